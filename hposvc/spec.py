"""Study specs: the TOML file a user writes, parsed and validated at the boundary.

A spec names the workload, the metric, the sampler and pruner, and the search space over
:class:`~hposvc.config.TrialConfig` fields. Every problem is found here, before anything is
written anywhere, and raised as one :class:`~hposvc.errors.SpecError` that names the file,
the key path, the bad value and what is allowed. Parsing is pure: it reads the spec and
nothing else (no storage, no data files, no torch/optuna/mlflow import).

The format (every key; ``[study] name`` is required, and ``task`` unless a trainer or
command loads its own data)::

    [study]
    name = "digits-quick"        # letters, digits, '.', '_', '-'
    task = "digits"              # digits | mnist1d | moons | spirals | tabular | "module:function"
    metric = "val_accuracy"      # or "val_loss"; a trainer or command may report any name
    direction = "minimize"       # needed when the metric's name does not say (val_loss, valid_ppl, val_acc do)
    n_trials = 12                # finished trials the study should end with (default 20)
    sampler = "tpe"              # tpe | random | cmaes | gp | grid | nsga2 | qmc (default tpe)
    pruner = "median"            # none | median | successive_halving | hyperband (default median)
    seed = 0                     # seeds the sampler and, unless [train] seed says otherwise, every trial
    population = 8               # train K trials at once as one population, or "auto"; absent: one at a time
    description = "free text"
    model = "mymodels:net"       # your model factory, called as net(task, config) -> torch.nn.Module
    trainer = "myloop:train"     # your training function, called as train(ctx) for each trial
    command = ["python", "train.py", "--lr={lr}"]  # or your script, any language (not with trainer)
    code_dir = "."               # where "module:function" code is imported from (default: the spec's folder)

    [task]                       # options for the workload (tabular: path, target, kind; images: path, size, ...)
    [train]                      # fixed training settings: epochs, batch_size, schedule, warmup, seed, timeout
                                 # (per trial: 600, "10m"; a trial past it is stopped and fails, not retried),
                                 # precision (fp32 | bf16 | fp16), channels_last, compile, data (auto | tensors | loader), num_workers, checkpoint_every
    [model]                      # depth, width (channels: the CNN's name for width), pretrained_path,
                                 # family (mlp | cnn1d | cnn2d | resnet), zero_init_residual (resnet),
                                 # norm_classes (["module:Class"]: a model factory's own norms)
    [metrics]                    # a command's output, read by patterns with one capture group (hposvc.script)
    valid_loss = 'valid loss\\s+([-+0-9.eE]+)'   # each match of the study's metric is one report
    epoch = 'end of epoch\\s+(\\d+)'              # optional: the step (else: the count of reports)
    [space]                      # any TrialConfig field, fixed / list / range
    optimizer_defaults = "auto"  # what unmentioned optimizer numbers do: auto | search | fixed
    [space.optimizers.adam]      # per-optimizer lr/momentum/beta1/beta2/eps/rho/weight_decay
    [space.params]               # your own dimensions, any name that is not one of hposvc's fields:
    dropout = { low = 0.0, high = 0.5 }   # passed as {dropout} to a command, ctx.params["dropout"]
    hidden = [128, 256]                   # to a trainer, and dropout=... to a model or task factory
    tied = [true, false]                  # whose signature names it; "{tied?--tied}" in a command
                                          # is --tied when true and no argument when false

A dimension is a scalar (fixed), a list (one of these values) or a table
``{low, high, log = false, step}`` (a range, both ends included; integer fields take
integer ranges, and a ``[space.params]`` range of integers stays integer). Each
TrialConfig field's values are checked by its rule in :data:`hposvc.config.FIELDS`. Paths in ``[task] path`` and ``[model] pretrained_path`` are relative to
the spec file. A ``[model] family`` must fit the task's inputs (digits' 64 pixels are
1×8×8 images for cnn2d and resnet), and every searched norm must suit each family.

Optimizer numbers the spec does not mention (see :data:`DEFAULT_RANGES`):

* ``optimizer_defaults = "fixed"``: they are the one-shot defaults
  (:data:`~hposvc.config.ONE_SHOT_DEFAULTS`), so ``optimizer = "adam"`` alone means Adam
  exactly as PyTorch ships it.
* ``"search"``: lr, momentum, beta1, beta2 and rho are searched over
  :data:`DEFAULT_RANGES` for each optimizer that uses them; eps and weight_decay stay at
  their one-shot defaults (tuning them is a separate question, and ranges for them mostly
  add noise to small budgets).
* ``"auto"`` (the default): "search" when the spec searches the optimizer itself (a list of
  two or more) — comparing optimizers fairly needs each one's own numbers tuned (Choi et
  al. 2019) — and "fixed" otherwise, or when the sampler is ``grid`` (it cannot enumerate
  continuous ranges).

>>> spec = parse_spec({"study": {"name": "demo", "task": "digits"},
...                    "space": {"optimizer": ["sgd", "adam"], "lr": {"low": 1e-4, "high": 0.5, "log": True}}})
>>> spec.direction, spec.dims["lr"].kind, spec.task_key
('maximize', 'range', 'digits[depth=2,width=128,epochs=10]')
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hposvc.config import (
    CONDITIONAL,
    FIELDS,
    NORMS,
    ONE_SHOT_DEFAULTS,
    OPTIMIZER_PARAMS,
    OPTIMIZERS,
    PARAM_NAME_RE,
    RESERVED_PARAM_NAMES,
    TABULAR_KINDS,
    TASK_INPUT_SHAPES,
    TASK_MODEL_DEFAULTS,
    TASK_OPTIONS,
    TASKS,
    TRANSFORMER_NORMS,
    Rejected,
    TrialConfig,
    check_family,
    check_population,
    family_input_shape,
)
from hposvc.errors import SpecError, invalid

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "DEFAULT_LR_FACTOR",
    "DEFAULT_RANGES",
    "Dim",
    "default_lr_dim",
    "METRICS",
    "direction_of",
    "PRUNERS",
    "SAMPLERS",
    "StudySpec",
    "load_spec",
    "parse_spec",
]

METRICS = ("val_accuracy", "val_loss")  # what hposvc's own loop reports
DIRECTIONS = {"val_accuracy": "maximize", "val_loss": "minimize"}
# A trainer or command may report any metric; its name must be one MLflow takes.
METRIC_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]{0,249}")
# Words that say which way a metric goes, when [study] direction does not: a name made of
# words from one list and none from the other ("valid_loss", "val_acc") says it.
_LOWER_IS_BETTER = ("loss", "error", "err", "mse", "mae", "rmse", "nll", "ppl", "perplexity", "wer", "cer")
_HIGHER_IS_BETTER = ("acc", "accuracy", "auc", "f1", "precision", "recall", "bleu", "iou", "map", "r2")
SAMPLERS = ("tpe", "random", "cmaes", "gp", "grid", "nsga2", "qmc")
PRUNERS = ("none", "median", "successive_halving", "hyperband")
OPTIMIZER_DEFAULTS = ("auto", "search", "fixed")

# Which network family each built-in task trains unless [model] family says otherwise;
# arrays' and a user factory's are known once loaded.
TASK_FAMILY = {"digits": "mlp", "moons": "mlp", "spirals": "mlp", "tabular": "mlp", "mnist1d": "cnn1d", "images": "cnn2d"}
# Instance norm normalises each channel over its positions: an MLP's features have none.
NORMS_BY_FAMILY = {
    "mlp": ("none", "batch", "layer", "group", "rms"),
    "cnn1d": NORMS,
    "cnn2d": NORMS,
    "resnet": NORMS,
    "transformer": TRANSFORMER_NORMS,
}


# The ranges unmentioned optimizer numbers get when they are searched (optimizer_defaults).
# lr: log range DEFAULT_LR_FACTOR times either side of each optimizer's one-shot default
# (sgd 1e-2 -> [0.000333, 0.3], adam 1e-3 -> [3.33e-5, 0.03], adadelta 1.0 -> [0.0333, 30]).
# beta2 is a list because what matters is 1 - beta2 on a log scale (0.05 ... 1e-4), which a
# linear range over [0.9, 0.9999] would almost never reach.
DEFAULT_LR_FACTOR = 30.0
DEFAULT_RANGES: dict[str, "Dim"] = {}  # filled below, once Dim exists


class _Missing:
    """The value of a required key that is not there; reads as "nothing" in messages."""

    def __repr__(self) -> str:
        return "nothing"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Dim:
    """One search dimension of a spec: a fixed value, a choice or a range.

    >>> Dim.range(1e-4, 0.5, log=True).contains(0.01)
    True
    >>> Dim.choice(["relu", "tanh"]).values()
    ('relu', 'tanh')
    """

    kind: str  # "fixed" | "choice" | "range"
    value: Any = None  # fixed: the value every trial gets
    choices: tuple = ()  # choice: the values, in the spec's order
    low: float | int | None = None  # range: lower end, included
    high: float | int | None = None  # range: upper end, included
    log: bool = False  # range: sample uniformly in log space
    step: float | int | None = None  # range: spacing of allowed values (None: continuous; 1 for integers)
    integer: bool = False  # range: an integer field (suggest_int rather than suggest_float)

    @classmethod
    def fixed(cls, value: Any) -> "Dim":
        return cls(kind="fixed", value=value)

    @classmethod
    def choice(cls, values: Iterable[Any]) -> "Dim":
        return cls(kind="choice", choices=tuple(values))

    @classmethod
    def range(
        cls,
        low: float | int,
        high: float | int,
        *,
        log: bool = False,
        step: float | int | None = None,
        integer: bool = False,
    ) -> "Dim":
        return cls(kind="range", low=low, high=high, log=log, step=step, integer=integer)

    @property
    def searched(self) -> bool:
        """True when trials choose a value (a choice or a range), False when fixed."""
        return self.kind != "fixed"

    def values(self) -> tuple | None:
        """Every value the dimension allows, or None for a continuous range."""
        if self.kind == "fixed":
            return (self.value,)
        if self.kind == "choice":
            return self.choices
        if self.integer:
            return tuple(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        n = int(round((self.high - self.low) / self.step))
        # Rounded so the grid holds 0.1, not 0.30000000000000004, and stays on Optuna's grid.
        return tuple(float(f"{self.low + k * self.step:.12g}") for k in range(n + 1))

    def contains(self, value: Any) -> bool:
        """Whether a trial could get ``value`` from this dimension."""
        if self.kind in ("fixed", "choice"):
            return any(_same(value, v) for v in self.values())
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        tol = 1e-12 * max(abs(self.low), abs(self.high))
        if not self.low - tol <= value <= self.high + tol:
            return False
        if self.step is not None:
            k = (value - self.low) / self.step
            return abs(k - round(k)) < 1e-8
        return True

    def to_json(self) -> Any:
        """The spec-file form: a scalar, a list or a ``{low, high, log?, step?}`` table."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "choice":
            return list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool):
            return False
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return type(a) is type(b) and a == b


DEFAULT_RANGES.update(
    {
        "momentum": Dim.range(0.5, 0.99),
        "beta1": Dim.range(0.8, 0.99),
        "beta2": Dim.choice((0.95, 0.99, 0.999, 0.9999)),
        "rho": Dim.range(0.8, 0.99),
    }
)


def default_lr_dim(optimizer: str) -> Dim:
    """The lr range an optimizer gets when its lr is searched by default."""
    lr = ONE_SHOT_DEFAULTS[optimizer]["lr"]
    # Three significant digits: the ends read as 0.000333 and 0.3, not 0.30000000000000004.
    return Dim.range(float(f"{lr / DEFAULT_LR_FACTOR:.3g}"), float(f"{lr * DEFAULT_LR_FACTOR:.3g}"), log=True)


def direction_of(metric: str) -> str | None:
    """Which way ``metric`` goes by its name, or None when the name does not say.

    >>> direction_of("valid_loss"), direction_of("val_acc"), direction_of("score")
    ('minimize', 'maximize', None)
    """
    if metric in DIRECTIONS:
        return DIRECTIONS[metric]
    words = set(re.split(r"[^a-z0-9]+", metric.lower()))
    lower, higher = words & set(_LOWER_IS_BETTER), words & set(_HIGHER_IS_BETTER)
    if lower and not higher:
        return "minimize"
    if higher and not lower:
        return "maximize"
    return None


# -- the keys each table takes -----------------------------------------------------------

_STUDY_KEYS = (
    "name", "task", "metric", "direction", "n_trials", "sampler", "pruner", "seed", "population", "description",
    "model", "trainer", "command", "code_dir",
)
# [train] and [model] fix the fields whose Rule names that table (config.FIELDS);
# "channels" is the CNN's name for width; norm_classes names a model factory's own norms.
_TRAIN_KEYS = (*(name for name, rule in FIELDS.items() if rule.table == "train"), "timeout")  # timeout: per trial, not a dimension
_MODEL_KEYS = (*(name for name, rule in FIELDS.items() if rule.table == "model"), "channels", "norm_classes")
_FIELDS = tuple(FIELDS)
_SPACE_KEYS = _FIELDS + ("optimizers", "optimizer_defaults", "params")
_TOP_KEYS = ("study", "task", "train", "model", "space", "metrics")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_FACTORY_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s?)?")
_DIM_HINT = "A dimension is a value (fixed), a list (one of these) or a table {low, high, log, step} (a range)."

# The fields a task key names: the workload's size and budget, not the choices being compared.
_KEY_FIELDS = ("family", "depth", "width", "epochs")


@dataclass(frozen=True)
class StudySpec:
    """A validated study spec. Build it with :func:`load_spec` or :func:`parse_spec`.

    >>> spec = parse_spec({"study": {"name": "s", "task": "moons", "metric": "val_loss"}})
    >>> spec.direction, spec.sampler, spec.n_trials
    ('minimize', 'tpe', 20)
    >>> parse_spec(spec.to_dict()) == spec
    True
    """

    name: str  # study name in storage and MLflow ("hposvc/<name>")
    task: str | None  # a built-in task name or "module:function"; None: the trainer or command loads its own data
    task_options: Mapping[str, Any]  # the [task] table, passed to load_task
    metric: str  # "val_accuracy" | "val_loss"; any name for a trainer or command
    direction: str  # "maximize" | "minimize": [study] direction, or what the metric's name says
    n_trials: int  # finished trials the study should end with
    sampler: str  # one of SAMPLERS
    pruner: str  # one of PRUNERS
    seed: int  # sampler seed, and every trial's seed unless the spec sets one
    population: int | str | None  # K trials trained together, "auto", or None (one at a time)
    dims: Mapping[str, Dim]  # every TrialConfig field the spec sets, from [train], [model], [space]
    optimizer_overrides: Mapping[str, Mapping[str, Dim]]  # [space.optimizers.NAME]
    optimizer_defaults: str = "auto"  # what unmentioned optimizer numbers do (module docstring)
    description: str = ""  # free text from [study] description
    model: str | None = None  # "module:function" model factory, or None: the task's built-in family
    trainer: str | None = None  # "module:function" training function, or None: hposvc's own loop
    command: tuple[str, ...] | None = None  # a script run per trial, with {field} placeholders
    # [space.params]: the user's own dimensions by name, passed to their command, trainer
    # (ctx.params) and factories; Optuna params of the same plain names.
    params: Mapping[str, Dim] = field(default_factory=dict)
    norm_classes: tuple[str, ...] = ()  # [model] norm_classes: "module:Class" norms of a model factory the rule misses
    # [train] timeout: seconds a trial may run before it is stopped and fails (None: no limit).
    # Like n_trials it bounds a run, not what is searched, so it is not part of the hash.
    timeout: float | None = None
    # [metrics]: metric name (or "epoch") -> a regular expression with one capture group,
    # read from each line of a command's output (hposvc.script)
    metrics: Mapping[str, str] = field(default_factory=dict)
    # Where user code is imported from and commands run: the spec file's folder unless
    # [study] code_dir says otherwise. A path of this machine, so not part of the hash.
    code_dir: str | None = field(default=None, compare=False)
    source: str = field(default="<dict>", compare=False)  # file the spec came from, for messages

    # -- derived views ------------------------------------------------------------------

    @property
    def family(self) -> str | None:
        """The built-in family trials train: [model] family when fixed, else the task's
        ("mlp", "cnn1d", "cnn2d"); None when searched, or for arrays and user factories
        (known once loaded)."""
        dim = self.dims.get("family")
        if dim is not None:
            return dim.value if dim.kind == "fixed" else None
        return TASK_FAMILY.get(self.task)

    @property
    def optimizers(self) -> tuple[str, ...]:
        """The optimizers a trial can get (TrialConfig's default when the spec names none)."""
        dim = self.dims.get("optimizer")
        return tuple(dim.values()) if dim is not None else (TrialConfig.optimizer,)

    @property
    def searches_optimizer_defaults(self) -> bool:
        """Whether unmentioned optimizer numbers are searched over DEFAULT_RANGES."""
        if self.optimizer_defaults != "auto":
            return self.optimizer_defaults == "search"
        return len(self.optimizers) > 1 and self.sampler != "grid"

    def optimizer_space(self, optimizer: str) -> dict[str, tuple[str, Dim]]:
        """The numbers of ``optimizer`` that the spec sets or searches.

        Maps each hyper-parameter to ``(Optuna param name, Dim)``; the ones left out take
        their one-shot default. Only lr may be shared across optimizers (named "lr");
        every other searched number is conditional, named "<optimizer>.<param>".

        >>> spec = parse_spec({"study": {"name": "s", "task": "digits"},
        ...                    "space": {"optimizer": ["sgd", "adam"], "lr": 0.01}})
        >>> sorted(spec.optimizer_space("adam"))
        ['beta1', 'beta2', 'lr']
        """
        out: dict[str, tuple[str, Dim]] = {}
        overrides = self.optimizer_overrides.get(optimizer, {})
        for param in ONE_SHOT_DEFAULTS[optimizer]:
            if param in overrides:
                out[param] = (f"{optimizer}.{param}", overrides[param])
            elif param in self.dims:
                out[param] = ("lr" if param == "lr" else f"{optimizer}.{param}", self.dims[param])
            elif self.searches_optimizer_defaults and param == "lr":
                out[param] = (f"{optimizer}.lr", default_lr_dim(optimizer))
            elif self.searches_optimizer_defaults and param in DEFAULT_RANGES:
                out[param] = (f"{optimizer}.{param}", DEFAULT_RANGES[param])
        return out

    def search_space(self) -> dict[str, Dim]:
        """Every Optuna parameter a trial of this spec may suggest, by name.

        >>> spec = parse_spec({"study": {"name": "s", "task": "digits"},
        ...                    "space": {"optimizer": "sgd", "lr": [0.1, 0.01]}})
        >>> list(spec.search_space())
        ['lr']
        """
        out = {name: dim for name, dim in self.dims.items() if dim.searched and name not in OPTIMIZER_PARAMS}
        for optimizer in self.optimizers:
            for name, dim in self.optimizer_space(optimizer).values():
                if dim.searched:
                    out[name] = dim
        out.update({name: dim for name, dim in self.params.items() if dim.searched})
        return out

    def implicit_values(self, task_defaults: Mapping[str, int] | None = None) -> dict[str, Any]:
        """Values hposvc sets for fields the spec leaves out: the task's depth/width and the seed.

        ``task_defaults`` gives depth/width for a user factory (its Task.default_depth /
        default_width); built-ins use :data:`~hposvc.config.TASK_MODEL_DEFAULTS`.
        """
        out: dict[str, Any] = {}
        sizes = dict(task_defaults or TASK_MODEL_DEFAULTS.get(self.task, {}))
        for name in ("depth", "width"):
            if name not in self.dims and name in sizes:
                out[name] = sizes[name]
        if "seed" not in self.dims:
            # Common random numbers: every trial sees the same init stream and data order, so
            # configs are compared fairly and a retried trial reproduces the failed one.
            out["seed"] = self.seed
        return out

    @property
    def task_key(self) -> str:
        """The workload plus its fixed size and budget, e.g. "digits[depth=2,width=128,epochs=10]".

        Studies with the same key trained the same network for the same epochs, so their
        trials can be pooled (recommend). Searched fields, optimizer numbers and the seed
        are not part of it.
        """
        label = self.task if self.task is not None else "own-data"  # the trainer or command loads it
        options = dict(self.task_options)
        if self.task == "tabular" and "path" in options:
            label = f"tabular:{Path(str(options.pop('path'))).name}"
        parts = [f"{k}={_key_value(v)}" for k, v in sorted(options.items())]
        implicit = self.implicit_values()
        implicit.setdefault("epochs", TrialConfig.epochs)
        for name in _KEY_FIELDS:
            dim = self.dims.get(name)
            if dim is not None and dim.kind == "fixed":
                parts.append(f"{name}={dim.value}")
            elif dim is None and name in implicit:
                parts.append(f"{name}={implicit[name]}")
        return f"{label}[{','.join(parts)}]" if parts else label

    # -- conversions ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The canonical, JSON-safe form: what is stored on the study.

        It is itself a spec (every dimension under "space"); ``parse_spec`` of it gives an
        equal spec with the same hash.
        """
        study: dict[str, Any] = {
            "name": self.name,
            **({"task": self.task} if self.task is not None else {}),
            "metric": self.metric,
            "n_trials": self.n_trials,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "seed": self.seed,
        }
        if self.metric not in DIRECTIONS:
            study["direction"] = self.direction  # the built-in metrics' is implied (and hashes stay)
        if self.population is not None:
            study["population"] = self.population
        if self.description:
            study["description"] = self.description
        for key in ("model", "trainer"):
            if getattr(self, key) is not None:
                study[key] = getattr(self, key)
        if self.command is not None:
            study["command"] = list(self.command)
        if self.code_dir is not None:
            study["code_dir"] = self.code_dir
        space: dict[str, Any] = {name: self.dims[name].to_json() for name in _FIELDS if name in self.dims}
        space["optimizer_defaults"] = self.optimizer_defaults
        if self.params:
            space["params"] = {name: dim.to_json() for name, dim in self.params.items()}
        if self.optimizer_overrides:
            space["optimizers"] = {
                opt: {p: dim.to_json() for p, dim in params.items()}
                for opt, params in sorted(self.optimizer_overrides.items())
            }
        out = {"study": study, "task": _json_safe(dict(self.task_options)), "space": space}
        if self.timeout is not None:
            out["train"] = {"timeout": self.timeout}
        if self.norm_classes:
            out["model"] = {"norm_classes": list(self.norm_classes)}
        if self.metrics:
            out["metrics"] = dict(self.metrics)
        return out

    @property
    def spec_hash(self) -> str:
        """sha256 of the canonical JSON, without n_trials, population and description.

        Those change how long a study runs, how trials are batched and how it is described,
        not what it searches, so ``--n-trials`` overrides and resumes keep the same hash.
        """
        data = self.to_dict()
        for key in ("n_trials", "population", "description", "code_dir"):
            data["study"].pop(key, None)
        data.pop("train", None)  # [train] timeout
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def with_overrides(self, **changes: Any) -> "StudySpec":
        """A copy with [study] settings changed (n_trials, name, seed, sampler, pruner,
        population), validated like the file; ``None`` leaves a setting as it is (so CLI
        options that were not given can be passed straight through).

        >>> parse_spec({"study": {"name": "s", "task": "digits"}}).with_overrides(n_trials=3).n_trials
        3
        """
        allowed = ("n_trials", "name", "seed", "sampler", "pruner", "population")
        data = self.to_dict()
        for key, value in changes.items():
            if key not in allowed:
                raise invalid("override", key, allowed, source=self.source, cls=SpecError)
            if value is not None:
                data["study"][key] = value
        return _SpecParser(self.source, base_dir=None).spec(data)


def _close(value: Any, allowed: Iterable[str]) -> str | None:
    """The allowed word closest to a misspelt one, if any is close (difflib)."""
    if not isinstance(value, str):
        return None
    # 0.65 rather than difflib's 0.6: 'bayes' should not suggest 'cmaes'.
    found = difflib.get_close_matches(value, list(allowed), n=1, cutoff=0.65)
    return found[0] if found else None


def _key_value(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value)


def _plain(value: Any) -> bool:
    """Whether a [task] option survives JSON (TOML dates and times do not)."""
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, (str, int, bool))


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# -- loading ---------------------------------------------------------------------------------


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a TOML spec file.

    Relative paths inside it ([task] path, [model] pretrained_path) are resolved against
    the file's folder. Errors name ``path`` as given.

    >>> load_spec("studies/quickstart.toml").name   # doctest: +SKIP
    'quickstart'
    """
    source = str(path)
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise invalid("spec", source, "an existing TOML file", cls=SpecError) from None
    except IsADirectoryError:
        raise invalid("spec", source, "a TOML file, not a folder", cls=SpecError) from None
    except UnicodeDecodeError as e:
        raise invalid("spec", source, "a UTF-8 text file", source=source, hint=str(e), cls=SpecError) from None
    except OSError as e:
        raise invalid("spec", source, "a readable TOML file", hint=str(e), cls=SpecError) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(source, text, e) from None
    return _SpecParser(source, base_dir=p.resolve().parent).spec(data)


def _toml_error(source: str, text: str, e: Exception) -> SpecError:
    message = str(e)
    found = re.search(r"line (\d+), column (\d+)", message)
    if found is None:
        hint = f"tomllib says: {message}."
        return invalid("file", "unparseable text", "valid TOML", source=source, hint=hint, cls=SpecError)
    line, col = int(found.group(1)), int(found.group(2))
    lines = text.splitlines()
    snippet = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    return invalid(
        f"line {line}",
        snippet,
        "valid TOML",
        source=f"{source}:{line}:{col}",
        hint=f"tomllib says: {message}.",
        cls=SpecError,
    )


def parse_spec(data: Mapping[str, Any], *, source: str = "<dict>") -> StudySpec:
    """Validate a spec given as a mapping (a parsed TOML file or :meth:`StudySpec.to_dict`).

    Relative paths are kept as they are (:func:`load_spec` resolves them).

    >>> parse_spec({"study": {"name": "s", "task": "nope"}})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    hposvc.errors.SpecError: <dict>: the 'study.task' parameter must be ...
    """
    return _SpecParser(source, base_dir=None).spec(data)


# -- parsing: one small reader per table ------------------------------------------------------


class _Reader:
    """What every table's reader shares: the source for messages, the spec's folder for
    relative paths, and the checks of tables, keys and single values."""

    def __init__(self, source: str, *, base_dir: Path | None) -> None:
        self.source = source
        self.base_dir = base_dir

    def error(self, key: str, value: Any, allowed: Any, hint: str | None = None) -> SpecError:
        return invalid(key, value, allowed, source=self.source, hint=hint, cls=SpecError)  # type: ignore[return-value]

    def table(self, key: str, value: Any) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.error(key, value, f"a table ([{key}])")
        return value

    def check_keys(
        self, key: str, table: Mapping[str, Any], allowed: Iterable[str], *, hint: str | None = None
    ) -> None:
        allowed = tuple(allowed)
        for name in table:
            if name in allowed:
                continue
            close = _close(name, allowed)
            where = f"'{key}.{name}'" if key else f"'{name}'"
            text = f"Unknown key {where}" + (f"; did you mean {close!r}?" if close else ".")
            if key in ("train", "model") and name in _SPACE_KEYS:
                text += f" {name!r} belongs in [space]."
            if hint:
                text += f" ({hint}.)"
            phrase = "a table with keys among " + ", ".join(repr(a) for a in allowed) if allowed else "an empty table"
            raise self.error(key or "spec", name, phrase, text)

    def enum(self, key: str, value: Any, allowed: tuple[str, ...]) -> str:
        if not isinstance(value, str) or value not in allowed:
            close = _close(value, allowed)
            raise self.error(key, value, allowed, f"Did you mean {close!r}?" if close else None)
        return value

    def integer(self, key: str, value: Any, *, minimum: int, phrase: str | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, value, phrase or f"an integer >= {minimum}")
        return value

    def path(self, value: str) -> str:
        if self.base_dir is None or Path(value).is_absolute():
            return value
        return str(self.base_dir / value)

    def range(self, key: str, raw: Mapping[str, Any], end: Callable[[str, Any], Any], *, integer: bool) -> Dim:
        """A ``{low, high, log, step}`` table; ``end(key, value)`` checks each end."""
        self.check_keys(key, raw, ("low", "high", "log", "step"))
        kind = "an integer" if integer else "a number"
        for side in ("low", "high"):
            if side not in raw:
                raise self.error(f"{key}.{side}", MISSING, kind, "A range needs both low and high.")
        low, high = end(f"{key}.low", raw["low"]), end(f"{key}.high", raw["high"])
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise self.error(f"{key}.log", log, "true or false")
        step = raw.get("step")
        if low == high:
            hint = "This is an empty range; to fix the value write it as a scalar."
            raise self.error(f"{key}.high", high, f"a number > low ({low})", hint)
        if low > high:
            raise self.error(f"{key}.high", high, f"a number > low ({low})", "low must be below high.")
        if log and low <= 0:
            raise self.error(f"{key}.low", low, "a number > 0", "A log range cannot include 0.")
        if step is not None:
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0:
                raise self.error(f"{key}.step", step, f"{kind} > 0")
            if integer and not isinstance(step, int):
                raise self.error(f"{key}.step", step, "an integer > 0", "This dimension takes whole numbers.")
            if log:
                raise self.error(f"{key}.step", step, "absent when log = true", "Optuna cannot space a log range by a step.")
            n = (high - low) / step
            if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
                raise self.error(
                    f"{key}.step", step, f"a step that divides high - low ({high - low:g})",
                    "Both ends of a range are included, so high must be low plus a whole number of steps.",
                )
            step = step if integer else float(step)
        return Dim.range(low, high, log=log, step=step, integer=integer)

    def choices(self, key: str, raw: list, value: Callable[[str, Any], Any]) -> Dim:
        """A list dimension: each item checked by ``value(key, item)``, no duplicates."""
        if not raw:
            raise self.error(key, raw, "a non-empty list", "An empty list leaves nothing to choose.")
        values: list[Any] = []
        for item in raw:
            if isinstance(item, (list, Mapping)):
                raise self.error(key, item, "a list of single values")
            checked = value(key, item)
            if any(_same(checked, v) for v in values):
                raise self.error(key, raw, "a list without duplicates", f"{item!r} appears twice.")
            values.append(checked)
        return Dim.choice(values)


class _StudyTable(_Reader):
    """[study]: the name, what trains a trial, the sampler and pruner (the task and metric
    are read by :class:`_TaskTable`)."""

    def parse(self, raw: Any) -> dict[str, Any]:
        study = self.table("study", raw)
        self.check_keys("study", study, _STUDY_KEYS)
        name = study.get("name", MISSING)
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise self.error(
                "study.name",
                name,
                "a name of letters, digits, '.', '_' or '-' (at most 100, starting with a letter or digit)",
                "Every spec needs [study] name and task." if name is MISSING else None,
            )
        out: dict[str, Any] = {
            "name": name,
            "n_trials": self.integer("study.n_trials", study.get("n_trials", 20), minimum=1),
            "sampler": self.enum("study.sampler", study.get("sampler", "tpe"), SAMPLERS),
            "pruner": self.enum("study.pruner", study.get("pruner", "median"), PRUNERS),
            "seed": self.integer("study.seed", study.get("seed", 0), minimum=0),
            "population": check_population(study.get("population"), key="study.population", source=self.source, cls=SpecError),
            "description": study.get("description", ""),
            "model": self.factory("study.model", study.get("model")),
            "trainer": self.factory("study.trainer", study.get("trainer")),
            "command": self.command(study.get("command")),
            "code_dir": self.code_dir(study.get("code_dir")),
        }
        if not isinstance(out["description"], str):
            raise self.error("study.description", out["description"], "a string")
        self.check_runner(out)
        return out

    def check_runner(self, study: Mapping[str, Any]) -> None:
        model, trainer, command, population = study["model"], study["trainer"], study["command"], study["population"]
        if trainer is not None and command is not None:
            raise self.error("study.command", list(command), "absent when [study] trainer is given", "A trial runs either a trainer function or a command, not both.")
        if command is not None and model is not None:
            raise self.error("study.model", model, "absent with [study] command", "A command builds its own model; name it in the command instead.")
        if population is not None and (trainer is not None or command is not None):
            kind = "trainer" if trainer is not None else "command"
            raise self.error(
                "study.population", population, "absent with a [study] " + kind,
                "A population trains several trials as one vectorised model inside hposvc's own loop; "
                "your own training code runs one trial at a time (run more workers instead: --workers auto).",
            )

    def factory(self, key: str, value: Any) -> str | None:
        """A "module:function" reference (imported later, by hposvc.plugins), or None."""
        if value is None or (isinstance(value, str) and _FACTORY_RE.fullmatch(value)):
            return value
        raise self.error(key, value, "a function named 'package.module:function'")

    def command(self, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
            raise self.error("study.command", value, "a non-empty list of strings", 'E.g. command = ["python", "train.py", "--lr={lr}"].')
        return tuple(value)

    def code_dir(self, value: Any) -> str | None:
        if value is None:
            return str(self.base_dir) if self.base_dir is not None else None
        if not isinstance(value, str) or not value:
            raise self.error("study.code_dir", value, "a folder path (relative to the spec file)")
        return self.path(value)


class _TaskTable(_Reader):
    """[study] task and metric, and the [task] table of options."""

    def task(self, task: Any, *, optional: bool = False) -> str | None:
        """The workload: a built-in or a "module:function" factory; None (absent) where the
        spec's own trainer or command loads its data."""
        if task is MISSING and optional:
            return None
        if isinstance(task, str) and (task in TASKS or _FACTORY_RE.fullmatch(task)):
            return task
        close = _close(task, TASKS)
        hint = f"Did you mean {close!r}?" if close else "A user factory is named 'package.module:function'."
        if task is MISSING:
            hint = "Every spec needs [study] name and task (a spec whose trainer or command loads its own data may leave task out)."
        elif isinstance(task, str) and task.startswith("tabular:"):
            hint = "For a CSV/Parquet file use task = 'tabular' with [task] path and target."
        raise self.error("study.task", task, [*TASKS, "module:function"], hint)

    def options(self, task: str | None, raw: Any) -> dict[str, Any]:
        options = dict(self.table("task", raw))
        if task is None:
            self.check_keys("task", options, (), hint="there is no [study] task to take options")
        if task == "tabular":
            self.check_keys("task", options, ("path", "target", "kind"), hint="'tabular' reads a file")
        elif task in TASK_OPTIONS:
            self.check_keys("task", options, TASK_OPTIONS[task], hint=None if TASK_OPTIONS[task] else f"{task!r} takes no options")
        for key, value in options.items():
            if not _plain(value):
                phrase = "a string, number, boolean, list or table"
                raise self.error(f"task.{key}", value, phrase, "It is stored as JSON.")
            option = TASK_OPTIONS.get(task, {}).get(key)
            if option is not None and option.check is not None and not option.check(value):
                raise self.error(f"task.{key}", value, option.allowed)
        if "kind" in options and task in ("tabular", "images", "arrays"):
            options["kind"] = self.enum("task.kind", options["kind"], TABULAR_KINDS)
        required = {"tabular": ("path", "target"), "images": ("path",), "arrays": ("path",)}.get(task, ())
        for key in required:
            value = options.get(key, MISSING)
            if not isinstance(value, str) or not value:
                needs = "[task] " + " and ".join(required)
                raise self.error(f"task.{key}", value, TASK_OPTIONS[task][key].allowed, f"task = {task!r} needs {needs}.")
        if "path" in options and task in ("tabular", "images", "arrays"):
            options["path"] = self.path(options["path"])
        return dict(sorted(options.items()))

    def metric(self, task: str, options: Mapping[str, Any], metric: Any, direction: Any, *, own_code: bool) -> tuple[str, str]:
        """The study's metric and direction. hposvc's own loop reports val_accuracy and
        val_loss; a trainer or command may report any metric, with [study] direction where
        its name does not say which way is better."""
        if direction is not MISSING:
            direction = self.enum("study.direction", direction, ("minimize", "maximize"))
        regression = task in ("tabular", "arrays") and options.get("kind") == "regression"
        if metric is MISSING:
            # Accuracy where the task is known to classify; loss works for every kind.
            kind = options.get("kind")
            classifies = task in TASK_FAMILY and (task != "tabular" or kind in ("classification", "binary"))
            metric = "val_accuracy" if classifies else "val_loss"
        elif own_code:
            if not isinstance(metric, str) or not METRIC_NAME_RE.fullmatch(metric):
                raise self.error("study.metric", metric, "a metric name of letters, digits and '_', '.', '-', '/' (starting with a letter or '_')")
        else:
            hint = "Any other name needs your own [study] trainer or command, which reports it."
            if not isinstance(metric, str) or metric not in METRICS:
                close = _close(metric, METRICS)
                raise self.error("study.metric", metric, METRICS, (f"Did you mean {close!r}? " if close else "") + hint)
        if metric == "val_accuracy" and regression:
            raise self.error(
                "study.metric", metric, ("val_loss",), "[task] kind = 'regression' has no accuracy; use val_loss."
            )
        implied = direction_of(metric)
        if direction is MISSING:
            if implied is None:
                raise self.error(
                    "study.direction", MISSING, ("minimize", "maximize"),
                    f"The name {metric!r} does not say whether lower or higher is better; add [study] direction.",
                )
            return metric, implied
        if metric in DIRECTIONS and direction != implied:
            raise self.error("study.direction", direction, (implied,), f"hposvc's {metric} is better when it is {'lower' if implied == 'minimize' else 'higher'}.")
        return metric, direction


class _MetricsTable(_Reader):
    """[metrics]: how to read a command's output. Each key is a metric name (or "epoch",
    the step) and each value a regular expression whose one capture group is the value."""

    def parse(self, raw: Any, *, command: Any) -> dict[str, str]:
        table = self.table("metrics", raw)
        if table and command is None:
            raise self.error(
                "metrics", dict(table), "absent without a [study] command",
                "Patterns read a command's output; a trainer reports with ctx.report, hposvc's own loop by itself.",
            )
        for name, pattern in table.items():
            key = f"metrics.{name}"
            if name != "epoch" and not METRIC_NAME_RE.fullmatch(name):
                raise self.error("metrics", name, "a metric name of letters, digits and '_', '.', '-', '/', or 'epoch'")
            if not isinstance(pattern, str) or not pattern:
                raise self.error(key, pattern, "a regular expression (a string)", "E.g. valid_loss = 'valid loss\\s+([-+0-9.eE]+)'.")
            try:
                compiled = re.compile(pattern)
            except re.error as e:
                raise self.error(key, pattern, "a regular expression that compiles", f"re says: {e}.") from None
            if compiled.groups != 1:
                raise self.error(
                    key, pattern, "a regular expression with exactly one capture group (...) around the value",
                    f"It has {compiled.groups}; write (?:...) for a group that is not the value.",
                )
        return dict(table)


class _FieldDims(_Reader):
    """Dimensions of TrialConfig fields: a scalar, a list or a range, each value checked by
    the field's :class:`~hposvc.config.Rule`."""

    def scalar(self, key: str, name: str, value: Any, *, in_dim: bool = True) -> Any:
        """One value of field ``name``, normalised (ints to floats for float fields)."""
        rule = FIELDS[name]
        try:
            value = rule.clean(value)
        except Rejected as e:
            hint = _DIM_HINT if in_dim and e.wrong_type else None
            if rule.kind == "choice" and not e.wrong_type:
                close = _close(value, rule.allowed)
                hint = f"Did you mean {close!r}?" if close else None
            raise self.error(key, value, e.allowed, hint) from None
        return self.path(value) if rule.kind == "path" else value

    def dim(self, key: str, name: str, raw: Any, *, fixed_only: bool = False) -> Dim:
        if fixed_only and isinstance(raw, (Mapping, list)):
            raise self.error(key, raw, "a single value", "[train] holds fixed settings; search it in [space].")
        if isinstance(raw, Mapping):
            rule = FIELDS[name]
            if not rule.numeric:
                allowed = rule.allowed if rule.kind == "choice" else None
                raise self.error(
                    key, dict(raw), f"a value or a list{' of ' + ', '.join(map(repr, allowed)) if allowed else ''}",
                    f"{name!r} is not numeric, so it has no range.",
                )
            end = lambda k, v: self.scalar(k, name, v, in_dim=False)  # noqa: E731
            return self.range(key, raw, end, integer=rule.kind == "int")
        if isinstance(raw, list):
            return self.choices(key, raw, lambda k, v: self.scalar(k, name, v, in_dim=False))
        return Dim.fixed(self.scalar(key, name, raw))


class _SpaceTables(_FieldDims):
    """[train], [model] and [space] (but [space.params]): every TrialConfig field a spec
    sets, set in one place only, then the rules across fields."""

    def parse(self, task: str, data: Mapping[str, Any], sampler: str) -> tuple[dict[str, Dim], dict[str, dict[str, Dim]], str]:
        self.dims: dict[str, Dim] = {}
        self.where: dict[str, str] = {}
        train = self.table("train", data.get("train", {}))
        self.check_keys("train", train, _TRAIN_KEYS)
        for key, raw in train.items():
            if key != "timeout":  # not a trial dimension: _SpecParser.timeout reads it
                self.put("train", key, key, raw, fixed_only=True)

        model = self.table("model", data.get("model", {}))
        self.check_keys("model", model, _MODEL_KEYS)
        family = model.get("family") if isinstance(model.get("family"), str) else TASK_FAMILY.get(task)
        for key, raw in model.items():
            if key == "norm_classes":
                continue  # not a trial dimension: _SpecParser.norm_classes reads it
            if key == "channels" and family == "mlp":
                who = f"{task!r} trains an MLP" if "family" not in model else "[model] family is 'mlp'"
                raise self.error(
                    "model.channels", raw, "absent for an MLP task",
                    f"channels is the CNN's name for width; {who}, so write width.",
                )
            self.put("model", key, "width" if key == "channels" else key, raw)

        space = self.table("space", data.get("space", {}))
        self.check_keys("space", space, _SPACE_KEYS)
        for key, raw in space.items():
            if key not in ("optimizers", "optimizer_defaults", "params"):
                self.put("space", key, key, raw)
        optimizer_defaults = self.enum("space.optimizer_defaults", space.get("optimizer_defaults", "auto"), OPTIMIZER_DEFAULTS)

        dims, where = self.dims, self.where
        optimizers = dims["optimizer"].values() if "optimizer" in dims else (TrialConfig.optimizer,)
        for name in OPTIMIZER_PARAMS:
            if name in dims and not any(name in ONE_SHOT_DEFAULTS[o] for o in optimizers):
                users = [o for o in OPTIMIZERS if name in ONE_SHOT_DEFAULTS[o]]
                phrase = f"absent: none of this spec's optimizers ({', '.join(optimizers)}) uses it"
                raise self.error(where[name], dims[name].to_json(), phrase, f"{name!r} applies to {', '.join(users)}.")
        overrides = self.overrides(space.get("optimizers", {}), optimizers)
        self.check_conditions(task)
        ordered = {name: dims[name] for name in _FIELDS if name in dims}
        return ordered, overrides, optimizer_defaults

    def put(self, table: str, key: str, name: str, raw: Any, **kw: Any) -> None:
        if name in self.dims:
            raise self.error(f"{table}.{key}", raw, f"set in one place only (it is already set as {self.where[name]})")
        self.dims[name] = self.dim(f"{table}.{key}", name, raw, **kw)
        self.where[name] = f"{table}.{key}"

    def overrides(self, raw: Any, optimizers: tuple[str, ...]) -> dict[str, dict[str, Dim]]:
        table = self.table("space.optimizers", raw)
        out: dict[str, dict[str, Dim]] = {}
        for opt in sorted(table):
            key = f"space.optimizers.{opt}"
            if opt not in OPTIMIZERS:
                close = _close(opt, OPTIMIZERS)
                raise self.error("space.optimizers", opt, OPTIMIZERS, f"Did you mean {close!r}?" if close else None)
            if opt not in optimizers:
                raise self.error(
                    "space.optimizers", opt, f"one of this spec's optimizers ({', '.join(optimizers)})",
                    f"[{key}] would never be used; add {opt!r} to space.optimizer or remove the table.",
                )
            params = self.table(key, table[opt])
            self.check_keys(key, params, ONE_SHOT_DEFAULTS[opt])
            out[opt] = {p: self.dim(f"{key}.{p}", p, params[p]) for p in OPTIMIZER_PARAMS if p in params}
        return out

    def values(self, name: str) -> tuple:
        dim = self.dims.get(name)
        return dim.values() if dim is not None else (FIELDS[name].default,)

    def check_conditions(self, task: str) -> None:
        dims, where, values = self.dims, self.where, self.values
        for name, (owner, active) in CONDITIONAL.items():
            if name in dims and not set(values(owner)) & set(active):
                raise self.error(
                    where[name], dims[name].to_json(), "absent",
                    f"It only applies when {owner} is one of {', '.join(active)}, and this spec's {owner} "
                    f"is {', '.join(map(str, values(owner)))}.",
                )
        if "pretrained" in values("init") and "pretrained_path" not in dims:
            raise self.error(
                "model.pretrained_path", MISSING, FIELDS["pretrained_path"].phrase,
                "init 'pretrained' loads its weights from [model] pretrained_path.",
            )
        # The built-in families trials may train ([model] family, else the task's own) must
        # fit the task's inputs and take every norm the spec asks for.
        families = {f or TASK_FAMILY.get(task) for f in values("family")} - {None}
        for family in sorted(families):
            if "family" in dims and task in TASK_INPUT_SHAPES:
                check_family(family, TASK_INPUT_SHAPES[task], key=where["family"], source=self.source, cls=SpecError)
            allowed = NORMS_BY_FAMILY[family]
            for norm in values("norm"):
                if norm not in allowed and family == "transformer":
                    raise self.error(
                        where.get("norm", "space.norm"), norm, allowed,
                        "A transformer normalises each token over its features; batch and instance norm average over "
                        "positions, which would let a causal model see later tokens.",
                    )
                if norm not in allowed:
                    who = f"{task!r} trains an MLP" if "family" not in dims else "the 'mlp' family"
                    fits = [f for f in ("cnn2d", "resnet") if task not in TASK_INPUT_SHAPES or family_input_shape(f, TASK_INPUT_SHAPES[task])]
                    raise self.error(
                        where.get("norm", "space.norm"), norm, allowed,
                        f"{who}, whose features have no length to normalise over; {norm!r} norm needs a "
                        + ("convolutional family: the CNN task 'mnist1d'" + (f", or [model] family = {fits[0]!r}" if fits else "") + "."),
                    )
        if "group" in values("norm"):
            self.check_groups(task)

    def check_groups(self, task: str) -> None:
        groups = self.dims["norm_groups"].values() if "norm_groups" in self.dims else (FIELDS["norm_groups"].when_active,)
        width = self.dims.get("width")
        key = self.where.get("width", "model.width")
        if width is None:
            size = TASK_MODEL_DEFAULTS.get(task, {}).get("width")
            if size is None:
                return  # a user factory's width is known only once loaded
            width = Dim.fixed(size)
        for g in groups:
            if width.kind == "range":
                ok = width.low % g == 0 and (width.step or 1) % g == 0
                bad: Any = width.to_json()
            else:
                odd = [w for w in width.values() if w % g]
                ok, bad = not odd, (odd[0] if odd else None)
            if not ok:
                raise self.error(
                    key, bad, f"a multiple of norm_groups={g}",
                    "Group norm splits the width into equal groups"
                    + ("; give the range a low and step that are multiples of it." if width.kind == "range" else "."),
                )


class _ParamsTable(_Reader):
    """[space.params]: the user's own dimensions, by any name that is not one of hposvc's
    fields. Values are booleans, integers, numbers or strings; a range of two integers
    (and an integer step) stays integer."""

    def parse(self, raw: Any) -> dict[str, Dim]:
        table = self.table("space.params", raw)
        out: dict[str, Dim] = {}
        for name, value in table.items():
            key = f"space.params.{name}"
            if name in RESERVED_PARAM_NAMES:
                where = f"set it as [space] {name}" if name in FIELDS else "it is what hposvc passes to your code"
                raise self.error(
                    "space.params", name, "a name that is not one of hposvc's own fields",
                    f"{name!r} is hposvc's own ({where}); give your dimension another name.",
                )
            if not PARAM_NAME_RE.fullmatch(name):
                raise self.error("space.params", name, "a name of letters, digits and '_' that does not start with a digit",
                                 "It becomes a {placeholder} and a keyword argument.")
            out[name] = self.dim(key, value)
        return dict(sorted(out.items()))

    def scalar(self, key: str, value: Any) -> Any:
        if isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            return value
        raise self.error(key, value, "a boolean, integer, finite number or string", _DIM_HINT)

    def dim(self, key: str, raw: Any) -> Dim:
        if isinstance(raw, Mapping):
            low, high, step = raw.get("low"), raw.get("high"), raw.get("step")
            integer = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) and (step is None or isinstance(step, int))

            def end(k: str, v: Any) -> Any:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise self.error(k, v, "a number")
                return v if integer else float(v)

            return self.range(key, raw, end, integer=integer)
        if isinstance(raw, list):
            return self.choices(key, raw, self.scalar)
        return Dim.fixed(self.scalar(key, raw))


class _SpecParser(_Reader):
    """A whole spec: each table by its reader, then what spans tables."""

    def spec(self, data: Any) -> StudySpec:
        data = self.table("spec", data)
        self.check_keys("", data, _TOP_KEYS)
        readers = {"source": self.source, "base_dir": self.base_dir}
        study = _StudyTable(**readers).parse(data.get("study", {}))
        raw_study = data.get("study", {})
        tasks = _TaskTable(**readers)
        own_code = study["trainer"] is not None or study["command"] is not None
        task = tasks.task(raw_study.get("task", MISSING), optional=own_code)
        options = tasks.options(task, data.get("task", {}))
        metric, direction = tasks.metric(task, options, raw_study.get("metric", MISSING), raw_study.get("direction", MISSING), own_code=own_code)
        metrics = _MetricsTable(**readers).parse(data.get("metrics", {}), command=study["command"])
        dims, overrides, optimizer_defaults = _SpaceTables(**readers).parse(task, data, study["sampler"])
        space = data.get("space", {})
        params = _ParamsTable(**readers).parse(space.get("params", {}) if isinstance(space, Mapping) else {})
        if study["sampler"] == "grid":
            self.check_grid(dims, params, overrides, optimizer_defaults, data)
        norm_classes = self.norm_classes(data.get("model", {}), study["model"])
        train = data.get("train", {})
        timeout = self.timeout(train.get("timeout")) if isinstance(train, Mapping) else None
        return StudySpec(
            task=task,
            task_options=options,
            metric=metric,
            direction=direction,
            dims=dims,
            params=params,
            metrics=metrics,
            optimizer_overrides=overrides,
            optimizer_defaults=optimizer_defaults,
            norm_classes=norm_classes,
            timeout=timeout,
            source=self.source,
            **study,
        )

    def timeout(self, value: Any) -> float | None:
        """[train] timeout: seconds (a number), or a duration such as "90s", "10m", "1h30m"."""
        if value is None:
            return None
        seconds: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())) and any(m.groups()):
            seconds = sum(float(n or 0) * unit for n, unit in zip(m.groups(), (3600, 60, 1)))
        if seconds is None or not math.isfinite(seconds) or seconds <= 0:
            raise self.error("train.timeout", value, 'a number of seconds > 0, or a duration such as "90s", "10m" or "1h30m"')
        return seconds

    def norm_classes(self, model_table: Mapping[str, Any], model: str | None) -> tuple[str, ...]:
        """[model] norm_classes: the model factory's own norm classes, as "module:Class"
        (imported by hposvc.plugins)."""
        value = model_table.get("norm_classes")
        if value is None:
            return ()
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and _FACTORY_RE.fullmatch(v) for v in value):
            raise self.error("model.norm_classes", value, "a list of classes named 'package.module:Class'", 'E.g. norm_classes = ["model:LayerNorm"].')
        if model is None:
            raise self.error(
                "model.norm_classes", value, "absent without [study] model",
                "It names the norm classes of your own model factory; the built-in families use hposvc's layers.",
            )
        return tuple(value)

    def check_grid(
        self,
        dims: Mapping[str, Dim],
        params: Mapping[str, Dim],
        overrides: Mapping[str, Mapping[str, Dim]],
        optimizer_defaults: str,
        data: Mapping[str, Any],
    ) -> None:
        hint = (
            "The grid sampler tries every combination, so each searched dimension needs a finite "
            "set of values: give a list, or a range with a step."
        )

        def where(name: str) -> str:
            for table in ("train", "model", "space"):
                raw = data.get(table, {})
                if name in raw or (name == "width" and "channels" in raw):
                    return f"{table}.{'channels' if name == 'width' and 'channels' in raw else name}"
            return f"space.{name}"

        found = [(where(n), d) for n, d in dims.items()]
        found += [(f"space.params.{n}", d) for n, d in params.items()]
        found += [(f"space.optimizers.{o}.{p}", d) for o, ps in overrides.items() for p, d in ps.items()]
        for key, dim in found:
            if dim.values() is None:
                raise self.error(key, dim.to_json(), "a list, or a range with a step, for sampler 'grid'", hint)
        if optimizer_defaults == "search":
            raise self.error(
                "space.optimizer_defaults", "search", ("fixed", "auto"),
                "The default ranges of optimizer numbers are continuous, which the grid sampler cannot enumerate.",
            )
