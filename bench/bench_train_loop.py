"""Time hposvc's training loop against a textbook DataLoader loop on the same trial.

The trial: digits, MLP 64-128-128-10 (depth 2, width 128), batch 64, Adam (one-shot
defaults), 20 epochs, one CPU thread. Both loops start from the same weights (same seed,
same ``build_model``), use the same optimizer, evaluate validation loss and accuracy every
epoch and val/test at the end. The only difference is how batches are made and read:

- hposvc: ``hposvc.train.train`` — index slices of tensors already on the device, per-step
  losses read once per epoch;
- textbook: ``DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)`` — the loader
  fetches each sample and collates the batch in Python; ``loss.item()`` every step.

Runs are interleaved (hposvc, textbook, hposvc, ...) after one warm-up each, so drifts in
machine load hit both; the median and the minimum of the repeats are reported.

    python bench/bench_train_loop.py [--repeats 5] [--epochs 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from hposvc.config import TrialConfig  # noqa: E402
from hposvc.nn import build_model  # noqa: E402
from hposvc.optim import build_optimizer  # noqa: E402
from hposvc.tasks import load_task  # noqa: E402
from hposvc.train import seed_everything, train  # noqa: E402


def textbook(config: TrialConfig, task) -> tuple[float, dict[str, float]]:
    """The loop from a PyTorch tutorial, with the same model, init, optimizer and evals."""
    t0 = time.perf_counter()
    seed_everything(config.seed)
    model = build_model(task, config)
    optimizer = build_optimizer(model.parameters(), config)
    loader = DataLoader(
        TensorDataset(task.x_train, task.y_train),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )

    def evaluate(x, y):
        model.eval()
        with torch.no_grad():
            out = model(x)
            return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()

    for _ in range(config.epochs):
        model.train()
        total = 0.0
        for xb, yb in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            total += loss.item()
        train_loss = total / len(loader)  # noqa: F841 (a tutorial logs it; kept for equal work)
        val_loss, val_acc = evaluate(task.x_val, task.y_val)
    val_loss, val_acc = evaluate(task.x_val, task.y_val)
    test_loss, test_acc = evaluate(task.x_test, task.y_test)
    final = {"val_loss": val_loss, "val_accuracy": val_acc, "test_loss": test_loss, "test_accuracy": test_acc}
    return time.perf_counter() - t0, final


def ours(config: TrialConfig, task) -> tuple[float, dict[str, float]]:
    t0 = time.perf_counter()
    result = train(config, task, device="cpu")
    return time.perf_counter() - t0, result.final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    torch.set_num_threads(1)
    task = load_task("digits", seed=0)
    config = TrialConfig(optimizer="adam", depth=2, width=128, batch_size=64, epochs=args.epochs, seed=0)
    print(
        f"digits: {len(task.x_train)} train samples, MLP 64-128-128-10, batch {config.batch_size}, "
        f"Adam lr {config.lr}, {config.epochs} epochs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread"
    )
    ours(config, task), textbook(config, task)  # warm-up: first-call costs in torch
    times: dict[str, list[float]] = {"hposvc": [], "textbook": []}
    finals = {}
    for _ in range(args.repeats):
        for name, fn in (("hposvc", ours), ("textbook", textbook)):
            seconds, finals[name] = fn(config, task)
            times[name].append(seconds)
    for name, values in times.items():
        accuracy = finals[name]["val_accuracy"]
        print(
            f"{name:9s} median {statistics.median(values):.3f} s  min {min(values):.3f} s  "
            f"(runs: {', '.join(f'{v:.3f}' for v in values)})  val_accuracy {accuracy:.4f}"
        )
    # The minimum is the run least disturbed by other processes; the median shows the spread.
    for label, stat in (("median", statistics.median), ("min", min)):
        ratio = stat(times["textbook"]) / stat(times["hposvc"])
        verdict = "hposvc faster" if ratio >= 1 else "hposvc SLOWER"
        print(f"ratio textbook / hposvc ({label}) = {ratio:.2f}  ({verdict})")


if __name__ == "__main__":
    main()
