"""The scale-out path survives its faults: real workers through a real ``hposvc storage serve``.

- the proxy killed with SIGKILL and restarted on its port, then PostgreSQL restarted behind
  it, in the middle of ``hposvc study run --workers 2 --storage grpc://…``: the study ends
  with exactly ``n_trials`` finished, none RUNNING, exit 0;
- an outage longer than the grace period: a live trial is not failed as stale;
- a proxy that stays away past ``HPOSVC_STORAGE_OUTAGE_LIMIT``: the worker stops with exit
  75 and says why; the other worker finds its trial stale, fails it with a reason, retries
  it and finishes the study.

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

from bench.soak import SPEC  # the soak's command study, at this test's size
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


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_until_settled(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``proc`` has finished starting: under 0.2 s of CPU in the last second."""
    deadline = time.monotonic() + timeout
    last = _cpu_seconds(proc.pid)
    while time.monotonic() < deadline:
        time.sleep(1)
        assert proc.poll() is None, f"exited with {proc.returncode}"
        now = _cpu_seconds(proc.pid)
        if now - last < 0.2:
            return
        last = now
    pytest.fail(f"process {proc.pid} still busy after {timeout:.0f} s")


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
    # the epochs of trials in flight during the outages landed (through the write-behind queue)
    assert all(t.intermediate_values == {1: 0.5, 2: 0.25} for t in trials if t.state == TrialState.COMPLETE)
    text = log.read_text()
    # Each outage is said once per process (the launcher and two workers), not once per call.
    assert 1 <= text.count("is unreachable (") <= 6, text
    assert text.count("is unreachable (") == text.count("is reachable again after"), text


def test_a_live_trial_outlives_an_outage_and_a_worker_past_the_limit_stops_and_is_retried(tmp_path: Path) -> None:
    # Trial 0 trains for a long time in worker "first" while worker "idle" has nothing to
    # claim and looks for stale trials every second (grace 4 s).
    spec = _write_study(tmp_path, "limit", 1, pause=0.1)
    # trial 0 trains until the test creates claims.txt.release
    hold = '[ "$HPOSVC_TRIAL_NUMBER" = 0 ] && while [ ! -e "$CLAIMS.release" ]; do sleep 0.1; done\n'
    (tmp_path / "trial.sh").write_text(TRIAL_SH.format(pause=0.1).replace("sleep 0.1\n", hold, 1))
    db = f"sqlite:///{tmp_path / 'limit.db'}"
    proxy = Proxy(db, tmp_path / "proxy.log")
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "idle")}
    procs: dict[str, subprocess.Popen] = {}

    def worker(name: str, **env: str) -> subprocess.Popen:
        with open(logs[name], "wb") as out:
            procs[name] = subprocess.Popen(
                [*CLI, "worker", "limit", *common, "--quiet", "--worker-id", name],
                stdout=subprocess.DEVNULL, stderr=out, env=_env(tmp_path, **env), cwd=tmp_path,
            )
        return procs[name]

    def trial0() -> optuna.trial.FrozenTrial | None:
        return next((t for t in _trials(db, "limit") if t.number == 0), None)

    try:
        proxy.storage().close()
        common = ["--storage", proxy.url, "--data-dir", str(tmp_path / "data")]
        created = CliRunner().invoke(main, ["study", "create", str(spec), *common])
        assert created.exit_code == 0, created.output
        first = worker("first", HPOSVC_STORAGE_OUTAGE_LIMIT="10")
        _wait_for("trial 0 to run", lambda: (t := trial0()) is not None and t.state == TrialState.RUNNING and t.user_attrs.get("hposvc.worker") == "first", first, logs["first"])
        idle = worker("idle", HPOSVC_GRACE_PERIOD="4")
        _wait_until_settled(idle)  # past its imports, looking for stale trials every second
        # 1) An outage longer than the grace period, shorter than the limit: the live trial
        #    is not failed, though its heartbeat could not land for longer than the grace.
        proxy.kill()
        time.sleep(6)
        proxy.start()
        proxy.storage().close()
        beat = trial0().system_attrs["hposvc.heartbeat"]
        time.sleep(5)  # more than the grace period, with the storage back
        assert trial0().state == TrialState.RUNNING and trial0().system_attrs["hposvc.heartbeat"] != beat
        assert first.poll() is None and idle.poll() is None
        # 2) An outage past first's limit (10 s): it stops with exit code 75 and says why.
        proxy.kill()
        (tmp_path / "claims.txt.release").touch()  # trial 0 ends; its result cannot be stored
        assert first.wait(timeout=90) == 75, logs["first"].read_text()[-3000:]
        said = logs["first"].read_text().strip().splitlines()[-1]
        assert said.startswith(f"Error: the study storage {proxy.url} has been unreachable for "), said
        assert "past the outage limit of 10 s (HPOSVC_STORAGE_OUTAGE_LIMIT)" in said and said.endswith(
            "This worker stops; its running trials are failed and retried by the next worker that finds them stale."
        ), said
        assert trial0().state == TrialState.RUNNING  # nobody could fail it yet
        # 3) The storage is back: idle (its own limit is the default 600 s) rode the outage
        #    out, finds trial 0 stale, fails it with the reason, retries it, finishes.
        proxy.start()
        assert idle.wait(timeout=120) == 0, logs["idle"].read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        proxy.stop()
    trials = _trials(db, "limit")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert _done(trials) == 1, [(t.number, t.state.name) for t in trials]
    failed = trial0()
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["hposvc.reason"].startswith("first stopped beating for 4 s"), failed.user_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert [t.state for t in trials if t.state == TrialState.FAIL] == [TrialState.FAIL]  # only the one past the limit
