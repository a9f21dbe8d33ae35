"""The soak (bench/soak.py) at CI scale: workers killed with SIGKILL every few seconds, the
storage proxy killed and restarted, PostgreSQL restarted behind it; then the books must
balance (exact count, nothing RUNNING, no trial run twice, every FAIL with a reason, one
MLflow run per trial). ``python bench/soak.py`` runs the full-size one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import soak
from tests.conftest import PgServer

pytestmark = pytest.mark.slow


def test_the_soak_balances_its_books(tmp_path: Path, postgres_url: str, pg_server: PgServer) -> None:
    result = soak(postgres_url, pg_server.restart, workdir=tmp_path / "soak", workers=3, trials=24, kill_every=5.0, pause=0.05, timeout=600)
    assert result["ok"], json.dumps(result, indent=2)
    assert result["worker_kills"] >= 1 and len(result["events"]) == 2, result  # the faults happened
