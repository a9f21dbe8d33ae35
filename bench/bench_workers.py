"""Trials per minute of a survey study with 1 vs 2 CPU worker slots (target: ≥ 1.7×).

Each configuration runs the real CLI in a subprocess with a fresh data directory (SQLite
study database, SQLite MLflow store), exactly as a user would::

    hposvc study run studies/survey/digits.toml --workers W --data-dir FRESH --n-trials N --quiet

and is measured three ways:

- wall: from starting the command to its exit (what a user waits for), trials / minute;
- steady: start-up and shutdown excluded. Each worker's trials are read from the study
  database (``datetime_start`` is when the worker claimed the trial, ``datetime_complete``
  when it told the result); a worker's rate is its trials over the span from its first
  claim to its last result, and the study's steady rate is the sum over workers;
- cpu: CPU seconds (user + system) of the command and all its worker processes, per trial,
  which shows work added by parallelism (contention, duplicated start-up) independently of
  what other processes on a shared machine do to the wall clock.

Start-up (command start → first claim) and tail (last result → exit) are printed too,
since they are fixed costs that a short study cannot amortise. Runs are interleaved
(1 slot, 2 slots, 1 slot, ...). This machine is shared and other processes only ever slow
a run down, so each row prints the 1-minute load average before the run and the cores
that other processes kept busy during it ("others", from /proc/stat less this run's own
CPU time); ``--wait-idle S`` waits up to S seconds for a quiet moment before each run.

``--investigate`` adds runs that explain a shortfall (all through the same CLI, no hposvc
code changed):

- ``1 slot, 1 core``: the 1-slot run confined to one core with ``taskset`` (the slot then
  gets one torch thread, as each of 2 slots does), the baseline that 2 slots on 2 cores can
  at best double. Against the ordinary 1-slot run (one slot, 2 torch threads) it shows what
  the second intra-op thread does for these small models;
- ``no MLflow``: the tracking URI points at a closed local port, so the workers' MLflow
  writer threads go offline after one failed call and keep records in the outbox instead
  (cheap JSON files): the difference in steady rate and CPU per trial is what MLflow's
  SQLite store costs. (Its start-up and tail include the failed connection attempts, about
  3 s, so compare those columns only between runs with MLflow.)

The "dup" column counts trials with two MLflow trial runs, i.e. trials that two workers
both claimed and trained; a "done" above the study's n_trials is flagged as well.

Then it measures the parts separately (each in its own subprocess, so thread settings and
imports are fresh): import times; ``train()`` of survey configs with 1 vs 2 torch threads;
the embedded MLflow store (creation, one trial's writes, the study's final plots); and the
Optuna SQLite storage calls one trial makes (claim, attributes, 10 reports, heartbeat,
tell), from 1 process and from 2 processes at once, i.e. SQLite contention.

Findings on the 2-core development machine (Nov 2026, commits 269a38e..1c0c284; quiet runs,
i.e. other processes < 0.3 cores): digits, 96 trials, steady 2 slots / 1 slot 2.08x and
2 slots / (1 slot on 1 core) 1.80x; wall only 1.45x / 1.30x, because start-up (~7-8 s:
imports, MLflow store creation, then worker imports) and tail (~5-6 s: final plots,
process exits) are as long as the ~10 s of training. One trial trains in ~0.08 s; the
Optuna SQLite calls of a trial take ~0.024 s (0.028 s with 2 processes: little
contention), MLflow's ~0.02-0.04 s on the writer thread. A lone CPU slot gets both cores
as torch threads: no faster than 1 thread for these models when the machine is idle, twice
the CPU, and 5-20x slower when anything else runs. About 1 % of trials were claimed by
both workers (SQLite claim race; see the "dup" column).

``--existing`` runs each study in a data dir an earlier, untimed study made (its MLflow
store exists and its tracking process runs), as every study after a user's first does;
without it each run starts from a fresh data dir (the store is created, ~1.3 CPU s, and
MLflow imported, ~1 CPU s, in the tracking process while the run starts). After each run,
outside the timing, the bench waits until the tracking processes have made the study's
summary and plots (``_settle.py``), which would otherwise slow the next run.

    python bench/bench_workers.py [--specs digits,moons] [--trials 48] [--repeats 2]
        [--workers 1,2] [--investigate | --one-core] [--existing] [--wait-idle S] [--keep DIR] [--timeout 900]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from _settle import stop_tracking, wait_for_tracking

ROOT = Path(__file__).resolve().parents[1]
SURVEY = ROOT / "studies" / "survey"
# A closed port on loopback: connecting fails at once, so the tracker goes offline quickly.
CLOSED_TRACKING_URI = "http://127.0.0.1:9"


@dataclass(frozen=True)
class TrialRow:
    """One trial as the study database holds it."""

    number: int
    state: str
    start: dt.datetime | None  # when a worker claimed it (naive local time, as Optuna stores it)
    complete: dt.datetime | None  # when its result was told
    attrs: dict = field(default_factory=dict)  # user attributes, JSON-decoded

    @property
    def duration(self) -> float | None:
        if self.start is None or self.complete is None:
            return None
        return (self.complete - self.start).total_seconds()

    @property
    def worker(self) -> str:
        return str(self.attrs.get("hposvc.worker", "?"))


def _parse_time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def read_trials(db_path: str | os.PathLike[str], study_name: str | None = None) -> list[TrialRow]:
    """The trials of a study (the only one, or ``study_name``) from an Optuna SQLite file.

    Read with plain sqlite3 so a benchmark does not import Optuna just to look.

    Example: ``[t.worker for t in read_trials("hposvc-data/hposvc.db")]``.
    """
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=60)
    try:
        if study_name is None:
            study_ids = [r[0] for r in con.execute("SELECT study_id FROM studies")]
        else:
            study_ids = [r[0] for r in con.execute("SELECT study_id FROM studies WHERE study_name = ?", (study_name,))]
        if len(study_ids) != 1:
            raise RuntimeError(f"expected one study in {db_path}, found {len(study_ids)}")
        attrs: dict[int, dict] = {}
        for trial_id, key, value in con.execute(
            "SELECT a.trial_id, a.key, a.value_json FROM trial_user_attributes a "
            "JOIN trials t ON t.trial_id = a.trial_id WHERE t.study_id = ?",
            (study_ids[0],),
        ):
            attrs.setdefault(trial_id, {})[key] = json.loads(value)
        rows = con.execute(
            "SELECT trial_id, number, state, datetime_start, datetime_complete FROM trials WHERE study_id = ? ORDER BY number",
            (study_ids[0],),
        ).fetchall()
    finally:
        con.close()
    return [TrialRow(n, state, _parse_time(s), _parse_time(c), attrs.get(tid, {})) for tid, n, state, s, c in rows]


def duplicate_runs(mlflow_db: str | os.PathLike[str], study_name: str | None = None) -> int | None:
    """Trial numbers with more than one MLflow trial run: trials that two workers both ran
    (of study ``study_name``'s experiment, or of every run in the store).

    None when the store is missing or has no runs table (e.g. tracking was offline).
    """
    if not Path(mlflow_db).exists():
        return None
    con = sqlite3.connect(f"file:{mlflow_db}?mode=ro", uri=True, timeout=60)
    try:
        rows = con.execute(
            "SELECT t.value, COUNT(*) FROM tags t JOIN tags r ON r.run_uuid = t.run_uuid "
            "JOIN runs u ON u.run_uuid = t.run_uuid JOIN experiments e ON e.experiment_id = u.experiment_id "
            "WHERE t.key = 'hposvc.trial_number' AND r.key = 'hposvc.role' AND r.value = 'trial' AND (? IS NULL OR e.name = ?) "
            "GROUP BY t.value HAVING COUNT(*) > 1",
            (study_name, f"hposvc/{study_name}"),
        ).fetchall()
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()
    return len(rows)


@dataclass(frozen=True)
class RunStats:
    """What one ``hposvc study run`` measured."""

    label: str
    spec: str
    workers: int
    n_done: int  # COMPLETE + PRUNED trials
    wall_s: float
    cpu_s: float  # user + system of the command and its workers
    startup_s: float  # command start → first trial claimed
    tail_s: float  # last trial told → command exit
    steady_tpm: float  # sum over workers of trials / (first claim → last result)
    mean_trial_s: float  # mean claim → result time of one trial
    per_worker: dict  # worker id → trials
    load_before: float  # 1-minute load average when the run started
    load_after: float
    others_cores: float  # cores other processes kept busy during the run, on average
    n_trials: int = 0  # the study's target; n_done above it means trials ran twice
    dup_runs: int | None = None  # trials with two MLflow runs (see duplicate_runs)

    @property
    def wall_tpm(self) -> float:
        return 60.0 * self.n_done / self.wall_s

    @property
    def cpu_per_trial(self) -> float:
        return self.cpu_s / max(self.n_done, 1)


def summarise(trials: list[TrialRow], *, started: dt.datetime, ended: dt.datetime) -> dict:
    """Start-up, tail, steady rate and per-worker counts from a run's finished trials."""
    done = [t for t in trials if t.state in ("COMPLETE", "PRUNED") and t.duration is not None]
    if not done:
        raise RuntimeError("no finished trials to summarise")
    by_worker: dict[str, list[TrialRow]] = {}
    for t in done:
        by_worker.setdefault(t.worker, []).append(t)
    steady = 0.0
    for rows in by_worker.values():
        span = (max(t.complete for t in rows) - min(t.start for t in rows)).total_seconds()
        steady += 60.0 * len(rows) / span if span > 0 else 0.0
    return {
        "n_done": len(done),
        "startup_s": (min(t.start for t in done) - started).total_seconds(),
        "tail_s": (ended - max(t.complete for t in done)).total_seconds(),
        "steady_tpm": steady,
        "mean_trial_s": statistics.fmean(t.duration for t in done),
        "per_worker": {w: len(rows) for w, rows in sorted(by_worker.items())},
    }


def _machine_busy() -> float:
    """CPU seconds all processes of this machine have spent busy (from /proc/stat), or NaN."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_busy(seconds: float = 3.0) -> float:
    """Cores the machine kept busy over ``seconds`` (this process only sleeps meanwhile)."""
    b0, t0 = _machine_busy(), time.perf_counter()
    time.sleep(seconds)
    return (_machine_busy() - b0) / (time.perf_counter() - t0)


def wait_until_idle(max_wait: float, *, threshold: float = 0.3) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores.

    Returns the last measured use; on a shared machine this picks quiet moments to
    measure in, and the table's "others" column says how quiet the run actually was.
    """
    deadline = time.monotonic() + max_wait
    busy = others_busy()
    while busy >= threshold and time.monotonic() < deadline:
        busy = others_busy()
    return busy


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_cli(
    spec: Path,
    workers: int,
    *,
    n_trials: int,
    data_dir: Path,
    label: str = "",
    extra: list[str] | None = None,
    prefix: list[str] | None = None,
    env: dict | None = None,
    timeout: float = 900.0,
    study_name: str | None = None,
) -> RunStats:
    """Run ``hposvc study run SPEC --workers N`` in a subprocess and measure it.

    ``prefix`` goes before the command (e.g. ``taskset -c 0``), ``extra`` after it. With
    ``study_name`` the study runs under that name in ``data_dir`` as it is (an existing data
    dir); without, ``data_dir`` is made afresh.
    """
    if data_dir.exists() and study_name is None:
        shutil.rmtree(data_dir)
    cmd = [
        *(prefix or []),
        sys.executable, "-m", "hposvc.cli", "study", "run", str(spec),
        "--workers", str(workers), "--data-dir", str(data_dir), "--n-trials", str(n_trials), "--quiet",
        *(["--name", study_name] if study_name else []),
        *(extra or []),
    ]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    load_before = os.getloadavg()[0]
    cpu0 = _children_cpu()
    busy0 = _machine_busy()
    started = dt.datetime.now()
    t0 = time.perf_counter()
    # Not the repository root as cwd: `python -m` puts the cwd first on sys.path, which would
    # shadow a PYTHONPATH that points at another checkout of hposvc to measure.
    proc = subprocess.run(cmd, cwd=data_dir.parent, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    ended = dt.datetime.now()
    cpu = _children_cpu() - cpu0
    others = max(0.0, (_machine_busy() - busy0 - cpu) / wall)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    s = summarise(read_trials(data_dir / "hposvc.db", study_name), started=started, ended=ended)
    return RunStats(
        label=label or f"{workers} slot{'s' if workers > 1 else ''}",
        spec=spec.stem,
        workers=workers,
        wall_s=wall,
        cpu_s=cpu,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        others_cores=others,
        n_trials=n_trials,
        dup_runs=duplicate_runs(data_dir / "mlflow.db", study_name),
        **s,
    )


# -- component probes (--investigate) ------------------------------------------------


def _probe_imports() -> dict:
    t0 = time.perf_counter()
    import torch  # noqa: F401

    t1 = time.perf_counter()
    import mlflow  # noqa: F401
    import optuna  # noqa: F401

    t2 = time.perf_counter()
    import hposvc.cli  # noqa: F401
    import hposvc.study  # noqa: F401

    return {"import torch s": t1 - t0, "import mlflow+optuna s": t2 - t1, "import hposvc s": time.perf_counter() - t2}


def survey_configs(n: int = 12, *, epochs: int = 10) -> list:
    """Configs shaped like the survey's trials: 4 optimizers × 3 norms, relu, batch 64."""
    from hposvc.config import TrialConfig

    grid = [(o, lr, nm) for o, lr in (("adam", 1e-3), ("sgd", 0.1), ("momentum", 0.01), ("rmsprop", 1e-3)) for nm in ("none", "batch", "layer")]
    return [TrialConfig(optimizer=o, lr=lr, norm=nm, activation="relu", epochs=epochs, batch_size=64) for o, lr, nm in grid[:n]]


def _probe_threads(task_name: str) -> dict:
    """Seconds per trial of ``train()`` with 1 and 2 intra-op threads (interleaved, best of 2)."""
    import torch

    from hposvc.tasks import load_task
    from hposvc.train import train

    task = load_task(task_name)
    cfgs = survey_configs()
    train(cfgs[0].replace(epochs=1), task, device="cpu")  # first-call costs
    best: dict[int, tuple[float, float]] = {}
    for _ in range(2):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            c0, t0 = time.process_time(), time.perf_counter()
            for c in cfgs:
                train(c, task, device="cpu")
            wall, cpu = (time.perf_counter() - t0) / len(cfgs), (time.process_time() - c0) / len(cfgs)
            if threads not in best or wall < best[threads][0]:
                best[threads] = (wall, cpu)
    return {f"train {task_name} {t} thread{'s' if t > 1 else ''} s/trial (cpu)": f"{w:.3f} ({c:.3f})" for t, (w, c) in best.items()}


def _probe_mlflow(folder: str) -> dict:
    """The embedded MLflow store: creating it, one trial's writes, the study's final plots."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    import optuna

    from hposvc.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfgs = survey_configs()
    t0 = time.perf_counter()
    tracker = Tracker(f"sqlite:///{folder}/mlflow.db", study="probe", data_dir=folder)
    tracker.start_study(spec={"probe": True})
    create = time.perf_counter() - t0
    n = 24
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        run = tracker.start_trial(i, cfgs[i % len(cfgs)], tags={"hposvc.device": "cpu"})
        for epoch in range(1, 11):
            run.log_epoch({"train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5, "lr": 0.1}, step=epoch)
        run.end("COMPLETE", metrics={"final_val_loss": 1.0})
    tracker.wait()
    per_trial, per_trial_cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1.0, log=True) + len(t.suggest_categorical("optimizer", ["adam", "sgd"])), n_trials=24)
    return {
        "tracking: outbox + tracking process start s": f"{create:.2f}",
        "tracking: one trial's records, until MLflow holds them, s (cpu here)": f"{per_trial:.3f} ({per_trial_cpu:.3f})",
    }


def _probe_storage_ops(url: str, n: int, start_at: float) -> dict:
    """One process's time for the Optuna storage calls of ``n`` hposvc trials."""
    import optuna

    from hposvc.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="probe", storage=open_storage(url))
    storage = study._storage  # noqa: SLF001 (heartbeats live on the storage)
    time.sleep(max(0.0, start_at - time.time()))  # start together with the other process
    c0, t0 = time.process_time(), time.perf_counter()
    for i in range(n):
        trial_id = storage.create_new_trial(study._study_id)  # noqa: SLF001 (what claiming writes)
        trial = optuna.Trial(study, trial_id)
        storage.record_heartbeat(trial_id)
        trial.suggest_float("lr", 1e-4, 1.0, log=True)
        for key in ("hposvc.config", "hposvc.device", "hposvc.host", "hposvc.worker", "hposvc.mlflow_run_id"):
            trial.set_user_attr(key, {"i": i, "key": key})
        for epoch in range(1, 11):
            trial.report(0.5, epoch)
        for key in ("hposvc.activation_std", "hposvc.unit_symmetry"):
            trial.set_user_attr(key, [0.1, 0.2])
        study.tell(trial, 0.5)
    return {"wall": (time.perf_counter() - t0) / n, "cpu": (time.process_time() - c0) / n}


def _run_probe(args: list[str], *, cwd: Path, timeout: float = 600) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_probe", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"})
    if out.returncode != 0:
        raise RuntimeError(f"probe {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def components(root: Path, *, task: str = "digits", n_ops: int = 40) -> None:
    """Print the component measurements (see the module docstring)."""
    import optuna

    print("\ncomponents (each in a fresh subprocess):", flush=True)
    rows = {**_run_probe(["imports"], cwd=root), **_run_probe(["threads", task], cwd=root)}
    folder = root / "probe-mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    rows.update(_run_probe(["mlflow", str(folder)], cwd=root))
    for k, v in rows.items():
        print(f"  {k:<40} {v if isinstance(v, str) else f'{v:.2f}'}", flush=True)
    from hposvc.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for procs in (1, 2):
        url = f"sqlite:///{root / f'probe-storage-{procs}.db'}"
        optuna.create_study(study_name="probe", storage=open_storage(url), direction="maximize")
        start_at = time.time() + 4.0  # after both processes have imported and connected
        children = [
            subprocess.Popen([sys.executable, __file__, "--_probe", "storage", url, str(n_ops), str(start_at)], cwd=root,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            for _ in range(procs)
        ]
        res = []
        for c in children:
            out, err = c.communicate(timeout=600)
            if c.returncode != 0:
                raise RuntimeError(f"storage probe failed:\n{err[-3000:]}")
            res.append(json.loads(out.strip().splitlines()[-1]))
        wall = statistics.fmean(r["wall"] for r in res)
        cpu = statistics.fmean(r["cpu"] for r in res)
        print(f"  {f'optuna SQLite calls of one trial, {procs} proc':<40} {wall:.3f} s ({cpu:.3f} cpu) per trial per process", flush=True)


HEADER = (
    f"{'spec':<7} {'config':<18} {'load':>5} {'others':>6} {'done':>4} {'wall s':>7} {'wall t/min':>10} "
    f"{'steady t/min':>12} {'s/trial':>7} {'cpu s/trial':>11} {'start s':>7} {'tail s':>6} {'dup':>3}  per worker"
)


def fmt(r: RunStats) -> str:
    workers = ",".join(str(n) for n in r.per_worker.values())
    return (
        f"{r.spec:<7} {r.label:<18} {r.load_before:>5.2f} {r.others_cores:>6.2f} {r.n_done:>4} {r.wall_s:>7.1f} {r.wall_tpm:>10.1f} "
        f"{r.steady_tpm:>12.1f} {r.mean_trial_s:>7.3f} {r.cpu_per_trial:>11.3f} {r.startup_s:>7.1f} {r.tail_s:>6.1f} {'-' if r.dup_runs is None else r.dup_runs:>3}  {workers}"
    )


# Runs during which other processes kept fewer cores than this busy count as quiet.
QUIET_CORES = 0.3


def print_ratios(results: dict, specs: list[str], pairs: list[tuple[str, str]]) -> None:
    """Throughput ratios top/base for wall and steady trials per minute.

    Best of the repeats, the medians, and the quiet runs only (others < QUIET_CORES cores;
    the most trustworthy on a shared machine, when each side has one).
    """
    print(f"\nratios: best of the repeats, [median], {{quiet runs only: others < {QUIET_CORES} cores}}")
    for spec in specs:
        for top, base in pairs:
            a, b = results[(spec, top)], results[(spec, base)]
            for metric in ("wall_tpm", "steady_tpm"):
                best = max(getattr(r, metric) for r in a) / max(getattr(r, metric) for r in b)
                med = statistics.median(getattr(r, metric) for r in a) / statistics.median(getattr(r, metric) for r in b)
                qa = [getattr(r, metric) for r in a if r.others_cores < QUIET_CORES]
                qb = [getattr(r, metric) for r in b if r.others_cores < QUIET_CORES]
                quiet = f"{{{statistics.median(qa) / statistics.median(qb):.2f}x}}" if qa and qb else "{n/a}"
                print(f"  {spec:<7} {metric:<10} {top:>18} / {base:<18} {best:5.2f}x  [{med:.2f}x]  {quiet}", flush=True)


def _probe_main(argv: list[str]) -> int:
    kind, rest = argv[0], argv[1:]
    if kind == "imports":
        out = _probe_imports()
    elif kind == "threads":
        out = _probe_threads(rest[0])
    elif kind == "mlflow":
        out = _probe_mlflow(rest[0])
    elif kind == "storage":
        out = _probe_storage_ops(rest[0], int(rest[1]), float(rest[2]))
    else:
        raise SystemExit(f"unknown probe {kind!r}")
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_probe"]:
        return _probe_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default="digits", help="survey specs (studies/survey/NAME.toml), comma-separated, or paths")
    parser.add_argument("--trials", type=int, default=48, help="trials per run (--n-trials)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (interleaved)")
    parser.add_argument("--workers", default="1,2", help="worker slot counts to compare; the ratio is last/first")
    parser.add_argument("--investigate", action="store_true", help="add the 1-core and no-MLflow runs and the component probes (see the docstring)")
    parser.add_argument("--one-core", action="store_true", help="add only the '1 slot, 1 core' run")
    parser.add_argument("--components-only", action="store_true", help="only the component probes (see the docstring)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each run wait up to S seconds for other processes to use < 0.3 cores")
    parser.add_argument("--keep", help="keep the data directories under this folder (default: a temp dir, removed)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    parser.add_argument("--existing", action="store_true",
                        help="run each study in a data dir that an earlier (untimed) study made, under a new name: the MLflow "
                             "store exists and its tracking process runs, as for every study after a user's first")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # Optuna's "experimental" notices from the probes' imports

    specs = [Path(s) if s.endswith(".toml") else SURVEY / f"{s}.toml" for s in args.specs.split(",")]
    counts = [int(w) for w in args.workers.split(",")]
    configs: list[tuple[str, int, dict]] = [(f"{w} slot{'s' if w > 1 else ''}", w, {}) for w in counts]
    if args.investigate or args.one_core:
        configs.append(("1 slot, 1 core", 1, {"prefix": ["taskset", "-c", "0"]}))
    if args.investigate:
        configs += [
            ("1 slot, no MLflow", 1, {"extra": ["--tracking-uri", CLOSED_TRACKING_URI]}),
            (f"{counts[-1]} slots, no MLflow", counts[-1], {"extra": ["--tracking-uri", CLOSED_TRACKING_URI]}),
        ]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-workers-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), {args.trials} trials per run, "
          f"{args.repeats} repeat(s); load: 1-minute load average before each run; "
          f"others: cores that other processes kept busy during it", flush=True)
    where = subprocess.run([sys.executable, "-c", "import hposvc; print(hposvc.__file__)"], cwd=root, capture_output=True, text=True).stdout.strip()
    print(f"hposvc measured: {where}", flush=True)
    results: dict[tuple[str, str], list[RunStats]] = {}
    try:
        if not args.components_only:
            print(HEADER, flush=True)
            for spec in specs:
                for rep in range(args.repeats):
                    for label, w, kw in configs:
                        if args.wait_idle > 0:
                            wait_until_idle(args.wait_idle)
                        slug = label.replace(" ", "").replace(",", "-")
                        if args.existing:
                            data_dir, name = root / f"{spec.stem}-{slug}", f"{spec.stem}-{rep}"
                            if rep == 0:  # the untimed first study that makes the data dir
                                run_cli(spec, w, n_trials=2, data_dir=data_dir, timeout=args.timeout, study_name="first", **kw)
                                wait_for_tracking(root)
                        else:
                            data_dir, name = root / f"{spec.stem}-{slug}-{rep}", None
                        r = run_cli(spec, w, n_trials=args.trials, data_dir=data_dir, label=label, timeout=args.timeout, study_name=name, **kw)
                        wait_for_tracking(root)  # its summary and plots, before the next timed run
                        results.setdefault((spec.stem, label), []).append(r)
                        print(fmt(r), flush=True)
                        if r.n_done != r.n_trials or r.dup_runs:
                            print(f"  ^ {r.n_done} finished trials for n_trials={r.n_trials}; {r.dup_runs} trial(s) with two MLflow runs "
                                  "(claimed by two workers)", flush=True)
            base_label, top_label = configs[0][0], configs[len(counts) - 1][0]
            pairs = [(top_label, base_label)]
            if args.investigate or args.one_core:
                pairs += [(top_label, "1 slot, 1 core"), (base_label, "1 slot, 1 core")]
            if args.investigate:
                pairs.append((f"{counts[-1]} slots, no MLflow", "1 slot, no MLflow"))
            print_ratios(results, [s.stem for s in specs], pairs)
        if args.investigate or args.components_only:
            components(root)
    finally:
        stop_tracking(root)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
