"""Script trials (hposvc.script) with real subprocesses: a Python script using report(),
sh and awk scripts that only print metric lines, pruning, failures, and no orphans.

Liveness is checked with ``ps``: a process that is gone, or a zombie waiting for its
parent to reap it, no longer runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hposvc.config import TrialConfig
from hposvc.errors import Interrupted, InvalidInputError
from hposvc.script import (
    LINE_PREFIX,
    ScriptFailed,
    check_command,
    fields_in,
    parse_line,
    render,
    report,
    run,
)

ENV = dict(os.environ)


def running(pid: int) -> bool:
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip().startswith("Z")


def script(tmp_path: Path, body: str, name: str = "train.sh") -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def collect(stop_at: int | None = None):
    seen: list[tuple[int, dict[str, float]]] = []

    def on_metrics(epoch: int, metrics: dict[str, float]) -> bool:
        seen.append((epoch, metrics))
        return stop_at is not None and epoch >= stop_at

    return seen, on_metrics


# -- metric lines --------------------------------------------------------------------


def test_parse_line_reads_a_metric_line_and_passes_others() -> None:
    assert parse_line('hposvc: {"epoch": 3, "val_accuracy": 0.91, "val_loss": 0.3}') == (3, {"val_accuracy": 0.91, "val_loss": 0.3})
    assert parse_line('hposvc: {"epoch": 1, "steps": 100}') == (1, {"steps": 100.0})
    for other in ("epoch 3: val_accuracy 0.91", "", "hposvc:no-space", ' hposvc: {"epoch": 1}'):
        assert parse_line(other) is None


@pytest.mark.parametrize(
    "line, why",
    [
        ('hposvc: {"epoch": 3, "acc": }', "not JSON"),
        ("hposvc: [3, 0.9]", "JSON object is needed"),
        ('hposvc: {"acc": 0.9}', 'no "epoch"'),
        ('hposvc: {"epoch": 0, "acc": 0.9}', '"epoch" must be an integer >= 1'),
        ('hposvc: {"epoch": "3", "acc": 0.9}', '"epoch" must be an integer >= 1'),
        ('hposvc: {"epoch": 2.5, "acc": 0.9}', '"epoch" must be an integer >= 1'),
        ('hposvc: {"epoch": 3, "acc": "high"}', "metric 'acc' must be a number"),
        ('hposvc: {"epoch": 3, "acc": true}', "metric 'acc' must be a number"),
        ('hposvc: {"epoch": 3, "loss": NaN}', "metric 'loss' is nan, not a finite number"),
    ],
)
def test_a_malformed_metric_line_names_the_line_and_the_problem(line: str, why: str) -> None:
    with pytest.raises(ScriptFailed) as e:
        parse_line(line)
    assert repr(line) in str(e.value)
    assert why in str(e.value)
    assert '"epoch"' in str(e.value)  # and says what a good line is


def test_report_prints_the_line_parse_line_reads(capsys: pytest.CaptureFixture[str]) -> None:
    report(2, val_accuracy=1 / 3, val_loss=0.5)
    out = capsys.readouterr().out
    assert out == 'hposvc: {"epoch": 2, "val_accuracy": 0.3333333333333333, "val_loss": 0.5}\n'
    assert parse_line(out.rstrip("\n")) == (2, {"val_accuracy": 1 / 3, "val_loss": 0.5})


def test_report_refuses_what_parse_line_would_refuse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InvalidInputError, match=r"'report' parameter .*\"epoch\" must be an integer >= 1, got 0"):
        report(0, acc=0.5)
    with pytest.raises(InvalidInputError, match="Metric 'loss' is nan, not a finite number"):
        report(1, loss=float("nan"))
    assert capsys.readouterr().out == ""


def test_importing_report_loads_nothing_heavy() -> None:
    code = "import sys; from hposvc.script import report; print(sorted(m for m in ('torch', 'optuna', 'mlflow', 'sqlalchemy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# -- the command ---------------------------------------------------------------------

COMMAND = ["python", "train.py", "--optimizer={optimizer}", "--lr={lr}", "--epochs={epochs}", "--tag={{{norm}}}-{{x}}"]


def test_fields_in_and_render_fill_placeholders_and_keep_escaped_braces() -> None:
    assert fields_in(COMMAND) == {"optimizer", "lr", "epochs", "norm"}
    config = TrialConfig(optimizer="sgd", lr=1 / 3, epochs=7, norm="batch")
    assert render(COMMAND, config) == [
        "python",
        "train.py",
        "--optimizer=sgd",
        "--lr=0.3333333333333333",  # repr: every digit of the float
        "--epochs=7",
        "--tag={batch}-{x}",
    ]
    assert render(["{lr}"], TrialConfig(optimizer="adam", lr=3e-4)) == ["0.0003"]
    assert fields_in(["echo", "{{lr}}"]) == set()


@pytest.mark.parametrize("arg", ["--lr={learning_rate}", "--cfg={extra}", "--x={lr:.3f}", "--x={", "--x=}"])
def test_a_placeholder_that_is_not_a_field_names_the_argument_and_the_fields(arg: str) -> None:
    for call in (lambda: fields_in(["train", arg]), lambda: render(["train", arg], TrialConfig())):
        with pytest.raises(InvalidInputError) as e:
            call()
        message = str(e.value)
        assert f"the 'command[1]' parameter must be an argument whose {{placeholders}} are TrialConfig fields (optimizer, lr, momentum" in message
        assert f"Got {arg!r} instead" in message
        assert "{{ and }}" in message


def test_a_field_this_trial_does_not_set_names_the_field_and_the_optimizer() -> None:
    with pytest.raises(InvalidInputError) as e:
        render(["train", "--momentum={momentum}"], TrialConfig(optimizer="adam"), source="studies/s.toml")
    message = str(e.value)
    assert message.startswith("studies/s.toml: the 'command[1]' parameter")
    assert "Optimizer 'adam' does not use 'momentum' (it uses lr, beta1, beta2, eps, weight_decay)" in message
    assert render(["--momentum={momentum}"], TrialConfig(optimizer="momentum")) == ["--momentum=0.9"]
    with pytest.raises(InvalidInputError, match=r"'init_std' only applies when init is one of \('normal', 'uniform'\), and this trial has init='he_normal' \(optimizer 'adam'\)"):
        render(["--std={init_std}"], TrialConfig(optimizer="adam"))


def test_check_command_finds_the_program(tmp_path: Path) -> None:
    script(tmp_path, "exit 0\n")
    check_command([sys.executable, "x.py"], cwd=tmp_path)
    check_command(["sh", "-c", "true"], cwd=tmp_path)  # on PATH
    check_command(["./train.sh", "--lr={lr}"], cwd=tmp_path)  # relative to the spec's folder
    check_command(["{optimizer}.sh"], cwd=tmp_path)  # known only per trial


@pytest.mark.parametrize(
    "command, message",
    [
        ([], "the 'command' parameter must be a non-empty list of strings. Got []"),
        ("python train.py", "the 'command' parameter must be a non-empty list of strings. Got 'python train.py'"),
        (["python", 3], "the 'command[1]' parameter must be a string. Got 3"),
        (["no-such-program-hposvc"], "an executable program on PATH. Got 'no-such-program-hposvc' instead. command not found: 'no-such-program-hposvc'"),
        (["./missing.sh"], "an executable program relative to"),
        (["./data.txt"], "command not found: './data.txt'. Give its path"),  # not executable
        (["train", "--lr={LR}"], "'command[1]' parameter must be an argument whose {placeholders}"),
    ],
)
def test_check_command_refuses_with_the_message_shape(tmp_path: Path, command, message: str) -> None:
    (tmp_path / "data.txt").write_text("1\n")
    with pytest.raises(InvalidInputError) as e:
        check_command(command, cwd=tmp_path, source="s.toml")
    assert str(e.value).startswith("s.toml: ")
    assert message in str(e.value)


# -- running scripts -----------------------------------------------------------------


def test_a_python_script_reports_with_report(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(
        textwrap.dedent(
            """
            import json, os, sys
            from hposvc.script import report
            lr = float(sys.argv[1].split("=")[1])
            print("starting with", lr, os.environ["HPOSVC_TRIAL_DIR"])
            for epoch in range(1, 4):
                report(epoch, val_accuracy=epoch * lr, val_loss=1 / epoch)
            print("oops", file=sys.stderr)
            """
        )
    )
    command = render([sys.executable, "train.py", "--lr={lr}"], TrialConfig(optimizer="sgd", lr=0.25))
    seen, on_metrics = collect()
    echoed: list[str] = []
    result = run(command, cwd=tmp_path, env={**ENV, "HPOSVC_TRIAL_DIR": "/trial/7"}, on_metrics=on_metrics, log_dir=tmp_path / "log", echo=echoed.append)
    expected = [(e, {"val_accuracy": e * 0.25, "val_loss": 1 / e}) for e in (1, 2, 3)]
    assert (result.status, result.returncode) == ("completed", 0)
    assert seen == result.epochs == expected
    assert result.final == {"val_accuracy": 0.75, "val_loss": 1 / 3}
    assert echoed == ["starting with 0.25 /trial/7", "oops"]  # everything but metric lines
    stdout = result.stdout_path.read_text().splitlines()
    assert stdout[0] == "starting with 0.25 /trial/7" and len(stdout) == 4
    assert json.loads(stdout[3].removeprefix(LINE_PREFIX)) == {"epoch": 3, "val_accuracy": 0.75, "val_loss": 1 / 3}
    assert result.stderr_path.read_text() == "oops\n"
    assert 0 < result.duration_s < 30


def test_an_awk_script_that_only_prints_metric_lines(tmp_path: Path) -> None:
    program = 'BEGIN { for (e = 1; e <= 4; e++) printf "hposvc: {\\"epoch\\": %d, \\"val_accuracy\\": %.2f}\\n", e, e / 10 }'
    seen, on_metrics = collect()
    result = run(["awk", program], cwd=tmp_path, env=ENV, on_metrics=on_metrics, log_dir=tmp_path)
    assert result.status == "completed"
    assert seen == [(e, {"val_accuracy": e / 10}) for e in (1, 2, 3, 4)]
    assert result.final == {"val_accuracy": 0.4}


def test_final_keeps_the_latest_value_of_each_metric(tmp_path: Path) -> None:
    # a last line with test metrics only: final still has the validation metric
    script(tmp_path, """\
        echo 'hposvc: {"epoch": 1, "val_accuracy": 0.5}'
        echo 'hposvc: {"epoch": 2, "val_accuracy": 0.6}'
        printf 'hposvc: {"epoch": 2, "test_accuracy": 0.55}'
        """)  # fmt: skip
    seen, on_metrics = collect()
    result = run(["./train.sh"], cwd=tmp_path, env=ENV, on_metrics=on_metrics, log_dir=tmp_path / "log")
    assert result.final == {"val_accuracy": 0.6, "test_accuracy": 0.55}  # the last line had no newline
    assert len(seen) == 3


PRUNABLE = """\
    trap '' TERM          # this script and its sleep ignore SIGTERM: only SIGKILL ends them
    sleep 1000 &
    echo $$ $! > pids
    e=1
    while true; do
        echo "hposvc: {\\"epoch\\": $e, \\"acc\\": 0.$e}"
        echo "epoch $e done" >&2
        e=$((e + 1))
        sleep 0.05
    done
    """


def test_prune_kills_the_group_within_the_grace_period(tmp_path: Path) -> None:
    script(tmp_path, PRUNABLE)
    seen, on_metrics = collect(stop_at=2)
    result = run(["./train.sh"], cwd=tmp_path, env=ENV, on_metrics=on_metrics, grace=0.5, log_dir=tmp_path / "log")
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert not any(running(p) for p in pids)  # the script and the sleep it spawned
    assert (result.status, result.returncode) == ("pruned", -signal.SIGKILL)
    assert [e for e, _ in result.epochs] == [1, 2]  # nothing after the prune counts
    assert 0.5 <= result.duration_s < 5


def test_a_script_that_honours_sigterm_stops_without_waiting_out_the_grace(tmp_path: Path) -> None:
    script(tmp_path, PRUNABLE.replace("trap '' TERM", "trap 'echo bye >&2; exit 0' TERM"))

    def on_metrics(epoch: int, metrics: dict[str, float]) -> bool:
        # Prune once the background sleep has exec'd: a SIGTERM that lands between its
        # fork and exec runs the shell's trap in the child and is lost, and the sleep then
        # rightly waits out the grace until SIGKILL.
        background = int((tmp_path / "pids").read_text().split()[1])
        return subprocess.run(["ps", "-o", "comm=", "-p", str(background)], capture_output=True, text=True).stdout.strip() == "sleep"

    result = run(["./train.sh"], cwd=tmp_path, env=ENV, on_metrics=on_metrics, grace=20, log_dir=tmp_path / "log")
    assert result.status == "pruned"
    assert result.duration_s < 10  # far less than the grace
    assert not any(running(int(p)) for p in (tmp_path / "pids").read_text().split())


def test_a_failing_script_raises_with_the_exit_code_and_the_stderr_tail(tmp_path: Path) -> None:
    script(tmp_path, """\
        echo 'hposvc: {"epoch": 1, "acc": 0.1}'
        for i in $(seq 1 30); do echo "stderr line $i" >&2; done
        exit 3
        """)  # fmt: skip
    seen, on_metrics = collect()
    with pytest.raises(ScriptFailed) as e:
        run(["./train.sh"], cwd=tmp_path, env=ENV, on_metrics=on_metrics, log_dir=tmp_path / "log")
    message = str(e.value)
    assert message.startswith("the script exited with code 3; the last 20 lines of its stderr:\nstderr line 11\n")
    assert message.endswith("stderr line 30") and "stderr line 10\n" not in message
    assert e.value.returncode == 3 and len(e.value.stderr_tail) == 20
    assert len((tmp_path / "log" / "stderr.txt").read_text().splitlines()) == 30
    assert seen == [(1, {"acc": 0.1})]


def test_a_script_killed_by_a_signal_says_which(tmp_path: Path) -> None:
    script(tmp_path, "kill -SEGV $$\n")
    with pytest.raises(ScriptFailed, match=r"the script was killed by SIGSEGV; the last 0 lines of its stderr:\n\(stderr was empty\)"):
        run(["./train.sh"], cwd=tmp_path, env=ENV, on_metrics=lambda e, m: False, log_dir=tmp_path)


def test_a_malformed_metric_line_fails_the_trial_and_stops_the_script(tmp_path: Path) -> None:
    script(tmp_path, """\
        echo $$ > pids
        echo 'hposvc: {"epoch": 1, "acc": 0.1}'
        echo 'hposvc: {"epoch": 2, "acc": 0.2,}'
        sleep 1000
        """)  # fmt: skip
    seen, on_metrics = collect()
    t0 = time.monotonic()
    with pytest.raises(ScriptFailed, match=r"""bad metric line from the script: 'hposvc: \{"epoch": 2, "acc": 0.2,\}': not JSON"""):
        run(["./train.sh"], cwd=tmp_path, env=ENV, on_metrics=on_metrics, grace=5, log_dir=tmp_path / "log")
    assert time.monotonic() - t0 < 10
    assert not running(int((tmp_path / "pids").read_text()))
    assert seen == [(1, {"acc": 0.1})]


@pytest.mark.parametrize("error", [KeyboardInterrupt(), Interrupted(signal.SIGTERM), RuntimeError("storage went away")])
def test_an_exception_from_on_metrics_kills_the_group_before_it_propagates(tmp_path: Path, error: BaseException) -> None:
    script(tmp_path, PRUNABLE)

    def on_metrics(epoch: int, metrics: dict[str, float]) -> bool:
        raise error

    with pytest.raises(type(error)):
        run(["./train.sh"], cwd=tmp_path, env=ENV, on_metrics=on_metrics, grace=0.3, log_dir=tmp_path / "log")
    assert not any(running(int(p)) for p in (tmp_path / "pids").read_text().split())


@pytest.mark.parametrize("redirect", ["", ">/dev/null 2>&1"])
def test_a_background_process_left_behind_is_stopped_when_the_script_exits(tmp_path: Path, redirect: str) -> None:
    # With the pipes inherited, reading would never see their end; without, the process
    # would outlive the trial. Either way: completed, and the sleep is gone.
    script(tmp_path, f"""\
        sleep 1000 {redirect} &
        echo $! > pids
        echo 'hposvc: {{"epoch": 1, "acc": 0.1}}'
        """)  # fmt: skip
    result = run(["./train.sh"], cwd=tmp_path, env=ENV, on_metrics=lambda e, m: False, grace=5, log_dir=tmp_path / "log")
    assert result.status == "completed" and result.final == {"acc": 0.1}
    assert not running(int((tmp_path / "pids").read_text()))
    assert result.duration_s < 10


def test_a_command_that_cannot_start_is_a_script_failure(tmp_path: Path) -> None:
    (tmp_path / "train.sh").write_text("echo hi\n")  # not executable
    with pytest.raises(ScriptFailed, match="could not start the command .*Permission denied"):
        run(["./train.sh"], cwd=tmp_path, env=ENV, on_metrics=lambda e, m: False, log_dir=tmp_path)


def test_sigterm_to_the_worker_leaves_no_orphans(tmp_path: Path) -> None:
    # A real worker-like process: stop signals raise (hposvc.interrupts), run() is in
    # flight. SIGTERM to it must take the script and its grandchild down too.
    script(tmp_path, PRUNABLE)
    (tmp_path / "worker.py").write_text(
        textwrap.dedent(
            """
            import os, sys, threading
            from pathlib import Path
            from hposvc.errors import Interrupted
            from hposvc.interrupts import signals_raise
            from hposvc.script import run
            def on_metrics(epoch, metrics):
                print(epoch, flush=True)
                return False
            with signals_raise(threading.Event()):
                try:
                    run(["./train.sh"], cwd=".", env=dict(os.environ), on_metrics=on_metrics, grace=0.3, log_dir=Path("log"))
                except Interrupted as e:
                    sys.exit(e.exit_code)
            """
        )
    )
    worker = subprocess.Popen([sys.executable, "worker.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "1\n"  # the script is running
        pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
        assert all(running(p) for p in pids)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 128 + signal.SIGTERM
        assert not any(running(p) for p in pids)
    finally:
        worker.kill()
        worker.wait()


# -- placeholders are checked against the spec's space, not TrialConfig's defaults ----------


def _command_spec(command: list[str], *, space: dict | None = None, train: dict | None = None):
    from hposvc.spec import parse_spec

    data = {"study": {"name": "s", "task": "moons", "command": [sys.executable, *command]}, "space": space or {}, "train": train or {}}
    return parse_spec(data, source="s.toml")


@pytest.mark.parametrize(
    ("arg", "train", "space"),
    [
        ("--warmup={warmup}", {"schedule": "warmup_cosine"}, {}),
        ("--std={init_std}", {}, {"init": "normal"}),
        ("--std={init_std}", {}, {"init": ["normal", "uniform"]}),
        ("--groups={norm_groups}", {}, {"norm": "group"}),
        ("--momentum={momentum}", {}, {"optimizer": ["momentum", "nesterov"]}),
    ],
)
def test_a_placeholder_the_spec_sets_is_accepted(arg: str, train: dict, space: dict) -> None:
    from hposvc.plugins import check_spec_code

    check_spec_code(_command_spec(["-c", "pass", arg], train=train, space=space))


@pytest.mark.parametrize(
    ("arg", "train", "space", "says"),
    [
        ("--warmup={warmup}", {}, {}, "'warmup' only applies when schedule is one of ('warmup_cosine',)"),
        ("--std={init_std}", {}, {"init": ["normal", "he_normal"]}, "init='he_normal'"),
        ("--momentum={momentum}", {}, {"optimizer": ["sgd", "momentum"]}, "Optimizer 'sgd' does not use 'momentum'"),
        ("--family={family}", {}, {}, "It is not set for this trial"),
    ],
)
def test_a_placeholder_some_trial_leaves_unset_is_refused(arg: str, train: dict, space: dict, says: str) -> None:
    from hposvc.plugins import check_spec_code

    with pytest.raises(InvalidInputError) as e:
        check_spec_code(_command_spec(["-c", "pass", arg], train=train, space=space))
    assert str(e.value).startswith("s.toml: the 'command[3]' parameter"), str(e.value)
    assert says in str(e.value), str(e.value)


# -- [metrics] patterns on unmodified output --------------------------------------------------

WAITS = """
import os, sys, time
for epoch in (1, 2):
    print(f"\\x1b[1mepoch {epoch}\\x1b[0m | val_loss: {-7.5e-05 * epoch:.1e}")  # no flush: PYTHONUNBUFFERED does it
    sys.stderr.write(f"\\r{epoch}/2 [====] loss=+1.2e-05\\r")
    deadline = time.time() + 20
    while not os.path.exists(f"go-{epoch}") and time.time() < deadline:
        time.sleep(0.02)  # the report must reach hposvc while the script still runs
    if not os.path.exists(f"go-{epoch}"):
        sys.exit(f"epoch {epoch} was not seen while the script ran")
"""


def test_each_match_is_a_report_while_the_script_runs(tmp_path: Path) -> None:
    (tmp_path / "fit.py").write_text(WAITS)
    seen: list[tuple[int, dict]] = []
    values: list[tuple[int, dict]] = []

    def on_metrics(epoch: int, metrics: dict) -> bool:
        seen.append((epoch, metrics))
        (tmp_path / f"go-{epoch}").touch()
        return False

    patterns = {"val_loss": r"val_loss:\s*([-+0-9.eE]+)", "loss": r"(?<!val_)loss=([-+0-9.eE]+)", "epoch": r"^epoch (\d+)"}
    result = run([sys.executable, "fit.py"], cwd=tmp_path, env={**ENV, "PYTHONUNBUFFERED": "1"}, on_metrics=on_metrics,
                 log_dir=tmp_path / "log", metric="val_loss", patterns=patterns, on_values=lambda s, v: values.append((s, v)))
    assert result.status == "completed"
    assert seen == [(1, {"val_loss": -7.5e-05}), (2, {"val_loss": -1.5e-04})]  # colours gone, signs and exponents read
    assert values == [(1, {"loss": 1.2e-05}), (2, {"loss": 1.2e-05})]  # the \r-drawn bar, at the epoch under way


def test_a_pattern_that_captures_no_number_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ScriptFailed, match=r"captured 'abc', which is not a number, in the line 'loss abc'"):
        run(["sh", "-c", "echo loss abc"], cwd=tmp_path, env=ENV, on_metrics=lambda e, m: False, log_dir=tmp_path / "log",
            metric="loss", patterns={"loss": r"loss (\w+)"})
