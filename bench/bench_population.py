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

``--model module:function`` benchmarks a user's model instead (a factory
``fn(task, config) -> nn.Module``; ``--model builtin`` is :func:`image_cnn`, a CNN with
batch norm that reads digits as 8×8 images, ``--width`` channels (default 8) then twice
that). Every trial is momentum-SGD with its own lr
and μ and its own init (``he_normal``); each mode builds its K models the way a trial
does (seeded, then the factory and conversion), and the model-build time is counted in
both. It also times the population's eligibility check (``vmap_reason``) on that model
and on a ResNet-18 (:class:`ResNet18`, 11.2M parameters, 3×32×32 inputs).

    python bench/bench_population.py --model builtin [--trials 16] [--population 16]
        [--epochs 3] [--repeats 3] [--device cpu|cuda|all]
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

from torch import nn  # noqa: E402

from hposvc.config import TrialConfig  # noqa: E402
from hposvc.plugins import build_user_model, load_callable  # noqa: E402
from hposvc.population import group_configs, train_population, vmap_reason  # noqa: E402
from hposvc.tasks import load_task  # noqa: E402
from hposvc.train import seed_everything, train  # noqa: E402


# -- user models -----------------------------------------------------------------------------


class ImageCNN(nn.Module):
    """A user's small CNN: digits' 64 pixels as one 8×8 image, two conv + batch-norm blocks."""

    def __init__(self, n_outputs: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, n_outputs)

    def forward(self, x):
        return self.head(self.features(x.reshape(len(x), 1, 8, 8)).mean(dim=(2, 3)))


def image_cnn(task, config):
    return ImageCNN(task.n_outputs, width=config.width)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlock ×[2, 2, 2, 2], 64–512 channels) with a 3×3 stem for 32×32 inputs."""

    def __init__(self, n_outputs: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, n_outputs)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


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


def model_configs(n: int, *, epochs: int, width: int, batch_size: int = 64, seed: int = 0) -> list[TrialConfig]:
    """``n`` momentum-SGD trials (lr log-uniform in [1e-3, 0.3], μ in [0.5, 0.99]), study seed."""
    rng = random.Random(seed)
    return [
        TrialConfig(optimizer="momentum", lr=math.exp(rng.uniform(math.log(1e-3), math.log(0.3))),
                    momentum=rng.uniform(0.5, 0.99), init="he_normal", batch_size=batch_size, epochs=epochs, seed=0, width=width)
        for _ in range(n)
    ]


def bench_model(factory, task_name: str, device: str, args) -> dict:
    """A user's model: K trials as one population vs one after another."""
    task = load_task(task_name)
    configs = model_configs(args.trials, epochs=args.epochs, width=args.width or 8, batch_size=args.batch_size)
    k = args.population or len(configs)

    def build(config):
        seed_everything(config.seed)  # as TrialContext.build_model: seed, factory, conversion
        return build_user_model(factory, task, config, apply=["init"])[0]

    def sequential():
        return [train(c, task, device=device, model=build(c)) for c in configs]

    def population():
        out = []
        for start in range(0, len(configs), k):
            group = configs[start : start + k]
            out += train_population(group, task, device=device, models=[build(c) for c in group])
        return out

    sample = build(configs[0]).to(device)
    check_s, reason = timed(lambda: vmap_reason(sample, task.x_val.to(device)), device)
    if reason is not None:
        raise SystemExit(f"the model cannot train as a population: {reason}")
    warm = [c.replace(epochs=1) for c in configs[:2]]
    train(warm[0], task, device=device, model=build(warm[0]))
    train_population(warm, task, device=device, models=[build(c) for c in warm])
    seq_times, pop_times = [], []
    for _ in range(args.repeats):
        t, seq = timed(sequential, device)
        seq_times.append(t)
        t, pop = timed(population, device)
        pop_times.append(t)
    diff = max(abs(a.final["val_loss"] - b.final["val_loss"]) for a, b in zip(seq, pop)
               if math.isfinite(a.final["val_loss"]) and math.isfinite(b.final["val_loss"]))
    n = len(configs)
    return {
        "task": task_name, "device": device, "trials": n, "population": k, "epochs": args.epochs, "width": configs[0].width,
        "batch": configs[0].batch_size,
        "seq_tpm": 60 * n / min(seq_times), "pop_tpm": 60 * n / min(pop_times),
        "ratio": min(seq_times) / min(pop_times), "max_val_loss_diff": diff,
        "same_status": f"{sum(a.status == b.status for a, b in zip(seq, pop))}/{n}", "check_s": check_s,
    }


def check_timing(device: str, repeats: int) -> tuple[float, int]:
    """Best-of seconds of vmap_reason on a ResNet-18 (two 3×32×32 samples), and its size."""
    seed_everything(0)
    model = ResNet18().to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    best = min(timed(lambda: vmap_reason(model, x), device)[0] for _ in range(max(1, repeats)))
    return best, sum(p.numel() for p in model.parameters())


def main_model(args, devices: list[str]) -> None:
    factory = image_cnn if args.model == "builtin" else load_callable(args.model, key="--model")
    name = "bench_population:image_cnn" if args.model == "builtin" else args.model
    print(f"{'model':<28} {'device':<6} {'width':>5} {'batch':>5} {'trials':>6} {'K':>3} {'ep':>3} {'seq t/min':>10} {'pop t/min':>10} "
          f"{'ratio':>6} {'Δval_loss':>10} {'status=':>7} {'check s':>8}", flush=True)
    for device in devices:
        r = bench_model(factory, args.tasks.split(",")[0], device, args)
        print(f"{name:<28} {device:<6} {r['width']:>5} {r['batch']:>5} {r['trials']:>6} {r['population']:>3} {r['epochs']:>3} {r['seq_tpm']:>10.1f} "
              f"{r['pop_tpm']:>10.1f} {r['ratio']:>5.2f}x {r['max_val_loss_diff']:>10.2e} {r['same_status']:>7} {r['check_s']:>8.3f}", flush=True)
    for device in devices:
        seconds, n_params = check_timing(device, args.repeats)
        print(f"eligibility check (vmap_reason) on ResNet-18 ({n_params / 1e6:.1f}M parameters, 2×3×32×32) on {device}: "
              f"{seconds:.3f} s (goal < 1 s)", flush=True)


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
    parser.add_argument("--batch-size", type=int, default=64, help="--model: the trials' batch size")
    parser.add_argument("--model", default=None, help="a user's model factory module:function ('builtin': a CNN with batch norm on digits as 8×8 images)")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), seeds {args.seeds}", file=sys.stderr)
    if args.model is not None:
        main_model(args, devices)
        return
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
