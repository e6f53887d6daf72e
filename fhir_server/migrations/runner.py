"""Upgrade a database to the newest schema, or tell how far behind it is.

    upgrade(engine)            # `cxr db upgrade`; start-up when CXR_DB_AUTO_UPGRADE (default on)
    status(engine) -> SchemaStatus(current, head)

A database created before migrations existed (tables made by `create_all`, no alembic_version)
is adopted: it is stamped with the newest revision whose tables it already has, then upgraded
from there, so an older release's database upgrades in place without losing a row.

On PostgreSQL the upgrade holds an advisory lock, so replicas that start together do not run the
same migration twice; the others wait and then find nothing to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)

# any 64-bit constant unique to this purpose ("cxr-migr")
_LOCK_KEY = 0x6378722D6D696772


@dataclass(frozen=True)
class SchemaStatus:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("fhir_server.migrations")))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def status(engine: Engine) -> SchemaStatus:
    with engine.connect() as conn:
        return SchemaStatus(current_revision(conn), head_revision())


def _adopt_unversioned(connection: Connection, cfg: Config) -> None:
    """Give a database that has tables but no migration history a revision to upgrade from.

    Its tables are those of a prefix of the revisions (a previous release made them with
    `create_all`): stamped with the newest revision of that prefix, then upgraded by the migrations.
    Anything else (tables from later revisions present while an earlier one's are missing: made by
    `create_all` of a build whose models were ahead of that prefix) gets the missing tables from the
    models and is stamped at head -- the same schema, since tests keep migrations equal to models.
    """
    existing = set(inspect(connection).get_table_names())
    if "alembic_version" in existing:
        return
    script = ScriptDirectory.from_config(cfg)
    revisions = list(reversed(list(script.walk_revisions())))  # oldest first
    model_tables = {t for rev in revisions for t in getattr(rev.module, "CREATES_TABLES", ())}
    present = existing & model_tables
    if not present:
        return  # empty (or foreign tables only): the migrations create everything
    adopt, covered = None, set()
    for rev in revisions:
        creates = set(getattr(rev.module, "CREATES_TABLES", ()))
        if not creates <= existing:
            break
        adopt, covered = rev.revision, covered | creates
    if adopt is not None and present <= covered:
        log.warning("database has tables but no migration history: adopting it at revision %s", adopt)
        command.stamp(cfg, adopt)
        return
    from fhir_server.migrations.metadata import target_metadata

    log.warning("database has tables of several releases but no migration history: completing it from the "
                "models and stamping it at the newest revision")
    target_metadata().create_all(connection, checkfirst=True)
    command.stamp(cfg, "head")


def upgrade(engine: Engine, revision: str = "head") -> SchemaStatus:
    if engine.dialect.name == "sqlite":
        # BEGIN IMMEDIATE: two processes starting on one file (cxr serve + cxr worker) queue on the
        # write lock for the busy timeout; a deferred transaction would fail at once when upgrading
        # its read lock while the other one migrates
        from fhir_server.storage.engine import WRITE_OPTION

        engine = engine.execution_options(**{WRITE_OPTION: True})
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY - (1 << 63)})
        cfg = _config(conn)
        _adopt_unversioned(conn, cfg)
        before = current_revision(conn)
        command.upgrade(cfg, revision)
        after = current_revision(conn)
    if before != after:
        log.info("database schema upgraded %s -> %s", before or "(empty)", after)
    return SchemaStatus(after, head_revision())
