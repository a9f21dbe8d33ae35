"""Script trials: run the user's own training command and read its metric lines.

A script study's ``command`` is an argument list with ``{field}`` placeholders for the
trial's :class:`~hposvc.config.TrialConfig` fields and the spec's own dimensions
(``[space.params]``: ``{dropout}``; ``{tied?--tied}`` for a flag present when true). Each trial renders it, runs it in its
own process group and reads stdout line by line; a line of the form

    hposvc: {"epoch": 3, "val_accuracy": 0.91, "val_loss": 0.3}

is a per-epoch report (any language can print one; Python scripts call :func:`report`).
Every other line is kept in the trial's log. When the pruner says stop, the whole group
gets SIGTERM, :data:`DEFAULT_GRACE` seconds, then SIGKILL; whichever way :func:`run` is
left (completion, prune, an exception, a signal to the worker), no process of the group
outlives it.

>>> cmd = ["python", "train.py", "--lr={lr}", "--epochs={epochs}"]
>>> sorted(fields_in(cmd))
['epochs', 'lr']
>>> render(cmd, TrialConfig(optimizer="adam", lr=3e-4, epochs=5))
['python', 'train.py', '--lr=0.0003', '--epochs=5']

This module imports nothing heavy: ``from hposvc.script import report`` is what a user's
script runs, and it must not pull in torch, Optuna or MLflow.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hposvc.config import CONDITIONAL, ONE_SHOT_DEFAULTS, OPTIMIZER_PARAMS, TrialConfig
from hposvc.errors import TrainingError, invalid

__all__ = [
    "DEFAULT_GRACE",
    "FIELDS",
    "LINE_PREFIX",
    "ScriptFailed",
    "ScriptResult",
    "check_command",
    "fields_in",
    "placeholders_in",
    "parse_line",
    "render",
    "report",
    "run",
]

LINE_PREFIX = "hposvc: "  # what marks a stdout line as a metric report
# Seconds a script gets between SIGTERM and SIGKILL: enough to flush a log or close a
# file, short enough that a pruned trial frees its device quickly.
DEFAULT_GRACE = 10.0
STDERR_TAIL = 20  # lines of stderr a failed trial's reason carries
# The fields a command may name. ``extra`` is a mapping with no one-argument spelling;
# scripts read it from HPOSVC_CONFIG.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialConfig) if f.name != "extra")
_EXAMPLE = LINE_PREFIX + '{"epoch": 3, "val_accuracy": 0.91, "val_loss": 0.3}'
# {{ and }} are literal braces; {name} a placeholder; any other brace is a mistake.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


class ScriptFailed(TrainingError):
    """A script trial failed: non-zero exit, a malformed metric line, or it could not start.

    ``returncode`` is None when the script did not get to exit on its own;
    ``stderr_tail`` holds its last lines of stderr (also in the message).
    """

    def __init__(self, message: str, *, returncode: int | None = None, stderr_tail: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = list(stderr_tail)


@dataclass(frozen=True)
class ScriptResult:
    """What one run of a script trial produced."""

    status: str  # "completed" (exit 0) or "pruned" (stopped because on_metrics said so)
    final: dict[str, float]  # the latest value of each metric the script reported
    epochs: list[tuple[int, dict[str, float]]]  # every report, in the order it came
    returncode: int  # negative: killed by that signal (pruned trials)
    stdout_path: Path  # the script's whole stdout, metric lines included
    stderr_path: Path
    duration_s: float  # from start to the group being gone


# -- metric lines --------------------------------------------------------------------


def _check_metrics(epoch: Any, metrics: Mapping[str, Any]) -> str | None:
    """What is wrong with one report, as a phrase; None when it is good."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        return f'"epoch" must be an integer >= 1, got {epoch!r}'
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            return f"metric names must be non-empty strings, got {name!r}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"metric {name!r} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"metric {name!r} is {value!r}, not a finite number (did training diverge?)"
    return None


def parse_line(line: str) -> tuple[int, dict[str, float]] | None:
    """The ``(epoch, metrics)`` a metric line reports, or None for any other line.

    A line that starts with :data:`LINE_PREFIX` but is not a valid report raises
    :class:`ScriptFailed` naming the line: a script bug should fail the trial with a
    message, not vanish into the log.

    >>> parse_line('hposvc: {"epoch": 2, "val_loss": 0.25}')
    (2, {'val_loss': 0.25})
    >>> parse_line("epoch 2: loss 0.25") is None
    True
    """
    if not line.startswith(LINE_PREFIX):
        return None
    try:
        data = json.loads(line[len(LINE_PREFIX) :])
    except json.JSONDecodeError as e:
        problem = f"not JSON ({e.msg} at column {e.colno + len(LINE_PREFIX)})"
    else:
        if not isinstance(data, dict):
            problem = f"a JSON object is needed, got {type(data).__name__}"
        elif "epoch" not in data:
            problem = 'it has no "epoch"'
        else:
            epoch = data.pop("epoch")
            problem = _check_metrics(epoch, data) or ""
            if not problem:
                return epoch, {k: float(v) for k, v in data.items()}
    raise ScriptFailed(
        f"bad metric line from the script: {line.rstrip()!r}: {problem}. "
        f"A metric line is {LINE_PREFIX!r} and a JSON object with an integer \"epoch\" >= 1 "
        f"and finite numbers, e.g. {_EXAMPLE}"
    )


def report(epoch: int, **metrics: float) -> None:
    """Report one epoch's metrics from a Python training script run as a script trial.

    Prints the metric line hposvc reads and flushes stdout, so the pruner sees it now.

    >>> from hposvc.script import report
    >>> report(3, val_accuracy=0.91, val_loss=0.3)
    hposvc: {"epoch": 3, "val_accuracy": 0.91, "val_loss": 0.3}
    """
    problem = _check_metrics(epoch, metrics)
    if problem:
        raise invalid("report", {"epoch": epoch, **metrics}, "an epoch >= 1 and finite numbers", hint=problem[0].upper() + problem[1:] + ".")
    # Python floats as JSON keep every digit (repr), so the trial sees exactly this number.
    print(LINE_PREFIX + json.dumps({"epoch": epoch, **metrics}), flush=True)


# -- the command ---------------------------------------------------------------------


def _split(arg: str, index: int, source: str | None, params: Sequence[str] = ()) -> list[str | tuple[str, str | None]]:
    """``arg`` as literal text and ``(name, flag)`` placeholders (``flag``: the text of a
    ``{name?text}`` placeholder, else None); bad braces and unknown names raise."""
    parts: list[str | tuple[str, str | None]] = []
    pos = 0
    for m in _TOKEN.finditer(arg):
        parts.append(arg[pos : m.start()])
        pos = m.end()
        token = m.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
            continue
        name, question, flag = (m.group(1) or "").partition("?")
        if m.group(1) is not None and (name in FIELDS or name in params):
            parts.append((name, flag if question else None))
            continue
        own = f" or the spec's [space.params] ({', '.join(params)})" if params else ""
        raise invalid(
            f"command[{index}]",
            arg,
            f"an argument whose {{placeholders}} are TrialConfig fields ({', '.join(FIELDS)}){own}",
            source=source,
            hint=f"{token!r} is not one of them; write {{{{ and }}}} for a literal brace, and {{name?--flag}} for a flag present when name is true.",
        )
    parts.append(arg[pos:])
    return parts


def _check_list(command: Any, source: str | None) -> None:
    if isinstance(command, (str, bytes)) or not isinstance(command, Sequence) or not command:
        raise invalid("command", command, "a non-empty list of strings", source=source, hint='E.g. command = ["python", "train.py", "--lr={lr}"].')
    for i, arg in enumerate(command):
        if not isinstance(arg, str):
            raise invalid(f"command[{i}]", arg, "a string", source=source)


def placeholders_in(command: Sequence[str], *, source: str | None = None, params: Sequence[str] = ()) -> dict[str, bool]:
    """The names ``command``'s placeholders use, each with whether some use of it is a
    ``{name?flag}`` (which needs a true/false value); a bad placeholder raises."""
    _check_list(command, source)
    out: dict[str, bool] = {}
    for i, arg in enumerate(command):
        for part in _split(arg, i, source, params):
            if isinstance(part, tuple):
                out[part[0]] = out.get(part[0], False) or part[1] is not None
    return out


def fields_in(command: Sequence[str], *, source: str | None = None, params: Sequence[str] = ()) -> set[str]:
    """The TrialConfig fields (and ``params`` names) ``command`` names; a bad placeholder
    raises InvalidInputError. ``source`` (e.g. the spec file) prefixes error messages."""
    return set(placeholders_in(command, source=source, params=params))


def _missing_hint(name: str, config: TrialConfig) -> str:
    if name in OPTIMIZER_PARAMS:
        uses = ", ".join(ONE_SHOT_DEFAULTS[config.optimizer])
        return f"Optimizer {config.optimizer!r} does not use {name!r} (it uses {uses}); drop {{{name}}} from the command or search only optimizers that use it."
    if name in CONDITIONAL:
        owner, values = CONDITIONAL[name]
        return f"{name!r} only applies when {owner} is one of {values}, and this trial has {owner}={getattr(config, owner)!r} (optimizer {config.optimizer!r})."
    return f"It is not set for this trial (optimizer {config.optimizer!r})."


def render(command: Sequence[str], config: TrialConfig, *, source: str | None = None) -> list[str]:
    """``command`` with each ``{name}`` replaced by ``config``'s value: a field, or one of
    the user's own dimensions (``config.params``).

    Floats are written with ``repr`` so no digit is lost; ``{{`` and ``}}`` are literal
    braces. ``{name?text}`` is ``text`` when ``name`` is true and nothing when it is false;
    an argument that is nothing but such flags, all false, is left out, so
    ``"{tied?--tied}"`` passes ``--tied`` or no argument at all. A field this config leaves
    None (``{momentum}`` with Adam) raises :class:`~hposvc.errors.InvalidInputError`
    naming the field and the optimizer.

    >>> render(["train.py", "--dropout={dropout}", "{tied?--tied}"], TrialConfig(params={"dropout": 0.5, "tied": False}))
    ['train.py', '--dropout=0.5']
    """
    _check_list(command, source)
    params = config.params
    out = []
    for i, arg in enumerate(command):
        text, only_flags, shown = [], True, False
        for part in _split(arg, i, source, tuple(params)):
            if isinstance(part, str):
                text.append(part)
                only_flags = only_flags and not part
                continue
            name, flag = part
            value = params[name] if name in params else getattr(config, name)
            if value is None:
                raise invalid(f"command[{i}]", arg, "an argument whose fields this trial sets", source=source, hint=_missing_hint(name, config))
            if flag is not None:
                if not isinstance(value, bool):
                    raise invalid(f"command[{i}]", arg, f"a {{{name}?...}} flag of a true/false dimension", source=source, hint=f"{name} is {value!r} in this trial.")
                text.append(flag if value else "")
                shown = shown or value
                continue
            only_flags = False
            text.append(repr(value) if isinstance(value, float) else str(value))
        if only_flags and not shown:
            continue  # a flag that is off: no argument at all
        out.append("".join(text))
    return out


def _executable(name: str, cwd: Path, path: str | None = None) -> str | None:
    """Where ``name`` runs from, as a subprocess started in ``cwd`` would find it."""
    if os.sep in name or (os.altsep and os.altsep in name):
        candidate = Path(cwd, name)
        return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
    return shutil.which(name, path=path)


def check_command(command: Sequence[str], *, cwd: str | os.PathLike[str], source: str | None = None, params: Sequence[str] = ()) -> None:
    """Validate a spec's ``command`` before any trial runs: a non-empty list of strings,
    placeholders that are TrialConfig fields or ``params`` names, and an executable that
    exists (a path relative to ``cwd``, or a name on PATH). Raises InvalidInputError.
    """
    fields_in(command, source=source, params=params)
    program = command[0]
    if "{" in program.replace("{{", "").replace("}}", ""):
        return  # named by a placeholder: known only per trial
    program = program.replace("{{", "{").replace("}}", "}")
    if _executable(program, Path(cwd)) is None:
        where = f"relative to {str(cwd)!r}" if os.sep in program else "on PATH"
        raise invalid(
            "command[0]",
            program,
            f"an executable program {where}",
            source=source,
            hint=f"command not found: {program!r}. Give its path, or the name of a program on PATH (check that the file is executable).",
        )


# -- running it ----------------------------------------------------------------------


def _signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the group; False when no process of it is left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:  # the id was reused by someone else's group: ours is gone
        return False
    return True


def _group_running(pgid: int) -> bool:
    """Whether a process of the group still runs. Killed orphans are reparented to init,
    which may be slow to reap them (or never, in a container whose PID 1 does not), so a
    zombie does not count; Linux's /proc tells them apart, elsewhere any member counts.
    """
    if not _signal_group(pgid, 0):
        return False
    try:
        stats = list(Path("/proc").glob("[0-9]*/stat"))
    except OSError:
        return True
    if not stats:
        return True  # no /proc: trust the signal
    for stat in stats:
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # state, ppid, pgrp, ...
        except OSError:  # exited while we looked
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """End the process group: 1) SIGTERM, 2) up to ``grace`` s for it to go, 3) SIGKILL.

    The SIGKILL is in ``finally`` so a second interrupt during the grace period escalates
    at once instead of leaving the group running.
    """
    pgid = proc.pid  # start_new_session made the child a group leader
    deadline = time.monotonic() + grace
    try:
        if not _signal_group(pgid, signal.SIGTERM):
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            return
        # The leader is gone; wait for the rest of its group (a backgrounded child).
        while time.monotonic() < deadline and _group_running(pgid):
            time.sleep(0.05)
    finally:
        _signal_group(pgid, signal.SIGKILL)
        proc.wait()


def run(
    command: Sequence[str],
    *,
    cwd: str | os.PathLike[str],
    env: Mapping[str, str],
    on_metrics: Callable[[int, dict[str, float]], bool],
    grace: float = DEFAULT_GRACE,
    log_dir: Path,
    echo: Callable[[str], None] | None = None,
) -> ScriptResult:
    """Run a rendered ``command`` in ``cwd`` with exactly ``env`` as its environment.

    Each metric line on stdout calls ``on_metrics(epoch, metrics)``; when that returns True
    (prune) the process group gets SIGTERM, ``grace`` seconds, then SIGKILL, and the
    result is "pruned". Exit 0 is "completed"; any other exit raises :class:`ScriptFailed`
    with the code and the last lines of stderr. stdout and stderr are saved whole under
    ``log_dir``; lines that are not metric lines also go to ``echo`` (e.g. a logger's
    ``info``). If ``on_metrics`` raises (an interrupt, a storage error), the group is
    stopped the same way before the exception goes on.

    >>> result = run(["sh", "-c", "echo 'hposvc: {\\"epoch\\": 1, \\"acc\\": 0.5}'"],
    ...              cwd=".", env={}, on_metrics=lambda e, m: False, log_dir=tmp)  # doctest: +SKIP
    >>> result.status, result.final                                                # doctest: +SKIP
    ('completed', {'acc': 0.5})
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    argv = list(command)
    if os.sep in argv[0]:  # a relative program path means relative to cwd, as validated
        argv[0] = os.path.abspath(os.path.join(cwd, argv[0]))  # not Path: it drops the './'
    epochs: list[tuple[int, dict[str, float]]] = []
    final: dict[str, float] = {}
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
    pruned = False
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so one signal reaches all of it
        )
    except OSError as e:
        raise ScriptFailed(f"could not start the command {argv!r}: {e}") from e

    def on_line(stream: str, line: str) -> None:
        nonlocal pruned
        if stream == "stderr":
            tail.append(line)
        elif (parsed := parse_line(line)) is not None:
            if pruned:
                return  # flushed while stopping: the trial's history ended at the prune
            epochs.append(parsed)
            final.update(parsed[1])
            if on_metrics(*parsed):
                pruned = True
                _stop(proc, grace)
            return
        if echo is not None:
            echo(line)

    with proc, open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        try:
            # One loop reads both pipes, so neither can fill up and block the script.
            _pump(proc, {proc.stdout: ("stdout", out), proc.stderr: ("stderr", err)}, on_line, grace)
            proc.wait()
        finally:
            if proc.returncode is None or _group_running(proc.pid):
                _stop(proc, grace)  # any way out of here: no process of the group is left
    duration = time.perf_counter() - t0
    if pruned:
        status = "pruned"
    elif proc.returncode == 0:
        status = "completed"
    else:
        code = proc.returncode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        shown = "\n".join(tail) if tail else "(stderr was empty)"
        raise ScriptFailed(
            f"the script {how}; the last {len(tail)} lines of its stderr:\n{shown}",
            returncode=code,
            stderr_tail=tail,
        )
    return ScriptResult(status, final, epochs, proc.returncode, stdout_path, stderr_path, duration)


def _pump(
    proc: subprocess.Popen[bytes],
    pipes: dict[Any, tuple[str, Any]],
    on_line: Callable[[str, str], None],
    grace: float,
) -> None:
    """Read the pipes to their end, a line at a time, until the process group is gone.

    A backgrounded child can hold a pipe open after the script exits; then the group is
    stopped so the pipes close, and reading gives up ``grace`` seconds later (a process
    that left the group with setsid cannot be stopped from here).
    """
    sel = selectors.DefaultSelector()
    buffers: dict[int, bytes] = {}
    for pipe, (name, file) in pipes.items():
        sel.register(pipe, selectors.EVENT_READ, (name, file))
        buffers[pipe.fileno()] = b""
    exited_at: float | None = None  # when the script was first seen gone
    give_up: float | None = None
    try:
        while sel.get_map():
            ready = sel.select(timeout=0.1)
            if proc.poll() is not None:
                now = time.monotonic()
                exited_at = exited_at or now
                if give_up is None and now - exited_at > 0.2:  # its pipes are still held open
                    _stop(proc, grace)
                    give_up = now + grace
                elif give_up is not None and now > give_up:
                    return
            for key, _ in ready:
                name, file = key.data
                chunk = os.read(key.fd, 1 << 16)
                file.write(chunk)
                if not chunk:  # EOF: a last line without a newline still counts
                    sel.unregister(key.fileobj)
                    lines, buffers[key.fd] = [buffers[key.fd]] if buffers[key.fd] else [], b""
                else:
                    *lines, buffers[key.fd] = (buffers[key.fd] + chunk).split(b"\n")
                for raw in lines:
                    on_line(name, raw.decode("utf-8", errors="replace").rstrip("\r"))
    finally:
        for file in {id(f): f for _, f in pipes.values()}.values():
            file.flush()
        sel.close()
