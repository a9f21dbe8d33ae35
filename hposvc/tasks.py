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
- ``images`` [``path``, ``size``, ``grayscale``, ``val_fraction``, ``test_fraction``]: an
  ImageFolder-style folder, one subfolder of images per class (class indices in sorted
  name order), or ``train/`` and ``val/`` (and ``test/``) folders of such subfolders.
  Images (PNG, JPEG, BMP, GIF, WebP, TIFF) are read with Pillow and NumPy (torchvision is
  not needed), converted to RGB (or one channel with ``grayscale``), resized to ``size``
  (``[height, width]`` or one side for squares; absent, all images must share one size)
  and scaled per channel with training-split mean and std. Shape (N, C, H, W), family
  ``cnn2d``. A split missing on disk is carved out of the training images, stratified.
- ``arrays`` [``path``, ``kind``, ``val_fraction``, ``test_fraction``]: an ``.npz`` (NumPy)
  or ``.pt`` (a dict of tensors, loaded with ``weights_only=True``) file with ``x_train``,
  ``y_train`` and optionally ``x_val``/``y_val`` and ``x_test``/``y_test``, any per-sample
  shape; integer labels are classes (``kind`` says otherwise), float targets a regression.
  Family by shape: (F,) mlp, (C, L) cnn1d, (C, H, W) cnn2d. Values are used as they are.
- ``module:function`` (any other name with ``:``): a user factory, called as
  ``function(seed=seed, **options)``; it must return a :class:`Task`, whose splits are
  tensors (or NumPy arrays) or map-style ``torch.utils.data.Dataset`` objects of ``(x, y)``
  pairs (:meth:`Task.from_datasets`).

Tensors are trained from the device (hposvc's fast path); datasets through a
``DataLoader`` unless they fit (:mod:`hposvc.train`, ``[train] data``).

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hposvc.config import FAMILIES, TABULAR_KINDS, TASK_MODEL_DEFAULTS, TASK_OPTIONS, TASKS
from hposvc.errors import InvalidInputError, invalid

__all__ = ["DatasetColumn", "Task", "load_task", "KINDS", "FAMILIES", "IMAGE_SUFFIXES"]

KINDS = ("multiclass", "binary", "regression")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # what `images` reads
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
    family: str  # the built-in family that fits: "mlp" | "cnn1d" | "cnn2d" | "resnet"
    input_shape: tuple[int, ...]  # per sample: (features,) for mlp, (channels, length) for cnn1d, (C, H, W)
    n_outputs: int  # classes for multiclass; 1 for binary and regression
    # Tensors, or DatasetColumn views of a Dataset's inputs / targets (Task.from_datasets).
    x_train: "torch.Tensor | DatasetColumn"
    y_train: "torch.Tensor | DatasetColumn"
    x_val: "torch.Tensor | DatasetColumn"
    y_val: "torch.Tensor | DatasetColumn"
    x_test: "torch.Tensor | DatasetColumn"
    y_test: "torch.Tensor | DatasetColumn"
    default_depth: int = 2  # hidden layers / conv blocks when a spec does not say
    default_width: int = 64  # hidden units / channels when a spec does not say
    # A dataset task's splits read into tensors, once (materialised()); not part of repr.
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_datasets(
        cls,
        name: str,
        kind: str,
        n_outputs: int,
        train: "torch.utils.data.Dataset",
        val: "torch.utils.data.Dataset",
        test: "torch.utils.data.Dataset",
        *,
        family: str | None = None,
        default_depth: int = 2,
        default_width: int = 64,
    ) -> "Task":
        """A task over map-style datasets whose items are ``(x, y)`` pairs of tensors
        (or numbers): they train through a ``DataLoader`` (or, when they fit, are read
        into device tensors once). ``input_shape`` is the first training sample's; the
        family is guessed from it unless given (``(F,)`` mlp, ``(C, L)`` cnn1d, ``(C, H, W)`` cnn2d).

        >>> xs, ys = torch.randn(20, 3, 8, 8), torch.arange(20) % 2
        >>> ds = torch.utils.data.TensorDataset(xs, ys)
        >>> task = Task.from_datasets("toy", "multiclass", 2, ds, ds, ds)
        >>> task.streams, task.family, task.input_shape, tuple(task.x_val[:4].shape)
        (True, 'cnn2d', (3, 8, 8), (4, 3, 8, 8))
        """
        source = f"task {name!r}"
        for split, ds in (("train", train), ("val", val), ("test", test)):
            if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
                raise invalid(split, type(ds).__name__, "a map-style torch Dataset (with __getitem__ and __len__)", source=source)
            if len(ds) == 0:
                raise invalid(split, "an empty dataset", "at least one sample", source=source)
        first = _item(train, 0, source=source, split="train")
        shape = tuple(torch.as_tensor(first[0]).shape)
        guessed = {1: "mlp", 2: "cnn1d", 3: "cnn2d"}.get(len(shape), "mlp")
        return cls(
            name, kind, family or guessed, shape, n_outputs,
            DatasetColumn(train, 0), DatasetColumn(train, 1),
            DatasetColumn(val, 0), DatasetColumn(val, 1),
            DatasetColumn(test, 0), DatasetColumn(test, 1),
            default_depth=default_depth, default_width=default_width,
        )

    @property
    def streams(self) -> bool:
        """True when the splits are datasets (read on demand), False for tensors."""
        return isinstance(self.x_train, DatasetColumn)

    def dataset(self, split: str) -> "torch.utils.data.Dataset":
        """The ``split`` ("train", "val", "test") as a map-style dataset of ``(x, y)``."""
        x = getattr(self, f"x_{split}")
        if isinstance(x, DatasetColumn):
            return x.dataset
        return torch.utils.data.TensorDataset(x, getattr(self, f"y_{split}"))

    def nbytes(self) -> int:
        """The splits' size in memory as tensors (for a dataset task: the first training
        sample's size times the number of samples)."""
        if not self.streams:
            return sum(getattr(self, f"{xy}_{s}").nbytes for s in ("train", "val", "test") for xy in ("x", "y"))
        n = sum(len(getattr(self, f"x_{s}")) for s in ("train", "val", "test"))
        return n * (4 * math.prod(self.input_shape) + 8)

    def materialised(self) -> "Task":
        """This task with every split read into CPU tensors (once; the result is kept).
        A tensor task is itself."""
        if not self.streams:
            return self
        if "tensors" not in self._cache:
            parts = {}
            for split in ("train", "val", "test"):
                x, y = _read_all(self.dataset(split), source=f"task {self.name!r}", split=split)
                parts[f"x_{split}"], parts[f"y_{split}"] = x, y
            self._cache["tensors"] = replace(self, **parts, _cache={})
        return self._cache["tensors"]

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
        if isinstance(self.x_train, DatasetColumn):
            self._check_datasets(source)
            return
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

    def _check_datasets(self, source: str) -> None:
        """A dataset task: every split a DatasetColumn pair; the first sample of each split
        has the input shape and a target of the task's kind (the rest is read in training)."""
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not (isinstance(x, DatasetColumn) and isinstance(y, DatasetColumn) and x.dataset is y.dataset):
                raise invalid(f"x_{split}", type(x).__name__, "a dataset like x_train's (Task.from_datasets)", source=source)
            if len(x) == 0:
                raise invalid(f"x_{split}", "an empty split", "at least one sample", source=source)
            sample, target = _item(x.dataset, 0, source=source, split=split)
            shape = tuple(torch.as_tensor(sample).shape)
            if shape != self.input_shape:
                raise invalid(f"x_{split}", f"samples of shape {shape}", f"samples of shape {self.input_shape}", source=source)
            target = torch.as_tensor(target)
            if target.numel() != 1:
                raise invalid(f"y_{split}", f"a target of shape {tuple(target.shape)}", "one number per sample", source=source)
            if self.kind == "multiclass" and (target.is_floating_point() or not 0 <= int(target) < self.n_outputs):
                raise invalid(f"y_{split}", f"a label {target.item()!r}", f"class indices in 0..{self.n_outputs - 1}", source=source)

    def __repr__(self) -> str:  # the default would print every tensor
        sizes = "/".join(str(len(getattr(self, f"x_{s}"))) for s in ("train", "val", "test"))
        return (
            f"Task(name={self.name!r}, kind={self.kind!r}, family={self.family!r}, "
            f"input_shape={self.input_shape}, n_outputs={self.n_outputs}, train/val/test={sizes})"
        )


class DatasetColumn:
    """The inputs (``index`` 0) or targets (1) of a map-style dataset of ``(x, y)`` pairs,
    read on demand: ``len()`` and slices (``column[:64]``) give tensors, so code that looks
    at a few samples (the init probes) works the same on a dataset task. Training reads
    the dataset itself, through a DataLoader (:mod:`hposvc.train`)."""

    def __init__(self, dataset: "torch.utils.data.Dataset", index: int) -> None:
        self.dataset, self.index = dataset, index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | slice) -> torch.Tensor:
        if isinstance(key, slice):
            dtype = torch.float32 if self.index == 0 else None
            return torch.stack([torch.as_tensor(self.dataset[i][self.index], dtype=dtype) for i in range(*key.indices(len(self)))])
        return torch.as_tensor(self.dataset[key][self.index])

    def __repr__(self) -> str:
        return f"DatasetColumn({type(self.dataset).__name__}, {'inputs' if self.index == 0 else 'targets'}, n={len(self)})"


def _item(dataset: Any, i: int, *, source: str, split: str) -> tuple[Any, Any]:
    """Item ``i`` of ``dataset`` as an ``(x, y)`` pair, or an error saying what it is."""
    item = dataset[i]
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise invalid(f"{split} dataset", f"an item of type {type(item).__name__}", "(x, y) pairs", source=source)
    return item[0], item[1]


def _read_all(dataset: Any, *, source: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(x, y)`` of ``dataset`` as two stacked CPU tensors (inputs float32)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=1024, shuffle=False)
    xs, ys = [], []
    for x, y in loader:
        xs.append(torch.as_tensor(x, dtype=torch.float32))
        ys.append(torch.as_tensor(y).reshape(-1))
    return torch.cat(xs), torch.cat(ys)


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
    if name in ("tabular", "images", "arrays") and isinstance(options.get("path"), (str, os.PathLike)):
        # An edited file (or a folder whose entries changed) must not be served from the cache.
        try:
            key += (("\0mtime", _stamp(options["path"])),)
        except OSError:
            pass
    try:
        hash(key)
    except TypeError:  # an option value that cannot be a cache key: build afresh
        return _build(name, seed, options)
    return _load_cached(name, seed, _Options(options, key))


def _stamp(path: str | os.PathLike) -> Any:
    """What changes when a file, or any entry of a folder tree, changes."""
    if not os.path.isdir(path):
        return os.stat(path).st_mtime_ns
    stamps = [(root, os.stat(root).st_mtime_ns, len(files)) for root, _, files in os.walk(path)]
    return tuple(sorted(stamps))


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
    builder = {"digits": _digits, "mnist1d": _mnist1d, "moons": _moons, "spirals": _spirals, "tabular": _tabular, "images": _images, "arrays": _arrays}
    return builder[name](seed, **options)


# -- splitting and scaling -----------------------------------------------------------


def _cut(xs: np.ndarray, ys: np.ndarray, fraction: float, seed: int, *, stratify: bool) -> list[np.ndarray]:
    """x_keep, x_cut, y_keep, y_cut with ``fraction`` of the samples cut off (stratified
    where every class can be represented on both sides)."""
    strat = ys if stratify and np.unique(ys, return_counts=True)[1].min() >= 2 else None
    return train_test_split(xs, ys, test_size=fraction, seed=seed, stratify=strat)


# scikit-learn's splits and toy data, written again in NumPy so that running a study never
# imports scikit-learn (a second of start-up). They draw the same numbers from the same
# seeds as scikit-learn's train_test_split (ShuffleSplit / StratifiedShuffleSplit) and
# make_moons, so the studies made before keep their data; tests/test_tasks.py checks it.


def train_test_split(x: np.ndarray, y: np.ndarray, *, test_size: float, seed: int, stratify: np.ndarray | None = None) -> list[np.ndarray]:
    """x_train, x_test, y_train, y_test: ``test_size`` of the samples in the test part,
    shuffled by ``seed``, class proportions kept when ``stratify`` (the labels) is given."""
    n = len(x)
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    rng = np.random.RandomState(seed)
    if stratify is None:
        order = rng.permutation(n)
        test, train = order[:n_test], order[n_test : n_test + n_train]
    else:
        train, test = _stratified_indices(np.asarray(stratify), n_train, n_test, rng)
    return [x[train], x[test], y[train], y[test]]


def _stratified_indices(y: np.ndarray, n_train: int, n_test: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    classes, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    if n_train < len(classes) or n_test < len(classes):
        raise ValueError(f"a stratified split of {len(y)} samples into {n_train}/{n_test} cannot hold all {len(classes)} classes on both sides")
    by_class = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _apportion(class_counts, n_train, rng)
    t_i = _apportion(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i, members in enumerate(by_class):
        shuffled = members.take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(shuffled[: n_i[i]])
        test.extend(shuffled[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


def _apportion(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """``n_draws`` shared out over classes in proportion to ``counts``: floors first, then
    one more for the largest remainders, ties broken at random."""
    share = counts / counts.sum() * n_draws
    taken = np.floor(share)
    left = int(n_draws - taken.sum())
    remainder = share - taken
    for value in np.sort(np.unique(remainder))[::-1]:
        if left <= 0:
            break
        (tied,) = np.where(remainder == value)
        now = min(len(tied), left)
        taken[rng.choice(tied, size=now, replace=False)] += 1
        left -= now
    return taken.astype(int)


def make_moons(n_samples: int, *, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles, shuffled, with Gaussian noise of std ``noise``."""
    n_out = n_samples // 2
    n_in = n_samples - n_out
    rng = np.random.RandomState(seed)
    outer, inner = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n_in)
    x = np.vstack([np.append(np.cos(outer), 1 - np.cos(inner)), np.append(np.sin(outer), 1 - np.sin(inner) - 0.5)]).T
    y = np.hstack([np.zeros(n_out, dtype=np.intp), np.ones(n_in, dtype=np.intp)])
    order = np.arange(n_samples)
    rng.shuffle(order)
    x, y = x[order], y[order]
    x += rng.normal(scale=noise, size=x.shape)
    return x, y


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits (1797 images, pixels 0..16) from the file scikit-learn ships, read
    without importing scikit-learn."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError("task 'digits' reads the digits file that ships with scikit-learn; install it (pip install scikit-learn).")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


def _split(x: np.ndarray, y: np.ndarray, seed: int, *, stratify: bool, val: float = _FRACTIONS[1], test: float = _FRACTIONS[2]) -> list[np.ndarray]:
    """x_train, x_val, x_test, y_train, y_val, y_test: 60/20/20 unless told, stratified if asked."""
    x_rest, x_test, y_rest, y_test = _cut(x, y, test, seed, stratify=stratify)
    x_train, x_val, y_train, y_val = _cut(x_rest, y_rest, val / (1.0 - test), seed, stratify=stratify)
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
    x, y = load_digits_arrays()
    # Pixels are intensities 0..16; dividing keeps them on one scale. Standardising per
    # pixel instead blows up the near-constant border pixels and costs ~2% accuracy.
    parts = _split(x / 16.0, y.astype(np.int64), seed, stratify=True)
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
    x, y, x_test, y_test = _mnist1d_arrays(num_samples)
    # Keep the package's own test split (comparable with published figures); carve the
    # validation split out of its training part: 20% of the whole, like the other tasks.
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, seed=seed, stratify=y)
    parts = [a[:, None, :] for a in (x_train, x_val, x_test)] + [y_train, y_val, y_test]  # (N, 1 channel, 40)
    parts = [*parts[:3], *(a.astype(np.int64) for a in parts[3:])]
    return _make("mnist1d", "multiclass", "cnn1d", 10, parts, defaults_of="mnist1d")


def _moons(seed: int, *, n_samples: int, noise: float) -> Task:
    x, y = make_moons(n_samples, noise=float(noise), seed=seed)
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


def _carve_fractions(val: float, test: float, *, source: str) -> tuple[tuple[str, float], ...]:
    """The order splits are carved out of the training data, with their fractions."""
    if val + test >= 1.0:
        raise invalid("val_fraction", val, f"a fraction below 1 - test_fraction ({1.0 - test:g})", source=source, hint="Something must be left to train on.")
    return (("test", test), ("val", val))


def _image_files(folder: Path, *, source: str) -> dict[str, list[Path]]:
    """Class name -> image files (sorted) of an ImageFolder-style ``folder``."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise invalid("path", str(folder), "a folder with one subfolder of images per class", source=source, hint=f"{folder} has no subfolders.")
    out = {}
    for c in classes:
        files = sorted(f for f in c.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise invalid("path", str(c), "a class folder with at least one image", source=source, hint=f"It holds no {'/'.join(IMAGE_SUFFIXES)} file.")
        out[c.name] = files
    return out


def _read_images(files: list[Path], *, size: tuple[int, int] | None, grayscale: bool, source: str) -> np.ndarray:
    """``files`` as one uint8 array (N, C, H, W); an unreadable image is an error naming it."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if grayscale else "RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            raise invalid("path", str(f), "a readable image", source=source, hint=f"Pillow could not read it: {e}") from e
        if arrays and a.shape != arrays[0].shape:
            hint = f"It is {a.shape[1]}×{a.shape[0]} but {files[0].name} is {arrays[0].shape[1]}×{arrays[0].shape[0]}; set [task] size to resize them all."
            raise invalid("path", str(f), "an image the size of the others", source=source, hint=hint)
        arrays.append(a)
    x = np.stack(arrays)
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, C, H, W)


def _images(seed: int, *, path: Any, size: Any, grayscale: bool, val_fraction: float, test_fraction: float) -> Task:
    source = "task 'images'"
    if not isinstance(path, (str, os.PathLike)):
        raise invalid("path", path, "a folder with one subfolder of images per class", source=source)
    root = Path(path)
    if not root.is_dir():
        hint = "No such folder." if not root.exists() else "It is a file, not a folder."
        raise invalid("path", str(path), "a folder with one subfolder of images per class", source=source, hint=hint)
    shape = None if size is None else ((size, size) if isinstance(size, int) else (int(size[0]), int(size[1])))
    # 1) files and labels, per split: train/ val/ test/ folders when there are, else one pool
    if (root / "train").is_dir():
        by_split = {s: _image_files(root / s, source=source) for s in ("train", "val", "test") if (root / s).is_dir()}
        classes = list(by_split["train"])
        for split, found in by_split.items():
            extra = sorted(set(found) - set(classes))
            if extra:
                raise invalid("path", str(root / split / extra[0]), f"a class folder that train/ has too ({', '.join(classes)})", source=source)
    else:
        by_split = {"train": _image_files(root, source=source)}
        classes = list(by_split["train"])
    if len(classes) < 2:
        raise invalid("path", str(root), "a folder with at least two class subfolders", source=source, hint=f"Found only {classes[0]!r}.")
    label = {c: i for i, c in enumerate(classes)}
    files = {s: [f for c, fs in found.items() for f in fs] for s, found in by_split.items()}
    labels = {s: np.array([label[c] for c, fs in found.items() for _ in fs], dtype=np.int64) for s, found in by_split.items()}
    # 2) carve the splits the disk does not have out of train (indices, before reading)
    index = {s: np.arange(len(files[s])) for s in files}
    carved = 0.0  # the fractions are of the whole pool: val's is rescaled once test is out
    for split, fraction in _carve_fractions(val_fraction, test_fraction, source=source):
        if split not in files:
            keep, cut, _, _ = _cut(index["train"], labels["train"][index["train"]], fraction / (1.0 - carved), seed, stratify=True)
            files[split], labels[split] = [files["train"][i] for i in cut], labels["train"][cut]
            index["train"] = keep
            carved += fraction
    files["train"], labels["train"] = [files["train"][i] for i in index["train"]], labels["train"][index["train"]]
    # 3) read, scale to [0, 1], standardise each channel with training statistics
    xs = {s: _read_images(files[s], size=shape, grayscale=grayscale, source=source).astype(np.float32) / 255.0 for s in ("train", "val", "test")}
    first = {s: xs[s].shape[1:] for s in xs}
    if len(set(first.values())) > 1:
        raise invalid("path", str(files["val"][0]), f"images the size of train/'s {first['train'][2]}×{first['train'][1]}", source=source, hint="Set [task] size to resize them all.")
    mean = xs["train"].mean(axis=(0, 2, 3), keepdims=True)
    std = xs["train"].std(axis=(0, 2, 3), keepdims=True)
    std = np.where(std > 0, std, 1.0)
    parts = [(xs[s] - mean) / std for s in ("train", "val", "test")] + [labels[s] for s in ("train", "val", "test")]
    return _make("images", "multiclass", "cnn2d", len(classes), parts, defaults_of="images")


def _arrays(seed: int, *, path: Any, kind: str | None, val_fraction: float, test_fraction: float) -> Task:
    source = "task 'arrays'"
    what = "an .npz or .pt file with x_train and y_train"
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_file():
        raise invalid("path", str(path), what, source=source, hint="No such file." if isinstance(path, (str, os.PathLike)) else None)
    p = Path(path)
    # 1) read the arrays
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        elif p.suffix in (".pt", ".pth"):
            loaded = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(loaded, Mapping):
                raise ValueError(f"it holds a {type(loaded).__name__}, not a dict of tensors")
            data = {str(k): (v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in loaded.items()}
        else:
            raise invalid("path", str(p), what, source=source, hint=f"{p.suffix or 'No suffix'}: hposvc reads .npz (numpy.savez) and .pt (torch.save of a dict).")
    except InvalidInputError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise invalid("path", str(p), what, source=source, hint=f"It could not be read: {e}") from e
    for key in ("x_train", "y_train"):
        if key not in data:
            raise invalid(f"{key}", None, f"an array in {p}", source=source, hint=f"The file holds {', '.join(sorted(data)) or 'nothing'}.")
    splits = {}
    for split in ("train", "val", "test"):
        x, y = data.get(f"x_{split}"), data.get(f"y_{split}")
        if (x is None) != (y is None):
            missing = f"y_{split}" if y is None else f"x_{split}"
            raise invalid(missing, None, f"an array in {p}", source=source, hint=f"x_{split} and y_{split} come together.")
        if x is None:
            continue
        if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
            raise invalid(f"y_{split}", f"shape {y.shape}", "one target per sample (N,)", source=source, hint=f"In {p}.")
        if len(x) != len(y):
            raise invalid(f"y_{split}", f"{len(y)} targets", f"one per sample of x_{split} ({len(x)})", source=source, hint=f"In {p}.")
        splits[split] = (np.asarray(x), np.asarray(y).reshape(-1))
    shapes = {s: xy[0].shape[1:] for s, xy in splits.items()}
    if len(set(shapes.values())) > 1:
        bad = next(s for s in shapes if shapes[s] != shapes["train"])
        raise invalid(f"x_{bad}", f"samples of shape {shapes[bad]}", f"x_train's {shapes['train']}", source=source, hint=f"In {p}.")
    # 2) what is predicted: integer labels are classes unless kind says otherwise
    ys = np.concatenate([y for _, y in splits.values()])
    integral = ys.dtype.kind in "iub"
    kind = kind or ("classification" if integral else "regression")
    if kind not in TABULAR_KINDS:
        raise invalid("kind", kind, TABULAR_KINDS, source=source)
    if kind != "regression":
        if not integral or ys.min() < 0:
            raise invalid("y_train", "labels that are not integers >= 0", "class indices 0..K-1", source=source, hint=f"In {p}; for real-valued targets set [task] kind = 'regression'.")
        n_classes = int(ys.max()) + 1
        if kind == "binary" and n_classes > 2:
            raise invalid("kind", kind, "'classification'", source=source, hint=f"The labels in {p} go up to {n_classes - 1}.")
    # 3) carve missing splits out of train
    x_train, y_train = splits["train"]
    carved = 0.0  # the fractions are of the whole: val's is rescaled once test is out
    for split, fraction in _carve_fractions(val_fraction, test_fraction, source=source):
        if split not in splits:
            x_train, x_cut, y_train, y_cut = _cut(x_train, y_train, fraction / (1.0 - carved), seed, stratify=kind != "regression")
            splits[split] = (x_cut, y_cut)
            carved += fraction
    order = ("train", "val", "test")
    splits["train"] = (x_train, y_train)
    parts = [splits[s][0].astype(np.float32) for s in order]
    family = {1: "mlp", 2: "cnn1d", 3: "cnn2d"}.get(parts[0].ndim - 1, "mlp")
    if kind == "classification":
        parts += [splits[s][1].astype(np.int64) for s in order]
        return _make("arrays", "multiclass", family, max(n_classes, 2), parts, defaults_of="arrays")
    parts += [splits[s][1].astype(np.float32) for s in order]
    return _make("arrays", kind, family, 1, parts, defaults_of="arrays")


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
    return task if task.name == name else replace(task, name=name, _cache={})
