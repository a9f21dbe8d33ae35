"""Bring your own training code: trainer functions and script commands, end to end.

Real studies on real SQLite and MLflow stores, real (tiny) training in the trainer, real
subprocesses for the commands and for the killed worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

import hposvc
from hposvc.cli import main
from hposvc.tracking import experiment_name

TRAINER = '''\
import math
import os
import time

import torch
import torch.nn.functional as F

import hposvc


def train(ctx):
    """A plain loop of the user's own, on the spec's task, reporting every epoch."""
    model = ctx.build_model()
    opt = ctx.build_optimizer(model.parameters())
    state = ctx.restore()
    start = 1
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["epoch"] + 1
    x, y = ctx.task.x_train.to(ctx.device), ctx.task.y_train.to(ctx.device)
    xv, yv = ctx.task.x_val.to(ctx.device), ctx.task.y_val.to(ctx.device)
    for epoch in range(start, ctx.config.epochs + 1):
        model.train()
        for i in range(0, len(x), ctx.config.batch_size):
            loss = F.cross_entropy(model(x[i : i + ctx.config.batch_size]), y[i : i + ctx.config.batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out = model(xv)
            acc = float((out.argmax(-1) == yv).float().mean())
            val_loss = float(F.cross_entropy(out, yv))
        if ctx.config.optimizer == "sgd" and epoch == 2:
            raise hposvc.TrialPruned("sgd is too slow here")  # the trainer's own decision
        ctx.report(epoch, val_accuracy=acc, val_loss=val_loss)
        ctx.checkpoint({"epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict()})
        time.sleep(float(os.environ.get("EPOCH_SLEEP", "0")))
    if ctx.config.optimizer == "adagrad":
        raise RuntimeError("adagrad is not allowed in this loop")
    if ctx.config.optimizer == "rmsprop":
        return {"val_accuracy": math.nan}
    return {"val_accuracy": acc, "val_loss": val_loss}
'''

TRAINER_SPEC = """\
[study]
name = "{name}"
task = "moons"
trainer = "myloop:train"
metric = "val_accuracy"
n_trials = {n_trials}
sampler = "{sampler}"
pruner = "none"
seed = 5

[train]
epochs = {epochs}
batch_size = 64

[model]
depth = 1
width = 16

[space]
optimizer = {optimizers}
"""


def _write_trainer(tmp_path: Path, *, name: str = "own", n_trials: int = 4, epochs: int = 3, optimizers: str = '["adam", "sgd"]', sampler: str = "grid") -> Path:
    (tmp_path / "myloop.py").write_text(TRAINER)
    spec = tmp_path / f"{name}.toml"
    spec.write_text(TRAINER_SPEC.format(name=name, n_trials=n_trials, epochs=epochs, optimizers=optimizers, sampler=sampler))
    return spec


def _runs(uri: str, name: str) -> dict[int, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment_name(name))
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'trial'", max_results=1000)
    return {int(r.data.tags["hposvc.trial_number"]): r for r in runs}


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_a_trainer_function_study_runs_end_to_end(tmp_path: Path) -> None:
    spec = _write_trainer(tmp_path, n_trials=4, optimizers='["adam", "sgd", "adagrad", "rmsprop"]')
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    storage, uri = f"sqlite:///{data / 'hposvc.db'}", f"sqlite:///{data / 'mlflow.db'}"
    trials = optuna.load_study(study_name="own", storage=storage).trials
    by_opt: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        if t.state.name != "WAITING":  # queued, never started: the grid ran out first
            by_opt.setdefault(t.user_attrs["hposvc.config"]["optimizer"], []).append(t)
    runs = _runs(uri, "own")

    (adam,) = by_opt["adam"]
    assert adam.state.name == "COMPLETE" and len(adam.intermediate_values) == 3
    # MLflow's per-epoch history is exactly what the trainer reported
    assert _history(uri, runs[adam.number].info.run_id, "val_accuracy") == sorted(adam.intermediate_values.items())
    assert runs[adam.number].info.status == "FINISHED"

    (sgd,) = by_opt["sgd"]
    assert sgd.state.name == "PRUNED" and runs[sgd.number].info.status == "KILLED"
    assert "sgd is too slow here" in sgd.user_attrs["hposvc.reason"]

    # errors fail the trial once (a retry would raise again), never the worker
    assert {t.state.name for t in by_opt["adagrad"]} == {"FAIL"} and len(by_opt["adagrad"]) == 1
    reason = by_opt["adagrad"][0].user_attrs["hposvc.reason"]
    assert reason == "RuntimeError: adagrad is not allowed in this loop"
    failed_run = runs[by_opt["adagrad"][0].number]
    assert failed_run.info.status == "FAILED"
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(failed_run.info.run_id)}
    assert "traceback.txt" in artifacts
    assert all("diverged" in t.user_attrs["hposvc.reason"] and "nan" in t.user_attrs["hposvc.reason"] for t in by_opt["rmsprop"])
    out = hposvc.trials("own", storage=storage)
    assert (out["state"] == "COMPLETE").sum() == 1


def test_a_trainer_that_does_not_exist_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    spec = _write_trainer(tmp_path, n_trials=2)
    spec.write_text(spec.read_text().replace("myloop:train", "myloop:missing"))
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 2
    assert "study.trainer" in result.output and "has no function 'missing'" in result.output
    assert not (data / "hposvc.db").exists()
    spec.write_text(spec.read_text().replace("myloop:missing", "myloop:train").replace("[study]", '[study]\npopulation = 4'))
    result = CliRunner().invoke(main, ["study", "validate", str(spec)])
    assert result.exit_code == 2 and "population" in result.output and "trainer" in result.output


SCRIPT_PY = '''\
import json, os, sys
from hposvc.script import report

lr = float(sys.argv[1].split("=")[1])
config = json.loads(os.environ["HPOSVC_CONFIG"])
assert config["lr"] == lr, (config["lr"], lr)
print("starting", flush=True)  # other output passes through to the trial's log
for epoch in range(1, 4):
    report(epoch, val_accuracy=min(1.0, 0.5 + lr * epoch), val_loss=1.0 / epoch)
if lr > 0.05:
    print("lr too high", file=sys.stderr)
    sys.exit(3)
'''

AWK = """\
#!/bin/sh
awk 'BEGIN { for (e = 1; e <= 4; e++) printf "hposvc: {\\"epoch\\": %d, \\"val_loss\\": %.3f}\\n", e, 1.0 / e }'
"""


def test_script_studies_in_python_and_awk(tmp_path: Path) -> None:
    (tmp_path / "train.py").write_text(SCRIPT_PY)
    (tmp_path / "train.sh").write_text(AWK)
    (tmp_path / "train.sh").chmod(0o755)
    specs = {
        "py": f"""
[study]
name = "py"
task = "moons"
command = ["{sys.executable}", "train.py", "--lr={{lr}}"]
metric = "val_accuracy"
n_trials = 3
sampler = "grid"
pruner = "none"
[space]
optimizer = "sgd"
lr = [0.01, 0.02, 0.1]
""",
        "awk": """
[study]
name = "awk"
task = "moons"
command = ["./train.sh"]
metric = "val_loss"
n_trials = 2
sampler = "random"
pruner = "none"
[space]
optimizer = "adam"
""",
    }
    data = tmp_path / "data"
    for name, text in specs.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(text))
        result = CliRunner().invoke(main, ["study", "run", str(path), "--data-dir", str(data), "--quiet", "--json"])
        assert result.exit_code == 0, result.output
    storage, uri = f"sqlite:///{data / 'hposvc.db'}", f"sqlite:///{data / 'mlflow.db'}"

    py = optuna.load_study(study_name="py", storage=storage).trials
    done = [t for t in py if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["hposvc.config"]["lr"] for t in done) == [0.01, 0.02]
    failed = [t for t in py if t.state.name == "FAIL"]
    assert failed and all("exit" in t.user_attrs["hposvc.reason"] and "lr too high" in t.user_attrs["hposvc.reason"] for t in failed)
    runs = _runs(uri, "py")
    for t in done:
        assert t.value == pytest.approx(0.5 + 3 * t.user_attrs["hposvc.config"]["lr"])
        assert _history(uri, runs[t.number].info.run_id, "val_accuracy") == sorted(t.intermediate_values.items())
        logs = {a.path for a in MlflowClient(uri).list_artifacts(runs[t.number].info.run_id, "logs")}
        assert logs == {"logs/stdout.txt", "logs/stderr.txt"}

    awk = optuna.load_study(study_name="awk", storage=storage).trials
    assert [t.state.name for t in awk] == ["COMPLETE", "COMPLETE"]
    assert all(t.value == pytest.approx(0.25) for t in awk)
    runs = _runs(uri, "awk")
    assert _history(uri, runs[awk[0].number].info.run_id, "val_loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(0.333)), (4, 0.25)]


def test_a_command_naming_a_field_its_optimizer_lacks_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(
        '[study]\nname = "bad"\ntask = "moons"\ncommand = ["sh", "-c", "echo {momentum}"]\n'
        '[space]\noptimizer = ["momentum", "adam"]\n'
    )
    result = CliRunner().invoke(main, ["study", "validate", str(spec)])
    assert result.exit_code == 2 and "momentum" in result.output and "adam" in result.output
    spec.write_text('[study]\nname = "bad"\ntask = "moons"\ncommand = ["no-such-program-here", "--lr={lr}"]\n')
    result = CliRunner().invoke(main, ["study", "validate", str(spec)])
    assert result.exit_code == 2 and "no-such-program-here" in result.output


@pytest.mark.slow
def test_a_killed_worker_s_trial_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    spec = _write_trainer(tmp_path, name="resume", n_trials=1, epochs=8, optimizers='"adam"', sampler="random")
    data = tmp_path / "data"
    storage = f"sqlite:///{data / 'hposvc.db'}"
    env = {**os.environ, "HPOSVC_HEARTBEAT_INTERVAL": "1", "HPOSVC_GRACE_PERIOD": "3", "EPOCH_SLEEP": "0.7", "PYTHONPATH": str(tmp_path)}
    assert CliRunner().invoke(main, ["study", "create", str(spec), "--data-dir", str(data)]).exit_code == 0
    cmd = [sys.executable, "-m", "hposvc.cli", "worker", "resume", "--data-dir", str(data), "--quiet"]
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "victim.stderr", "wb"))
    deadline = time.monotonic() + 180
    reported: dict[int, float] = {}
    while time.monotonic() < deadline and len(reported) < 3:
        assert victim.poll() is None, (tmp_path / "victim.stderr").read_text()
        time.sleep(0.2)
        try:
            reported = optuna.load_study(study_name="resume", storage=storage).trials[0].intermediate_values
        except (KeyError, IndexError):
            pass
    k = max(reported)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)

    survivor = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert survivor.returncode == 0, survivor.stderr
    trials = optuna.load_study(study_name="resume", storage=storage).trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # exact: one finished trial
    retry = trials[1]
    assert retry.system_attrs["failed_trial"] == 0
    first = min(retry.intermediate_values)
    assert first in (k, k + 1), f"the retry started at epoch {first}, the killed trial had reported {k}"
    assert max(retry.intermediate_values) == 8


def test_hposvc_s_own_loop_resumes_from_its_checkpoint_exactly() -> None:
    # [train] checkpoint_every: a run resumed from the epoch-2 checkpoint ends with the same
    # weights and curve as the run that was never interrupted (CPU, same seed).
    import torch

    from hposvc.config import TrialConfig
    from hposvc.tasks import load_task
    from hposvc.train import train

    task = load_task("moons", seed=1)
    config = TrialConfig(optimizer="momentum", lr=0.05, epochs=4, width=16, depth=1, checkpoint_every=2, schedule="cosine")
    saved: list[dict] = []
    whole = train(config, task, device="cpu", keep_model=True, checkpoint=lambda state: saved.append(__import__("copy").deepcopy(state)))
    assert [s["epoch"] for s in saved] == [2, 4]
    resumed = train(config, task, device="cpu", keep_model=True, resume=saved[0])
    assert [m.epoch for m in resumed.history] == [3, 4]
    assert resumed.history[-1].val_loss == pytest.approx(whole.history[-1].val_loss, rel=1e-6)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    from hposvc.spec import parse_spec

    spec = parse_spec({"study": {"name": "c", "task": "moons"}, "train": {"checkpoint_every": 5}})
    assert spec.dims["checkpoint_every"].values() == (5,)
