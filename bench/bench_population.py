"""Trials per minute: sequential training (one trial after another) vs population training.

The trials are what a random-sampled lr × momentum/β study draws: half momentum-SGD
(lr log-uniform in [1e-3, 0.3], μ uniform in [0.5, 0.99]) and half Adam (lr log-uniform
in [1e-4, 3e-2], β1 in [0.8, 0.95], β2 in [0.9, 0.9999]), on a fixed structure (the
task's default depth and width, batch 64, relu, no norm). Both modes train the same
configs in the same process:

- sequential: ``hposvc.train.train(config, task)`` for each config in turn;
- population: ``hposvc.population.group_configs(configs, max_size=K)`` and
  ``train_population`` per group (here: one momentum group and one Adam group).

Every trial uses the study's seed (``--seeds shared``, what hposvc does unless a spec
sets per-trial seeds), so members share batch orders; ``--seeds per-trial`` gives each
trial its own seed and its own batches. Runs are interleaved (sequential, population,
sequential, ...) after one warm-up, and the best of ``--repeats`` is reported, because
this machine is shared and load only ever makes a run slower. The script also prints the
largest difference in final validation loss between the two modes, as a sanity check.

    python bench/bench_population.py [--tasks digits,mnist1d] [--trials 32] [--epochs 5]
        [--population 16] [--repeats 3] [--seeds shared|per-trial] [--width W]
        [--device cpu|cuda|all]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hposvc.config import TrialConfig  # noqa: E402
from hposvc.population import group_configs, train_population  # noqa: E402
from hposvc.tasks import load_task  # noqa: E402
from hposvc.train import train  # noqa: E402


def sample_configs(
    task, n: int, *, epochs: int, per_trial_seeds: bool, width: int | None = None, seed: int = 0
) -> list[TrialConfig]:
    """``n`` random lr × momentum/β configs on the task's default structure (or ``width``)."""
    rng = random.Random(seed)
    log_uniform = lambda lo, hi: math.exp(rng.uniform(math.log(lo), math.log(hi)))  # noqa: E731
    common = dict(depth=task.default_depth, width=width or task.default_width, batch_size=64, epochs=epochs)
    configs = []
    for i in range(n):
        trial_seed = i if per_trial_seeds else 0
        if i % 2 == 0:
            cfg = TrialConfig(
                optimizer="momentum",
                lr=log_uniform(1e-3, 0.3),
                momentum=rng.uniform(0.5, 0.99),
                seed=trial_seed,
                **common,
            )
        else:
            cfg = TrialConfig(
                optimizer="adam",
                lr=log_uniform(1e-4, 3e-2),
                beta1=rng.uniform(0.8, 0.95),
                beta2=rng.uniform(0.9, 0.9999),
                seed=trial_seed,
                **common,
            )
        configs.append(cfg)
    return configs


def run_sequential(configs, task, device):
    return [train(c, task, device=device) for c in configs]


def run_population(configs, task, device, k):
    results = [None] * len(configs)
    for group in group_configs(configs, max_size=k):
        for i, r in zip(group, train_population([configs[i] for i in group], task, device=device)):
            results[i] = r
    return results


def timed(fn, device):
    """Seconds ``fn`` took: wall time on CUDA; on the CPU the process's CPU time, which
    other processes on a shared machine cannot inflate (one thread: CPU time = wall time
    on an idle machine)."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = clock()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return clock() - t0, out


def bench(task_name: str, device: str, args) -> dict:
    task = load_task(task_name)
    configs = sample_configs(
        task, args.trials, epochs=args.epochs, per_trial_seeds=args.seeds == "per-trial", width=args.width
    )
    k = args.population or len(configs)
    # Warm-up: first calls pay for lazy init (kernels, vmap tracing, allocator).
    warm = [c.replace(epochs=1) for c in configs[:4]]
    run_sequential(warm[:1], task, device)
    run_population(warm, task, device, k)
    seq_times, pop_times = [], []
    for _ in range(args.repeats):
        t, seq = timed(lambda: run_sequential(configs, task, device), device)
        seq_times.append(t)
        t, pop = timed(lambda: run_population(configs, task, device, k), device)
        pop_times.append(t)
    diff = max(
        abs(a.final["val_loss"] - b.final["val_loss"])
        for a, b in zip(seq, pop)
        if math.isfinite(a.final["val_loss"]) and math.isfinite(b.final["val_loss"])
    )
    statuses = sum(a.status == b.status for a, b in zip(seq, pop))
    n = len(configs)
    row = {
        "task": task_name,
        "device": device,
        "trials": n,
        "population": k,
        "width": configs[0].width,
        "epochs": args.epochs,
        "seq_tpm": 60 * n / min(seq_times),
        "pop_tpm": 60 * n / min(pop_times),
        "seq_median_s": statistics.median(seq_times),
        "pop_median_s": statistics.median(pop_times),
        "max_val_loss_diff": diff,
        "same_status": f"{statuses}/{n}",
    }
    row["ratio"] = row["pop_tpm"] / row["seq_tpm"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="digits,mnist1d")
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--population", type=int, default=16, help="max members per population (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", choices=("shared", "per-trial"), default="shared")
    parser.add_argument("--width", type=int, default=None, help="hidden width / channels (default: the task's)")
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cpu, plus cuda if available)")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), seeds {args.seeds}", file=sys.stderr)
    header = (
        f"{'task':<8} {'device':<6} {'width':>5} {'trials':>6} {'K':>3} {'ep':>3} "
        f"{'seq t/min':>10} {'pop t/min':>10} {'ratio':>6} {'Δval_loss':>10} {'status=':>7}"
    )
    print(header, flush=True)
    for device in devices:
        for name in args.tasks.split(","):
            r = bench(name, device, args)
            print(
                f"{r['task']:<8} {r['device']:<6} {r['width']:>5} {r['trials']:>6} {r['population']:>3} {r['epochs']:>3} "
                f"{r['seq_tpm']:>10.1f} {r['pop_tpm']:>10.1f} {r['ratio']:>5.2f}x {r['max_val_loss_diff']:>10.2e} {r['same_status']:>7}",
                flush=True,
            )


if __name__ == "__main__":
    main()
