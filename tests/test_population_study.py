"""Population execution through the study service: grouping, own trials and runs, faults."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from hposvc.config import TrialConfig
from hposvc.spec import parse_spec
from hposvc.study import prepare_study
from hposvc.worker import run_worker
from hposvc.tracking import experiment_name

pytestmark = pytest.mark.slow  # every test runs a real study

SPEC = {
    "study": {"name": "pop", "task": "digits", "n_trials": 8, "sampler": "random", "pruner": "none", "seed": 0},
    "train": {"epochs": 3, "batch_size": 64},
    "model": {"depth": 1, "width": 32},
    "space": {
        "optimizer": ["adam", "momentum", "sgd"],
        "lr": {"low": 1e-3, "high": 200.0, "log": True},
        "norm": ["none", "batch"],
        "activation": ["relu", "tanh"],
        "optimizer_defaults": "fixed",
    },
}

# Fixed configs: two groups of three (adam/none/relu and momentum/batch/tanh), one member
# of the first diverging (Adam at lr 100), and two loners (sgd) that fit no group of their own structure.
CONFIGS = [
    TrialConfig(optimizer="adam", lr=lr, norm="none", activation="relu", epochs=3, batch_size=64, depth=1, width=32)
    for lr in (1e-3, 1e-2, 100.0)
] + [
    TrialConfig(optimizer="momentum", lr=lr, norm="batch", activation="tanh", epochs=3, batch_size=64, depth=1, width=32)
    for lr in (1e-2, 3e-2, 1e-1)
] + [
    TrialConfig(optimizer="sgd", lr=0.05, norm="none", activation="tanh", epochs=3, batch_size=64, depth=1, width=32),
    TrialConfig(optimizer="sgd", lr=0.05, norm="batch", activation="relu", epochs=3, batch_size=64, depth=1, width=32),
]


def _run(tmp_path: Path, name: str, population: int | None) -> optuna.Study:
    spec = parse_spec({**SPEC, "study": {**SPEC["study"], "name": name}})
    storage = f"sqlite:///{tmp_path / 'hposvc.db'}"
    study = prepare_study(spec, storage=storage, enqueue=CONFIGS)
    run_worker(study, spec=spec, storage=storage, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", data_dir=tmp_path, device="cpu", population=population)
    return optuna.load_study(study_name=name, storage=storage)


def test_population_matches_sequential_with_own_trials_and_runs(tmp_path: Path) -> None:
    seq = _run(tmp_path, "seq", None)
    pop = _run(tmp_path, "pop", 8)
    by_lr = lambda study: {(t.user_attrs["hposvc.config"]["optimizer"], t.user_attrs["hposvc.config"]["norm"], t.user_attrs["hposvc.config"]["lr"]): t for t in study.trials}  # noqa: E731
    s, p = by_lr(seq), by_lr(pop)
    assert s.keys() == p.keys() and len(p) == 8
    for key, t in p.items():
        assert t.state == s[key].state, key
        if t.state.name == "COMPLETE":
            # Stated tolerance: batched kernels sum in another order (~1e-4 on accuracy).
            assert t.value == pytest.approx(s[key].value, abs=2e-3), key
            assert len(t.intermediate_values) == 3
    diverged = p[("adam", "none", 100.0)]
    assert diverged.state.name == "PRUNED" and diverged.user_attrs["hposvc.reason"].startswith("diverged")
    assert sum(t.state.name == "COMPLETE" for t in pop.trials) == 7  # only the diverged member stopped
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment_name("pop"))
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`hposvc.role` = 'trial'")
    assert sorted(int(r.data.tags["hposvc.trial_number"]) for r in runs) == sorted(t.number for t in pop.trials)
    for r in runs:
        t = pop.trials[int(r.data.tags["hposvc.trial_number"])]
        assert r.data.tags["hposvc.state"] == t.state.name
        assert r.data.params["lr"] == str(t.user_attrs["hposvc.config"]["lr"])
        assert [m.value for m in client.get_metric_history(r.info.run_id, "val_accuracy")] == pytest.approx(
            [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        )


def test_population_worker_killed_trials_are_retried(tmp_path: Path) -> None:
    # One structure (only lr varies), so the worker trains all four as one population.
    spec_dict = {
        **SPEC,
        "study": {**SPEC["study"], "name": "popkill", "n_trials": 4},
        "train": {"epochs": 250, "batch_size": 64},  # long enough to be seen in flight
        "space": {"optimizer": "momentum", "lr": {"low": 1e-3, "high": 1e-1, "log": True}, "norm": "none", "activation": "relu"},
    }
    spec = parse_spec(spec_dict)
    storage = f"sqlite:///{tmp_path / 'hposvc.db'}"
    prepare_study(spec, storage=storage)
    env = {**os.environ, "HPOSVC_HEARTBEAT_INTERVAL": "1", "HPOSVC_GRACE_PERIOD": "3"}
    cmd = [sys.executable, "-m", "hposvc.cli", "worker", "popkill", "--storage", storage, "--data-dir", str(tmp_path), "--quiet"]
    victim = subprocess.Popen([*cmd, "--population", "4", "--worker-id", "victim"], env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "victim.stderr", "wb"))
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.3)
        assert victim.poll() is None, "the victim finished before it could be killed; make its trials longer"
        running = [t for t in optuna.load_study(study_name="popkill", storage=storage).trials if t.state.name == "RUNNING" and t.intermediate_values]
        if len(running) >= 2:
            break
    else:
        raise AssertionError("the population never started")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    spec_short = subprocess.run([*cmd, "--worker-id", "survivor"], env=env, capture_output=True, text=True, timeout=600)
    assert spec_short.returncode == 0, spec_short.stderr
    trials = optuna.load_study(study_name="popkill", storage=storage).trials
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials) == 4
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) >= 2
    for t in failed:
        retry = [r for r in trials if r.system_attrs.get("failed_trial") == t.number]
        assert len(retry) == 1 and retry[0].params == t.params
