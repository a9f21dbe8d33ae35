"""The user's code a spec names: ``module:function`` references, imported and checked.

A spec's ``model``, ``trainer`` and ``task`` may name a function as
``package.module:function``. It is imported from the spec's ``code_dir`` (by default the
spec file's folder) or from ``sys.path``. :func:`check_spec_code` imports everything a spec
names and checks each signature, so ``study validate`` and ``study run`` fail with exit
code 2 before anything is written; a factory that raises later fails its trial instead.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hposvc.errors import invalid

if TYPE_CHECKING:
    from hposvc.spec import StudySpec

__all__ = ["check_runnable", "check_spec_code", "load_callable"]


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


def _check_arity(fn: Callable[..., Any], ref: str, *, key: str, n: int, shape: str, source: str | None) -> None:
    try:
        inspect.signature(fn).bind(*range(n))
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
        _check_arity(fn, spec.model, key="study.model", n=2, shape="factory(task, config)", source=src)
    if spec.command is not None:
        from hposvc.config import TrialConfig
        from hposvc.script import check_command, render

        check_command(list(spec.command), cwd=Path(spec.code_dir or "."), source=src)
        # A {field} the command names must exist for every optimizer the study can pick.
        for optimizer in spec.optimizers:
            render(list(spec.command), TrialConfig(optimizer=optimizer), source=src)


def check_runnable(spec: "StudySpec") -> None:
    """Everything about ``spec`` that can be known before a trial runs, beyond parsing: the
    grid's size against ``n_trials``, and the user code it names. What ``study validate``
    checks and ``study run`` checks before it writes anything."""
    from hposvc.space import check_grid_budget

    check_grid_budget(spec)
    check_spec_code(spec)
