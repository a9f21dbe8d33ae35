"""Stop signals as exceptions that a worker cannot lose.

SIGTERM becomes :class:`~hposvc.errors.Interrupted` and SIGINT ``KeyboardInterrupt``,
raised in the main thread wherever it is. Both are also *remembered*, because the
exception can land inside a library that wraps it: SIGTERM arriving in the middle of a
SQLAlchemy commit comes out of Optuna as a ``StorageInternalError``, which alone would
read as one trial's storage error and let the worker go on with the next trial.
:func:`interruption` finds the stop behind any exception.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hposvc.errors import Interrupted

__all__ = ["STOPS", "check", "interruption", "signals_raise"]

# What counts as "stop the worker" rather than "this trial failed".
STOPS = (KeyboardInterrupt, Interrupted)

# The interruption a signal raised in this process (at most one is acted on).
_pending: list[BaseException] = []


@contextmanager
def signals_raise(drain: threading.Event) -> Iterator[None]:
    """Turn SIGTERM into :class:`Interrupted` and SIGINT into KeyboardInterrupt, both
    remembered; SIGUSR1 sets ``drain`` (finish the trial in flight, then stop).

    Outside the main thread signals cannot be handled; this is then a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        e: BaseException = KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)
        _pending.append(e)
        raise e

    _pending.clear()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    if hasattr(signal, "SIGUSR1"):
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: drain.set())
    try:
        yield
    finally:
        _pending.clear()  # handled by now; must not stop a later run in this process
        for signum, old in previous.items():
            signal.signal(signum, old)


def check() -> None:
    """Raise the remembered interruption, if a signal arrived that something swallowed."""
    if _pending:
        raise _pending[0]


def interruption(e: BaseException) -> BaseException | None:
    """The interruption behind ``e``: a remembered signal, or one in its cause chain."""
    if _pending:
        return _pending[0]
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, STOPS):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None
