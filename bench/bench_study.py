"""hposvc's overhead per trial, and hposvc against a plain Optuna + MLflowCallback script.

The same 20 digits trials (fixed configs: four optimizers × five learning rates, MLP
64-128-128-10, batch 64, 10 epochs, one CPU thread) run three ways in one process:

  (a) bare: ``hposvc.train.train`` on each config, nothing else;
  (b) hposvc: the configs enqueued into a study, run end to end (SQLite study database,
      per-epoch reports to the trial and to the outbox, which the tracking process sends
      to an MLflow SQLite store beside training; the run returns once MLflow holds every
      trial);
  (c) plain: an Optuna study (SQLite) whose objective trains with a textbook DataLoader
      loop, reports each epoch to the trial and logs it to MLflow, with
      optuna-integration's ``MLflowCallback`` (MLflow SQLite store).

It prints hposvc's overhead over (a) — target ≤ 10 % — and (c)/(b) — target > 1.

    python bench/bench_study.py [--trials 20] [--epochs 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)

from _settle import stop_tracking, wait_for_tracking  # noqa: E402
from hposvc.config import TrialConfig  # noqa: E402
from hposvc.spec import parse_spec  # noqa: E402
from hposvc.tasks import load_task  # noqa: E402
from hposvc.train import train  # noqa: E402

OPTIMIZERS = ("sgd", "momentum", "adam", "rmsprop")


def configs(n: int, epochs: int) -> list[TrialConfig]:
    lrs = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    return [
        TrialConfig(optimizer=OPTIMIZERS[i % 4], lr=lrs[(i // 4) % 5], epochs=epochs, batch_size=64, depth=2, width=128)
        for i in range(n)
    ]


def spec(n: int, epochs: int, pruner: str = "median") -> dict:
    return {
        "study": {"name": "bench", "task": "digits", "n_trials": n, "sampler": "random", "pruner": pruner, "seed": 0},
        "train": {"epochs": epochs, "batch_size": 64},
        "model": {"depth": 2, "width": 128},
        "space": {"optimizer": list(OPTIMIZERS), "lr": {"low": 1e-4, "high": 1.0, "log": True}, "optimizer_defaults": "fixed"},
    }


def run_bare(cfgs: list[TrialConfig], task) -> tuple[float, dict]:
    """Total seconds, and seconds per epoch of each config (keyed by optimizer and lr)."""
    t0 = time.perf_counter()
    per_epoch = {}
    for c in cfgs:
        t = time.perf_counter()
        train(c, task, device="cpu")
        per_epoch[(c.optimizer, c.lr)] = (time.perf_counter() - t) / c.epochs
    return time.perf_counter() - t0, per_epoch


def run_hposvc(cfgs: list[TrialConfig], folder: Path, pruner: str = "median") -> tuple[float, float, list]:
    """Total seconds, the seconds inside trials (claim to result, per Optuna's clock), and
    each trial's (optimizer, lr, epochs it ran, seconds) — a pruned trial runs fewer epochs."""
    from hposvc.study import prepare_study
    from hposvc.worker import run_worker

    s = parse_spec(spec(len(cfgs), cfgs[0].epochs, pruner))
    storage = f"sqlite:///{folder / 'hposvc.db'}"
    t0 = time.perf_counter()
    study = prepare_study(s, storage=storage, enqueue=cfgs)
    result = run_worker(study, spec=s, storage=storage, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", data_dir=folder, device="cpu")
    elapsed = time.perf_counter() - t0
    assert result.n_done >= len(cfgs), result
    done = [t for t in study.get_trials(deepcopy=False) if t.duration is not None]
    in_trials = sum(t.duration.total_seconds() for t in done)
    rows = [(t.params["optimizer"], t.params["lr"], len(t.intermediate_values), t.duration.total_seconds()) for t in done]
    return elapsed, in_trials, rows


def run_plain(cfgs: list[TrialConfig], task, folder: Path) -> float:
    import mlflow
    import optuna
    import torch.nn.functional as F
    from optuna_integration.mlflow import MLflowCallback
    from torch.utils.data import DataLoader, TensorDataset

    from hposvc.nn import build_model
    from hposvc.optim import build_optimizer

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uri = f"sqlite:///{folder / 'plain-mlflow.db'}"
    callback = MLflowCallback(tracking_uri=uri, metric_name="val_accuracy", create_experiment=True)
    by_params = {(c.optimizer, c.lr): c for c in cfgs}

    @callback.track_in_mlflow()
    def objective(trial: optuna.Trial) -> float:
        c = by_params[(trial.suggest_categorical("optimizer", list(OPTIMIZERS)), trial.suggest_float("lr", 1e-4, 1.0, log=True))]
        torch.manual_seed(c.seed)
        model = build_model(task, c)
        opt = build_optimizer(model.parameters(), c)
        loader = DataLoader(TensorDataset(task.x_train, task.y_train), batch_size=c.batch_size, shuffle=True)
        acc = 0.0
        for epoch in range(1, c.epochs + 1):
            model.train()
            total = 0.0
            for xb, yb in loader:
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                total += loss.item()
            model.eval()
            with torch.no_grad():
                out = model(task.x_val)
                val_loss = F.cross_entropy(out, task.y_val).item()
                acc = (out.argmax(1) == task.y_val).float().mean().item()
            mlflow.log_metrics({"train_loss": total / len(loader), "val_loss": val_loss, "val_accuracy": acc}, step=epoch)
            trial.report(acc, epoch)
        return acc

    t0 = time.perf_counter()
    study = optuna.create_study(storage=f"sqlite:///{folder / 'plain.db'}", study_name="plain", direction="maximize")
    for c in cfgs:
        study.enqueue_trial({"optimizer": c.optimizer, "lr": c.lr})
    study.optimize(objective, n_trials=len(cfgs), callbacks=[callback])
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pruner", default="median", help="the study's pruner (median: the issue's case; none: no per-epoch decisions)")
    args = parser.parse_args()
    task = load_task("digits", seed=0)
    cfgs = configs(args.trials, args.epochs)
    train(cfgs[0], task, device="cpu")  # warm-up: imports, first-call costs
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        from mlflow import MlflowClient

        runs = []
        for r in range(args.repeats):  # interleaved: a, b, c, a, b, c, ...
            for kind in ("b", "c"):
                (folder / f"{kind}{r}").mkdir()
            # MLflow's SQLite schema is created outside the timed region for both (b) and (c).
            MlflowClient(f"sqlite:///{folder / f'b{r}' / 'mlflow.db'}").search_experiments()
            MlflowClient(f"sqlite:///{folder / f'c{r}' / 'plain-mlflow.db'}").search_experiments()
            a, per_epoch = run_bare(cfgs, task)
            b, b_trials, rows = run_hposvc(cfgs, folder / f"b{r}", args.pruner)
            wait_for_tracking(folder)  # the study's summary and plots, before (c) and the next repeat's (a)
            c = run_plain(cfgs, task, folder / f"c{r}")
            # Per-trial overhead against the bare loop for the epochs each trial actually ran
            # (the median pruner stops some early).
            trained = sum(per_epoch[(opt, lr)] * epochs for opt, lr, epochs, _ in rows)
            overhead_ms = (sum(d for *_, d in rows) - trained) / len(rows) * 1000
            pruned = sum(epochs < args.epochs for _, _, epochs, _ in rows)
            runs.append((a, b, b_trials, c, overhead_ms, pruned))
        stop_tracking(folder)
    a = min(r[0] for r in runs)
    b = min(r[1] for r in runs)
    c = min(r[3] for r in runs)
    overhead_ms = min(r[4] for r in runs)
    once = min(r[1] - r[2] for r in runs)
    pruned = runs[0][5]
    bare = a
    print(f"trials: {args.trials} × {args.epochs} epochs, digits MLP 64-128-128-10, batch 64, 1 thread")
    print(f"best of {args.repeats} interleaved repeats")
    print(f"(a) bare training loop        {a:7.2f} s")
    print(f"(b) hposvc end to end         {b:7.2f} s  -> {b / args.trials * 1000:.0f} ms/trial")
    print(f"(c) optuna + MLflowCallback   {c:7.2f} s")
    print(f"hposvc overhead over (a): {100 * (b - bare) / bare:+.1f} %  ({(b - bare) / args.trials * 1000:.0f} ms/trial; target <= 10 %)")
    print(f"  per trial (claim to result, against the bare loop for the epochs it ran; {pruned} pruned, pruner {args.pruner}): {overhead_ms:.0f} ms/trial (target <= 25 ms)")
    print(f"  and once per study (create, queue, MLflow parent run, final plots): {once:.2f} s")
    print(f"speed ratio (c)/(b): {c / b:.2f}x  (target > 1)")


if __name__ == "__main__":
    main()
