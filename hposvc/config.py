"""TrialConfig: the one value object that describes a trial.

It is what the sampler produces, what training consumes, what MLflow logs as params and
what ``best_config()`` returns. Optimizer hyper-parameters are always explicit numbers:
the ones that apply to the chosen optimizer are filled from :data:`ONE_SHOT_DEFAULTS`
when not given, the ones that do not apply are ``None`` (and giving one is an error).

>>> cfg = TrialConfig(optimizer="adam")
>>> cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.momentum
(0.001, 0.9, 0.999, 1e-08, None)
>>> TrialConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from hposvc.errors import invalid

__all__ = [
    "ACTIVATIONS",
    "CONDITIONAL",
    "DATA_PATHS",
    "FAMILIES",
    "INITS",
    "NORMS",
    "ONE_SHOT_DEFAULTS",
    "OPTIMIZERS",
    "OPTIMIZER_PARAMS",
    "PRECISIONS",
    "SCHEDULES",
    "TABULAR_KINDS",
    "TASKS",
    "TASK_INPUT_SHAPES",
    "TASK_MODEL_DEFAULTS",
    "TASK_OPTIONS",
    "TaskOption",
    "TrialConfig",
    "check_family",
    "check_population",
    "family_input_shape",
]

# Every optimizer hposvc offers, with the hyper-parameters it uses and the numbers it gets
# when a spec fixes only the optimizer ("one-shot defaults"). These are PyTorch's own
# defaults except where the guide gives another value (Adadelta ρ 0.9, SGD lr 1e-2), and
# they are stored as numbers so a trial never depends on a framework default changing.
# ``rho`` is Adadelta's ρ and RMSprop's α (both the decay of the squared-gradient average).
ONE_SHOT_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 1e-2, "weight_decay": 0.0},
    "momentum": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0},
    "nesterov": {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.0},
    "adagrad": {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.0},
    "adadelta": {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0},
    "rmsprop": {"lr": 1e-3, "rho": 0.99, "eps": 1e-8, "weight_decay": 0.0},
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2},
    "nadam": {"lr": 2e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
}
OPTIMIZERS: tuple[str, ...] = tuple(ONE_SHOT_DEFAULTS)
OPTIMIZER_PARAMS: tuple[str, ...] = ("lr", "momentum", "beta1", "beta2", "eps", "rho", "weight_decay")

SCHEDULES = ("constant", "cosine", "warmup_cosine")
INITS = (
    "zeros",
    "normal",
    "uniform",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "zero",  # ZerO (Zhao, Schäfer & Anandkumar 2022): deterministic identity/Hadamard
    "pretrained",
    "default",  # keep the model's own init (a user factory's, or PyTorch's for the built-ins)
)
# Built-in workloads and the network size each uses unless a spec's [model] says otherwise
# (the CNN's width is its channel count). A name with ":" is a user factory "module:function".
TASKS = ("digits", "mnist1d", "moons", "spirals", "tabular", "images", "arrays")
TASK_MODEL_DEFAULTS: dict[str, dict[str, int]] = {
    "digits": {"depth": 2, "width": 128},
    "mnist1d": {"depth": 3, "width": 32},
    "moons": {"depth": 2, "width": 32},
    "spirals": {"depth": 3, "width": 64},
    "tabular": {"depth": 2, "width": 64},
    "images": {"depth": 2, "width": 32},  # cnn2d / resnet channels
    "arrays": {"depth": 2, "width": 64},
}
# Per-sample input shapes of the built-ins whose shape does not depend on a file; a spec's
# [model] family is checked against them before anything runs (the others when loaded).
TASK_INPUT_SHAPES: dict[str, tuple[int, ...]] = {"digits": (64,), "mnist1d": (1, 40), "moons": (2,), "spirals": (2,)}
# Built-in model families (hposvc.nn): what each reads is in family_input_shape.
FAMILIES = ("mlp", "cnn1d", "cnn2d", "resnet")
PRECISIONS = ("fp32", "bf16", "fp16")  # [train] precision: autocast dtype (fp16 adds a gradient scaler)
# [train] data: how batches reach the model. "tensors": the whole split on the device,
# batches sliced out of it; "loader": a torch DataLoader; "auto": tensors when the data
# fits (hposvc.train.AUTO_TENSOR_BYTES), else the loader.
DATA_PATHS = ("auto", "tensors", "loader")
TABULAR_KINDS = ("classification", "binary", "regression")  # tabular's and arrays' [task] kind


@dataclass(frozen=True)
class TaskOption:
    """One [task] option of a built-in task: its default and the values it takes."""

    default: Any  # None: required, or detected by the task (tabular's kind)
    check: "Callable[[Any], bool] | None"  # None: the task checks it itself (paths, columns)
    allowed: str  # the allowed values, as error messages say them


def _int_at_least(least: int) -> TaskOption:
    return TaskOption(None, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least, f"an integer >= {least}")


def _with_default(option: TaskOption, default: Any) -> TaskOption:
    return dataclasses.replace(option, default=default)


def _is_size(v: Any) -> bool:
    whole = lambda n: isinstance(n, int) and not isinstance(n, bool) and n >= 1  # noqa: E731
    return whole(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(whole(n) for n in v))


# A split carved out of the data when the files do not provide it (images, arrays).
_FRACTION = TaskOption(0.2, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1, "a fraction in (0, 1)")
_NOISE = TaskOption(None, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, "a number >= 0")
# The [task] options each built-in takes, with defaults and checks: what a spec validates
# and what hposvc.tasks builds with. A user factory gets whatever the spec gives.
TASK_OPTIONS: dict[str, dict[str, TaskOption]] = {
    "digits": {},
    "mnist1d": {"num_samples": _with_default(_int_at_least(50), 5000)},
    "moons": {"n_samples": _with_default(_int_at_least(20), 1000), "noise": _with_default(_NOISE, 0.2)},
    "spirals": {"n_samples": _with_default(_int_at_least(20), 1500), "arms": _with_default(_int_at_least(2), 3), "noise": _with_default(_NOISE, 0.05)},
    "tabular": {
        "path": TaskOption(None, None, "a path to a CSV or Parquet file"),
        "target": TaskOption(None, None, "the name of the target column"),
        "kind": TaskOption(None, None, "one of " + ", ".join(repr(k) for k in TABULAR_KINDS)),
    },
    "images": {
        "path": TaskOption(None, None, "a folder with one subfolder of images per class (or train/ and val/ folders of them)"),
        "size": TaskOption(None, _is_size, "an integer >= 1 or [height, width]"),  # None: the images' own (all alike)
        "grayscale": TaskOption(False, lambda v: isinstance(v, bool), "true or false"),
        "val_fraction": _FRACTION,
        "test_fraction": _FRACTION,
    },
    "arrays": {
        "path": TaskOption(None, None, "a path to an .npz or .pt file with x_train and y_train"),
        "kind": TaskOption(None, None, "one of " + ", ".join(repr(k) for k in TABULAR_KINDS)),
        "val_fraction": _FRACTION,
        "test_fraction": _FRACTION,
    },
}

NORMS = ("none", "batch", "instance", "layer", "group", "rms")
ACTIVATIONS = ("relu", "leaky_relu", "prelu", "gelu", "mish", "sigmoid", "tanh", "softsign")

# Fields that only mean something for some values of another field: (field, owner, values,
# default when it applies). Outside those values the field must be None.
_CONDITIONAL = (
    ("init_std", "init", ("normal", "uniform"), 0.01),
    ("pretrained_path", "init", ("pretrained",), None),
    ("norm_groups", "norm", ("group",), 4),
    ("warmup", "schedule", ("warmup_cosine",), 0.1),
    ("zero_init_residual", "family", ("resnet",), False),
)
# The same rule by field: field -> (owner, the owner's values for which it applies).
CONDITIONAL: dict[str, tuple[str, tuple[str, ...]]] = {name: (owner, values) for name, owner, values, _ in _CONDITIONAL}


@dataclass(frozen=True)
class TrialConfig:
    """Every choice one trial makes, as explicit values.

    Construct with keywords; hyper-parameters that apply to ``optimizer`` and are left
    ``None`` are filled with its one-shot defaults. Invalid values raise
    :class:`~hposvc.errors.InvalidInputError` naming the field and what is allowed.
    """

    optimizer: str = "adam"
    # Optimizer numbers: None means "not used by this optimizer" once constructed.
    lr: float | None = None
    momentum: float | None = None  # heavy-ball / Nesterov μ
    beta1: float | None = None  # Adam-family first-moment decay
    beta2: float | None = None  # Adam-family second-moment decay
    eps: float | None = None  # denominator guard of adaptive methods
    rho: float | None = None  # Adadelta ρ / RMSprop α
    weight_decay: float | None = None  # L2 (coupled) or decoupled for AdamW
    schedule: str = "constant"  # learning-rate schedule over all training steps
    warmup: float | None = None  # warmup_cosine: fraction of steps spent warming up
    init: str = "he_normal"  # weight-init scheme of every linear/conv layer
    init_std: float | None = None  # normal: std; uniform: half-width of U(-a, a)
    pretrained_path: str | None = None  # init "pretrained": a state_dict file
    norm: str = "none"  # normalisation after each hidden layer
    norm_groups: int | None = None  # group norm: number of channel groups
    activation: str = "relu"
    batch_size: int = 64
    epochs: int = 10
    depth: int = 2  # hidden layers (MLP), conv blocks (CNN) or residual blocks per stage (ResNet)
    width: int = 128  # hidden units (MLP) or channels (CNN; a ResNet's first stage)
    family: str | None = None  # built-in model family (FAMILIES); None: the task's own
    zero_init_residual: bool | None = None  # resnet: every residual branch starts at 0 (Goyal et al. 2017)
    seed: int = 0
    # How the trial trains (speed and memory; precision can also move the numbers):
    precision: str = "fp32"  # autocast dtype: fp32 | bf16 | fp16 (fp16 adds a gradient scaler)
    channels_last: bool = False  # 2-D convs in channels-last memory format (used on CUDA only)
    compile: bool = False  # torch.compile the model; where compiling fails, eager, with the reason logged
    data: str = "auto"  # how batches reach the model (DATA_PATHS)
    num_workers: int | None = None  # DataLoader worker processes; None: 0 on the CPU, up to 4 on CUDA
    checkpoint_every: int = 0  # hposvc's own loop saves a checkpoint every N epochs (0: never); a retry resumes from it
    # Task-specific knobs a user factory may read; kept sorted so equality is stable.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.optimizer not in ONE_SHOT_DEFAULTS:
            raise invalid("optimizer", self.optimizer, OPTIMIZERS)
        uses = ONE_SHOT_DEFAULTS[self.optimizer]
        for name in OPTIMIZER_PARAMS:
            value = getattr(self, name)
            if name not in uses:
                if value is not None:
                    raise invalid(
                        name,
                        value,
                        "None",
                        hint=f"{self.optimizer!r} does not use {name!r}; it uses {', '.join(uses)}.",
                    )
                continue
            value = uses[name] if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise invalid(name, value, "a finite number")
            value = float(value)
            if name in ("lr", "eps") and value <= 0:
                raise invalid(name, value, "a number > 0")
            if name in ("momentum", "beta1", "beta2", "rho") and not 0.0 <= value < 1.0:
                raise invalid(name, value, "a number in [0, 1)")
            if name == "weight_decay" and value < 0:
                raise invalid(name, value, "a number >= 0")
            set_(name, value)
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("init", INITS),
            ("norm", NORMS),
            ("activation", ACTIVATIONS),
            ("precision", PRECISIONS),
            ("data", DATA_PATHS),
        ):
            if getattr(self, name) not in allowed:
                raise invalid(name, getattr(self, name), allowed)
        for name, owner, values, default in _CONDITIONAL:
            applies = getattr(self, owner) in values
            value = getattr(self, name)
            if not applies:
                if value is not None:
                    raise invalid(name, value, "None", hint=f"It only applies when {owner} is one of {values}.")
                continue
            if value is None:
                if default is None:
                    raise invalid(name, value, "a path to a state_dict file", hint=f"{owner}={getattr(self, owner)!r} needs it.")
                value = default
            set_(name, value)
        if self.init_std is not None:
            if not isinstance(self.init_std, (int, float)) or not self.init_std > 0:
                raise invalid("init_std", self.init_std, "a number > 0")
            set_("init_std", float(self.init_std))
        if self.warmup is not None:
            if not isinstance(self.warmup, (int, float)) or not 0.0 <= self.warmup < 1.0:
                raise invalid("warmup", self.warmup, "a fraction in [0, 1)")
            set_("warmup", float(self.warmup))
        if self.pretrained_path is not None:
            set_("pretrained_path", str(self.pretrained_path))
        for name in ("batch_size", "epochs", "depth", "width", "norm_groups"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "depth" else 1):
                limit = "an integer >= 0" if name == "depth" else "an integer >= 1"
                raise invalid(name, value, limit)
        if self.norm_groups is not None and self.width % self.norm_groups:
            raise invalid(
                "norm_groups",
                self.norm_groups,
                f"a divisor of width={self.width}",
                hint="Group norm splits the channels into equal groups.",
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise invalid("seed", self.seed, "an integer")
        if self.family is not None and self.family not in FAMILIES:
            raise invalid("family", self.family, (*FAMILIES, None))
        for name in ("zero_init_residual", "channels_last", "compile"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "zero_init_residual"):
                raise invalid(name, value, "true or false")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise invalid("checkpoint_every", self.checkpoint_every, "an integer >= 0 (0: no checkpoints)")
        if self.num_workers is not None and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise invalid("num_workers", self.num_workers, "an integer >= 0 or None (automatic)")
        set_("extra", dict(sorted(dict(self.extra).items())))

    # -- conversions -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-safe); ``from_dict`` inverts it exactly."""
        out = dataclasses.asdict(self)
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrialConfig":
        """Build from a dict such as :meth:`to_dict` gives; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise invalid(unknown[0], data[unknown[0]], f"one of the TrialConfig fields ({', '.join(sorted(known))})")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrialConfig":
        return cls.from_dict(json.loads(text))

    def flat_params(self) -> dict[str, str]:
        """The fields that are set, as strings: MLflow params and table columns."""
        out = {k: v for k, v in self.to_dict().items() if k != "extra" and v is not None}
        out.update({f"extra.{k}": v for k, v in self.extra.items()})
        return {k: str(v) for k, v in out.items()}

    def replace(self, **changes: Any) -> "TrialConfig":
        """A copy with ``changes``; changing the optimizer resets its numbers to defaults
        unless they are given too."""
        data = self.to_dict()
        if "optimizer" in changes and changes["optimizer"] != self.optimizer:
            for name in OPTIMIZER_PARAMS:
                data[name] = None
        for owner_field in ("init", "norm", "schedule", "family"):
            if owner_field in changes:
                for name, owner, _, _ in _CONDITIONAL:
                    if owner == owner_field and name not in changes:
                        data[name] = None
        data.update(changes)
        return TrialConfig.from_dict(data)

    @property
    def optimizer_params(self) -> dict[str, float]:
        """The numbers the optimizer uses, e.g. ``{"lr": 0.001, "beta1": 0.9, ...}``."""
        return {name: getattr(self, name) for name in ONE_SHOT_DEFAULTS[self.optimizer]}


def check_population(value: Any, *, key: str = "population", source: str | None = None, cls: Any = None) -> int | str | None:
    """How many trials train together: None (one at a time), a positive integer or "auto".

    The one check for a spec's ``population``, ``--population`` and the API argument.
    """
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(key, value, "an integer >= 1 or 'auto'", source=source, **({"cls": cls} if cls else {}))
    return value


def family_input_shape(family: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The per-sample shape ``family`` reads for task inputs of ``shape``; None if it cannot:
    mlp flattens anything, cnn1d takes ``(C, L)``, cnn2d and resnet take ``(C, H, W)`` or a
    flat square vector as one channel (digits' 64 features are its 1×8×8 pixels).

    >>> family_input_shape("resnet", (64,)), family_input_shape("cnn1d", (5,))
    ((1, 8, 8), None)
    """
    if family == "mlp":
        return shape
    if family == "cnn1d":
        return shape if len(shape) == 2 else None
    if len(shape) == 3:
        return shape
    side = math.isqrt(shape[0]) if len(shape) == 1 else 0
    return (1, side, side) if side and side * side == shape[0] else None


def check_family(family: str, input_shape: tuple[int, ...], *, key: str = "family", source: str | None = None, cls: Any = None) -> tuple[int, ...]:
    """The per-sample shape ``family`` reads for a task with ``input_shape``, or an error
    naming both (the one check for specs, TrialConfigs and :func:`hposvc.nn.build_model`).

    >>> check_family("resnet", (64,)), check_family("cnn1d", (1, 40))
    ((1, 8, 8), (1, 40))
    """
    extra = {"source": source, **({"cls": cls} if cls else {})}
    if family not in FAMILIES:
        raise invalid(key, family, FAMILIES, **extra)
    shape = tuple(int(d) for d in input_shape)
    fitted = family_input_shape(family, shape)
    if fitted is not None:
        return fitted
    wants = "(channels, length)" if family == "cnn1d" else "(channels, height, width), or a flat square vector (64 → 1×8×8)"
    fitting = [f for f in FAMILIES if family_input_shape(f, shape) is not None]
    raise invalid(
        key,
        family,
        f"a family that fits the task's input shape {shape}",
        hint=f"{family!r} needs per-sample inputs {wants}; this task fits {', '.join(map(repr, fitting))}.",
        **extra,
    )
