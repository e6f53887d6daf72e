"""Database engine for SQLite (embedded default) or PostgreSQL (CXR_DATABASE_URL)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import StaticPool
from sqlmodel import SQLModel, create_engine

from . import tables  # noqa: F401  (registers the tables on SQLModel.metadata)

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option set on engines used for writing; on SQLite it turns BEGIN into BEGIN IMMEDIATE.
WRITE_OPTION = "cxr_write"


def _setup_sqlite(engine: Engine, *, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # pragma: no cover - exercised by every test
        # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit transactions defer locking until
        # the first write, which turns concurrent writers into "database is locked" errors).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if not in_memory:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # Writers take the write lock up front so two writers queue (busy_timeout) instead of
        # deadlocking on a read->write upgrade; readers stay lock-free under WAL.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for `url`; creates the SQLite file's folder when needed."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
        kwargs: dict = {"connect_args": {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}}
        if in_memory:
            kwargs["poolclass"] = StaticPool  # one shared connection, or every session sees an empty db
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, **kwargs)
        _setup_sqlite(engine, in_memory=in_memory)
        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True)


def create_tables(engine: Engine, tables: list | None = None) -> None:
    """create_all (of `tables`, default every model's) as a writer (BEGIN IMMEDIATE on SQLite):
    create_all reads the schema, then writes, and a deferred transaction whose read snapshot another
    start-up writer (the job queue) overtook cannot upgrade to a write lock: it fails at once with
    "database is locked", whatever the busy timeout (a migration test failed so on a loaded machine)."""
    SQLModel.metadata.create_all(engine.execution_options(**{WRITE_OPTION: True}), tables=tables)


def drop_tables(engine: Engine) -> None:
    SQLModel.metadata.drop_all(engine)
