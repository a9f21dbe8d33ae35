"""The scale-out path survives its faults: real workers through a real ``hposvc storage serve``.

- the proxy killed with SIGKILL and restarted on its port, then PostgreSQL restarted behind
  it, in the middle of ``hposvc study run --workers 2 --storage grpc://…``: the study ends
  with exactly ``n_trials`` finished, none RUNNING, exit 0;
- a proxy that stays away past ``HPOSVC_STORAGE_OUTAGE_LIMIT``: the worker stops with exit
  75 and says why; the next worker finds its trial stale, fails it with a reason, retries it
  and finishes the study.

Trials are a command (a shell script that reports two epochs), so the time goes to the
faults, not to training. The soak (bench/soak.py, tests/test_soak.py) adds worker kills.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from click.testing import CliRunner

from hposvc.cli import main
from hposvc.storage import open_storage
from tests.conftest import PgServer, Proxy

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

CLI = [sys.executable, "-m", "hposvc.cli"]
# Each trial appends its number to $CLAIMS (a trial run twice would show twice), then
# reports two epochs.
TRIAL_SH = """\
#!/bin/sh
echo "$HPOSVC_TRIAL_NUMBER" >> "$CLAIMS"
sleep {pause}
echo 'hposvc: {{"epoch": 1, "val_loss": 0.5}}'
sleep {pause}
echo 'hposvc: {{"epoch": 2, "val_loss": 0.25}}'
"""
SPEC = """\
[study]
name = "{name}"
task = "moons"
command = ["./trial.sh"]
metric = "val_loss"
n_trials = {n}
sampler = "random"
pruner = "none"

[space]
optimizer = "adam"
"""


def _write_study(folder: Path, name: str, n: int, pause: float) -> Path:
    (folder / "trial.sh").write_text(TRIAL_SH.format(pause=pause))
    (folder / "trial.sh").chmod(0o755)
    (folder / f"{name}.toml").write_text(SPEC.format(name=name, n=n))
    return folder / f"{name}.toml"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "CLAIMS": str(tmp_path / "claims.txt"), "HPOSVC_HEARTBEAT_INTERVAL": "1", "HPOSVC_GRACE_PERIOD": "4", **extra}


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """Straight from the database, past the proxy; [] while the database is away."""
    storage = open_storage(url)
    try:
        return storage.get_all_trials(storage.get_study_id_from_name(name))
    except Exception:  # noqa: BLE001 (restarting: ask again)
        return []


def _done(trials: list) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)


def _wait_for(what: str, cond, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited with {proc.returncode} before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def _claims(tmp_path: Path) -> list[int]:
    return [int(line) for line in (tmp_path / "claims.txt").read_text().split()]


def test_study_run_survives_a_proxy_kill_and_a_database_restart(tmp_path: Path, postgres_url: str, pg_server: PgServer) -> None:
    n = 10
    spec = _write_study(tmp_path, "faults", n, pause=0.2)
    proxy = Proxy(postgres_url, tmp_path / "proxy.log")
    log = tmp_path / "run.log"
    try:
        proxy.storage().close()
        with open(log, "wb") as out:
            run = subprocess.Popen(
                [*CLI, "study", "run", str(spec), "--workers", "2", "--storage", proxy.url, "--data-dir", str(tmp_path / "data"), "--quiet"],
                stdout=subprocess.DEVNULL, stderr=out, env=_env(tmp_path), cwd=tmp_path,
            )
        # 1) kill -9 the proxy mid-study, restart it on the same port 3 s later
        _wait_for("3 trials", lambda: _done(_trials(postgres_url, "faults")) >= 3, run, log)
        proxy.kill()
        time.sleep(3)
        proxy.start()
        # 2) restart PostgreSQL behind the proxy
        _wait_for("6 trials", lambda: _done(_trials(postgres_url, "faults")) >= 6, run, log)
        pg_server.restart()
        assert run.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
        proxy.stop()
    trials = _trials(postgres_url, "faults")
    assert _done(trials) == n, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len(_claims(tmp_path)) == len(set(_claims(tmp_path))), "a trial ran twice"
    assert all(t.user_attrs.get("hposvc.reason") for t in trials if t.state == TrialState.FAIL)
    text = log.read_text()
    # Each outage is said once per process (the launcher and two workers), not once per call.
    assert 1 <= text.count("is unreachable (") <= 6, text
    assert text.count("is unreachable (") == text.count("is reachable again after"), text


def test_an_outage_past_the_limit_stops_the_worker_and_the_next_one_retries_its_trial(tmp_path: Path) -> None:
    spec = _write_study(tmp_path, "limit", 2, pause=0.5)
    db = f"sqlite:///{tmp_path / 'limit.db'}"
    proxy = Proxy(db, tmp_path / "proxy.log")
    log = tmp_path / "first.log"
    try:
        proxy.storage().close()
        common = ["--storage", proxy.url, "--data-dir", str(tmp_path / "data"), "--quiet"]
        created = CliRunner().invoke(main, ["study", "create", str(spec), *common[:-1]])
        assert created.exit_code == 0, created.output
        with open(log, "wb") as out:
            first = subprocess.Popen(
                [*CLI, "worker", "limit", *common, "--worker-id", "first"],
                stdout=subprocess.DEVNULL, stderr=out, env=_env(tmp_path, HPOSVC_STORAGE_OUTAGE_LIMIT="3"), cwd=tmp_path,
            )
        running = lambda: [t for t in _trials(db, "limit") if t.state == TrialState.RUNNING and t.user_attrs.get("hposvc.worker") == "first"]  # noqa: E731
        _wait_for("the first worker's trial", running, first, log)
        held = running()[0].number
        proxy.kill()  # and it stays away past the limit
        assert first.wait(timeout=60) == 75, log.read_text()[-3000:]
        said = log.read_text().strip().splitlines()[-1]
        assert said.startswith(f"Error: the study storage {proxy.url} has been unreachable for "), said
        assert "past the outage limit of 3 s (HPOSVC_STORAGE_OUTAGE_LIMIT)" in said and said.endswith(
            "This worker stops; its running trials are failed and retried by the next worker that finds them stale."
        ), said
        assert [t.state for t in _trials(db, "limit") if t.number == held] == [TrialState.RUNNING]
        # The proxy is back; the next worker notices the stale trial, fails it, retries it.
        proxy.start()
        proxy.storage().close()
        second = subprocess.run([*CLI, "worker", "limit", *common, "--worker-id", "second"], capture_output=True, text=True, env=_env(tmp_path, HPOSVC_GRACE_PERIOD="2"), cwd=tmp_path, timeout=180)
        assert second.returncode == 0, second.stderr[-3000:]
    finally:
        proxy.stop()
    trials = _trials(db, "limit")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert _done(trials) == 2, [(t.number, t.state.name) for t in trials]
    failed = next(t for t in trials if t.number == held)
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["hposvc.reason"].startswith("first stopped beating for 2 s"), failed.user_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == held]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
