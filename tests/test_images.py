"""Your own data: image folders and array files the tests write themselves (Pillow, NumPy),
datasets through a DataLoader, and the training options (bf16 autocast, compile, channels_last)
that run on the CPU. Nothing is downloaded."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from hposvc.cli import main
from hposvc.config import TrialConfig
from hposvc.errors import InvalidInputError
from hposvc.tasks import Task, load_task
from hposvc.train import data_path, train

CLASSES = ("circle", "cross", "square")


def curves(result) -> list[tuple]:
    """A run's learning curves without the wall-clock times."""
    return [(h.train_loss, h.val_loss, h.val_accuracy) for h in result.history]


def shape_image(kind: str, rng: np.random.Generator, size: int = 12) -> np.ndarray:
    """A size×size RGB picture of ``kind`` in a random colour on noise: easy to tell apart."""
    img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    colour = rng.integers(150, 256, size=3, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    if kind == "circle":
        mask = np.abs(np.hypot(yy - c, xx - c) - size / 3) < 1.2
    elif kind == "cross":
        mask = (np.abs(yy - c) < 1.2) | (np.abs(xx - c) < 1.2)
    else:
        mask = ((yy == 2) | (yy == size - 3) | (xx == 2) | (xx == size - 3)) & (yy >= 2) & (yy <= size - 3) & (xx >= 2) & (xx <= size - 3)
    img[mask] = colour
    return img


def write_folder(root: Path, per_class: int = 20, *, size: int = 12, seed: int = 0, suffix: str = ".png") -> Path:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(shape_image(kind, rng, size)).save(root / kind / f"{i:03d}{suffix}")
    return root


# -- images ----------------------------------------------------------------------------


def test_an_image_folder_is_split_scaled_and_labelled_in_class_name_order(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "shapes", per_class=20)
    (root / "circle" / "notes.txt").write_text("not an image: skipped")
    task = load_task("images", seed=1, options={"path": str(root)})
    assert (task.kind, task.family, task.input_shape, task.n_outputs) == ("multiclass", "cnn2d", (3, 12, 12), 3)
    sizes = [len(task.x_train), len(task.x_val), len(task.x_test)]
    assert sum(sizes) == 60 and sizes[1] == 12 and sizes[2] == 12
    assert all(sorted(torch.bincount(y).tolist()) == [n // 3] * 3 for y, n in ((task.y_val, 12), (task.y_test, 12)))  # stratified
    # per-channel standardisation with training statistics
    assert torch.allclose(task.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(task.x_train.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    # the same seed gives the same split; another seed another one
    again = load_task("images", seed=1, options={"path": str(root), "size": 12})
    assert torch.equal(again.x_val, task.x_val)
    assert not torch.equal(load_task("images", seed=2, options={"path": str(root)}).y_val, task.y_val)


def test_train_and_val_folders_grayscale_and_resizing(tmp_path: Path) -> None:
    write_folder(tmp_path / "data" / "train", per_class=10, size=16)
    write_folder(tmp_path / "data" / "val", per_class=3, size=16, seed=1, suffix=".jpg")
    task = load_task("images", options={"path": str(tmp_path / "data"), "size": [8, 10], "grayscale": True, "test_fraction": 0.3})
    assert task.input_shape == (1, 8, 10)
    assert len(task.x_val) == 9 and len(task.x_test) == 9 and len(task.x_train) == 21  # val from disk, test carved from train


def test_images_train_a_cnn_and_a_resnet(tmp_path: Path) -> None:
    task = load_task("images", options={"path": str(write_folder(tmp_path / "shapes", per_class=30))})
    for family in ("cnn2d", "resnet"):
        config = TrialConfig(optimizer="adam", lr=3e-3, epochs=8, batch_size=16, depth=1, width=8, norm="batch", family=family)
        result = train(config, task, device="cpu")
        assert result.status == "completed" and result.final["val_accuracy"] >= 0.8, (family, result.final)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda root: (root / "circle" / "005.png").write_bytes(b"\x89PNG broken"), "circle/005.png"),
        (lambda root: [p.unlink() for p in (root / "cross").iterdir()], "cross"),
        (lambda root: Image.new("RGB", (20, 12)).save(root / "square" / "999.png"), "square/999.png"),
    ],
    ids=["broken-image", "empty-class", "odd-size"],
)
def test_bad_image_folders_name_the_file(tmp_path: Path, make, needle: str) -> None:
    root = write_folder(tmp_path / "shapes", per_class=4)
    make(root)
    with pytest.raises(InvalidInputError) as err:
        load_task("images", options={"path": str(root)})
    assert needle in str(err.value)
    if needle.endswith("999.png"):
        assert "set [task] size" in str(err.value)


def test_a_missing_image_folder_is_exit_2_before_anything_is_written(tmp_path: Path) -> None:
    spec = tmp_path / "img.toml"
    spec.write_text('[study]\nname = "img"\ntask = "images"\nn_trials = 1\n\n[task]\npath = "nowhere"\n')
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 2, result.output
    assert str(tmp_path / "nowhere") in result.output and "No such folder" in result.output
    assert not (data / "hposvc.db").exists()
    spec.write_text('[study]\nname = "img"\ntask = "images"\n')
    result = CliRunner().invoke(main, ["study", "validate", str(spec)])
    assert result.exit_code == 2 and "task.path" in result.output


def test_an_image_study_runs_end_to_end(tmp_path: Path) -> None:
    write_folder(tmp_path / "shapes", per_class=12)
    spec = tmp_path / "shapes.toml"
    spec.write_text(
        textwrap.dedent(
            """\
            [study]
            name = "shapes"
            task = "images"
            n_trials = 2
            pruner = "none"
            [task]
            path = "shapes"
            [train]
            epochs = 2
            batch_size = 16
            [model]
            family = "resnet"
            depth = 1
            width = 4
            zero_init_residual = true
            [space]
            norm = ["batch", "group"]
            """
        )
    )
    data = tmp_path / "data"
    result = CliRunner().invoke(main, ["study", "run", str(spec), "--data-dir", str(data), "--quiet"])
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="shapes", storage=f"sqlite:///{data / 'hposvc.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert {t.user_attrs["hposvc.config"]["family"] for t in trials} == {"resnet"}
    assert all(t.user_attrs["hposvc.config"]["zero_init_residual"] is True for t in trials)


# -- arrays ----------------------------------------------------------------------------


def test_arrays_from_npz_and_pt_with_any_sample_shape(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 2, 6, 6)).astype(np.float32)
    y = (x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64) + 2 * (x[:, 1].mean(axis=(1, 2)) > 0)
    np.savez(tmp_path / "a.npz", x_train=x[:60], y_train=y[:60], x_val=x[60:75], y_val=y[60:75], x_test=x[75:], y_test=y[75:])
    task = load_task("arrays", options={"path": str(tmp_path / "a.npz")})
    assert (task.kind, task.family, task.input_shape, task.n_outputs) == ("multiclass", "cnn2d", (2, 6, 6), 4)
    assert torch.equal(task.x_test, torch.from_numpy(x[75:])) and len(task.x_train) == 60
    torch.save({"x_train": torch.randn(50, 7), "y_train": torch.randn(50)}, tmp_path / "r.pt")
    task = load_task("arrays", options={"path": str(tmp_path / "r.pt"), "val_fraction": 0.2, "test_fraction": 0.2})
    assert (task.kind, task.family, task.n_outputs, len(task.x_train), len(task.x_val)) == ("regression", "mlp", 1, 30, 10)
    result = train(TrialConfig(epochs=2, width=8, depth=1), task, device="cpu")
    assert result.status == "completed" and "val_accuracy" not in result.final


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x_train": np.zeros((10, 3)), "y_train": np.zeros(9, dtype=np.int64)}, "'y_train' parameter must be one per sample of x_train (10). Got '9 targets'"),
        ({"x_train": np.zeros((10, 3))}, "'y_train' parameter must be an array in"),
        ({"x_train": np.zeros((10, 3)), "y_train": np.zeros(10, dtype=np.int64), "x_val": np.zeros((4, 3))}, "x_val and y_val come together"),
        ({"x_train": np.zeros((10, 3)), "y_train": np.zeros(10, dtype=np.int64), "x_val": np.zeros((4, 2)), "y_val": np.zeros(4, dtype=np.int64)}, "x_train's (3,)"),
    ],
    ids=["label-count", "no-labels", "half-a-split", "shape"],
)
def test_bad_array_files_name_the_file_and_key(tmp_path: Path, arrays: dict, needle: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InvalidInputError) as err:
        load_task("arrays", options={"path": str(tmp_path / "bad.npz")})
    assert needle in str(err.value) and ("bad.npz" in str(err.value))


# -- datasets through a DataLoader -------------------------------------------------------


class Squares(torch.utils.data.Dataset):
    """A map-style dataset computed per item (nothing is a tensor of the whole split)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 6, 6, generator=g)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def squares_task(n: int = 120) -> Task:
    return Task.from_datasets("squares", "multiclass", 2, Squares(n, 0), Squares(n // 4, 1), Squares(n // 4, 2))


def test_a_dataset_task_trains_through_the_loader_or_as_tensors() -> None:
    task = squares_task()
    assert task.streams and task.input_shape == (1, 6, 6) and task.family == "cnn2d"
    config = TrialConfig(optimizer="adam", lr=1e-2, epochs=3, batch_size=32, depth=1, width=4, family="cnn2d")
    assert data_path(config, task) == "tensors"  # small: read once, then the fast path
    fast = train(config, task, device="cpu")
    loader = train(config.replace(data="loader"), task, device="cpu")
    assert (fast.data, loader.data) == ("tensors", "loader")
    assert loader.status == "completed" and loader.final["val_accuracy"] > 0.7
    # the seeded sampler: the same config gives the same numbers
    assert curves(train(config.replace(data="loader"), task, device="cpu")) == curves(loader)
    # the lone last sample is dropped on both paths: 120 = 3 × 32 + 24, 97 = 3 × 32 + 1
    assert len(squares_task(97).x_train) == 97
    assert train(config.replace(data="loader", epochs=1), squares_task(97), device="cpu").status == "completed"


def test_loader_workers_are_seeded_and_persistent() -> None:
    task = squares_task()
    config = TrialConfig(optimizer="adam", lr=1e-2, epochs=2, batch_size=32, depth=1, width=4, family="cnn2d", data="loader", num_workers=2)
    a, b = train(config, task, device="cpu"), train(config, task, device="cpu")
    assert curves(a) == curves(b) and a.status == "completed"


def test_a_tensor_task_can_be_forced_through_the_loader() -> None:
    task = load_task("moons", options={"n_samples": 200})
    config = TrialConfig(epochs=2, width=8, depth=1, data="loader")
    result = train(config, task, device="cpu")
    assert result.data == "loader" and result.status == "completed"


def test_a_bad_dataset_is_refused_with_what_is_wrong() -> None:
    with pytest.raises(InvalidInputError, match=r"'y_val' parameter must be class indices in 0..1. Got 'a label 5' instead"):
        bad = torch.utils.data.TensorDataset(torch.zeros(4, 1, 6, 6), torch.full((4,), 5))
        Task.from_datasets("bad", "multiclass", 2, Squares(8, 0), bad, Squares(8, 0))


# -- precision, compile, channels_last -------------------------------------------------


def test_bf16_autocast_trains_on_the_cpu() -> None:
    task = load_task("digits")
    config = TrialConfig(optimizer="adam", lr=1e-2, epochs=3, width=16, depth=1, family="cnn2d", precision="bf16")
    bf16, fp32 = train(config, task, device="cpu"), train(config.replace(precision="fp32"), task, device="cpu")
    assert bf16.status == "completed" and bf16.final["val_accuracy"] > 0.8
    assert abs(bf16.final["val_accuracy"] - fp32.final["val_accuracy"]) < 0.05
    assert curves(bf16) != curves(fp32)  # autocast did change the arithmetic


def test_fp16_uses_a_gradient_scaler_and_trains() -> None:
    result = train(TrialConfig(optimizer="adam", epochs=2, width=16, depth=1, precision="fp16"), load_task("moons"), device="cpu")
    assert result.status == "completed"


def test_compile_that_fails_falls_back_to_eager_and_says_why(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(model, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler here")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    config = TrialConfig(epochs=1, width=8, depth=1, compile=True)
    result = train(config, load_task("moons"), device="cpu")
    assert result.status == "completed"
    assert result.notes == ("torch.compile failed, trained eagerly: RuntimeError: no C++ compiler here",)
    assert "torch.compile failed" in caplog.text
    # training itself is what eager training gives (the tried step was undone)
    assert result.history[0].train_loss == train(config.replace(compile=False), load_task("moons"), device="cpu").history[0].train_loss


def test_channels_last_is_for_cuda_and_says_so_elsewhere() -> None:
    result = train(TrialConfig(epochs=1, width=4, depth=1, family="cnn2d", channels_last=True), load_task("digits"), device="cpu")
    assert result.notes == ("channels_last ignored: it applies to 2-D convs on CUDA, and this is cpu",)
