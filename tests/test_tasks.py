"""hposvc.tasks: built-in workloads, deterministic splits, tabular files, user factories."""

from __future__ import annotations

import os
import random
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from hposvc.config import TASK_MODEL_DEFAULTS, TASKS
from hposvc.errors import InvalidInputError
from hposvc.tasks import Task, _load_cached, _mnist1d_arrays, load_task


def splits(task: Task):
    return [getattr(task, f"{xy}_{s}") for s in ("train", "val", "test") for xy in ("x", "y")]


def same_data(a: Task, b: Task) -> bool:
    return all(torch.equal(u, v) for u, v in zip(splits(a), splits(b)))


# -- built-ins -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "family", "input_shape", "n_outputs", "total"),
    [
        ("digits", {}, "mlp", (64,), 10, 1797),
        ("mnist1d", {"num_samples": 200}, "cnn1d", (1, 40), 10, 200),
        ("moons", {"n_samples": 100}, "mlp", (2,), 2, 100),
        ("spirals", {"n_samples": 150, "arms": 3}, "mlp", (2,), 3, 150),
    ],
)
def test_builtin_shapes_and_kinds(name, options, family, input_shape, n_outputs, total):
    task = load_task(name, seed=0, options=options)
    assert (task.name, task.kind, task.family) == (name, "multiclass", family)
    assert task.input_shape == input_shape and task.n_outputs == n_outputs
    assert (task.default_depth, task.default_width) == tuple(TASK_MODEL_DEFAULTS[name].values())
    sizes = [len(task.x_train), len(task.x_val), len(task.x_test)]
    assert sum(sizes) == total
    assert sizes[1] == pytest.approx(0.2 * total, abs=1) and sizes[2] == pytest.approx(0.2 * total, abs=1)
    for x, y in zip(splits(task)[::2], splits(task)[1::2]):
        assert x.dtype == torch.float32 and x.shape[1:] == input_shape and x.device.type == "cpu"
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert int(y.min()) >= 0 and int(y.max()) < n_outputs
    assert set(task.y_train.tolist()) == set(range(n_outputs))


def test_digits_pixels_are_scaled_to_unit_range():
    task = load_task("digits")
    assert float(task.x_train.min()) == 0.0 and float(task.x_train.max()) == 1.0


def test_mnist1d_is_generated_locally_keeps_its_test_split_and_the_callers_rng():
    from mnist1d.data import get_dataset_args, make_dataset

    _load_cached.cache_clear()
    _mnist1d_arrays.cache_clear()  # so make_dataset really runs here
    random.seed(123)
    np.random.seed(123)
    expected_py, expected_np = random.random(), np.random.random()
    random.seed(123)
    np.random.seed(123)
    task = load_task("mnist1d", seed=5, options={"num_samples": 200})
    # make_dataset reseeds the global RNGs; load_task must hand the caller's back.
    assert (random.random(), np.random.random()) == (expected_py, expected_np)
    args = get_dataset_args()
    args.num_samples = 200
    data = make_dataset(args)
    assert torch.equal(task.x_test[:, 0, :], torch.from_numpy(data["x_test"]).float())
    assert torch.equal(task.y_test, torch.from_numpy(data["y_test"]).long())


def test_same_seed_same_split_and_cached_object():
    a = load_task("digits", seed=3)
    assert load_task("digits", seed=3) is a  # cached
    _load_cached.cache_clear()
    b = load_task("digits", seed=3)
    assert b is not a and same_data(a, b)  # rebuilt, identical
    c = load_task("digits", seed=4)
    assert not torch.equal(a.y_train, c.y_train)


def test_classification_splits_are_stratified():
    task = load_task("digits", seed=1)
    for y in (task.y_train, task.y_val, task.y_test):
        counts = torch.bincount(y, minlength=10).float()
        share = counts / counts.sum()
        assert float((share - 0.1).abs().max()) < 0.01  # digits is balanced: ~10% per class


def test_synthetic_sets_follow_the_seed():
    a = load_task("spirals", seed=0, options={"n_samples": 90})
    b = load_task("spirals", seed=1, options={"n_samples": 90})
    assert not torch.equal(a.x_train, b.x_train)
    assert same_data(a, load_task("spirals", seed=0, options={"n_samples": 90}))


# -- bad names and options -------------------------------------------------------------


def test_unknown_task_lists_the_builtins():
    with pytest.raises(InvalidInputError) as e:
        load_task("digitz")
    assert str(e.value).startswith("the 'task' parameter must be one of " + ", ".join(repr(t) for t in TASKS))
    assert "Got 'digitz' instead." in str(e.value)


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(InvalidInputError) as e:
        load_task("moons", options={"arms": 3})
    assert str(e.value) == "task 'moons': the 'options' parameter must be one of 'n_samples', 'noise'. Got 'arms' instead."
    with pytest.raises(InvalidInputError, match="must be empty. Got 'noise' instead. 'digits' takes no options."):
        load_task("digits", options={"noise": 0.1})
    with pytest.raises(InvalidInputError, match=r"'options.noise' parameter must be a number >= 0. Got -1"):
        load_task("moons", options={"noise": -1})


# -- tabular files ---------------------------------------------------------------------


def table(n: int = 120, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a = rng.normal(10.0, 3.0, n)
    b = rng.normal(-5.0, 0.5, n)
    colour = rng.choice(["red", "green", "blue"], n)
    b[::17] = np.nan  # missing numbers are filled with the training mean
    return pd.DataFrame(
        {
            "a": a,
            "b": b,
            "colour": colour,
            "price": 2.0 * a + rng.normal(0, 0.1, n),  # regression target
            "label": np.where(a > 10, "big", "small"),  # two classes
            "grade": rng.integers(0, 3, n),  # three integer classes
        }
    )


def test_tabular_csv_binary_auto_detected(tmp_path):
    path = tmp_path / "shop.csv"
    table().to_csv(path, index=False)
    task = load_task("tabular", seed=0, options={"path": str(path), "target": "label"})
    assert (task.name, task.kind, task.family, task.n_outputs) == ("tabular:shop.csv", "binary", "mlp", 1)
    # a, b, price, grade + one-hot colour (3 values)
    assert task.input_shape == (7,)
    assert task.y_train.dtype == torch.float32 and set(task.y_train.tolist()) == {0.0, 1.0}
    # standardised with training statistics: exactly mean 0 / std 1 there, not elsewhere
    assert task.x_train.mean(0).abs().max() < 1e-5
    assert (task.x_train.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert not torch.isnan(task.x_val).any() and not torch.isnan(task.x_train).any()
    assert (task.default_depth, task.default_width) == (2, 64)


def test_tabular_parquet_regression(tmp_path):
    path = tmp_path / "shop.parquet"
    table().to_parquet(path)
    task = load_task("tabular", seed=0, options={"path": path, "target": "price"})
    assert (task.kind, task.n_outputs, task.input_shape) == ("regression", 1, (8,))  # label one-hot: 2
    assert task.y_train.dtype == torch.float32
    assert abs(float(task.y_train.mean())) < 1e-5  # target standardised with train stats


def test_tabular_multiclass_and_forced_kinds(tmp_path):
    path = tmp_path / "shop.csv"
    table().to_csv(path, index=False)
    grade = load_task(f"tabular:{path}", options={"target": "grade"})
    assert (grade.kind, grade.n_outputs, grade.y_train.dtype) == ("multiclass", 3, torch.int64)
    softmax_two = load_task("tabular", options={"path": str(path), "target": "label", "kind": "classification"})
    assert (softmax_two.kind, softmax_two.n_outputs) == ("multiclass", 2)
    as_regression = load_task("tabular", options={"path": str(path), "target": "grade", "kind": "regression"})
    assert as_regression.kind == "regression"
    with pytest.raises(InvalidInputError, match="has 3 distinct values, not 2"):
        load_task("tabular", options={"path": str(path), "target": "grade", "kind": "binary"})
    with pytest.raises(InvalidInputError, match="'kind' parameter must be one of 'classification', 'binary', 'regression'"):
        load_task("tabular", options={"path": str(path), "target": "grade", "kind": "ordinal"})


def test_tabular_bad_target_names_the_columns(tmp_path):
    path = tmp_path / "shop.csv"
    table().to_csv(path, index=False)
    with pytest.raises(InvalidInputError) as e:
        load_task("tabular", options={"path": str(path), "target": "prize"})
    assert str(e.value) == (
        "task 'tabular': the 'target' parameter must be one of 'a', 'b', 'colour', 'price', 'label', 'grade'. "
        "Got 'prize' instead. Those are the columns of shop.csv."
    )


def test_tabular_bad_paths(tmp_path):
    with pytest.raises(InvalidInputError, match="must be an existing file. Got"):
        load_task("tabular", options={"path": str(tmp_path / "nope.csv"), "target": "y"})
    with pytest.raises(InvalidInputError, match=r"a file ending in .csv, .parquet or .pq"):
        load_task("tabular", options={"path": str(tmp_path / "x.xlsx"), "target": "y"})


def test_tabular_edited_file_is_reloaded(tmp_path):
    path = tmp_path / "shop.csv"
    table(seed=0).to_csv(path, index=False)
    first = load_task("tabular", options={"path": str(path), "target": "label"})
    stat = os.stat(path)
    table(seed=1).to_csv(path, index=False)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load_task("tabular", options={"path": str(path), "target": "label"})
    assert second is not first and not torch.equal(first.x_train, second.x_train)


# -- user factories --------------------------------------------------------------------

FACTORY = textwrap.dedent(
    """
    import torch
    from hposvc.tasks import Task

    def make(seed, n=40, sizes=(3,)):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 5, generator=g)
        y = (x[:, 0] > 0).long()
        k = n // 2
        return Task("anything", "multiclass", "mlp", (5,), 2, x[:k], y[:k], x[k:], y[k:], x[k:], y[k:],
                    default_depth=1, default_width=list(sizes)[0] * 8)

    def not_a_task(seed):
        return {"x": [1, 2]}
    """
)


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "my_tasks_for_hposvc.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_tasks_for_hposvc"


def test_user_factory_is_called_with_seed_and_options(factory_module):
    task = load_task(f"{factory_module}:make", seed=7, options={"n": 30, "sizes": [2, 4]})
    assert task.name == f"{factory_module}:make"  # the name the study asked for
    assert len(task.x_train) == 15 and task.default_width == 16  # options arrived (list kept)
    again = load_task(f"{factory_module}:make", seed=7, options={"n": 30, "sizes": [2, 4]})
    assert again is task
    other_seed = load_task(f"{factory_module}:make", seed=8, options={"n": 30, "sizes": [2, 4]})
    assert not torch.equal(task.x_train, other_seed.x_train)
    unhashable = load_task(f"{factory_module}:make", seed=7, options={"n": 30, "sizes": np.array([2, 4])})
    assert unhashable is not task and torch.equal(unhashable.x_train, task.x_train)  # built, not cached


def test_user_factory_errors(factory_module):
    with pytest.raises(InvalidInputError, match="returned dict"):
        load_task(f"{factory_module}:not_a_task")
    with pytest.raises(InvalidInputError, match="has no function 'missing'"):
        load_task(f"{factory_module}:missing")
    with pytest.raises(InvalidInputError, match="Importing 'no_such_module_xyz' failed"):
        load_task("no_such_module_xyz:make")


def test_task_checks_what_a_factory_builds():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(InvalidInputError, match=r"'x_train' parameter must be \(N, 4\). Got 'shape \(4, 3\)'"):
        Task("t", "multiclass", "mlp", (4,), 2, x, y, x, y, x, y)
    with pytest.raises(InvalidInputError, match="'y_val' parameter must be integer class indices"):
        Task("t", "multiclass", "mlp", (3,), 2, x, y, x, y.float(), x, y)
    with pytest.raises(InvalidInputError, match="'kind' parameter must be one of 'multiclass', 'binary', 'regression'"):
        Task("t", "ranking", "mlp", (3,), 1, x, y, x, y, x, y)
    with pytest.raises(InvalidInputError, match=r"'y_test' parameter must be class indices in 0..1. Got 'a label 2'"):
        Task("t", "multiclass", "mlp", (3,), 2, x, y, x, y, x, y + 1)
    binary = Task("t", "binary", "mlp", (3,), 1, x.numpy(), y.numpy(), x, y, x, y)  # NumPy accepted
    assert binary.y_train.dtype == torch.float32 and binary.x_train.dtype == torch.float32


# -- scikit-learn's data and splits, without importing it ----------------------------------


def test_digits_moons_and_splits_match_scikit_learn() -> None:
    # hposvc reads the digits file and splits in NumPy so a study never imports
    # scikit-learn; studies made before must keep exactly their data.
    from sklearn.datasets import load_digits, make_moons
    from sklearn.model_selection import train_test_split

    from hposvc import tasks

    x, y = tasks.load_digits_arrays()
    digits = load_digits()
    assert np.array_equal(x, digits.data) and np.array_equal(y, digits.target)
    uneven = np.array([0] * 7 + [1] * 5 + [2] * 5 + [3] * 3)  # remainders tie: broken by the seed
    for seed in range(4):
        for labels, frac in ((y, 0.2), (y, 0.25), (uneven, 0.3)):
            data = np.arange(len(labels))
            for strat in (labels, None):
                ours = tasks.train_test_split(data, labels, test_size=frac, seed=seed, stratify=strat)
                theirs = train_test_split(data, labels, test_size=frac, random_state=seed, stratify=strat)
                assert all(np.array_equal(a, b) for a, b in zip(ours, theirs)), (seed, frac, strat is None)
        for n, noise in ((200, 0.1), (7, 0.0)):
            ours, theirs = tasks.make_moons(n, noise=noise, seed=seed), make_moons(n_samples=n, noise=noise, random_state=seed)
            assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])


def test_a_digits_study_does_not_import_scikit_learn(tmp_path) -> None:
    import subprocess
    import sys

    code = "import sys, hposvc.tasks as t; t.load_task('digits'); t.load_task('moons'); print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'mlflow', 'matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
