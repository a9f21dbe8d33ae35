"""Workloads: data splits plus the model family that trains on them.

A :class:`Task` holds CPU tensors for train/validation/test, what kind of prediction it
is (``multiclass`` → softmax through cross-entropy, ``binary`` → one sigmoid output with
binary cross-entropy, ``regression`` → a linear head with MSE) and which model family
fits it. :func:`load_task` builds the built-in workloads and calls user factories.

Built-ins (names from :data:`hposvc.config.TASKS`; options in brackets):

- ``digits``: scikit-learn's bundled 8×8 digits (pixels scaled to [0, 1]), 10 classes, MLP.
- ``mnist1d`` [``num_samples``]: generated locally by ``mnist1d.data.make_dataset`` with
  the package's canonical arguments (seed 42, so it is the published data set, never
  downloaded); its own 1000-sample test split is kept, the rest is split train/val by
  ``seed``. Shape (N, 1, 40) for the 1-D CNN.
- ``moons`` [``n_samples``, ``noise``]: two interleaved half-moons, kept as a
  two-class ``multiclass`` task (softmax); binary sigmoid heads come from tabular files.
- ``spirals`` [``n_samples``, ``arms``, ``noise``]: interleaved spirals, one class
  per arm (1.5 turns each, outer radius 1, Gaussian ``noise`` std).
- ``tabular`` [``path``, ``target``, ``kind``]: a CSV or Parquet file read with pandas.
  ``kind`` is ``classification`` (softmax over the classes), ``binary`` (exactly two
  classes, one sigmoid output; the larger label is positive) or ``regression``; absent,
  a non-numeric/boolean target or one of at most 20 distinct integers is a classification
  (``binary`` when it has two values), anything else a regression. Categorical columns
  are one-hot encoded, missing numbers get the training mean, and every feature (and a
  regression target) is standardised with training-split statistics. ``tabular:<path>``
  is shorthand for ``tabular`` with ``path``.
- ``module:function`` (any other name with ``:``): a user factory, called as
  ``function(seed=seed, **options)``; it must return a :class:`Task`.

Splits are 60/20/20 train/val/test, stratified by class for classification, and
deterministic from ``seed``; synthetic sets are also generated from ``seed``. Results are
cached per process: the same name, seed and options give the same object (treat it as
read-only).

>>> task = load_task("digits", seed=0)
>>> task.kind, task.family, task.input_shape, task.n_outputs, tuple(task.x_train.shape)
('multiclass', 'mlp', (64,), 10, (1077, 64))
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hposvc.config import TABULAR_KINDS, TASK_MODEL_DEFAULTS, TASK_OPTIONS, TASKS
from hposvc.errors import invalid

__all__ = ["Task", "load_task", "KINDS", "FAMILIES"]

KINDS = ("multiclass", "binary", "regression")
FAMILIES = ("mlp", "cnn1d")
_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / test
_MAX_CLASS_VALUES = 20  # an integer target with more distinct values is a regression


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value; identity is equality
class Task:
    """One workload: data splits (CPU tensors) plus the model family that fits them.

    ``x_*`` are float32 with per-sample shape ``input_shape``; ``y_*`` are int64 class
    indices for ``multiclass`` and float32 for ``binary`` (0/1) and ``regression``.
    NumPy arrays are accepted and converted to those dtypes; anything else inconsistent
    (wrong kind, shapes that disagree) raises :class:`~hposvc.errors.InvalidInputError`,
    so a user factory gets told what is wrong.

    >>> import torch
    >>> x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    >>> Task("toy", "multiclass", "mlp", (3,), 2, x, y, x, y, x, y).default_depth
    2
    """

    name: str  # "digits", "mnist1d", "tabular:<file>", "pkg.mod:fn", ...
    kind: str  # "multiclass" | "binary" | "regression"
    family: str  # "mlp" | "cnn1d"
    input_shape: tuple[int, ...]  # per sample: (features,) for mlp, (channels, length) for cnn1d
    n_outputs: int  # classes for multiclass; 1 for binary and regression
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    default_depth: int = 2  # hidden layers / conv blocks when a spec does not say
    default_width: int = 64  # hidden units / channels when a spec does not say

    def __post_init__(self) -> None:
        source = f"task {self.name!r}"
        if self.kind not in KINDS:
            raise invalid("kind", self.kind, KINDS, source=source)
        if self.family not in FAMILIES:
            raise invalid("family", self.family, FAMILIES, source=source)
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        if self.kind != "multiclass" and self.n_outputs != 1:
            raise invalid("n_outputs", self.n_outputs, "1", source=source, hint=f"A {self.kind} task has one output.")
        if self.kind == "multiclass" and not (isinstance(self.n_outputs, int) and self.n_outputs >= 2):
            raise invalid("n_outputs", self.n_outputs, "the number of classes (>= 2)", source=source)
        y_dtype = torch.int64 if self.kind == "multiclass" else torch.float32
        for split in ("train", "val", "test"):
            x = torch.as_tensor(getattr(self, f"x_{split}"), dtype=torch.float32)
            y = torch.as_tensor(getattr(self, f"y_{split}"))
            if self.kind == "multiclass" and y.is_floating_point():
                raise invalid(f"y_{split}", f"a {y.dtype} tensor", "integer class indices", source=source)
            y = y.to(y_dtype)
            if tuple(x.shape[1:]) != self.input_shape:
                raise invalid(
                    f"x_{split}",
                    f"shape {tuple(x.shape)}",
                    f"(N, {', '.join(map(str, self.input_shape))})",
                    source=source,
                )
            if y.ndim != 1 or len(y) != len(x):
                raise invalid(
                    f"y_{split}", f"shape {tuple(y.shape)}", f"({len(x)},), one target per sample", source=source
                )
            if len(x) == 0:
                raise invalid(f"x_{split}", "an empty split", "at least one sample", source=source)
            # Out-of-range labels would fail deep inside the loss (on CUDA as a device assert).
            if self.kind == "multiclass" and not (0 <= int(y.min()) and int(y.max()) < self.n_outputs):
                bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
                allowed = f"class indices in 0..{self.n_outputs - 1}"
                raise invalid(f"y_{split}", f"a label {bad}", allowed, source=source)
            if self.kind == "binary" and not bool(((y == 0) | (y == 1)).all()):
                raise invalid(f"y_{split}", "labels other than 0 and 1", "0/1 labels", source=source)
            object.__setattr__(self, f"x_{split}", x)
            object.__setattr__(self, f"y_{split}", y)

    def __repr__(self) -> str:  # the default would print every tensor
        sizes = "/".join(str(len(getattr(self, f"x_{s}"))) for s in ("train", "val", "test"))
        return (
            f"Task(name={self.name!r}, kind={self.kind!r}, family={self.family!r}, "
            f"input_shape={self.input_shape}, n_outputs={self.n_outputs}, train/val/test={sizes})"
        )


def load_task(name: str, *, seed: int = 0, options: Mapping[str, Any] | None = None) -> Task:
    """The workload called ``name``, split deterministically from ``seed``.

    ``name`` is a built-in (``digits``, ``mnist1d``, ``moons``, ``spirals``, ``tabular``),
    ``tabular:<path>``, or a user factory ``module:function``. The same arguments return
    the same (cached) object within a process.

    >>> load_task("moons", seed=1, options={"n_samples": 200}).n_outputs
    2
    >>> load_task("tabular", options={"path": "x.csv"})
    Traceback (most recent call last):
    ...
    hposvc.errors.InvalidInputError: task 'tabular': the 'target' parameter must be the name of the column to predict. Got None instead.
    """
    options = dict(options or {})
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise invalid("seed", seed, "an integer", source=f"task {name!r}")
    if isinstance(name, str) and name.startswith("tabular:"):
        name, options = "tabular", {"path": name.partition(":")[2], **options}
    key = _freeze(options)
    if name == "tabular" and isinstance(options.get("path"), (str, os.PathLike)):
        # An edited file must not be served from the cache.
        try:
            key += (("\0mtime", os.stat(options["path"]).st_mtime_ns),)
        except OSError:
            pass
    try:
        hash(key)
    except TypeError:  # an option value that cannot be a cache key: build afresh
        return _build(name, seed, options)
    return _load_cached(name, seed, _Options(options, key))


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an options mapping (lists and dicts become tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


class _Options:
    """Options as given (a factory gets its lists and dicts back) but hashed by their key."""

    def __init__(self, options: dict[str, Any], key: tuple) -> None:
        self.options, self.key = options, key

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Options) and self.key == other.key


@functools.lru_cache(maxsize=32)
def _load_cached(name: str, seed: int, opts: _Options) -> Task:
    return _build(name, seed, opts.options)


def _build(name: str, seed: int, options: dict[str, Any]) -> Task:
    if isinstance(name, str) and ":" in name:
        return _from_factory(name, seed, options)
    if name not in TASKS:
        raise invalid("task", name, TASKS, hint="Or name a user factory as 'module:function'.")
    allowed = TASK_OPTIONS[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        hint = None if allowed else f"{name!r} takes no options."
        raise invalid("options", unknown[0], list(allowed) or "empty", source=f"task {name!r}", hint=hint)
    for key, value in options.items():
        check = allowed[key].check
        if check is not None and not check(value):
            raise invalid(f"options.{key}", value, allowed[key].allowed, source=f"task {name!r}")
    options = {**{k: o.default for k, o in allowed.items()}, **options}
    builder = {"digits": _digits, "mnist1d": _mnist1d, "moons": _moons, "spirals": _spirals, "tabular": _tabular}
    return builder[name](seed, **options)


# -- splitting and scaling -----------------------------------------------------------


def _split(x: np.ndarray, y: np.ndarray, seed: int, *, stratify: bool) -> list[np.ndarray]:
    """x_train, x_val, x_test, y_train, y_val, y_test: 60/20/20, stratified if asked."""
    from sklearn.model_selection import train_test_split

    def cut(xs, ys, test_size):
        # Stratify only where every class can be represented on both sides.
        strat = ys if stratify and np.unique(ys, return_counts=True)[1].min() >= 2 else None
        return train_test_split(xs, ys, test_size=test_size, random_state=seed, stratify=strat)

    _, val_frac, test_frac = _FRACTIONS
    x_rest, x_test, y_rest, y_test = cut(x, y, test_frac)
    x_train, x_val, y_train, y_val = cut(x_rest, y_rest, val_frac / (1.0 - test_frac))
    return [x_train, x_val, x_test, y_train, y_val, y_test]


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale every column by training-split mean and std (constant columns keep std 1)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)]


def _make(name: str, kind: str, family: str, n_outputs: int, parts: list[np.ndarray], *, defaults_of: str) -> Task:
    x_train, x_val, x_test, y_train, y_val, y_test = parts
    defaults = TASK_MODEL_DEFAULTS[defaults_of]
    return Task(
        name=name,
        kind=kind,
        family=family,
        input_shape=tuple(x_train.shape[1:]),
        n_outputs=n_outputs,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train)),
        x_val=torch.from_numpy(np.ascontiguousarray(x_val, dtype=np.float32)),
        y_val=torch.from_numpy(np.ascontiguousarray(y_val)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test)),
        default_depth=defaults["depth"],
        default_width=defaults["width"],
    )


# -- built-in workloads --------------------------------------------------------------


def _digits(seed: int) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    # Pixels are intensities 0..16; dividing keeps them on one scale. Standardising per
    # pixel instead blows up the near-constant border pixels and costs ~2% accuracy.
    parts = _split(data.data / 16.0, data.target.astype(np.int64), seed, stratify=True)
    return _make("digits", "multiclass", "mlp", 10, parts, defaults_of="digits")


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset seeds Python's and NumPy's global RNGs; give callers theirs back.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def _mnist1d(seed: int, *, num_samples: int) -> Task:
    from sklearn.model_selection import train_test_split

    x, y, x_test, y_test = _mnist1d_arrays(num_samples)
    # Keep the package's own test split (comparable with published figures); carve the
    # validation split out of its training part: 20% of the whole, like the other tasks.
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    parts = [a[:, None, :] for a in (x_train, x_val, x_test)] + [y_train, y_val, y_test]  # (N, 1 channel, 40)
    parts = [*parts[:3], *(a.astype(np.int64) for a in parts[3:])]
    return _make("mnist1d", "multiclass", "cnn1d", 10, parts, defaults_of="mnist1d")


def _moons(seed: int, *, n_samples: int, noise: float) -> Task:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n_samples, noise=float(noise), random_state=seed)
    parts = _split(x, y.astype(np.int64), seed, stratify=True)
    parts[:3] = _standardise(*parts[:3])
    return _make("moons", "multiclass", "mlp", 2, parts, defaults_of="moons")


def _spirals(seed: int, *, n_samples: int, arms: int, noise: float) -> Task:
    n, noise = n_samples, float(noise)
    rng = np.random.default_rng(seed)
    per_arm = n // arms
    # Each arm turns 1.5 times around the origin, radius growing with the angle; the arms
    # are rotated copies, so only a non-linear boundary separates them.
    t = np.sqrt(rng.uniform(0.0, 1.0, size=(arms, per_arm)))  # sqrt: even density along the arm
    angle = 3.0 * np.pi * t + (2.0 * np.pi / arms) * np.arange(arms)[:, None]
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=-1).reshape(-1, 2)
    x = x + rng.normal(scale=noise, size=x.shape)  # the outer radius is 1; arms are ~0.2 apart
    y = np.repeat(np.arange(arms, dtype=np.int64), per_arm)
    parts = _split(x, y, seed, stratify=True)
    parts[:3] = _standardise(*parts[:3])
    return _make("spirals", "multiclass", "mlp", arms, parts, defaults_of="spirals")


def _tabular(seed: int, *, path: Any, target: Any, kind: Any) -> Task:
    import pandas as pd

    source = "task 'tabular'"
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise invalid("path", path, "a CSV or Parquet file", source=source)
    if not isinstance(target, str):
        raise invalid("target", target, "the name of the column to predict", source=source)
    if kind is not None and kind not in TABULAR_KINDS:
        raise invalid("kind", kind, TABULAR_KINDS, source=source, hint="Leave it out to detect it from the target.")
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise invalid("path", str(path), "a file ending in .csv, .parquet or .pq", source=source)
    if not file.is_file():
        raise invalid("path", str(path), "an existing file", source=source)
    try:
        frame = pd.read_csv(file) if suffix == ".csv" else pd.read_parquet(file)
    except (ValueError, OSError, ImportError) as e:
        allowed = f"a readable {suffix[1:]} file"
        raise invalid("path", str(path), allowed, source=source, hint=f"pandas said: {e}") from e
    if target not in frame.columns:
        columns = [str(c) for c in frame.columns]
        raise invalid("target", target, columns, source=source, hint=f"Those are the columns of {file.name}.")
    if len(frame.columns) < 2:
        raise invalid("path", str(path), "a table with feature columns besides the target", source=source)
    target_col = frame[target]
    if target_col.isna().any():
        hint = f"{int(target_col.isna().sum())} rows have none."
        raise invalid("target", target, "a column without missing values", source=source, hint=hint)
    name = f"tabular:{file.name}"

    # 1) what is being predicted
    numeric = pd.api.types.is_numeric_dtype(target_col) and not pd.api.types.is_bool_dtype(target_col)
    if kind is None:
        integral = numeric and bool(np.all(np.mod(target_col.to_numpy(dtype=np.float64), 1.0) == 0))
        few = target_col.nunique() <= _MAX_CLASS_VALUES
        kind = "regression" if numeric and not (integral and few) else "classification"
        if kind == "classification" and target_col.nunique() == 2:
            kind = "binary"
    if kind == "regression":
        if not numeric:
            hint = f"Column {target!r} is not numeric."
            raise invalid("kind", kind, "'classification' or 'binary'", source=source, hint=hint)
        y = target_col.to_numpy(dtype=np.float64)
        classes: list[Any] = []
    else:
        classes = sorted(target_col.unique().tolist(), key=lambda v: (str(type(v)), v))
        if kind == "binary" and len(classes) != 2:
            hint = f"Column {target!r} has {len(classes)} distinct values, not 2."
            raise invalid("kind", kind, "'classification' or 'regression'", source=source, hint=hint)
        if len(classes) < 2:
            raise invalid("target", target, "a column with at least two classes", source=source)
        y = target_col.map({c: i for i, c in enumerate(classes)}).to_numpy(dtype=np.int64)

    # 2) features: one-hot categoricals, the rest as numbers
    features = frame.drop(columns=[target])
    types = pd.api.types
    categorical = [c for c in features if not types.is_numeric_dtype(features[c]) or types.is_bool_dtype(features[c])]
    # A missing category becomes an all-zero one-hot row, itself a distinct value.
    features = pd.get_dummies(features, columns=categorical, dtype=np.float64)
    x = features.to_numpy(dtype=np.float64)

    # 3) split, then fill and scale with training statistics only
    parts = _split(x, y, seed, stratify=kind != "regression")
    fill = np.nanmean(parts[0], axis=0)
    fill = np.where(np.isnan(fill), 0.0, fill)
    parts[:3] = [np.where(np.isnan(a), fill, a) for a in parts[:3]]
    parts[:3] = _standardise(*parts[:3])
    if kind == "regression":
        parts[3:] = [a[:, None] for a in parts[3:]]
        parts[3:] = [a[:, 0].astype(np.float32) for a in _standardise(*parts[3:])]
        return _make(name, "regression", "mlp", 1, parts, defaults_of="tabular")
    if kind == "binary":
        parts[3:] = [a.astype(np.float32) for a in parts[3:]]
        return _make(name, "binary", "mlp", 1, parts, defaults_of="tabular")
    return _make(name, "multiclass", "mlp", len(classes), parts, defaults_of="tabular")


def _from_factory(name: str, seed: int, options: dict[str, Any]) -> Task:
    module_name, _, function_name = name.partition(":")
    if not module_name or not function_name:
        raise invalid("task", name, "a user factory named 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = f"Importing {module_name!r} failed: {e}"
        raise invalid("task", name, "an importable 'module:function'", hint=hint) from e
    fn = getattr(module, function_name, None)
    if not callable(fn):
        hint = f"Module {module_name!r} has no function {function_name!r}."
        raise invalid("task", name, "an importable 'module:function'", hint=hint)
    task = fn(seed=seed, **options)
    if not isinstance(task, Task):
        raise invalid(
            "task",
            name,
            "a factory returning hposvc.tasks.Task",
            hint=f"{name}(seed={seed}) returned {type(task).__name__}.",
        )
    # Stored studies key their results on the name the user asked for.
    return task if task.name == name else replace(task, name=name)
