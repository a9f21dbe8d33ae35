"""The tracking outbox: the records training processes write, where they live, how they are read.

Training processes never talk to MLflow. They append tracking records to a journal in the
outbox, and one tracking process per data directory and tracking URI (:mod:`hposvc.drain`)
sends them to MLflow in batches. This module is the contract between the two: the layout,
the record kinds, the append-only writer, the reader and the drain's cursors. It imports
nothing heavy (no MLflow, no torch).

Layout, for the tracking URI ``U`` of data directory ``D``::

    D/outbox/<key(U)>/          one folder per tracking URI (key: a short hash of U)
        uri                     U itself, so `hposvc sync` and the tracking process know where to send
        <host>-<pid>-<rand>.jsonl   one journal per writing process: one JSON record a line, append-only
        state.json              the tracking process's cursors (bytes sent of each journal) and health
        tracking.lock           held (flock) by the one tracking process of this folder
        tracking.pid, tracking.log
        failed/                 records MLflow refused (4xx), kept with the reason

Record kinds (field ``k``); every record names its study and the study's uid (a re-created
namesake study never lands on the old one's runs), trial records the trial number:

===========  ==========================================================================
``study``    open the study's experiment and parent run; ``spec`` (spec.json), ``tags``,
             ``storage`` (where the tracking process reads the study at its end)
``start``    a trial's run: ``ts`` (start, ms), ``tags``, ``params``
``metrics``  ``m``: ``[key, value, timestamp_ms, step]`` rows
``text``     an artifact: ``path`` and ``text``
``end``      the trial's end: MLflow ``status``, ``ts`` (end, ms), ``tags``, final ``m``;
             ``start``/``base`` let it create the run when no ``start`` record exists
             (a dead worker's trial closed by another worker)
``done``     the study finished: summary and plots on its parent run
``eof``      the writer closed its journal cleanly
===========  ==========================================================================

Delivery is at-least-once and idempotent: a run is found by its tags (study uid + trial
number) before one is created, a metric row carries its own timestamp so MLflow drops a
re-sent one, params and tags are set to the same values again. So a tracking process killed
between sending and saving its cursors re-sends a little and duplicates nothing.

Durability: each record is one ``write()`` of a whole line to a file opened with
``O_APPEND``, so it is in the kernel's page cache once the call returns and survives
``kill -9`` of the writer or of the tracking process. A journal is ``fsync``ed when a trial
ends and when it is closed: an operating-system crash or power loss can lose the records of
trials still running (they are re-run anyway: their Optuna trials fail as stale).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "Journal",
    "OutboxFolder",
    "folder_for",
    "journals",
    "read_records",
]

# The journal format; a tracking process refuses journals of a newer one.
FORMAT = 1
SUFFIX = ".jsonl"


def _key(uri: str) -> str:
    return "tracking-" + hashlib.sha1(uri.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class OutboxFolder:
    """The outbox folder of one data directory and tracking URI."""

    path: Path
    uri: str

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.path / "tracking.lock"

    @property
    def pid_file(self) -> Path:
        return self.path / "tracking.pid"

    @property
    def log_file(self) -> Path:
        return self.path / "tracking.log"

    @property
    def failed(self) -> Path:
        return self.path / "failed"

    def create(self) -> "OutboxFolder":
        self.path.mkdir(parents=True, exist_ok=True)
        uri_file = self.path / "uri"
        if not uri_file.is_file():
            _atomic_write(uri_file, self.uri)
        return self

    def state(self) -> "DrainState":
        return DrainState.load(self.state_file)

    def pending(self) -> int:
        """Bytes written to journals that the tracking process has not sent yet."""
        offsets = self.state().offsets
        return sum(max(0, p.stat().st_size - offsets.get(p.name, 0)) for p in journals(self.path))


def folder_for(data_dir: str | os.PathLike[str], uri: str) -> OutboxFolder:
    """The outbox folder of ``data_dir`` for tracking URI ``uri``."""
    return OutboxFolder(Path(data_dir) / "outbox" / _key(uri), uri)


def outbox_folders(data_dir: str | os.PathLike[str]) -> list[OutboxFolder]:
    """Every tracking URI's outbox folder in ``data_dir`` (for `hposvc sync` without a URI)."""
    root = Path(data_dir) / "outbox"
    found = []
    for uri_file in sorted(root.glob("tracking-*/uri")):
        found.append(OutboxFolder(uri_file.parent, uri_file.read_text()))
    return found


def journals(path: Path) -> list[Path]:
    """The journals in an outbox folder, oldest first (by name: their creation time leads)."""
    return sorted(path.glob(f"*{SUFFIX}"))


class Journal:
    """The append-only journal of one writing process.

    >>> j = Journal(folder_for("/tmp/hposvc-doctest", "sqlite:///x.db").create())
    >>> j.write({"k": "metrics", "study": "s", "uid": "u", "trial": 0, "m": [["loss", 0.5, 1, 1]]})
    >>> j.close()
    """

    def __init__(self, folder: OutboxFolder) -> None:
        self.folder = folder
        # Creation time first, so a folder listing is in writing order.
        name = f"{time.time_ns():020d}-{_safe(socket.gethostname())}-{os.getpid()}-{uuid.uuid4().hex[:6]}{SUFFIX}"
        self.path = folder.path / name
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()
        self.size = 0  # bytes written: the tracking process has sent all of them when its cursor is here
        self.write({"k": "journal", "v": FORMAT, "pid": os.getpid(), "host": socket.gethostname()})

    def write(self, record: dict[str, Any], *, sync: bool = False) -> None:
        """Append one record: one ``write()`` of one line (never half a record in the file)."""
        line = (json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n").encode()
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"journal {self.path.name} is closed")
            n = os.write(self._fd, line)
            if n != len(line):  # a full disk: the rest, or an OSError
                os.write(self._fd, line[n:])
            self.size += len(line)
            if sync:
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
        self.write({"k": "eof"}, sync=True)
        with self._lock:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0


def read_records(path: Path, offset: int, *, limit: int = 8 << 20) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """Complete records of journal ``path`` from byte ``offset``: ``([(end, record)], new offset)``.

    ``end`` is the byte offset just past each record, the cursor once it is sent. A last line
    without its newline (a writer killed mid-write, or still writing) is left for later.
    At most about ``limit`` bytes are read at once.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(limit)
    cut = data.rfind(b"\n")
    if cut < 0:
        return [], offset
    out: list[tuple[int, dict[str, Any]]] = []
    pos = offset
    for line in data[: cut + 1].splitlines(keepends=True):
        pos += len(line)
        text = line.strip()
        if not text:
            continue
        try:
            out.append((pos, json.loads(text)))
        except ValueError:
            out.append((pos, {"k": "garbled", "line": text[:200].decode(errors="replace")}))
    return out, offset + cut + 1


@dataclass
class DrainState:
    """What the tracking process has sent, saved after every pass (``state.json``)."""

    offsets: dict[str, int] = field(default_factory=dict)  # journal name -> bytes sent
    runs: dict[str, str] = field(default_factory=dict)  # "uid/trial" -> MLflow run id, runs not ended yet
    creating: list[str] = field(default_factory=list)  # runs being created: found by tags after a crash
    experiments: dict[str, list[str]] = field(default_factory=dict)  # experiment name -> [id, direction] (for links)
    pid: int = 0  # the tracking process that wrote this
    online: bool = True  # False: the last pass could not reach MLflow
    error: str = ""  # why, when offline
    updated: float = 0.0  # time.time() of the last pass

    @classmethod
    def load(cls, path: Path) -> "DrainState":
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return cls()
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: Path) -> None:
        _atomic_write(path, json.dumps(self.__dict__))


def run_key(uid: str, study: str, trial: int) -> str:
    """How the tracking process names one trial's run in its state (uid, or name when none)."""
    return f"{uid or study}/{trial}"


def iter_new(folder: OutboxFolder, state: DrainState) -> Iterator[tuple[Path, list[tuple[int, dict[str, Any]]], int]]:
    """For each journal with unsent records: its path, the records and the offset after them."""
    for path in journals(folder.path):
        offset = state.offsets.get(path.name, 0)
        try:
            if path.stat().st_size <= offset:
                continue
            records, new = read_records(path, offset)
        except FileNotFoundError:
            continue
        if records:
            yield path, records, new


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
