"""The survey's workloads that hposvc has no built-in task for, as task factories.

A survey spec names them as ``task = "hposvc.recommendation._tasks:NAME"`` (the
``module:function`` form any user factory takes), with ``[task]`` options passed as
keywords. Everything is offline: scikit-learn's bundled data sets (breast_cancer,
diabetes, wine, digits moved and blurred by noise), its generators (make_classification)
and mnist1d, generated locally.
Splits and scaling are hposvc's own (:func:`hposvc.tasks.load_task` of a tabular file
does the same), so a survey task differs from a user's only in where the data comes from.

>>> task = breast_cancer(seed=0)
>>> task.kind, task.family, task.input_shape, task.n_outputs
('binary', 'mlp', (30,), 1)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hposvc.tasks import Task, _make, _split, _standardise, load_digits_arrays, load_task, train_test_split

__all__ = ["breast_cancer", "classification", "diabetes", "digits_jittered", "heavy_tailed", "mnist1d_flat", "mnist1d_signals", "wine"]

# Network size a spec gets when its [model] table says nothing (the same as tabular files).
_DEFAULTS_OF = "tabular"


def _module_name(fn: str) -> str:
    return f"{__name__}:{fn}"


def breast_cancer(*, seed: int = 0) -> Task:
    """scikit-learn's bundled Wisconsin breast cancer data: 569 samples, 30 features, binary."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    parts = _split(data.data, data.target.astype(np.int64), seed, stratify=True)
    parts[:3] = _standardise(*parts[:3])
    parts[3:] = [a.astype(np.float32) for a in parts[3:]]
    return _make(_module_name("breast_cancer"), "binary", "mlp", 1, parts, defaults_of=_DEFAULTS_OF)


def wine(*, seed: int = 0) -> Task:
    """scikit-learn's bundled wine recognition data: 178 samples, 13 features, 3 classes."""
    from sklearn.datasets import load_wine

    data = load_wine()
    parts = _split(data.data, data.target.astype(np.int64), seed, stratify=True)
    parts[:3] = _standardise(*parts[:3])
    return _make(_module_name("wine"), "multiclass", "mlp", 3, parts, defaults_of=_DEFAULTS_OF)


def diabetes(*, seed: int = 0) -> Task:
    """scikit-learn's bundled diabetes progression data: 442 samples, 10 features, a
    regression on the standardised target (so a val_loss of 1 is predicting the mean)."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    parts = _split(data.data, data.target.astype(np.float64), seed, stratify=False)
    parts[:3] = _standardise(*parts[:3])
    parts[3:] = [a[:, 0].astype(np.float32) for a in _standardise(*(a[:, None] for a in parts[3:]))]
    return _make(_module_name("diabetes"), "regression", "mlp", 1, parts, defaults_of=_DEFAULTS_OF)


def classification(
    *,
    seed: int = 0,
    n_samples: int = 1000,
    n_features: int = 20,
    n_informative: int = 5,
    n_classes: int = 3,
    class_sep: float = 1.0,
    flip_y: float = 0.01,
    data_seed: int = 0,
) -> Task:
    """scikit-learn's ``make_classification``; ``data_seed`` draws the problem, ``seed``
    the split, so two specs with different options are two different tasks."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=int(n_samples),
        n_features=int(n_features),
        n_informative=int(n_informative),
        n_redundant=min(2, int(n_features) - int(n_informative)),
        n_classes=int(n_classes),
        class_sep=float(class_sep),
        flip_y=float(flip_y),
        random_state=int(data_seed),
    )
    parts = _split(x, y.astype(np.int64), seed, stratify=True)
    parts[:3] = _standardise(*parts[:3])
    return _make(_module_name("classification"), "multiclass", "mlp", int(n_classes), parts, defaults_of=_DEFAULTS_OF)


def mnist1d_flat(*, seed: int = 0, num_samples: int = 5000) -> Task:
    """mnist1d's 40-sample signals as flat feature vectors, for an MLP (the built-in
    ``mnist1d`` task trains the 1-D CNN on the same data and split)."""
    task = load_task("mnist1d", seed=seed, options={"num_samples": int(num_samples)})
    flat: dict[str, Any] = {f"x_{s}": getattr(task, f"x_{s}").reshape(len(getattr(task, f"x_{s}")), -1) for s in ("train", "val", "test")}
    return Task(
        name=_module_name("mnist1d_flat"),
        kind=task.kind,
        family="mlp",
        input_shape=(int(np.prod(task.input_shape)),),
        n_outputs=task.n_outputs,
        y_train=task.y_train,
        y_val=task.y_val,
        y_test=task.y_test,
        **flat,
    )


def heavy_tailed(
    *,
    seed: int = 0,
    levels: int = 7,
    rarest: int = 5,
    n_features: int = 64,
    noise: float = 1.0,
    data_seed: int = 0,
) -> Task:
    """Heavy-tailed class imbalance for a linear softmax model (Kunstner et al. 2024):
    level i (0 .. levels-1) has 2^i classes of ``rarest`` · 2^(levels-1-i) samples each, so
    every level holds the same number of samples while class frequencies span
    2^(levels-1) (7 levels: 127 classes, 64× spread). A class's inputs are its mean (a
    random Gaussian direction, drawn with ``data_seed``) plus Gaussian ``noise``. Split
    60/20/20 stratified by ``seed``; validation has the same imbalance, so each frequency
    level carries the same weight in ``val_loss``."""
    levels, rarest, n_features = int(levels), int(rarest), int(n_features)
    rng = np.random.default_rng(int(data_seed))
    counts = np.concatenate([np.full(2**i, rarest * 2 ** (levels - 1 - i)) for i in range(levels)])
    means = rng.standard_normal((len(counts), n_features))
    y = np.repeat(np.arange(len(counts)), counts)
    x = means[y] + float(noise) * rng.standard_normal((len(y), n_features))
    parts = _split(x, y.astype(np.int64), seed, stratify=True)
    parts[:3] = _standardise(*parts[:3])
    return _make(_module_name("heavy_tailed"), "multiclass", "mlp", len(counts), parts, defaults_of=_DEFAULTS_OF)


def mnist1d_signals(*, seed: int = 0, num_samples: int = 5000, data_seed: int = 42) -> Task:
    """mnist1d's 40-sample signals for the 1-D CNN, drawn with ``data_seed`` as the
    generator's seed (the built-in ``mnist1d`` task is mnist1d's own seed, 42): the same
    ten templates, other draws of their padding, shift, scale, shear and noise. Split as
    the built-in task: mnist1d's own test part, validation carved out of its training part
    by ``seed`` (20 % of the whole)."""
    import random

    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = int(num_samples), int(data_seed)
    # make_dataset seeds Python's and NumPy's global RNGs; give callers theirs back.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x_train, x_val, y_train, y_val = train_test_split(data["x"], data["y"], test_size=0.25, seed=seed, stratify=data["y"])
    signals = [a[:, None, :] for a in (x_train, x_val, data["x_test"])]  # (N, 1 channel, 40)
    labels = [np.asarray(a).astype(np.int64) for a in (y_train, y_val, data["y_test"])]
    return _make(_module_name("mnist1d_signals"), "multiclass", "cnn1d", 10, [*signals, *labels], defaults_of="mnist1d")


def digits_jittered(*, seed: int = 0, shift: int = 1, noise: float = 0.1, data_seed: int = 0) -> Task:
    """scikit-learn's bundled 8x8 digits as 1x8x8 images (pixels 0..1), each moved by a
    random offset of up to ``shift`` pixels along each axis (the uncovered border is 0)
    and given Gaussian pixel noise of std ``noise``, both drawn with ``data_seed``. Split
    60/20/20 stratified by ``seed``, as the built-in ``digits`` task."""
    x, y = load_digits_arrays()
    shift = int(shift)
    rng = np.random.default_rng(int(data_seed))
    images = np.pad(x.reshape(-1, 8, 8) / 16.0, ((0, 0), (shift, shift), (shift, shift)))
    dy, dx = rng.integers(-shift, shift + 1, size=(2, len(images)))
    moved = np.stack([img[shift + i : shift + i + 8, shift + j : shift + j + 8] for img, i, j in zip(images, dy, dx)])
    moved = moved + float(noise) * rng.standard_normal(moved.shape)
    parts = _split(moved[:, None], y.astype(np.int64), seed, stratify=True)
    return _make(_module_name("digits_jittered"), "multiclass", "cnn2d", 10, parts, defaults_of="digits")
