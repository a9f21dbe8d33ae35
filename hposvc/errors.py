"""hposvc's one error hierarchy.

Everything hposvc raises on purpose is an :class:`HposvcError`. Bad input (a spec, a CLI
option, an API argument) is an :class:`InvalidInputError` and becomes exit code 2 on the
CLI; every other :class:`HposvcError` is a failure and becomes exit code 1. Driver errors
(SQLAlchemy, MLflow, torch) are wrapped with ``raise ... from e`` where they cross into
hposvc, so the original traceback is kept.
"""

from __future__ import annotations

import signal
from typing import Any

__all__ = [
    "HposvcError",
    "Interrupted",
    "InvalidInputError",
    "SpecError",
    "StorageError",
    "StorageUnavailableError",
    "TrackingError",
    "TrainingError",
    "TrialPruned",
    "TrialTimedOut",
    "invalid",
]


class HposvcError(Exception):
    """Base class of every error hposvc raises on purpose."""


class InvalidInputError(HposvcError, ValueError):
    """Bad input from the user: a spec, an option or an argument. Exit code 2."""


class SpecError(InvalidInputError):
    """A study spec file that cannot be used; the message names file, key and value."""


class StorageError(HposvcError):
    """The study database failed (connection lost, schema, driver error)."""


class StorageUnavailableError(StorageError):
    """The study storage stayed unreachable for longer than the outage limit
    (``HPOSVC_STORAGE_OUTAGE_LIMIT``). A worker stops on it with exit code ``exit_code``
    (75, ``EX_TEMPFAIL``: run it again); its running trials are failed and retried by the
    next worker that finds them stale."""

    exit_code = 75


class TrackingError(HposvcError):
    """The MLflow tracking store failed."""


class TrainingError(HposvcError):
    """A trial could not be trained (e.g. out of device memory)."""


class TrialTimedOut(TrainingError):
    """A trial ran past its spec's ``[train] timeout`` and was stopped. It ends FAIL and is
    not retried: a retry would run out of time the same way."""


class TrialPruned(HposvcError):
    """Raised by :meth:`hposvc.TrialContext.report` when the study's pruner stops the trial.

    A trainer lets it propagate (or raises it itself, as it may ``optuna.TrialPruned``);
    the trial then ends PRUNED, and its MLflow run KILLED.
    """


class Interrupted(HposvcError):
    """SIGTERM (or another stop signal) arrived; ``exit_code`` is 128 + the signal number.

    SIGINT stays Python's KeyboardInterrupt; both stop a worker (see :mod:`hposvc.interrupts`).
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _describe(allowed: Any) -> str:
    if isinstance(allowed, str):
        return allowed
    items = list(allowed)
    if len(items) == 1:
        return repr(items[0])
    return "one of " + ", ".join(repr(a) for a in items)


def invalid(
    key: str,
    value: Any,
    allowed: Any,
    *,
    source: str | None = None,
    hint: str | None = None,
    cls: type[InvalidInputError] = InvalidInputError,
) -> InvalidInputError:
    """Build the one message shape hposvc uses for bad input.

    ``invalid("optimizer", "adamm", ["sgd", "adam"], source="studies/x.toml")`` gives
    ``studies/x.toml: the 'optimizer' parameter must be one of 'sgd', 'adam'. Got 'adamm'
    instead.`` ``allowed`` is either a collection of allowed values or a phrase
    (``"a float > 0"``). The error is returned, not raised, so callers write
    ``raise invalid(...)`` and the traceback points at them.
    """
    prefix = f"{source}: " if source else ""
    message = f"{prefix}the {key!r} parameter must be {_describe(allowed)}. Got {value!r} instead."
    if hint:
        message += f" {hint}"
    return cls(message)
