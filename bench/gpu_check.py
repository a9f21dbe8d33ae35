"""GPU check: a small study on every GPU of this machine, per-GPU trials and utilisation,
then sequential vs population training on one GPU.

What it does, each step time-bounded (``--budget`` seconds in all):

1. Finds the GPUs (``torch.cuda.device_count()``, which honours ``CUDA_VISIBLE_DEVICES``,
   and ``nvidia-smi`` for names and ids). With none it prints ``no GPU: ...`` and exits 0.
2. Runs a small random-sampled study through the real CLI,
   ``hposvc study run SPEC --workers auto --trials-per-device 2 --data-dir TMP --quiet``,
   while a thread samples ``nvidia-smi --query-gpu=index,utilization.gpu,memory.used
   --format=csv,noheader,nounits`` every second.
3. Prints, per GPU: its worker slots, the trials they finished (from the trials'
   ``hposvc.worker`` attribute, mapped to the GPU each slot was pinned to with
   ``CUDA_VISIBLE_DEVICES`` by :func:`hposvc.devices.plan_slots`, the plan the study run
   uses), the device each trial recorded (``hposvc.device``), mean seconds per trial, and
   utilisation and memory (mean / max over the samples taken while the study ran).
   Checks: the study finished all its trials, none failed, none was run by two workers,
   every slot and every GPU ran trials, and every trial trained on CUDA.
4. Runs ``bench/bench_population.py --device cuda`` (sequential vs population trials per
   minute, same trials, same process) pinned to the first GPU.
5. Runs ``bench/bench_population.py --model builtin --device cuda``: a user's CNN with
   batch norm on digits as 8×8 images, K = 16 trials as one population vs one after
   another (goal >= 10x), and the population eligibility check on a ResNet-18 (goal < 1 s).
   The goals are printed as met / NOT met; they are benchmarks, not failed checks.

``--cpu-dry-run`` runs the same code on the CPU with tiny sizes (2 CPU worker slots stand
in for GPUs, a stand-in for ``nvidia-smi`` prints per-core CPU utilisation in the same CSV
format, and the population bench runs with ``--device cpu``), so every path of this script
is exercised on a machine without a GPU.

    bench/gpu_check [--cpu-dry-run] [--task mnist1d] [--trials N] [--epochs 5]
        [--trials-per-device 2] [--budget 480] [--keep DIR]

Exit status: 0 when all checks pass or there is no GPU; 1 when a check fails; 2 when a
step ran out of time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.append(str(ROOT))  # hposvc itself when it is not installed

from bench_workers import TrialRow, duplicate_runs, read_trials  # noqa: E402

NVIDIA_SMI_QUERY = ["--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
SAMPLE_SECONDS = 1.0


# -- utilisation sampling ------------------------------------------------------------


@dataclass
class Samples:
    """``(time, gpu index, utilisation %, memory used MiB)`` rows, one per GPU per sample."""

    rows: list[tuple[dt.datetime, str, float | None, float | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    n: int = 0  # samples taken

    def window(self, start: dt.datetime | None, end: dt.datetime | None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """Utilisation and memory per GPU index, from samples taken in [start, end]."""
        util: dict[str, list[float]] = {}
        mem: dict[str, list[float]] = {}
        for when, index, u, m in self.rows:
            if (start is None or when >= start) and (end is None or when <= end):
                if u is not None:
                    util.setdefault(index, []).append(u)
                if m is not None:
                    mem.setdefault(index, []).append(m)
        return util, mem


def parse_smi_csv(text: str) -> list[tuple[str, float | None, float | None]]:
    """Rows of ``index, utilization.gpu, memory.used`` (``nounits``); ``[N/A]`` → None.

    >>> parse_smi_csv("0, 35, 1200\\n1, [N/A], 800\\n")
    [('0', 35.0, 1200.0), ('1', None, 800.0)]
    """
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue

        def num(s: str) -> float | None:
            try:
                return float(s)
            except ValueError:
                return None

        rows.append((parts[0], num(parts[1]), num(parts[2])))
    return rows


class Sampler:
    """Runs ``command`` every ``interval`` seconds on a thread and keeps its parsed rows."""

    def __init__(self, command: list[str], interval: float = SAMPLE_SECONDS) -> None:
        self.command, self.interval = command, interval
        self.samples = Samples()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                out = subprocess.run(self.command, capture_output=True, text=True, timeout=5)
                if out.returncode == 0:
                    now = dt.datetime.now()  # naive local time, as Optuna stores trial times
                    self.samples.rows += [(now, index, util, mem) for index, util, mem in parse_smi_csv(out.stdout)]
                    self.samples.n += 1
                elif len(self.samples.errors) < 3:
                    self.samples.errors.append(f"exit {out.returncode}: {out.stderr.strip()[:200]}")
            except (OSError, subprocess.TimeoutExpired) as e:
                if len(self.samples.errors) < 3:
                    self.samples.errors.append(str(e)[:200])
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))


# A stand-in for nvidia-smi in --cpu-dry-run: "index, utilisation %, memory MiB" per CPU
# core, utilisation since its previous call (state kept in a file next to it).
FAKE_SMI = '''
import json, os, sys
state = sys.argv[1]
with open("/proc/stat") as f:
    cores = [l.split() for l in f if l.startswith("cpu") and l[3].isdigit()]
now = {c[0][3:]: (sum(map(int, c[1:9])), int(c[4]) + int(c[5])) for c in cores}
try:
    before = json.load(open(state))
except (OSError, ValueError):
    before = {}
json.dump(now, open(state, "w"))
with open("/proc/meminfo") as f:
    info = {l.split(":")[0]: int(l.split()[1]) for l in f}
used = (info["MemTotal"] - info["MemAvailable"]) / 1024 / max(len(now), 1)
for i, (total, idle) in now.items():
    t0, i0 = before.get(i, (0, 0))
    busy = 100.0 * (1 - (idle - i0) / (total - t0)) if total > t0 else 0.0
    print(f"{i}, {busy:.0f}, {used:.0f}")
'''


# -- GPUs ---------------------------------------------------------------------------


def gpu_inventory() -> list[dict[str, str]]:
    """``nvidia-smi``'s GPUs (index, uuid, name, memory.total); [] without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,driver_version", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    keys = ("index", "uuid", "name", "memory_total", "driver")
    return [dict(zip(keys, (p.strip() for p in line.split(",")))) for line in out.stdout.strip().splitlines() if line.strip()]


def torch_cuda_count() -> tuple[int, str]:
    """GPUs torch sees (NVML, no CUDA context) and torch's version string."""
    import torch

    return int(torch.cuda.device_count()), f"torch {torch.__version__} (CUDA {torch.version.cuda})"


def smi_index(gpu_id: str, inventory: list[dict[str, str]]) -> str:
    """The nvidia-smi index of a ``CUDA_VISIBLE_DEVICES`` id (a number or a UUID)."""
    for g in inventory:
        if gpu_id in (g["index"], g["uuid"]) or (gpu_id.startswith("GPU-") and g["uuid"].startswith(gpu_id)):
            return g["index"]
    return gpu_id


# -- running a step with a time limit ---------------------------------------------------


class OutOfTime(Exception):
    pass


def run_bounded(cmd: list[str], *, timeout: float, cwd: Path, env: dict[str, str] | None = None, echo: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; on timeout SIGTERM the group (then SIGKILL).

    SIGTERM first lets ``hposvc study run`` stop its workers and close their trials.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print("    " + line.rstrip(), flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        reader.join(timeout=5)
        raise OutOfTime(f"{' '.join(cmd[:6])} ... ran past {timeout:.0f} s and was stopped;\n{''.join(lines[-20:])}")
    reader.join(timeout=5)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), "")


# -- the study on all GPUs ----------------------------------------------------------------


def spec_text(*, task: str, n_trials: int, epochs: int, batch_size: int) -> str:
    """A small random-sampled study: 4 optimizers × lr × norm × activation."""
    return textwrap.dedent(f"""\
        [study]
        name = "gpu-check"
        task = "{task}"
        metric = "val_accuracy"
        n_trials = {n_trials}
        sampler = "random"
        pruner = "none"
        seed = 0

        [train]
        epochs = {epochs}
        batch_size = {batch_size}

        [space]
        optimizer = ["sgd", "momentum", "adam", "rmsprop"]
        lr = {{ low = 1e-4, high = 0.3, log = true }}
        norm = ["none", "batch"]
        activation = ["relu", "tanh"]
        """)


_SLOT_RE = re.compile(r":slot(\d+)$")


def per_gpu_table(trials: list[TrialRow], slot_gpu: dict[int, str], samples: Samples, inventory: list[dict[str, str]]) -> tuple[list[str], dict]:
    """Lines of the per-GPU table and the numbers the checks look at."""
    gpus = sorted(set(slot_gpu.values()), key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else 0, g))
    by_gpu: dict[str, list[TrialRow]] = {g: [] for g in gpus}
    by_slot: dict[int, int] = {i: 0 for i in slot_gpu}
    unmatched = 0
    for t in trials:
        if t.state not in ("COMPLETE", "PRUNED"):
            continue
        m = _SLOT_RE.search(t.worker)
        if m is None or int(m.group(1)) not in slot_gpu:
            unmatched += 1
            continue
        slot = int(m.group(1))
        by_slot[slot] += 1
        by_gpu[slot_gpu[slot]].append(t)
    # Utilisation while trials ran: worker start-up (imports, CUDA init) would dilute it.
    finished = [t for t in trials if t.start is not None and t.complete is not None]
    start = min((t.start for t in finished), default=None)
    end = max((t.complete for t in finished), default=None)
    util_by, mem_by = samples.window(start, end)
    lines = [f"  {'GPU':<5} {'slots':<10} {'trials':>6} {'devices recorded':<18} {'s/trial':>7} {'util % mean/max':>16} {'mem MiB mean/max':>17}"]
    for g in gpus:
        rows = by_gpu[g]
        slots = ",".join(str(i) for i, gg in sorted(slot_gpu.items()) if gg == g)
        devices = ",".join(sorted({str(t.attrs.get("hposvc.device", "?")) for t in rows})) or "-"
        durations = [t.duration for t in rows if t.duration is not None]
        idx = smi_index(g, inventory)
        util, mem = util_by.get(idx, []), mem_by.get(idx, [])
        u = f"{statistics.fmean(util):.0f}/{max(util):.0f}" if util else "n/a"
        mm = f"{statistics.fmean(mem):.0f}/{max(mem):.0f}" if mem else "n/a"
        s = f"{statistics.fmean(durations):.2f}" if durations else "-"
        lines.append(f"  {g:<5} {slots:<10} {len(rows):>6} {devices:<18} {s:>7} {u:>16} {mm:>17}")
    return lines, {"by_gpu": {g: len(r) for g, r in by_gpu.items()}, "by_slot": by_slot, "unmatched": unmatched}


def study_step(args: argparse.Namespace, *, work: Path, inventory: list[dict[str, str]], deadline: float) -> list[str]:
    """Run the study on all GPUs (or CPU slots in the dry run); return failed checks."""
    from hposvc.devices import plan_slots

    if args.cpu_dry_run:
        slots = plan_slots("cpu", workers=2)
        cli_slots = ["--workers", "2", "--devices", "cpu"]
        slot_gpu = {s.index: str(s.index) for s in slots}  # slot i stands in for "GPU" i
        fake = work / "fake_smi.py"
        fake.write_text(FAKE_SMI)
        sampler_cmd = [sys.executable, str(fake), str(work / "fake_smi.state")]
    else:
        slots = plan_slots("auto", trials_per_device=args.trials_per_device, workers="auto")
        cli_slots = ["--workers", "auto", "--trials-per-device", str(args.trials_per_device)]
        slot_gpu = {s.index: str(s.cuda_visible_devices) for s in slots}
        sampler_cmd = ["nvidia-smi", *NVIDIA_SMI_QUERY]
    n_trials = args.trials or 4 * len(slots)
    spec = work / "gpu-check.toml"
    spec.write_text(spec_text(task=args.task, n_trials=n_trials, epochs=args.epochs, batch_size=args.batch_size))
    data_dir = work / "data"
    cmd = [sys.executable, "-m", "hposvc.cli", "study", "run", str(spec), *cli_slots, "--data-dir", str(data_dir), "--quiet"]
    print(f"\n[1] study: {n_trials} trials of {args.task} ({args.epochs} epochs, batch {args.batch_size}) on "
          f"{len(slots)} slot(s): " + ", ".join(f"slot {s.index} → {'CUDA_VISIBLE_DEVICES=' + s.cuda_visible_devices if s.cuda_visible_devices is not None else 'cpu'} ({s.threads} thr)" for s in slots), flush=True)
    print(f"    $ {' '.join(cmd[2:])}", flush=True)
    timeout = min(args.study_timeout, deadline - time.monotonic())
    t0 = time.perf_counter()
    late: OutOfTime | None = None
    with Sampler(sampler_cmd) as sampler:
        try:
            proc = run_bounded(cmd, timeout=timeout, cwd=work, env={"PYTHONWARNINGS": "ignore"})
        except OutOfTime as e:
            late, proc = e, None  # still show what the trials so far say
    wall = time.perf_counter() - t0
    failed: list[str] = []
    if proc is not None and proc.returncode != 0:
        print(textwrap.indent(proc.stdout[-3000:], "    "), flush=True)
        failed.append(f"study run exited {proc.returncode}")
    if not (data_dir / "hposvc.db").exists():
        if late is not None:
            raise late
        return failed
    trials = read_trials(data_dir / "hposvc.db", "gpu-check")
    states: dict[str, int] = {}
    for t in trials:
        states[t.state] = states.get(t.state, 0) + 1
    done = states.get("COMPLETE", 0) + states.get("PRUNED", 0)
    print(f"    {wall:.1f} s wall, {60 * done / wall:.1f} trials/min; states: " + ", ".join(f"{k} {v}" for k, v in sorted(states.items())), flush=True)
    if sampler.samples.errors:
        print(f"    utilisation sampling errors: {sampler.samples.errors}", flush=True)
    print(f"    {sampler.samples.n} utilisation sample(s), one per {SAMPLE_SECONDS:.0f} s; util/mem below: samples taken "
          "between the first trial's start and the last trial's end" + (" (CPU cores standing in for GPUs)" if args.cpu_dry_run else ""), flush=True)
    lines, counts = per_gpu_table(trials, slot_gpu, sampler.samples, inventory)
    print("\n".join(lines), flush=True)
    if not args.cpu_dry_run and inventory:
        used = {smi_index(g, inventory) for g in slot_gpu.values()}
        idle = [g["index"] for g in inventory if g["index"] not in used]
        if idle:
            print(f"    GPUs not used (hidden by CUDA_VISIBLE_DEVICES): {', '.join(idle)}", flush=True)

    if late is not None:
        raise late
    dups = duplicate_runs(data_dir / "mlflow.db")
    if dups:
        failed.append(f"{dups} trial(s) were claimed and trained by two workers (two MLflow runs each)")
    if done < n_trials:
        failed.append(f"{done} of {n_trials} trials finished")
    if states.get("FAIL", 0):
        reasons = {str(t.attrs.get("hposvc.reason", "?"))[:160] for t in trials if t.state == "FAIL"}
        failed.append(f"{states['FAIL']} trial(s) failed: {'; '.join(sorted(reasons)[:3])}")
    if counts["unmatched"]:
        failed.append(f"{counts['unmatched']} finished trial(s) have a worker id that matches no slot")
    idle_slots = [i for i, n in counts["by_slot"].items() if n == 0]
    if idle_slots:
        failed.append(f"slot(s) {idle_slots} ran no trial")
    idle_gpus = [g for g, n in counts["by_gpu"].items() if n == 0]
    if idle_gpus:
        failed.append(f"GPU(s) {idle_gpus} ran no trial")
    want = "cpu" if args.cpu_dry_run else "cuda"
    wrong = sorted({str(t.attrs.get("hposvc.device")) for t in trials if t.state in ("COMPLETE", "PRUNED") and not str(t.attrs.get("hposvc.device", "")).startswith(want)})
    if wrong:
        failed.append(f"trials recorded device(s) {wrong}, expected {want}")
    return failed


# -- population on one GPU ------------------------------------------------------------------


def population_step(args: argparse.Namespace, *, work: Path, first_gpu: str | None, deadline: float) -> list[str]:
    """bench/bench_population.py on one device; returns failed checks."""
    if args.cpu_dry_run:
        pop_args = ["--device", "cpu", "--tasks", "digits", "--trials", "4", "--epochs", "1", "--population", "4", "--repeats", "1"]
        env = {}
    else:
        pop_args = ["--device", "cuda", "--tasks", args.pop_tasks, "--trials", str(args.pop_trials), "--epochs", str(args.pop_epochs),
                    "--population", str(args.pop_size), "--repeats", str(args.pop_repeats)]
        env = {"CUDA_VISIBLE_DEVICES": first_gpu} if first_gpu is not None else {}
    cmd = [sys.executable, str(BENCH / "bench_population.py"), *pop_args]
    where = f"CUDA_VISIBLE_DEVICES={first_gpu} " if env else ""
    print(f"\n[2] population vs sequential: {where}python bench/bench_population.py {' '.join(pop_args)}", flush=True)
    timeout = min(args.pop_timeout, deadline - time.monotonic())
    proc = run_bounded(cmd, timeout=timeout, cwd=work, env={**env, "PYTHONWARNINGS": "ignore"}, echo=True)
    if proc.returncode != 0:
        return [f"bench_population.py exited {proc.returncode}"]
    device = "cpu" if args.cpu_dry_run else "cuda"
    rows = [line for line in proc.stdout.splitlines() if re.match(rf"^\S+\s+{device}\s", line)]
    if not rows:
        return [f"bench_population.py printed no {device} result row"]
    return []


def model_population_step(args: argparse.Namespace, *, work: Path, first_gpu: str | None, deadline: float) -> list[str]:
    """bench/bench_population.py --model builtin (a user's CNN with batch norm on digits as
    8×8 images, K trials as one population vs one after another, goal >= 10x on a GPU) and
    the eligibility check's time on a ResNet-18 (goal < 1 s); returns failed checks."""
    if args.cpu_dry_run:
        pop_args = ["--device", "cpu", "--trials", "2", "--epochs", "1", "--population", "2", "--repeats", "1"]
        env = {}
    else:
        pop_args = ["--device", "cuda", "--trials", str(args.model_trials), "--epochs", str(args.model_epochs),
                    "--population", str(args.model_trials), "--repeats", str(args.pop_repeats)]
        env = {"CUDA_VISIBLE_DEVICES": first_gpu} if first_gpu is not None else {}
    pop_args = ["--model", "builtin", "--tasks", "digits", *pop_args]
    cmd = [sys.executable, str(BENCH / "bench_population.py"), *pop_args]
    where = f"CUDA_VISIBLE_DEVICES={first_gpu} " if env else ""
    print(f"\n[3] a user's model, population vs sequential: {where}python bench/bench_population.py {' '.join(pop_args)}", flush=True)
    timeout = min(args.pop_timeout, deadline - time.monotonic())
    proc = run_bounded(cmd, timeout=timeout, cwd=work, env={**env, "PYTHONWARNINGS": "ignore"}, echo=True)
    if proc.returncode != 0:
        return [f"bench_population.py --model exited {proc.returncode}"]
    device = "cpu" if args.cpu_dry_run else "cuda"
    rows = [line.split() for line in proc.stdout.splitlines() if re.match(rf"^\S+\s+{device}\s", line)]
    checks = [line for line in proc.stdout.splitlines() if line.startswith("eligibility check") and f"on {device}:" in line]
    if not rows or not checks:
        return [f"bench_population.py --model printed no {device} result row or check time"]
    ratio = float(rows[0][9].rstrip("x"))
    seconds = float(re.search(r": ([0-9.]+) s", checks[0]).group(1))
    goal = 2.0 if device == "cpu" else 10.0
    print(f"  user-model population: {ratio:.2f}x (goal >= {goal:g}x: {'met' if ratio >= goal else 'NOT met'}); "
          f"eligibility check on ResNet-18: {seconds:.3f} s (goal < 1 s: {'met' if seconds < 1 else 'NOT met'})", flush=True)
    return []


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="exercise every step on the CPU with tiny sizes")
    parser.add_argument("--task", default=None, help="study workload (default: mnist1d; digits in the dry run)")
    parser.add_argument("--trials", type=int, default=None, help="study trials (default: 4 per slot)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 5; 1 in the dry run)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--trials-per-device", type=int, default=2, help="concurrent trials (worker slots) per GPU")
    parser.add_argument("--pop-tasks", default="digits,mnist1d")
    parser.add_argument("--pop-trials", type=int, default=32)
    parser.add_argument("--pop-epochs", type=int, default=5)
    parser.add_argument("--pop-size", type=int, default=16, help="max members per population")
    parser.add_argument("--pop-repeats", type=int, default=2)
    parser.add_argument("--model-trials", type=int, default=16, help="user-model bench: trials, all in one population")
    parser.add_argument("--model-epochs", type=int, default=3)
    parser.add_argument("--skip-population", action="store_true")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check")
    parser.add_argument("--study-timeout", type=float, default=240.0)
    parser.add_argument("--pop-timeout", type=float, default=200.0)
    parser.add_argument("--keep", help="keep the study's data directory under this folder")
    args = parser.parse_args(argv)
    args.task = args.task or ("digits" if args.cpu_dry_run else "mnist1d")
    args.epochs = args.epochs or (1 if args.cpu_dry_run else 5)
    deadline = time.monotonic() + args.budget
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    # The CLI subprocesses find hposvc like this script does, installed or not (a
    # PYTHONPATH already set still comes first).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)

    inventory = gpu_inventory()
    try:
        n_gpus, versions = torch_cuda_count()
    except Exception as e:  # noqa: BLE001 (a broken CUDA install should still get a clear line)
        n_gpus, versions = 0, f"torch could not query CUDA ({type(e).__name__}: {e})"
    print(f"gpu_check on {os.uname().nodename}: {versions}; torch sees {n_gpus} GPU(s)"
          + (f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r})" if "CUDA_VISIBLE_DEVICES" in os.environ else ""), flush=True)
    for g in inventory:
        print(f"  nvidia-smi GPU {g['index']}: {g['name']}, {g['memory_total']} MiB, driver {g['driver']}, {g['uuid']}", flush=True)
    if len({g["name"] for g in inventory}) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        # CUDA numbers GPUs fastest first, nvidia-smi by PCI bus: the per-GPU utilisation
        # below may then be matched to the wrong GPU.
        print("  note: mixed GPU models and CUDA_DEVICE_ORDER is not PCI_BUS_ID; CUDA ids may not be nvidia-smi indices", flush=True)
    if n_gpus == 0 and not args.cpu_dry_run:
        why = "nvidia-smi lists GPUs but torch sees none" if inventory else "no NVIDIA GPU or driver found"
        print(f"no GPU: {why}; nothing to check (run with --cpu-dry-run to exercise this script on the CPU).", flush=True)
        return 0
    if args.cpu_dry_run:
        print("CPU DRY RUN: 2 CPU worker slots stand in for GPUs; tiny sizes; numbers mean nothing.", flush=True)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    timed_out = False
    try:
        try:
            failed += study_step(args, work=work, inventory=inventory, deadline=deadline)
        except OutOfTime as e:
            timed_out = True
            failed.append(f"study: {e}")
        if not args.skip_population:
            if deadline - time.monotonic() < 20:
                timed_out = True
                failed.append("population comparison skipped: the --budget is used up")
            else:
                from hposvc.devices import visible_gpu_ids

                first = None if args.cpu_dry_run else visible_gpu_ids(n_gpus)[0]
                try:
                    failed += population_step(args, work=work, first_gpu=first, deadline=deadline)
                    failed += model_population_step(args, work=work, first_gpu=first, deadline=deadline)
                except OutOfTime as e:
                    timed_out = True
                    failed.append(f"population: {e}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("", flush=True)
    if failed:
        for f in failed:
            print(f"CHECK FAILED: {f}", flush=True)
        return 2 if timed_out else 1
    print("ALL CHECKS PASSED" + (" (CPU dry run)" if args.cpu_dry_run else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
