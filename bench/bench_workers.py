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
(1 slot, 2 slots, 1 slot, ...) and each row prints the 1-minute load average before it
started, because this machine is shared and other processes only ever slow a run down.

``--investigate`` adds runs that explain a shortfall (all through the same CLI, no hposvc
code changed):

- ``1 slot, 1 core``: the 1-slot run confined to one core with ``taskset`` (the slot then
  also gets one torch thread), the baseline that 2 slots on 2 cores can at best double.
  How much faster the ordinary 1-slot run is than this shows how much of the second core
  a single worker already uses (its second torch thread, the MLflow writer thread, the
  coordinator);
- ``no MLflow``: the tracking URI points at a closed local port, so the workers' MLflow
  writer threads go offline after one failed call and keep records in the outbox instead
  (cheap JSON files): the difference is what MLflow's SQLite store costs in CPU.

    python bench/bench_workers.py [--specs digits,moons] [--trials 48] [--repeats 2]
        [--workers 1,2] [--investigate] [--keep DIR] [--timeout 900]
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
from dataclasses import dataclass, field
from pathlib import Path

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
) -> RunStats:
    """Run ``hposvc study run SPEC --workers N`` in a subprocess and measure it.

    ``prefix`` goes before the command (e.g. ``taskset -c 0``), ``extra`` after it.
    """
    if data_dir.exists():
        shutil.rmtree(data_dir)
    cmd = [
        *(prefix or []),
        sys.executable, "-m", "hposvc.cli", "study", "run", str(spec),
        "--workers", str(workers), "--data-dir", str(data_dir), "--n-trials", str(n_trials), "--quiet",
        *(extra or []),
    ]
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    load_before = os.getloadavg()[0]
    cpu0 = _children_cpu()
    busy0 = _machine_busy()
    started = dt.datetime.now()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    ended = dt.datetime.now()
    cpu = _children_cpu() - cpu0
    others = max(0.0, (_machine_busy() - busy0 - cpu) / wall)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    s = summarise(read_trials(data_dir / "hposvc.db"), started=started, ended=ended)
    return RunStats(
        label=label or f"{workers} slot{'s' if workers > 1 else ''}",
        spec=spec.stem,
        workers=workers,
        wall_s=wall,
        cpu_s=cpu,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        others_cores=others,
        **s,
    )


HEADER = (
    f"{'spec':<7} {'config':<18} {'load':>5} {'others':>6} {'done':>4} {'wall s':>7} {'wall t/min':>10} "
    f"{'steady t/min':>12} {'s/trial':>7} {'cpu s/trial':>11} {'start s':>7} {'tail s':>6}  per worker"
)


def fmt(r: RunStats) -> str:
    workers = ",".join(str(n) for n in r.per_worker.values())
    return (
        f"{r.spec:<7} {r.label:<18} {r.load_before:>5.2f} {r.others_cores:>6.2f} {r.n_done:>4} {r.wall_s:>7.1f} {r.wall_tpm:>10.1f} "
        f"{r.steady_tpm:>12.1f} {r.mean_trial_s:>7.3f} {r.cpu_per_trial:>11.3f} {r.startup_s:>7.1f} {r.tail_s:>6.1f}  {workers}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default="digits", help="survey specs (studies/survey/NAME.toml), comma-separated, or paths")
    parser.add_argument("--trials", type=int, default=48, help="trials per run (--n-trials)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (interleaved)")
    parser.add_argument("--workers", default="1,2", help="worker slot counts to compare; the ratio is last/first")
    parser.add_argument("--investigate", action="store_true", help="add the 1-core and no-MLflow runs (see the docstring)")
    parser.add_argument("--keep", help="keep the data directories under this folder (default: a temp dir, removed)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one run may take")
    args = parser.parse_args(argv)

    specs = [Path(s) if s.endswith(".toml") else SURVEY / f"{s}.toml" for s in args.specs.split(",")]
    counts = [int(w) for w in args.workers.split(",")]
    configs: list[tuple[str, int, dict]] = [(f"{w} slot{'s' if w > 1 else ''}", w, {}) for w in counts]
    if args.investigate:
        configs += [
            ("1 slot, 1 core", 1, {"prefix": ["taskset", "-c", "0"]}),
            ("1 slot, no MLflow", 1, {"extra": ["--tracking-uri", CLOSED_TRACKING_URI]}),
            (f"{counts[-1]} slots, no MLflow", counts[-1], {"extra": ["--tracking-uri", CLOSED_TRACKING_URI]}),
        ]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-workers-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), {args.trials} trials per run, "
          f"{args.repeats} repeat(s); load: 1-minute load average before each run; "
          f"others: cores that other processes kept busy during it", flush=True)
    print(HEADER, flush=True)
    results: dict[tuple[str, str], list[RunStats]] = {}
    try:
        for spec in specs:
            for rep in range(args.repeats):
                for label, w, kw in configs:
                    data_dir = root / f"{spec.stem}-{label.replace(' ', '').replace(',', '-')}-{rep}"
                    r = run_cli(spec, w, n_trials=args.trials, data_dir=data_dir, label=label, timeout=args.timeout, **kw)
                    results.setdefault((spec.stem, label), []).append(r)
                    print(fmt(r), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print("\nratios (best of the repeats; median in brackets):")
    base_label, top_label = configs[0][0], configs[len(counts) - 1][0]
    pairs = [(top_label, base_label)]
    if args.investigate:
        pairs += [(top_label, "1 slot, 1 core"), (base_label, "1 slot, 1 core"),
                  (f"{counts[-1]} slots, no MLflow", "1 slot, no MLflow")]
    for spec in specs:
        for top, base in pairs:
            a, b = results[(spec.stem, top)], results[(spec.stem, base)]
            for metric in ("wall_tpm", "steady_tpm"):
                best = max(getattr(r, metric) for r in a) / max(getattr(r, metric) for r in b)
                med = statistics.median(getattr(r, metric) for r in a) / statistics.median(getattr(r, metric) for r in b)
                print(f"  {spec.stem:<7} {metric:<10} {top:>18} / {base:<18} {best:5.2f}x  [{med:.2f}x]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
