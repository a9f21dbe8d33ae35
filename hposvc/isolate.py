"""A trainer function under a time limit, in a child process that the limit can always end.

A check at each report stops a trainer that keeps reporting past ``[train] timeout``, but
not one that hangs without reporting (a deadlocked DataLoader, a stuck collective, a
C extension that never returns): Python cannot stop a thread from outside. So a spec's
trainer with a time limit runs each trial in a child process of its own session (a
fresh interpreter, so CUDA starts clean in it and the parent's ``__main__`` is not re-run):

1. the child loads the task and the trainer, builds the trial's context and calls
   ``train(ctx)``; each ``ctx.report`` travels over a pipe to the worker, which reports
   it to Optuna and MLflow and answers with the pruner's decision;
2. the worker waits for reports and the result until the limit;
3. at the limit the child's whole process group (its DataLoader workers included) gets
   SIGTERM, then SIGKILL after the grace period, and the trial fails "timed out after N s".
   The slot's memory goes with the process.

A trial costs one process start (importing torch again) this way; trainers without a
limit run in the worker's own process, as before.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hposvc.errors import TrainingError, TrialPruned, TrialTimedOut

if TYPE_CHECKING:
    from hposvc.config import TrialConfig
    from hposvc.spec import StudySpec

__all__ = ["run_trainer"]

POLL_SECONDS = 0.2  # how often the worker looks at a child that sends nothing


def run_trainer(
    spec: "StudySpec",
    config: "TrialConfig",
    *,
    trial_number: int,
    trial_dir: Path | None,
    device: str,
    deadline: float,
    timeout: float,
    grace: float,
    on_report: Callable[[int, dict[str, float]], bool],
    on_model: Callable[[str, int, str | None, list[str]], None],
) -> tuple[str, Any]:
    """Run ``spec``'s trainer for one trial in a child process until ``deadline``
    (``time.monotonic()``). ``on_report(epoch, metrics)`` is the worker's side of
    ``ctx.report`` (True: prune); ``on_model(text, n_params, conversion, notes)`` receives
    what the child built.

    Returns ``("done", final)`` with what ``train(ctx)`` returned, or ``("pruned", message)``.
    Raises :class:`TrialTimedOut` at the limit, :class:`TrainingError` when the trainer
    raised (its type, message and traceback) or its process died.
    """
    # A fresh interpreter (not multiprocessing's spawn, which re-runs the parent's
    # __main__: a user's script or notebook), in a session of its own so one signal
    # reaches its whole process group; it gets its arguments over the pipe.
    ours, theirs = multiprocessing.Pipe()
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from hposvc.isolate import _main; _main({theirs.fileno()})"],
        pass_fds=(theirs.fileno(),), start_new_session=True, env=env, stdin=subprocess.DEVNULL,
    )
    theirs.close()
    ours.send((spec, config, trial_number, str(trial_dir) if trial_dir else None, device, deadline, timeout))
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrialTimedOut(f"timed out after {timeout:g} s")
            if not ours.poll(min(left, POLL_SECONDS)):
                if proc.poll() is not None and not ours.poll():
                    raise TrainingError(f"the trainer's process ended without a result ({_how(proc)})")
                continue
            try:
                message = ours.recv()
            except EOFError:
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
                raise TrainingError(f"the trainer's process ended without a result ({_how(proc)})") from None
            kind = message[0]
            if kind == "report":
                ours.send(bool(on_report(message[1], message[2])))
            elif kind == "model":
                on_model(*message[1:])
            elif kind in ("done", "pruned"):
                return kind, message[1]
            elif kind == "timeout":
                raise TrialTimedOut(message[1])
            else:  # "error"
                _, name, text, trace = message
                error = TrainingError(f"{name}: {text}")
                error.child_traceback = trace  # type: ignore[attr-defined]
                raise error
    finally:
        _end(proc, grace)
        ours.close()


def _how(proc: "subprocess.Popen[bytes]") -> str:
    code = proc.poll()
    if code is None:
        return "it is still running"
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _end(proc: "subprocess.Popen[bytes]", grace: float) -> None:
    """The child's process group ends: 1) SIGTERM, 2) up to ``grace`` s, 3) SIGKILL."""
    from hposvc.script import _stop

    _stop(proc, grace)  # the same as a command's: start_new_session made it a group leader


# -- the child -----------------------------------------------------------------------


def _main(fd: int) -> None:
    """The child's entry point: the pipe's end is ``fd``."""
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    _child(conn, *conn.recv())


def _child(conn: Any, spec: "StudySpec", config: "TrialConfig", trial_number: int, trial_dir: str | None, device: str, deadline: float, timeout: float) -> None:
    """The child's side: the trial's context with reports sent over ``conn``."""
    try:
        import optuna

        from hposvc import plugins
        from hposvc.context import TrialContext

        task = plugins.trial_task(spec, plugins.load_spec_task(spec), config.params)

        def report(epoch: int, metrics: Mapping[str, float]) -> bool:
            conn.send(("report", epoch, dict(metrics)))
            return bool(conn.recv())

        def built(model: Any, conversion: Any) -> None:
            from hposvc.nn import count_parameters

            notes = list(conversion.notes) if conversion is not None else []
            conn.send(("model", str(model), count_parameters(model), conversion.describe() if conversion is not None else None, notes))

        ctx = TrialContext(
            config,
            on_report=report,
            task=task,
            device=device,
            trial_number=trial_number,
            study_name=spec.name,
            metric=spec.metric,
            trial_dir=Path(trial_dir) if trial_dir else None,
            model_factory=plugins.model_factory(spec, task, config, on_built=built),
            timeout=timeout,
            deadline=deadline,
        )
        fn = plugins.load_callable(spec.trainer, key="study.trainer", code_dir=spec.code_dir, source=spec.source)
        try:
            final = fn(ctx)
        except (TrialPruned, optuna.TrialPruned) as e:
            conn.send(("pruned", f"pruned: {e}" if str(e) else None))
            return
        conn.send(("done", _plain(final)))
    except TrialTimedOut as e:
        conn.send(("timeout", str(e)))
    except BaseException as e:  # noqa: BLE001 (the trainer's error goes to the worker, whatever it is)
        conn.send(("error", type(e).__name__, str(e), "".join(traceback.format_exception(e))))


def _plain(final: Any) -> Any:
    """What ``train(ctx)`` returned, with numbers (tensors, numpy) made floats so it pickles."""
    if not isinstance(final, Mapping):
        return final
    out = {}
    for key, value in final.items():
        try:
            out[str(key)] = None if value is None else float(value)
        except (TypeError, ValueError):
            out[str(key)] = repr(value)
    return out
