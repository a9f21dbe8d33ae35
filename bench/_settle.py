"""Between timed runs: let the tracking processes of earlier runs finish first.

``hposvc study run`` returns once MLflow holds its trials; the study's summary and plots
(a few CPU seconds) follow in its tracking process after that, and the process stays up
for the next study. Started straight away, the next timed run would share the CPU with
that work and look slower than it is. These helpers wait, outside the timed region,
until every tracking process under a folder has been idle for a moment.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime


def tracking_pids(root: Path) -> list[int]:
    """The live tracking processes whose outbox folders lie under ``root``."""
    pids = []
    for pid_file in root.rglob("outbox/tracking-*/tracking.pid"):
        try:
            pid = int(pid_file.read_text())
        except (OSError, ValueError):
            continue
        if _cpu_ticks(pid) is not None:
            pids.append(pid)
    return pids


def wait_for_tracking(root: Path, *, quiet_for: float = 1.0, timeout: float = 120.0) -> float:
    """Wait until the tracking processes under ``root`` used no CPU for ``quiet_for``
    seconds (or ``timeout`` passed); the seconds waited."""
    t0 = time.monotonic()
    ticks = {pid: _cpu_ticks(pid) for pid in tracking_pids(root)}
    still_since = time.monotonic()
    while ticks and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        now = {pid: _cpu_ticks(pid) for pid in ticks}
        if now != ticks:
            ticks, still_since = {p: t for p, t in now.items() if t is not None}, time.monotonic()
        elif time.monotonic() - still_since >= quiet_for:
            break
    return time.monotonic() - t0


def stop_tracking(root: Path) -> None:
    """SIGTERM the tracking processes under ``root`` (they exit after their pass)."""
    import signal

    for pid in tracking_pids(root):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
