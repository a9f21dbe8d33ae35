"""The user's code a spec names: ``module:function`` references, imported and checked.

A spec's ``model``, ``trainer`` and ``task`` may name a function as
``package.module:function``. It is imported from the spec's ``code_dir`` (by default the
spec file's folder) or from ``sys.path``. :func:`check_spec_code` imports everything a spec
names and checks each signature, so ``study validate`` and ``study run`` fail with exit
code 2 before anything is written; a factory that raises later fails its trial instead.

A model factory is called as ``factory(task, config)`` and returns a ``torch.nn.Module``;
the spec's own dimensions (``[space.params]``) its signature names are passed as keyword
arguments too (``def gpt(task, config, *, dropout=0.0)``), and so to a task factory;
:func:`model_factory` turns it into the zero-argument builder a trial's
:meth:`~hposvc.context.TrialContext.build_model` calls, which applies the dimensions the
spec sets (``norm``, ``activation``, ``init`` in ``[space]``) with
:func:`hposvc.nn.convert` and nothing else: a TrialConfig default (norm ``none``, He init)
never strips or re-initialises the user's layers. A factory that takes ``norm_layer`` /
``activation_layer`` keyword arguments (torchvision's convention) gets builders for the
trial's kinds instead, and that dimension is not swapped afterwards.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hposvc.errors import InvalidInputError, TrainingError, invalid

if TYPE_CHECKING:
    import torch

    from hposvc.config import TrialConfig
    from hposvc.nn import ConversionReport
    from hposvc.spec import StudySpec
    from hposvc.tasks import Task

__all__ = [
    "APPLIED_DIMS",
    "applied_dims",
    "build_user_model",
    "check_runnable",
    "check_spec_code",
    "first_params",
    "load_callable",
    "load_spec_task",
    "model_factory",
    "norm_classes",
    "param_arguments",
    "task_params",
    "trial_task",
]

APPLIED_DIMS = ("norm", "activation", "init")  # what hposvc applies to a user's model
# A spec with these tasks reads files: loading them is part of checking the spec.
_FILE_TASKS = ("tabular", "images", "arrays")


@contextmanager
def _importable_from(code_dir: str | None) -> Iterator[None]:
    # The folder goes first on sys.path while importing only; a module already imported
    # stays in sys.modules, so later calls cost nothing.
    if code_dir is None or code_dir in sys.path:
        yield
        return
    sys.path.insert(0, code_dir)
    try:
        yield
    finally:
        try:
            sys.path.remove(code_dir)
        except ValueError:
            pass


def load_callable(ref: str, *, key: str, code_dir: str | None = None, source: str | None = None) -> Callable[..., Any]:
    """Import ``package.module:function`` and return the function.

    >>> load_callable("math:sqrt", key="study.trainer")(4.0)
    2.0
    """
    module_name, _, name = ref.partition(":")
    where = f" (from {code_dir} or sys.path)" if code_dir else " (from sys.path)"
    try:
        with _importable_from(code_dir):
            module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 (an import runs the user's module: anything can fail)
        raise invalid(key, ref, "an importable 'module:function'", source=source, hint=f"Importing {module_name!r}{where} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise invalid(key, ref, "an importable 'module:function'", source=source, hint=f"Module {module_name!r} has no function {name!r}.")
    return fn


def _check_arity(fn: Callable[..., Any], ref: str, *, key: str, n: int, shape: str, source: str | None, kwargs: Mapping[str, Any] | None = None) -> None:
    try:
        inspect.signature(fn).bind(*range(n), **(kwargs or {}))
    except TypeError as e:
        raise invalid(key, ref, f"a function called as {shape}", source=source, hint=f"Its signature does not take that: {e}.") from e
    except ValueError:
        pass  # no signature to read (a builtin): trust it


def check_spec_code(spec: "StudySpec") -> None:
    """Import every function ``spec`` names and check it can be called as hposvc will call
    it; check a ``command``'s program exists and its ``{field}`` placeholders are fields.

    Raises :class:`~hposvc.errors.InvalidInputError` (exit 2) naming the key and the fix.
    """
    src = spec.source
    if spec.trainer is not None:
        fn = load_callable(spec.trainer, key="study.trainer", code_dir=spec.code_dir, source=src)
        _check_arity(fn, spec.trainer, key="study.trainer", n=1, shape="train(ctx)", source=src)
    if spec.model is not None:
        fn = load_callable(spec.model, key="study.model", code_dir=spec.code_dir, source=src)
        own = param_arguments(fn, first_params(spec))
        shape = "factory(task, config" + "".join(f", {k}=..." for k in own) + ")"
        _check_arity(fn, spec.model, key="study.model", n=2, shape=shape, source=src, kwargs=own)
    if spec.command is not None:
        from hposvc.script import check_command, render

        check_command(list(spec.command), cwd=Path(spec.code_dir or "."), source=src, params=tuple(spec.params))
        _check_flags(spec)
        # A {field} the command names must be set in every trial the spec can produce.
        for config in _corner_configs(spec):
            render(list(spec.command), config, source=src)
    _check_params_taken(spec)
    _check_model(spec)


def _corner_configs(spec: "StudySpec") -> "list[TrialConfig]":
    """Configs of ``spec``'s space that between them take every value of each field that
    decides whether another is set: each optimizer (its numbers) and each value of init,
    norm, schedule and family (the conditional fields). A {field} set in all of them is
    set in every trial."""
    from hposvc.config import CONDITIONAL, FIELDS
    from hposvc.space import first_config

    base = first_config(spec)
    configs = [base.replace(optimizer=o) for o in spec.optimizers]
    for owner in dict.fromkeys(owner for owner, _ in CONDITIONAL.values()):
        dim = spec.dims.get(owner)
        for value in dim.values() if dim is not None else (FIELDS[owner].default,):
            try:
                configs.append(base.replace(**{owner: value}))
            except InvalidInputError:
                continue  # not a trial this spec can produce (e.g. pretrained without its path)
    return configs


def first_params(spec: "StudySpec") -> dict[str, Any]:
    """Each of the spec's own dimensions at its first value (a choice's first, a range's low)."""
    return {name: (dim.values() or (dim.low,))[0] for name, dim in spec.params.items()}


def _takes(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword arguments ``fn`` names, and whether it takes any (``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set(), False
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params.values())


def param_arguments(fn: Callable[..., Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The user's own dimensions (``config.params``) that ``fn``'s signature takes, as
    keyword arguments: those it names, or all of them when it has ``**kwargs``.

    >>> param_arguments(lambda task, config, *, dropout=0.0: None, {"dropout": 0.2, "clip": 1.0})
    {'dropout': 0.2}
    """
    named, anything = _takes(fn)
    return {k: v for k, v in params.items() if anything or k in named}


def _task_factory(spec: "StudySpec") -> Callable[..., Any] | None:
    if spec.task is None or ":" not in spec.task:
        return None
    return load_callable(spec.task, key="study.task", code_dir=spec.code_dir, source=spec.source)


def task_params(spec: "StudySpec", params: Mapping[str, Any]) -> dict[str, Any]:
    """The user's own dimensions the spec's task factory takes, from ``params``."""
    fn = _task_factory(spec) if spec.params else None
    return {} if fn is None else param_arguments(fn, params)


def load_spec_task(spec: "StudySpec", params: Mapping[str, Any] | None = None) -> "Task | None":
    """The spec's task, with the user's own dimensions its factory takes as keyword
    arguments (``params``: a trial's; default: each dimension's first value); None when
    the spec names none (its trainer or command loads its own data)."""
    from hposvc.tasks import load_task

    if spec.task is None:
        return None
    with _importable_from(spec.code_dir):
        extra = task_params(spec, first_params(spec) if params is None else params)
        return load_task(spec.task, seed=spec.seed, options={**spec.task_options, **extra})


def trial_task(spec: "StudySpec", task: "Task | None", params: Mapping[str, Any]) -> "Task | None":
    """The task one trial trains on: ``task`` (the worker's), or the task factory called
    again when it takes a dimension the spec searches (cached per value by load_task)."""
    searched = {n for n, d in spec.params.items() if d.searched}
    if task is None or not searched & set(task_params(spec, params)):
        return task
    return load_spec_task(spec, params)


def _check_flags(spec: "StudySpec") -> None:
    """A ``{name?text}`` placeholder needs a true/false dimension."""
    from hposvc.config import FIELDS
    from hposvc.script import placeholders_in

    for name, flag in placeholders_in(list(spec.command), source=spec.source, params=tuple(spec.params)).items():
        if not flag:
            continue
        if name in spec.params:
            values = spec.params[name].values() or (spec.params[name].low,)
        else:
            values = (True,) if FIELDS[name].kind == "bool" else (None,)
        if not all(isinstance(v, bool) for v in values):
            shown = spec.params[name].to_json() if name in spec.params else f"the field {name!r}"
            raise invalid(
                "study.command", list(spec.command), f"{{{name}?...}} flags of true/false dimensions only", source=spec.source,
                hint=f"{name} is {shown!r}; write [space.params] {name} = [true, false], or use {{{name}}} to pass its value.",
            )


def _check_params_taken(spec: "StudySpec") -> None:
    """Where hposvc's own loop trains (no trainer, no command), the user's dimensions can
    only reach the model or task factory: each must be taken by one of them."""
    if not spec.params or spec.trainer is not None or spec.command is not None:
        return
    takers: list[tuple[str, Callable[..., Any]]] = []
    if spec.model is not None:
        takers.append((f"the model factory {spec.model}", load_callable(spec.model, key="study.model", code_dir=spec.code_dir, source=spec.source)))
    if (fn := _task_factory(spec)) is not None:
        takers.append((f"the task factory {spec.task}", fn))
    for name, dim in spec.params.items():
        if any(param_arguments(fn, {name: None}) for _, fn in takers):
            continue
        who = " nor ".join(w for w, _ in takers) if takers else "no model or task factory (the spec trains a built-in model)"
        hint = (
            f"{who} takes a {name!r} argument, and hposvc's own loop has no use for it. Add {name} to a factory's "
            "signature (def net(task, config, *, " + name + "=...)), or train with your own [study] trainer or command."
        )
        if not takers:
            hint = f"There is {who}, and hposvc's own loop has no use for {name!r}: name a [study] model or task factory that takes it, or train with your own [study] trainer or command."
        raise invalid(f"space.params.{name}", dim.to_json(), "a dimension your code takes", source=spec.source, hint=hint)


def check_runnable(spec: "StudySpec") -> None:
    """Everything about ``spec`` that can be known before a trial runs, beyond parsing: the
    grid's size against ``n_trials``, and the user code it names. What ``study validate``
    checks and ``study run`` checks before it writes anything."""
    from hposvc.space import check_grid_budget

    check_grid_budget(spec)
    check_spec_code(spec)


def applied_dims(spec: "StudySpec", config: "TrialConfig") -> dict[str, str]:
    """The dimensions hposvc applies to a user's model for ``config``: those of
    :data:`APPLIED_DIMS` that ``spec`` sets (fixed or searched), with the trial's values.

    >>> from hposvc.config import TrialConfig
    >>> from hposvc.spec import parse_spec
    >>> spec = parse_spec({"study": {"name": "s", "task": "digits", "model": "m:f"}, "space": {"norm": ["batch", "group"]}})
    >>> applied_dims(spec, TrialConfig(norm="group"))
    {'norm': 'group'}
    """
    return {name: getattr(config, name) for name in APPLIED_DIMS if name in spec.dims}


def model_factory(
    spec: "StudySpec",
    task: "Task | None",
    config: "TrialConfig",
    *,
    on_built: "Callable[[torch.nn.Module, ConversionReport | None], None] | None" = None,
) -> "Callable[[], torch.nn.Module] | None":
    """The zero-argument model builder of one trial: the spec's model factory with the
    dimensions the spec sets applied (:func:`applied_dims`), or the built-in family
    (``config.family``, else the task's). ``on_built(model, report)`` is called with each
    model built (``report``: what conversion changed; None for a built-in). None when the
    spec has neither a model factory nor a task.

    The factory's own errors fail the trial with a :class:`~hposvc.errors.TrainingError`
    that names it.
    """
    if spec.model is None:
        if task is None:
            return None

        def build_builtin() -> "torch.nn.Module":
            from hposvc.nn import build_model

            model = build_model(task, config)
            if on_built is not None:
                on_built(model, None)
            return model

        return build_builtin
    fn = load_callable(spec.model, key="study.model", code_dir=spec.code_dir, source=spec.source)
    applied = applied_dims(spec, config)
    classes = norm_classes(spec)

    def build_user() -> "torch.nn.Module":
        model, report = build_user_model(fn, task, config, apply=applied, name=spec.model, norm_classes=classes)
        if on_built is not None:
            on_built(model, report)
        return model

    return build_user


def norm_classes(spec: "StudySpec") -> "tuple[type[torch.nn.Module], ...]":
    """The classes ``[model] norm_classes`` names (``"module:Class"``), imported like the
    model factory: the user's norm layers that hposvc's rule does not recognise."""
    from torch import nn

    out = []
    for ref in getattr(spec, "norm_classes", ()):
        cls = load_callable(ref, key="model.norm_classes", code_dir=spec.code_dir, source=spec.source)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise invalid(
                "model.norm_classes", ref, "'module:Class' of an nn.Module subclass", source=spec.source,
                hint=f"{ref} is a {type(cls).__name__}, not a torch.nn.Module class: name the norm layer's class.",
            )
        out.append(cls)
    return tuple(out)


def _layer_arguments(fn: Callable[..., Any], config: "TrialConfig", applied: dict[str, str]) -> dict[str, Any]:
    """``norm_layer`` / ``activation_layer`` for a factory that takes them (torchvision's
    convention: ``norm_layer(channels)``, ``activation_layer()``), for applied dimensions."""
    from hposvc.nn import DEFAULT_NORM_GROUPS, activation_layer, norm_layer

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    out: dict[str, Any] = {}
    if "norm" in applied and "norm_layer" in named:
        norm, groups = applied["norm"], config.norm_groups or DEFAULT_NORM_GROUPS

        def make_norm(channels: int, dims: int = 2) -> "torch.nn.Module":
            return norm_layer(norm, channels, dims, groups=groups)

        out["norm_layer"] = make_norm
    if "activation" in applied and "activation_layer" in named:
        activation = applied["activation"]
        out["activation_layer"] = lambda *args, **kwargs: activation_layer(activation)  # inplace=True etc.: ignored
    return out


def _call_factory(fn: Callable[..., Any], ref: str, task: "Task | None", config: "TrialConfig", kwargs: dict[str, Any]) -> "torch.nn.Module":
    from torch import nn

    try:
        model = fn(task, config, **kwargs)
    except (InvalidInputError, TrainingError):
        raise
    except Exception as e:  # noqa: BLE001 (the user's code: anything can fail; the trial says which)
        why = " (task is None: the spec names no [study] task)" if task is None else ""
        raise TrainingError(f"the model factory {ref}(task, config) raised {type(e).__name__}: {e}{why}") from e
    if not isinstance(model, nn.Module):
        raise TrainingError(f"the model factory {ref}(task, config) returned {type(model).__name__}; it must return a torch.nn.Module.")
    return model


def build_user_model(
    factory: Callable[..., Any],
    task: "Task | None",
    config: "TrialConfig",
    *,
    apply: "Mapping[str, str] | Iterable[str]" = (),
    name: str | None = None,
    norm_classes: "Iterable[type[torch.nn.Module]]" = (),
) -> "tuple[torch.nn.Module, ConversionReport]":
    """``factory(task, config)`` with ``config``'s values of the dimensions in ``apply``
    (``"norm"``, ``"activation"``, ``"init"``) applied, as a trial of a spec that sets
    them builds it; returns the model and what conversion changed. ``name`` names the
    factory in errors; ``norm_classes`` are the model's own norm classes that
    :func:`hposvc.nn.convert`'s rule misses.

    >>> from torch import nn
    >>> from hposvc.config import TrialConfig
    >>> net = lambda task, config: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    >>> model, report = build_user_model(net, None, TrialConfig(norm="layer", activation="gelu"), apply=["norm", "activation"])
    >>> model[1], model[2], report.norms
    (LayerNorm((8,), eps=1e-05, elementwise_affine=True, bias=True), GELU(approximate='none'), ('1',))
    """
    from hposvc.nn import convert_with_report

    applied = {k: getattr(config, k) for k in apply} if not isinstance(apply, Mapping) else dict(apply)
    unknown = sorted(set(applied) - set(APPLIED_DIMS))
    if unknown:
        raise invalid("apply", unknown[0], APPLIED_DIMS)
    ref = name or getattr(factory, "__qualname__", repr(factory))
    kwargs = {**_layer_arguments(factory, config, applied), **param_arguments(factory, config.params)}
    model = _call_factory(factory, ref, task, config, kwargs)
    norm = None if "norm_layer" in kwargs else applied.get("norm")
    activation = None if "activation_layer" in kwargs else applied.get("activation")
    init = applied.get("init")
    return convert_with_report(
        model,
        norm=norm,
        activation=activation,
        init=init,
        norm_groups=config.norm_groups if norm == "group" else None,
        init_std=config.init_std if init in ("normal", "uniform") else None,
        pretrained_path=config.pretrained_path if init == "pretrained" else None,
        norm_classes=norm_classes,
    )


def _check_model(spec: "StudySpec") -> None:
    """Before any trial runs: load the task where the spec's checks need it (a model
    factory, a family whose fit depends on the data, a data file), build one model and
    convert it once per dimension the spec applies, so a model with nothing to act on
    ("norm" searched over a model without norm layers) fails now, not after n_trials
    identical trials."""
    from hposvc.config import TASK_INPUT_SHAPES, check_family
    from hposvc.space import first_config

    src = spec.source
    family_dim = spec.dims.get("family")
    needs_task = spec.model is not None or spec.task in _FILE_TASKS or (family_dim is not None and spec.task not in TASK_INPUT_SHAPES)
    if not needs_task or spec.command is not None:
        return
    task = load_spec_task(spec)  # bad data: InvalidInputError naming the file
    if task is not None and task.kind == "regression" and spec.metric == "val_accuracy" and spec.trainer is None:
        raise invalid(
            "study.metric", spec.metric, ("val_loss",), source=src,
            hint=f"Task {spec.task!r} is a regression (its targets are not class labels), so it has no accuracy; use val_loss, or give [task] kind.",
        )
    if spec.model is None:
        if spec.trainer is None and task is not None:
            for family in family_dim.values() if family_dim is not None else (task.family,):
                check_family(family, task.input_shape, key="model.family", source=f"{src} (task {task.name!r})")
        return
    config = first_config(spec, task_defaults=None if task is None else {"depth": task.default_depth, "width": task.default_width})
    applied = applied_dims(spec, config)
    fn = load_callable(spec.model, key="study.model", code_dir=spec.code_dir, source=src)
    kwargs = {**_layer_arguments(fn, config, applied), **param_arguments(fn, config.params)}
    try:
        model = _call_factory(fn, spec.model, task, config, kwargs)
    except TrainingError as e:
        why = " (task is None: this spec names no [study] task, so the factory must build its model without one)" if task is None else ""
        raise invalid("study.model", spec.model, "a factory that builds a model for this task", source=src, hint=f"Building one to check the spec failed: {e}{why}") from e
    from hposvc.nn import convert_with_report

    classes = norm_classes(spec)
    if classes and "norm" in applied and "norm_layer" not in kwargs:
        present = {type(m) for m in model.modules()}
        for ref, cls in zip(spec.norm_classes, classes):
            if not any(issubclass(t, cls) for t in present):
                raise invalid(
                    "model.norm_classes", ref, f"a class the model of {spec.model} has layers of", source=src,
                    hint=f"The model built to check the spec has no {cls.__name__} layer.",
                )
    for name in applied:
        if f"{name}_layer" in kwargs:
            continue  # the factory builds these layers itself
        values = spec.dims[name].values() or (applied[name],)
        # init: a scheme that sets weights, if the spec has one (default and pretrained set none)
        value = next((v for v in values if v not in ("default", "pretrained")), values[0]) if name == "init" else values[0]
        try:
            convert_with_report(copy.deepcopy(model), **{name: value}, norm_classes=classes if name == "norm" else ())
        except InvalidInputError as e:
            raise InvalidInputError(f"{src}: [space] {name} cannot act on the model of {spec.model}: {e}") from e
