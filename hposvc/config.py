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
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from hposvc.errors import invalid

__all__ = [
    "ACTIVATIONS",
    "CONDITIONAL",
    "DATA_PATHS",
    "FAMILIES",
    "FIELDS",
    "INITS",
    "NORMS",
    "ONE_SHOT_DEFAULTS",
    "OPTIMIZERS",
    "OPTIMIZER_PARAMS",
    "PARAM_NAME_RE",
    "PRECISIONS",
    "RESERVED_PARAM_NAMES",
    "SCHEDULES",
    "TABULAR_KINDS",
    "TASKS",
    "TASK_INPUT_SHAPES",
    "TASK_MODEL_DEFAULTS",
    "TASK_OPTIONS",
    "TRANSFORMER_NORMS",
    "Rejected",
    "Rule",
    "TaskOption",
    "TrialConfig",
    "check_family",
    "check_param_value",
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
FAMILIES = ("mlp", "cnn1d", "cnn2d", "resnet", "transformer")
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
# Norms a transformer block takes: each normalises one token over its features. Batch norm
# (statistics over the batch and every position) and instance norm (over positions) would
# let a causal model see later tokens, so the transformer family refuses them.
TRANSFORMER_NORMS = ("none", "layer", "rms", "group")
ACTIVATIONS = ("relu", "leaky_relu", "prelu", "gelu", "mish", "sigmoid", "tanh", "softsign")

# -- the fields ---------------------------------------------------------------------------
#
# Each TrialConfig field is defined once, below, by a Rule: its kind, default, allowed
# values or range, which spec table may fix it, and (for conditional fields) when it
# applies. TrialConfig checks its values with it; hposvc.spec parses spec values with it.


class Rejected(ValueError):
    """A value a Rule does not allow; ``allowed`` says what is (a phrase or the values)."""

    def __init__(self, allowed: Any, *, wrong_type: bool) -> None:
        super().__init__(allowed if isinstance(allowed, str) else ", ".join(map(repr, allowed)))
        self.allowed = allowed
        self.wrong_type = wrong_type  # e.g. a string for a number: a spec also says what a dimension is


@dataclass(frozen=True)
class Rule:
    """How one TrialConfig field is checked, defaulted and set in a spec.

    >>> FIELDS["lr"].clean(3), FIELDS["norm"].allowed[:2]
    (3.0, ('none', 'batch'))
    """

    kind: str  # "choice" | "bool" | "int" | "float" | "path"
    default: Any  # the field's default (None: unset until the optimizer or owner gives one)
    allowed: tuple = ()  # choice: the values
    test: "Callable[[Any], bool] | None" = None  # int / float: the range
    phrase: str = ""  # what is allowed, as messages say it
    table: str = "space"  # where a spec may fix it: "train", "model", or "space" only
    none_ok: bool = False  # None is a value of its own (family: the task's; num_workers: automatic)
    owner: str | None = None  # conditional fields: the field whose values decide whether it applies
    active: tuple = ()  # ... and those values
    when_active: Any = None  # its default when it applies (None: required, e.g. pretrained_path)

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float")

    def clean(self, value: Any) -> Any:
        """``value`` normalised (ints to floats for float fields); raises :class:`Rejected`."""
        if value is None and self.none_ok:
            return None
        if self.kind == "choice":
            if isinstance(value, str) and value in self.allowed:
                return value
            raise Rejected(self.allowed, wrong_type=not isinstance(value, str))
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            raise Rejected("true or false", wrong_type=True)
        if self.kind == "path":
            if isinstance(value, (str, os.PathLike)) and str(value):
                return str(value)
            raise Rejected(self.phrase, wrong_type=True)
        number = (int,) if self.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            raise Rejected(self.phrase, wrong_type=True)
        if not math.isfinite(value) or not self.test(value):
            raise Rejected(self.phrase, wrong_type=False)
        return float(value) if self.kind == "float" else value


def _choice(default: Any, values: tuple, *, table: str = "space", none_ok: bool = False) -> Rule:
    return Rule("choice", default, allowed=values, table=table, none_ok=none_ok)


def _flag(default: bool | None, *, table: str = "space", **conditional: Any) -> Rule:
    return Rule("bool", default, phrase="true or false", table=table, **conditional)


def _int(default: int | None, least: int, *, table: str = "space", phrase: str | None = None, **kw: Any) -> Rule:
    return Rule("int", default, test=lambda v: v >= least, phrase=phrase or f"an integer >= {least}", table=table, **kw)


def _float(test: "Callable[[float], bool]", phrase: str, *, table: str = "space", **conditional: Any) -> Rule:
    return Rule("float", None, test=test, phrase=phrase, table=table, **conditional)


_POSITIVE = (lambda v: v > 0, "a number > 0")
_UNIT = (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")

# Every field of TrialConfig, in its order. The unconditional defaults here are the
# dataclass's defaults; the optimizer numbers' come from ONE_SHOT_DEFAULTS.
FIELDS: dict[str, Rule] = {
    "optimizer": _choice("adam", OPTIMIZERS),
    "lr": _float(*_POSITIVE),
    "momentum": _float(*_UNIT),  # heavy-ball / Nesterov μ
    "beta1": _float(*_UNIT),  # Adam-family first-moment decay
    "beta2": _float(*_UNIT),  # Adam-family second-moment decay
    "eps": _float(*_POSITIVE),  # denominator guard of adaptive methods
    "rho": _float(*_UNIT),  # Adadelta ρ / RMSprop α
    "weight_decay": _float(lambda v: v >= 0, "a number >= 0"),  # L2 (coupled) or decoupled for AdamW
    "schedule": _choice("constant", SCHEDULES, table="train"),  # learning-rate schedule over all steps
    # warmup_cosine: the fraction of steps spent warming up
    "warmup": _float(lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)", table="train", owner="schedule", active=("warmup_cosine",), when_active=0.1),
    "init": _choice("he_normal", INITS),  # weight-init scheme of every linear/conv layer
    # normal: the std; uniform: the half-width of U(-a, a)
    "init_std": _float(*_POSITIVE, owner="init", active=("normal", "uniform"), when_active=0.01),
    # init "pretrained": a state_dict file (required then)
    "pretrained_path": Rule("path", None, phrase="a path to a state_dict file", table="model", owner="init", active=("pretrained",)),
    "norm": _choice("none", NORMS),  # normalisation after each hidden layer
    "norm_groups": _int(None, 1, owner="norm", active=("group",), when_active=4),  # group norm: channel groups
    "activation": _choice("relu", ACTIVATIONS),
    "batch_size": _int(64, 1, table="train"),
    "epochs": _int(10, 1, table="train"),
    "depth": _int(2, 0, table="model"),  # hidden layers (MLP), conv blocks (CNN), residual blocks per stage (ResNet)
    "width": _int(128, 1, table="model"),  # hidden units (MLP) or channels (CNN; a ResNet's first stage); a transformer's model dimension
    "heads": _int(4, 1, table="model"),  # transformer: attention heads (width must be a multiple); other families ignore it
    "family": _choice(None, FAMILIES, table="model", none_ok=True),  # built-in family; None: the task's own
    # resnet: every residual branch starts at 0 (Goyal et al. 2017)
    "zero_init_residual": _flag(None, table="model", owner="family", active=("resnet",), when_active=False),
    "seed": _int(0, 0, table="train"),
    "precision": _choice("fp32", PRECISIONS, table="train"),  # autocast dtype (fp16 adds a gradient scaler)
    "channels_last": _flag(False, table="train"),  # 2-D convs in channels-last memory format (CUDA only)
    "compile": _flag(False, table="train"),  # torch.compile; where compiling fails, eager, with the reason logged
    "data": _choice("auto", DATA_PATHS, table="train"),  # how batches reach the model
    "num_workers": _int(None, 0, table="train", none_ok=True),  # DataLoader workers; None: 0 on the CPU, up to 4 on CUDA
    # hposvc's own loop saves a checkpoint every N epochs (0: never); a retry resumes from it
    "checkpoint_every": _int(0, 0, table="train", phrase="an integer >= 0 (0: no checkpoints)"),
}
# Conditional fields by name: field -> (owner, the owner's values for which it applies).
CONDITIONAL: dict[str, tuple[str, tuple[str, ...]]] = {n: (r.owner, r.active) for n, r in FIELDS.items() if r.owner}
# Names a spec's [space.params] may not take: hposvc's own fields, and what factories and
# trainers are already called with.
RESERVED_PARAM_NAMES: tuple[str, ...] = (*FIELDS, "extra", "params", "task", "config", "ctx", "seed")
PARAM_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _default(name: str) -> Any:
    return FIELDS[name].default


def check_param_value(name: str, value: Any) -> Any:
    """A value of a user dimension (``[space.params]``): a bool, int, finite float or string."""
    if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise invalid(f"params.{name}", value, "a boolean, integer, finite number or string")


@dataclass(frozen=True)
class TrialConfig:
    """Every choice one trial makes, as explicit values.

    Construct with keywords; hyper-parameters that apply to ``optimizer`` and are left
    ``None`` are filled with its one-shot defaults. Invalid values raise
    :class:`~hposvc.errors.InvalidInputError` naming the field and what is allowed. Each
    field's rules (and its comment) are in :data:`FIELDS`.
    """

    optimizer: str = _default("optimizer")
    # Optimizer numbers: None means "not used by this optimizer" once constructed.
    lr: float | None = None
    momentum: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    rho: float | None = None
    weight_decay: float | None = None
    schedule: str = _default("schedule")
    warmup: float | None = None  # conditional fields are None where they do not apply
    init: str = _default("init")
    init_std: float | None = None
    pretrained_path: str | None = None
    norm: str = _default("norm")
    norm_groups: int | None = None
    activation: str = _default("activation")
    batch_size: int = _default("batch_size")
    epochs: int = _default("epochs")
    depth: int = _default("depth")
    width: int = _default("width")
    heads: int = _default("heads")
    family: str | None = _default("family")
    zero_init_residual: bool | None = None
    seed: int = _default("seed")
    precision: str = _default("precision")
    channels_last: bool = _default("channels_last")
    compile: bool = _default("compile")
    data: str = _default("data")
    num_workers: int | None = _default("num_workers")
    checkpoint_every: int = _default("checkpoint_every")
    # Task-specific knobs a user factory may read; kept sorted so equality is stable.
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The user's own dimensions ([space.params]): name -> value, passed to their command,
    # trainer (ctx.params) and factories; kept sorted.
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)

        def check(name: str, value: Any) -> Any:
            try:
                return FIELDS[name].clean(value)
            except Rejected as e:
                raise invalid(name, value, (*e.allowed, None) if FIELDS[name].none_ok and not isinstance(e.allowed, str) else e.allowed) from None

        check("optimizer", self.optimizer)
        # 1) the optimizer's numbers: its own filled from the one-shot defaults, the rest None
        uses = ONE_SHOT_DEFAULTS[self.optimizer]
        for name in OPTIMIZER_PARAMS:
            value = getattr(self, name)
            if name in uses:
                set_(name, check(name, uses[name] if value is None else value))
            elif value is not None:
                hint = f"{self.optimizer!r} does not use {name!r}; it uses {', '.join(uses)}."
                raise invalid(name, value, "None", hint=hint)
        # 2) every other field by its rule, conditional ones only where their owner says
        for name, rule in FIELDS.items():
            if name == "optimizer" or name in OPTIMIZER_PARAMS:
                continue
            value = getattr(self, name)
            if rule.owner is not None:
                owner = getattr(self, rule.owner)
                if owner not in rule.active:
                    if value is not None:
                        raise invalid(name, value, "None", hint=f"It only applies when {rule.owner} is one of {rule.active}.")
                    continue
                if value is None:
                    if rule.when_active is None:
                        raise invalid(name, value, rule.phrase, hint=f"{rule.owner}={owner!r} needs it.")
                    value = rule.when_active
            set_(name, check(name, value))
        # 3) rules across fields
        if self.norm_groups is not None and self.width % self.norm_groups:
            raise invalid(
                "norm_groups",
                self.norm_groups,
                f"a divisor of width={self.width}",
                hint="Group norm splits the channels into equal groups.",
            )
        set_("extra", dict(sorted(dict(self.extra).items())))
        params = dict(self.params)
        for name, value in params.items():
            if not isinstance(name, str) or not PARAM_NAME_RE.fullmatch(name) or name in RESERVED_PARAM_NAMES:
                raise invalid("params", name, "a name of letters, digits and '_' that is not one of hposvc's fields")
            check_param_value(name, value)
        set_("params", dict(sorted(params.items())))

    # -- conversions -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (JSON-safe); ``from_dict`` inverts it exactly.
        ``params`` is left out when empty, so configs without user dimensions read as before."""
        out = dataclasses.asdict(self)
        out["extra"] = dict(self.extra)
        if self.params:
            out["params"] = dict(self.params)
        else:
            del out["params"]
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
        """The fields that are set, as strings: MLflow params and table columns. The user's
        own dimensions keep their plain names (they cannot clash with a field's)."""
        out = {k: v for k, v in self.to_dict().items() if k not in ("extra", "params") and v is not None}
        out.update({f"extra.{k}": v for k, v in self.extra.items()})
        out.update(self.params)
        return {k: str(v) for k, v in out.items()}

    def replace(self, **changes: Any) -> "TrialConfig":
        """A copy with ``changes``; changing the optimizer resets its numbers to defaults
        unless they are given too."""
        data = self.to_dict()
        if "optimizer" in changes and changes["optimizer"] != self.optimizer:
            for name in OPTIMIZER_PARAMS:
                data[name] = None
        for name, (owner, _) in CONDITIONAL.items():
            if owner in changes and name not in changes:
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
    mlp flattens anything, cnn1d takes ``(C, L)``, transformer ``(L,)`` token ids, cnn2d and resnet take ``(C, H, W)`` or a
    flat square vector as one channel (digits' 64 features are its 1×8×8 pixels).

    >>> family_input_shape("resnet", (64,)), family_input_shape("cnn1d", (5,))
    ((1, 8, 8), None)
    """
    if family == "mlp":
        return shape
    if family == "cnn1d":
        return shape if len(shape) == 2 else None
    if family == "transformer":
        return shape if len(shape) == 1 else None
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
    wants = {
        "cnn1d": "(channels, length)",
        "transformer": "(length,) sequences of token ids",
    }.get(family, "(channels, height, width), or a flat square vector (64 → 1×8×8)")
    # the transformer also needs token ids, which a shape cannot tell: it is not offered here
    fitting = [f for f in FAMILIES if f != "transformer" and family_input_shape(f, shape) is not None]
    raise invalid(
        key,
        family,
        f"a family that fits the task's input shape {shape}",
        hint=f"{family!r} needs per-sample inputs {wants}; this task fits {', '.join(map(repr, fitting))}.",
        **extra,
    )
