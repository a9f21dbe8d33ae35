"""Time a user's own ResNet-8 tuned through hposvc against the same search in plain Optuna.

Both sides, in one run, on the same generated image folder (``--images`` 32×32 PNGs of
three shape classes, written with Pillow) and the same model (:data:`USER_MODEL`, a
CIFAR-style ResNet-8 with batch norm and ReLU modules, as a user would write it):

- hposvc: ``hposvc.run_study`` of a spec with ``task = "images"`` and ``model =
  "ownresnet:resnet8"``, searching optimizer (adam / momentum) and lr; hposvc reads the
  folder once, trains on the fast path, logs per-epoch metrics, ``model.txt``, the
  parameter count and the config to MLflow and every trial to SQLite.
- plain: the script most people write: ``optuna.create_study`` on SQLite, the
  ``optuna_integration.MLflowCallback`` (params and the final value per trial), the
  folder read once into tensors with Pillow, and the textbook loop: ``DataLoader(
  TensorDataset, shuffle=True)``, ``.to(device)`` per batch, ``zero_grad / backward /
  step``, then a validation pass.

Same trials, epochs, batch size and seed-per-trial; the sampler picks the values on each
side, which does not change the work per trial. The sides alternate (hposvc, plain,
hposvc, plain) after one warm-up each, so machine-load drifts hit both, and the best of
the repeats is reported. It then prints what converting a model (norm, activation and
init applied with :func:`hposvc.nn.convert`) and logging it (``str(model)``, the
parameter count) cost per trial, as a fraction of one trial's training time.

``--paths`` instead trains the resnet family on digits-as-images once per training path
(fp32, bf16, fp16, channels_last, compile, a DataLoader with worker processes) and prints
each one's accuracy, time and notes: on a GPU, the check of the CUDA-only paths that the
CPU tests cannot run.

    python bench/bench_own_model.py [--device auto] [--images 600] [--trials 4] [--epochs 2] [--repeats 2]
    python bench/bench_own_model.py --paths [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

USER_MODEL = '''\
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + identity)


class ResNet8(nn.Module):
    """CIFAR-style ResNet-8: a 3×3 stem, three stages of one basic block, pool, linear."""

    def __init__(self, in_channels=3, n_classes=10, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


def resnet8(task, config):
    return ResNet8(task.input_shape[0], task.n_outputs)
'''

CLASSES = ("circle", "cross", "square")


def write_images(root: Path, n: int, size: int = 32, seed: int = 0) -> None:
    """``n`` RGB images, a third per class: a coloured shape on noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    masks = {
        "circle": np.abs(np.hypot(yy - c, xx - c) - size / 3) < 1.5,
        "cross": (np.abs(yy - c) < 1.5) | (np.abs(xx - c) < 1.5),
        "square": (np.maximum(np.abs(yy - c), np.abs(xx - c)) > size / 3 - 1.5) & (np.maximum(np.abs(yy - c), np.abs(xx - c)) < size / 3 + 1.5),
    }
    for i in range(n):
        kind = CLASSES[i % 3]
        img = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
        img[masks[kind]] = rng.integers(140, 256, size=3, dtype=np.uint8)
        (root / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / kind / f"{i:05d}.png")


# -- hposvc -----------------------------------------------------------------------------


def run_hposvc(work: Path, images: Path, *, round_: int, trials: int, epochs: int, batch_size: int, device: str) -> float:
    import hposvc

    data = work / f"hposvc-{round_}"  # a fresh store each round (MLflow caches engines by URI)
    spec = {
        "study": {"name": "own-resnet8", "task": "images", "model": "ownresnet:resnet8", "n_trials": trials, "pruner": "none", "sampler": "random", "code_dir": str(work)},
        "task": {"path": str(images)},
        "train": {"epochs": epochs, "batch_size": batch_size},
        "space": {"optimizer": ["adam", "momentum"], "lr": {"low": 1e-3, "high": 0.1, "log": True}},
    }
    t0 = time.perf_counter()
    result = hposvc.run_study(spec, data_dir=data, device=device)
    elapsed = time.perf_counter() - t0
    assert result.n_done == trials, result
    return elapsed


# -- plain Optuna + MLflowCallback + a textbook DataLoader loop ----------------------------


def run_plain(work: Path, images: Path, *, round_: int, trials: int, epochs: int, batch_size: int, device: str) -> float:
    import importlib

    import optuna
    import torch.nn.functional as F
    from optuna_integration.mlflow import MLflowCallback
    from PIL import Image

    data = work / f"plain-{round_}"
    data.mkdir()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    t0 = time.perf_counter()
    # the folder, read once: files per class, a seeded 60/20/20 split, per-channel scaling
    files = sorted((c, f) for c in sorted(os.listdir(images)) for f in sorted((images / c).iterdir()))
    classes = sorted({c for c, _ in files})
    x = torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for _, f in files])).permute(0, 3, 1, 2)
    y = torch.tensor([classes.index(c) for c, _ in files])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_train, n_val = int(0.6 * len(x)), int(0.2 * len(x))
    train_idx, val_idx = order[:n_train], order[n_train : n_train + n_val]
    mean, std = x[train_idx].mean(dim=(0, 2, 3), keepdim=True), x[train_idx].std(dim=(0, 2, 3), keepdim=True)
    x = (x - mean) / std
    train_set = torch.utils.data.TensorDataset(x[train_idx], y[train_idx])
    val_set = torch.utils.data.TensorDataset(x[val_idx], y[val_idx])
    resnet8 = importlib.import_module("ownresnet").resnet8
    task = type("T", (), {"input_shape": tuple(x.shape[1:]), "n_outputs": len(classes)})()

    def objective(trial: optuna.Trial) -> float:
        optimizer_name = trial.suggest_categorical("optimizer", ["adam", "momentum"])
        lr = trial.suggest_float("lr", 1e-3, 0.1, log=True)
        torch.manual_seed(0)
        model = resnet8(task, None).to(dev)
        if optimizer_name == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=lr)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True)
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=256)
        for _ in range(epochs):
            model.train()
            for xb, yb in loader:
                xb, yb = xb.to(dev), yb.to(dev)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for xb, yb in val_loader:
                    correct += (model(xb.to(dev)).argmax(-1) == yb.to(dev)).sum().item()
        return correct / len(val_set)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # optuna-integration marks it deprecated; it is still what people use
        callback = MLflowCallback(tracking_uri=f"sqlite:///{data / 'mlflow.db'}", metric_name="val_accuracy")
    study = optuna.create_study(study_name="plain-resnet8", storage=f"sqlite:///{data / 'optuna.db'}", direction="maximize")
    study.optimize(objective, n_trials=trials, callbacks=[callback])
    return time.perf_counter() - t0


# -- conversion and logging cost per trial -----------------------------------------------


def conversion_cost(images: Path, *, epochs: int, batch_size: int, device: str, repeats: int = 20) -> tuple[float, float]:
    """(seconds to build, convert and describe one model, seconds to train one trial)."""
    import importlib

    from hposvc.config import TrialConfig
    from hposvc.nn import count_parameters
    from hposvc.plugins import build_user_model
    from hposvc.tasks import load_task
    from hposvc.train import train

    task = load_task("images", options={"path": str(images)})
    factory = importlib.import_module("ownresnet").resnet8
    config = TrialConfig(optimizer="adam", norm="group", activation="gelu", init="he_normal", epochs=epochs, batch_size=batch_size)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        raw = factory(task, config)
        t1 = time.perf_counter()
        model, report = build_user_model(factory, task, config, apply=("norm", "activation", "init"))
        text, n, notes = str(model), count_parameters(model), report.describe()
        seconds.append(time.perf_counter() - t1 - (t1 - t0))  # what hposvc adds to calling the factory
    model, _ = build_user_model(factory, task, config, apply=("norm", "activation", "init"))
    result = train(config, task, device=device, model=model)
    del raw, text, n, notes
    return float(np.median(seconds)), result.wall_time


def training_paths(device: str) -> None:
    """One training per path, same config otherwise; a path that fails raises."""
    from hposvc.config import TrialConfig
    from hposvc.tasks import load_task
    from hposvc.train import train

    task = load_task("digits")
    base = TrialConfig(optimizer="adam", lr=3e-3, epochs=5, batch_size=64, family="resnet", depth=1, width=16, norm="batch", schedule="cosine")
    paths = {
        "fp32": base,
        "bf16": base.replace(precision="bf16"),
        "fp16": base.replace(precision="fp16"),
        "channels_last": base.replace(channels_last=True),
        "compile": base.replace(compile=True),
        "loader, 2 workers": base.replace(data="loader", num_workers=2),
    }
    for name, config in paths.items():
        result = train(config, task, device=device)
        notes = "; ".join(result.notes) or "-"
        print(f"{name:>18}: {result.status}, val_accuracy {result.final['val_accuracy']:.3f}, {result.wall_time:.2f} s on {result.device} via {result.data}; notes: {notes}", flush=True)
        if result.status != "completed":
            raise SystemExit(f"{name}: {result.reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=600, help="generated 32×32 images (a third per class)")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side, after one warm-up each")
    parser.add_argument("--paths", action="store_true", help="train once per training path (precision, channels_last, compile, loader) instead")
    args = parser.parse_args()
    if args.paths:
        training_paths(args.device)
        return

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-own-model-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # MLflowCallback's runs put their artifact folder (mlruns/) in the working directory
        (work / "ownresnet.py").write_text(USER_MODEL)
        sys.path.insert(0, str(work))
        images = work / "images"
        write_images(images, args.images)
        kw = dict(trials=args.trials, epochs=args.epochs, batch_size=args.batch_size, device=args.device)
        print(f"device {args.device}; {args.images} images 32×32, {args.trials} trials × {args.epochs} epochs, batch {args.batch_size}; torch threads {torch.get_num_threads()}", flush=True)
        ours, plain = [], []
        for i in range(args.repeats + 1):  # the first of each is a warm-up
            ours.append(run_hposvc(work, images, round_=i, **kw))
            plain.append(run_plain(work, images, round_=i, **kw))
            print(f"  round {i}{' (warm-up)' if i == 0 else ''}: hposvc {ours[-1]:.2f} s, plain {plain[-1]:.2f} s", flush=True)
        best_ours, best_plain = min(ours[1:]), min(plain[1:])
        print(f"study wall time, best of {args.repeats}: hposvc {best_ours:.2f} s, plain Optuna + MLflowCallback + DataLoader {best_plain:.2f} s")
        print(f"ratio hposvc / plain: {best_ours / best_plain:.2f}  (per trial: {best_ours / args.trials:.2f} s vs {best_plain / args.trials:.2f} s)")
        convert, trained = conversion_cost(images, epochs=args.epochs, batch_size=args.batch_size, device=args.device)
        print(
            f"conversion + logging per trial (norm, activation, init applied; str(model), parameter count, report): "
            f"{convert * 1e3:.1f} ms = {100 * convert / trained:.2f} % of one trial's training ({trained:.2f} s; goal < 2 %)"
        )


if __name__ == "__main__":
    main()
