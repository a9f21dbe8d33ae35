"""hposvc's own recommendation table, in the same SQL database as Optuna's tables.

Two tables, created on first write (SQLAlchemy Core):

- ``hposvc_schema(component, version, updated_at)``: one row per hposvc component that
  owns tables; here component "recommendations". A later hposvc that changes the table
  adds a step to ``_MIGRATIONS`` and bumps ``SCHEMA_VERSION``.
- ``hposvc_recommendations``: one row per computation: when, over which studies and how
  many trials, budget, context split, best optimizer, the full JSON result and the schema
  version it was written with.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import pandas as pd
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from hposvc.errors import StorageError, invalid
from hposvc.queue import backend_of
from hposvc.recommendation._core import Recommendation
from hposvc.recommendation._data import StorageLike, open_storage

__all__ = [
    "SCHEMA_VERSION",
    "load_recommendation",
    "recommendation_history",
    "save_recommendation",
    "set_mlflow_run_id",
]

COMPONENT = "recommendations"
SCHEMA_VERSION = 1
# version -> function(connection) that upgrades the tables from that version to the next.
_MIGRATIONS: dict[int, Callable[[sa.Connection], None]] = {}

metadata = sa.MetaData()
schema_table = sa.Table(
    "hposvc_schema",
    metadata,
    sa.Column("component", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
recommendations_table = sa.Table(
    "hposvc_recommendations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("studies", sa.JSON, nullable=False),
    sa.Column("n_trials", sa.Integer, nullable=False),
    sa.Column("budget", sa.Integer, nullable=False),
    sa.Column("by", sa.String(32), nullable=True),
    sa.Column("best", sa.String(64), nullable=True),
    sa.Column("result", sa.JSON, nullable=False),
    sa.Column("mlflow_run_id", sa.String(64), nullable=True),
    sa.Column("schema_version", sa.Integer, nullable=False),
)

HISTORY_COLUMNS = [
    "id", "created_at", "best", "budget", "by", "n_trials", "studies", "summary", "mlflow_run_id", "schema_version",
]


def _engine(storage: StorageLike) -> sa.Engine:
    """The SQLAlchemy engine behind ``storage`` (a URL, None for the default, a study or an
    optuna RDB storage). URLs go through :func:`hposvc.storage.open_storage`, so the table
    lives in the same database with the same connection settings as Optuna's, and the
    engine is the cached one of that storage (not disposed here)."""
    opened = backend_of(open_storage(storage))
    if not isinstance(opened, optuna.storages.RDBStorage):
        raise invalid(
            "storage",
            type(opened).__name__,
            "an SQL database (an SQLAlchemy URL or an optuna RDBStorage)",
            hint="Recommendations are stored beside Optuna's tables; pass store=False (--no-store) to skip saving.",
        )
    return opened.engine


@contextlib.contextmanager
def _transaction(engine: sa.Engine, what: str) -> Iterator[sa.Connection]:
    """One transaction; driver errors become StorageError naming what was being done."""
    try:
        with engine.begin() as conn:
            yield conn
    except sa_exc.SQLAlchemyError as e:
        raise StorageError(f"{what} failed: {e}") from e


def _ensure_schema(conn: sa.Connection) -> None:
    metadata.create_all(conn, checkfirst=True)
    version = conn.execute(
        sa.select(schema_table.c.version).where(schema_table.c.component == COMPONENT)
    ).scalar_one_or_none()
    now = dt.datetime.now(dt.timezone.utc)
    if version is None:
        conn.execute(sa.insert(schema_table).values(component=COMPONENT, version=SCHEMA_VERSION, updated_at=now))
        return
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"the {recommendations_table.name} table has schema version {version}, newer than this "
            f"hposvc understands ({SCHEMA_VERSION}); upgrade hposvc."
        )
    while version < SCHEMA_VERSION:
        _MIGRATIONS[version](conn)
        version += 1
        conn.execute(
            sa.update(schema_table).where(schema_table.c.component == COMPONENT).values(version=version, updated_at=now)
        )


def save_recommendation(storage: StorageLike, rec: Recommendation) -> int:
    """Store ``rec`` as one row (in one transaction) and return its id.

    >>> save_recommendation("sqlite:///hposvc-data/hposvc.db", rec)  # doctest: +SKIP
    1
    """
    result = rec.to_dict()
    engine = _engine(storage)
    for attempt in (1, 2):
        try:
            with _transaction(engine, "saving the recommendation") as conn:
                _ensure_schema(conn)
                row = conn.execute(
                    sa.insert(recommendations_table).values(
                        created_at=rec.created_at,
                        studies=list(rec.studies),
                        n_trials=rec.n_trials,
                        budget=rec.budget,
                        by=rec.by_key,
                        best=rec.best,
                        result=result,
                        mlflow_run_id=rec.mlflow_run_id,
                        schema_version=SCHEMA_VERSION,
                    )
                )
                return int(row.inserted_primary_key[0])
        except StorageError as e:
            # Two processes creating the tables at once: the loser retries once.
            if attempt == 2 or not isinstance(e.__cause__, (sa_exc.IntegrityError, sa_exc.OperationalError, sa_exc.ProgrammingError)):
                raise
    raise AssertionError("unreachable")


def set_mlflow_run_id(storage: StorageLike, id: int, run_id: str) -> None:
    """Record the MLflow run a stored recommendation was logged to (one transaction)."""
    t = recommendations_table
    engine = _engine(storage)
    with _transaction(engine, "recording the MLflow run id") as conn:
        result = _loads(conn.execute(sa.select(t.c.result).where(t.c.id == id)).scalar_one())
        result["mlflow_run_id"] = run_id
        conn.execute(sa.update(t).where(t.c.id == id).values(mlflow_run_id=run_id, result=result))


def _has_table(engine: sa.Engine) -> bool:
    try:
        return sa.inspect(engine).has_table(recommendations_table.name)
    except sa_exc.SQLAlchemyError as e:
        raise StorageError(f"reading the recommendation history failed: {e}") from e


def recommendation_history(storage: StorageLike = None) -> pd.DataFrame:
    """Every stored recommendation, newest first: id, created_at, best, budget, by,
    n_trials, studies, summary, schema_version. Empty when none was stored yet.

    >>> recommendation_history("sqlite:///hposvc-data/hposvc.db").head()  # doctest: +SKIP
    """
    engine = _engine(storage)
    if not _has_table(engine):
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    t = recommendations_table
    with _transaction(engine, "reading the recommendation history") as conn:
        rows = conn.execute(
            sa.select(
                t.c.id, t.c.created_at, t.c.best, t.c.budget, t.c.by, t.c.n_trials, t.c.studies, t.c.result,
                t.c.mlflow_run_id, t.c.schema_version,
            ).order_by(t.c.id.desc())
        ).all()
    records = []
    for r in rows:
        result = _loads(r.result)
        records.append(
            {
                "id": r.id,
                "created_at": r.created_at,
                "best": r.best,
                "budget": r.budget,
                "by": r.by,
                "n_trials": r.n_trials,
                "studies": _loads(r.studies),
                "summary": result.get("summary") if isinstance(result, dict) else None,
                "mlflow_run_id": r.mlflow_run_id,
                "schema_version": r.schema_version,
            }
        )
    return pd.DataFrame(records, columns=HISTORY_COLUMNS)


def load_recommendation(storage: StorageLike, id: int) -> dict[str, Any]:
    """The full stored result (``Recommendation.to_dict()``) of recommendation ``id``."""
    engine = _engine(storage)
    row = None
    if _has_table(engine):
        t = recommendations_table
        with _transaction(engine, "reading a recommendation") as conn:
            row = conn.execute(sa.select(t.c.id, t.c.result).where(t.c.id == id)).one_or_none()
    if row is None:
        raise invalid("id", id, "the id of a stored recommendation", hint="List them with `hposvc recommend --history`.")
    result = _loads(row.result)
    result["id"] = row.id
    return result


def _loads(x: Any) -> Any:
    return json.loads(x) if isinstance(x, str) else x
