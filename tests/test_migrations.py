"""Alembic migrations: an empty database and a database of the previous release (tables made by
create_all, no migration history) both upgrade to a schema equal to the models, on SQLite and
PostgreSQL, and an upgraded old database keeps its rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from fhir_server.migrations import runner
from fhir_server.migrations.metadata import target_metadata
from fhir_server.storage import Repository
from fhir_server.storage.engine import make_engine

ROOT = Path(__file__).resolve().parents[1]


def _diff(engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, target_metadata())


def _previous_release(engine) -> None:
    """The schema the last release created on start-up: create_all of the storage tables only."""
    from fhir_server.storage import tables

    tables.SQLModel.metadata.create_all(engine, tables=[tables.ResourceVersion.__table__, tables.SearchIndex.__table__])


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_engine(request, tmp_path):
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}")
        yield engine
        engine.dispose()
        return
    if not os.environ.get("CXR_TEST_POSTGRES_URL"):
        pytest.skip("CXR_TEST_POSTGRES_URL not set")
    from pg_cluster import fresh_postgres_database

    with fresh_postgres_database("cxr_mig") as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def test_an_empty_database_upgrades_to_exactly_the_models(empty_engine):
    assert runner.status(empty_engine).current is None
    state = runner.upgrade(empty_engine)
    assert state.up_to_date and state.current == runner.head_revision()
    assert _diff(empty_engine) == []
    assert runner.upgrade(empty_engine).current == state.current  # idempotent


def test_a_previous_release_database_is_adopted_and_keeps_its_rows(empty_engine):
    _previous_release(empty_engine)
    repo = Repository(empty_engine)
    patient = repo.create({"resourceType": "Patient", "name": [{"family": "Adopted"}]})
    state = runner.upgrade(empty_engine)
    assert state.up_to_date
    assert _diff(empty_engine) == []
    assert "queue_job" in inspect(empty_engine).get_table_names()
    assert repo.read("Patient", patient.id).resource["name"][0]["family"] == "Adopted"
    assert [e.resource["name"][0]["family"] for e in repo.search_params("Patient", [("family", "adopted")]).matches] == ["Adopted"]


def test_every_migration_downgrades_and_upgrades_again(empty_engine):
    runner.upgrade(empty_engine)
    runner.upgrade(empty_engine, "head")
    from alembic import command

    with empty_engine.begin() as conn:
        command.downgrade(runner._config(conn), "base")
    assert set(inspect(empty_engine).get_table_names()) <= {"alembic_version"}
    assert runner.upgrade(empty_engine).up_to_date
    assert _diff(empty_engine) == []


def test_cxr_db_upgrade_and_status(tmp_path):
    env = {**os.environ, "CXR_DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("CXR_DATABASE_URL", None)
    run = lambda *a: subprocess.run([sys.executable, "-m", "fhir_server", "db", *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    before = run("status")
    assert before.returncode == 1 and "run `cxr db upgrade`" in before.stdout
    up = run("upgrade")
    assert up.returncode == 0, up.stderr
    after = run("status")
    assert after.returncode == 0 and "up to date" in after.stdout


def test_a_replica_with_an_old_schema_is_not_ready_when_it_may_not_upgrade(tmp_path):
    from fastapi.testclient import TestClient

    from fhir_server.app import create_app
    from fhir_server.settings import Settings

    engine = make_engine(f"sqlite:///{tmp_path / 'cxr.sqlite3'}")
    _previous_release(engine)
    engine.dispose()
    settings = Settings(data_dir=tmp_path, db_auto_upgrade=False, ood_gate=False, model="cxr:untrained-demo")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "cxr db upgrade" in ready.json()["reason"]
        assert client.get("/healthz").status_code == 200


def test_a_database_made_by_create_all_of_a_newer_build_is_completed_and_stamped(empty_engine):
    """Tables of a later revision without those of an earlier one (create_all of whatever models
    were imported): the upgrade completes it from the models instead of failing on a table that exists."""
    from fhir_server.dicom import tables as dicom_tables
    from fhir_server.storage import tables

    tables.SQLModel.metadata.create_all(empty_engine, tables=[
        tables.ResourceVersion.__table__, tables.SearchIndex.__table__,
        dicom_tables.DicomInstance.__table__,  # 0004's, while 0002/0003's are missing
    ])
    state = runner.upgrade(empty_engine)
    assert state.up_to_date
    assert _diff(empty_engine) == []


def test_processes_starting_together_on_one_sqlite_file_migrate_once(tmp_path):
    """`cxr serve` and `cxr worker` started together on the embedded SQLite file both upgrade at
    start-up: the second waits for the first (it failed with 'database is locked' before)."""
    import threading

    errors: list[str] = []

    def start() -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'shared.sqlite3'}")
        try:
            runner.upgrade(engine)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(exc))
        finally:
            engine.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine = make_engine(f"sqlite:///{tmp_path / 'shared.sqlite3'}")
    assert runner.status(engine).up_to_date and _diff(engine) == []
    engine.dispose()
