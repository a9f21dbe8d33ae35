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
from hposvc.config import FIELDS as CONFIG_FIELDS
from hposvc.errors import TrainingError, TrialTimedOut, invalid

__all__ = [
    "DEFAULT_GRACE",
    "FIELDS",
    "LINE_PREFIX",
    "OutputPatterns",
    "ScriptFailed",
    "ScriptResult",
    "check_command",
    "fields_in",
    "placeholders_in",
    "parse_line",
    "render",
    "report",
    "run",
    "strip_ansi",
]

LINE_PREFIX = "hposvc: "  # what marks a stdout line as a metric report
# Seconds a script gets between SIGTERM and SIGKILL: enough to flush a log or close a
# file, short enough that a pruned trial frees its device quickly.
DEFAULT_GRACE = 10.0
STDERR_TAIL = 20  # lines of stderr a failed trial's reason carries
# The fields a command may name: every TrialConfig field with one value (``extra`` is a
# mapping scripts read from HPOSVC_CONFIG; ``params`` are named one by one, {dropout}).
FIELDS: tuple[str, ...] = tuple(CONFIG_FIELDS)
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


# -- reading unmodified output ([metrics] patterns) -----------------------------------

# ANSI escape sequences (colours, cursor moves): removed before a line is matched.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_LINE_END = re.compile(rb"\r\n|\r|\n")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences.

    >>> strip_ansi("\x1b[32mval_loss: 0.89\x1b[0m")
    'val_loss: 0.89'
    """
    return _ANSI.sub("", text)


class OutputPatterns:
    """A spec's ``[metrics]`` patterns, applied to a command's output one line at a time.

    Each pattern's one capture group is the value (scientific notation and signs read as
    ``float`` reads them). Each line where the study's metric matches is one report: its
    step is the last value the ``epoch`` pattern captured (0-based epochs are shifted to
    start at 1), else the count of reports so far. Other metrics on that line go with the
    report; on other lines they take the step of the epoch under way.

    >>> p = OutputPatterns({"valid_loss": r"valid loss\s+([-+0-9.eE]+)", "ppl": r"ppl\s+([0-9.]+)"}, "valid_loss")
    >>> p.read("| end of epoch 1 | valid loss 5.80 | valid ppl 330.0")
    (1, {'valid_loss': 5.8, 'ppl': 330.0}, True)
    >>> p.read("| epoch 2 | 200/2983 batches | loss 7.63 | ppl 2000.5"), p.read("nothing here")
    ((2, {'ppl': 2000.5}, False), None)
    """

    def __init__(self, patterns: Mapping[str, str], metric: str | None) -> None:
        self.metric = metric
        self.patterns = dict(patterns)
        self.epoch = re.compile(patterns["epoch"]) if "epoch" in patterns else None
        self.values = {name: re.compile(p) for name, p in patterns.items() if name != "epoch"}
        self.reports = 0  # reports so far
        self.last_epoch: int | None = None  # what the epoch pattern last captured, shifted
        self.shift: int | None = None  # +1 when the epochs count from 0

    def describe(self, metric: str) -> str:
        if metric in self.values:
            return f"[metrics] {metric} = {self.patterns[metric]!r}, or {LINE_PREFIX.strip()} lines"
        return f"{LINE_PREFIX.strip()} lines; [metrics] has no pattern for it"

    def read(self, line: str) -> tuple[int, dict[str, float], bool] | None:
        """``(step, values, is_report)`` for a line any pattern matches, else None."""
        matched = False
        if self.epoch is not None and (m := self.epoch.search(line)):
            matched = True
            epoch = self._number("epoch", m.group(1), line)
            if epoch != int(epoch):
                raise ScriptFailed(f"the [metrics] epoch pattern captured {m.group(1)!r}, not a whole number, in the line {line!r}")
            if self.shift is None:
                self.shift = 1 if epoch == 0 else 0
            self.last_epoch = int(epoch) + self.shift
        values: dict[str, float] = {}
        for name, pattern in self.values.items():
            if (m := pattern.search(line)) is None:
                continue
            matched = True
            value = self._number(name, m.group(1), line)
            if math.isfinite(value):
                values[name] = value
            elif name == self.metric:
                raise ScriptFailed(f"{name} is {value} in the line {line.strip()!r} (did training diverge?)")
        if not matched:
            return None
        is_report = self.metric in values
        if is_report:
            self.reports += 1
        if self.last_epoch is not None:
            step = self.last_epoch
        else:
            step = self.reports if is_report else self.reports + 1
        return step, values, is_report

    @staticmethod
    def _number(name: str, text: str | None, line: str) -> float:
        try:
            return float((text or "").strip())
        except ValueError:
            raise ScriptFailed(
                f"the [metrics] pattern for {name} captured {text!r}, which is not a number, in the line {line.strip()!r}; "
                "make its capture group match only the value, e.g. ([-+0-9.eE]+)"
            ) from None


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
    metric: str | None = None,
    patterns: Mapping[str, str] | None = None,
    on_values: Callable[[int, dict[str, float]], None] | None = None,
    timeout: float | None = None,
    limit: float | None = None,
) -> ScriptResult:
    """Run a rendered ``command`` in ``cwd`` with exactly ``env`` as its environment.

    Each report calls ``on_metrics(epoch, metrics)``: a metric line on stdout, or a line
    (of stdout or stderr) where ``patterns`` (a spec's ``[metrics]``, see
    :class:`OutputPatterns`) find the study's ``metric``. Other pattern matches go to
    ``on_values(step, metrics)``. When ``on_metrics`` returns True (prune) the process
    group gets SIGTERM, ``grace`` seconds, then SIGKILL, and the result is "pruned"; the
    same happens ``timeout`` seconds after the start, and then :class:`TrialTimedOut` is
    raised (its message names ``limit``, the trial's whole limit, when given). Exit 0 is "completed", unless ``metric`` was never reported: then, as for any
    other exit, :class:`ScriptFailed` with the last lines of output. stdout and stderr are
    saved whole under ``log_dir``; lines that match nothing also go to ``echo`` (e.g. a
    logger's ``info``). If ``on_metrics`` raises (an interrupt, a storage error), the
    group is stopped the same way before the exception goes on.

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
    reader = OutputPatterns(patterns or {}, metric)
    epochs: list[tuple[int, dict[str, float]]] = []
    final: dict[str, float] = {}
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
    stdout_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL // 2)
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

    def report(epoch: int, metrics: dict[str, float]) -> None:
        nonlocal pruned
        epochs.append((epoch, metrics))
        final.update(metrics)
        if on_metrics(epoch, metrics):
            pruned = True
            _stop(proc, grace)

    def on_line(stream: str, line: str) -> None:
        if pruned:
            return  # flushed while stopping: the trial's history ended at the prune
        line = strip_ansi(line)
        if not line.strip():
            return
        if stream == "stderr":
            tail.append(line)
        else:
            stdout_tail.append(line)
            if (parsed := parse_line(line)) is not None:
                report(*parsed)
                return
        found = reader.read(line)
        if found is None:
            if echo is not None:
                echo(line)
            return
        step, values, is_report = found
        if is_report:
            report(step, values)
        elif values:
            final.update(values)
            if on_values is not None:
                on_values(step, values)

    deadline = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    with proc, open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        try:
            # One loop reads both pipes, so neither can fill up and block the script.
            timed_out = _pump(proc, {proc.stdout: ("stdout", out), proc.stderr: ("stderr", err)}, on_line, grace, deadline)
            proc.wait()
        finally:
            if proc.returncode is None or _group_running(proc.pid):
                _stop(proc, grace)  # any way out of here: no process of the group is left
    duration = time.perf_counter() - t0
    # The two pipes are read as their data comes, so their lines' order between them is lost.
    last = "".join(
        f"\nits last {len(lines)} lines on {name}:\n" + "\n".join(lines)
        for name, lines in (("stdout", stdout_tail), ("stderr", list(tail)[-(STDERR_TAIL // 2) :]))
        if lines
    ) or "\nit printed nothing."
    if timed_out:
        raise TrialTimedOut(f"timed out after {limit or timeout:g} s;{last}")
    if pruned:
        status = "pruned"
    elif proc.returncode == 0:
        status = "completed"
        if metric is not None and metric not in final:
            raise ScriptFailed(
                f"{metric} never appeared in the output (read with {reader.describe(metric)});{last}",
                returncode=0,
                stderr_tail=tail,
            )
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
    deadline: float | None = None,
) -> bool:
    """Read the pipes to their end, a line at a time, until the process group is gone;
    True when ``deadline`` (``time.monotonic()``) came first and the group was stopped.

    Lines end at ``\\n`` or ``\\r`` (a progress bar redraws its line with ``\\r``: each
    redraw is read as it comes). A backgrounded child can hold a pipe open after the
    script exits; then the group is stopped so the pipes close, and reading gives up
    ``grace`` seconds later (a process that left the group with setsid cannot be stopped
    from here).
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
            if deadline is not None and exited_at is None and time.monotonic() > deadline:
                _stop(proc, grace)
                return True
            if proc.poll() is not None:
                now = time.monotonic()
                exited_at = exited_at or now
                if give_up is None and now - exited_at > 0.2:  # its pipes are still held open
                    _stop(proc, grace)
                    give_up = now + grace
                elif give_up is not None and now > give_up:
                    return False
            for key, _ in ready:
                name, file = key.data
                chunk = os.read(key.fd, 1 << 16)
                file.write(chunk)
                if not chunk:  # EOF: a last line without a newline still counts
                    sel.unregister(key.fileobj)
                    lines, buffers[key.fd] = [buffers[key.fd]] if buffers[key.fd] else [], b""
                else:
                    *lines, buffers[key.fd] = _LINE_END.split(buffers[key.fd] + chunk)
                for raw in lines:
                    on_line(name, raw.decode("utf-8", errors="replace"))
        return False
    finally:
        for file in {id(f): f for _, f in pipes.values()}.values():
            file.flush()
        sel.close()
