"""[train] timeout: a command that sleeps, a trainer that reports past the limit and a
trainer that hangs without reporting all end FAIL "timed out" within limit + grace, are
not retried, leave no process behind, and the worker goes on to the next trial.

Real studies on real SQLite and MLflow stores; real processes, found in /proc afterwards.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from hposvc.cli import main
from hposvc.script import DEFAULT_GRACE
from hposvc.spec import parse_spec

TIMEOUT = 2.0  # a command's
TRAINER_TIMEOUT = 5.0  # a trainer's limit includes starting its child process (~1.5 s on a busy machine)
# Sleeps of this many seconds mark the processes a trial started, so /proc can be searched.
MARK = 31337

COMMAND_SPEC = f"""
[study]
name = "slow-command"
command = ["sh", "-c", "sleep {{nap}} & sleep {{nap}}; echo 'hposvc: {{{{\\"epoch\\": 1, \\"val_loss\\": 1.0}}}}'"]
metric = "val_loss"
n_trials = 2
sampler = "grid"
pruner = "none"
[train]
timeout = "{TIMEOUT:g}s"
[space.params]
nap = [0, {MARK}]
"""

TRAINER = f'''
import subprocess, threading, time


def train(ctx):
    mode = ctx.params["mode"]
    if mode == "hang":  # e.g. a deadlocked DataLoader: a worker process, and no report ever
        subprocess.Popen(["sleep", "{MARK + 1}"])
        threading.Event().wait()
    epoch = 0
    while True:
        epoch += 1
        ctx.report(epoch, val_loss=1.0 / epoch)
        if mode == "ok" and epoch == 2:
            return {{"val_loss": 0.5}}
        time.sleep(0.1)
'''

TRAINER_SPEC = f"""
[study]
name = "slow-trainer"
trainer = "slowloop:train"
metric = "val_loss"
n_trials = 3
sampler = "grid"
pruner = "none"
[train]
timeout = {TRAINER_TIMEOUT:g}
[space.params]
mode = ["ok", "report", "hang"]
"""


def _marked_processes() -> list[str]:
    """Live processes a trial started: its marked sleeps and trainer children (zombies do not count)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if (str(MARK) in cmdline or "hposvc.isolate import _main" in cmdline) and "pytest" not in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data dir (SQLite and MLflow stores) for the module's studies: the stores are
    created and migrated once, not per test; each study has a name of its own."""
    return tmp_path_factory.mktemp("data")


@pytest.mark.slow
@pytest.mark.parametrize(("spec_text", "name", "limit", "states"), [
    (COMMAND_SPEC, "slow-command", TIMEOUT, {"COMPLETE": 1, "FAIL": 1}),
    (TRAINER_SPEC, "slow-trainer", TRAINER_TIMEOUT, {"COMPLETE": 1, "FAIL": 2}),
], ids=["command", "trainer"])
def test_trials_past_their_limit_fail_once_and_leave_nothing_running(tmp_path: Path, shared_data: Path, spec_text: str, name: str, limit: float, states: dict) -> None:
    (tmp_path / "slowloop.py").write_text(TRAINER)
    spec = tmp_path / f"{name}.toml"
    spec.write_text(spec_text)
    data = shared_data
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 0, result.output
    trials = [t for t in optuna.load_study(study_name=name, storage=f"sqlite:///{data / 'hposvc.db'}").trials if t.state.name != "WAITING"]
    # exact: one trial per grid point, the failed ones not retried, the worker went on
    assert {s: sum(t.state.name == s for t in trials) for s in states} == states and len(trials) == sum(states.values())
    for t in trials:
        if t.state.name == "FAIL":
            assert t.user_attrs["hposvc.reason"].startswith(f"TrialTimedOut: timed out after {limit:g} s"), t.user_attrs["hposvc.reason"]
            took = (t.datetime_complete - t.datetime_start).total_seconds()
            assert limit <= took < limit + DEFAULT_GRACE, took
    reported = [t for t in trials if t.params.get("mode") == "report"]
    assert all(len(t.intermediate_values) > 2 for t in reported)  # it ran until the limit, reporting
    assert _marked_processes() == []


def test_a_timeout_reads_seconds_and_durations() -> None:
    def timeout(value):
        return parse_spec({"study": {"name": "s", "task": "moons"}, "train": {"timeout": value}}).timeout

    assert (timeout(600), timeout("10m"), timeout("1h30m"), timeout("90s"), timeout(2.5)) == (600, 600, 5400, 90, 2.5)
    for bad in (0, -1, "soon", "", True, [1]):
        with pytest.raises(Exception, match=r"'train.timeout' parameter must be a number of seconds > 0"):
            timeout(bad)
    with_limit = parse_spec({"study": {"name": "s", "task": "moons"}, "train": {"timeout": "10m"}})
    assert with_limit.spec_hash == parse_spec({"study": {"name": "s", "task": "moons"}}).spec_hash  # like n_trials
    assert parse_spec(with_limit.to_dict()) == with_limit


def test_hposvc_s_own_loop_stops_at_the_next_batch_past_the_limit() -> None:
    import time

    from hposvc.config import TrialConfig
    from hposvc.context import TrialContext
    from hposvc.errors import TrialTimedOut
    from hposvc.tasks import load_task
    from hposvc.trial import train_trial

    task = load_task("moons", options={"n_samples": 200})
    train_trial(TrialContext(TrialConfig(epochs=1, width=8), on_report=lambda e, m: False, task=task))  # warm: imports, first build
    batches = []
    deadline = time.monotonic() + 1.0
    ctx = TrialContext(TrialConfig(epochs=500, width=8, batch_size=16), on_report=lambda e, m: False, task=task, timeout=1.0, deadline=deadline)
    real = ctx.check_time
    ctx.check_time = lambda: (batches.append(time.monotonic()), real())[1]  # type: ignore[method-assign]
    with pytest.raises(TrialTimedOut, match="timed out after 1 s"):
        train_trial(ctx)
    # checked after every batch, and stopped at the first one past the limit
    assert len(batches) > 10 and batches[-2] <= deadline < batches[-1] < deadline + 0.5


def test_a_worker_whose_trials_all_fail_stops_and_says_why(tmp_path: Path) -> None:
    spec = tmp_path / "broken.toml"
    spec.write_text('[study]\nname = "broken"\ncommand = ["sh", "-c", "echo no such file >&2; exit 3"]\nmetric = "val_loss"\nn_trials = 2\n')
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 1, result.output
    assert "the last 3 trials this worker ran all failed" in result.output and "exited with code 3" in result.output
    assert "no such file" in result.output and "run the study again" in result.output
    trials = optuna.load_study(study_name="broken", storage=f"sqlite:///{data / 'hposvc.db'}").trials
    assert sum(t.state.name == "FAIL" for t in trials) == 3  # each failed once, none retried
