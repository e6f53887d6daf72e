"""Shared fixtures for the FHIR storage/API tests: every test runs on SQLite, and on PostgreSQL
too when CXR_TEST_POSTGRES_URL is set (tests marked `postgres`)."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import text

from fhir_server.storage import Repository

POSTGRES_URL = os.environ.get("CXR_TEST_POSTGRES_URL")

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param(
        "postgres",
        id="postgres",
        marks=[pytest.mark.postgres, pytest.mark.skipif(not POSTGRES_URL, reason="CXR_TEST_POSTGRES_URL not set")],
    ),
]

_pg_repos: dict[str, Repository] = {}


def _pg_repo(schema: str) -> Repository:
    """One repository per PostgreSQL schema, so long-lived (module) fixtures and per-test
    fixtures never truncate each other's tables."""
    if schema not in _pg_repos:
        from sqlalchemy import create_engine

        admin = create_engine(POSTGRES_URL)
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        admin.dispose()
        sep = "&" if "?" in POSTGRES_URL else "?"
        _pg_repos[schema] = Repository.from_url(f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}")
    return _pg_repos[schema]


def make_repo(backend: str, tmp_path, *, schema: str = "public") -> Repository:
    """A fresh, empty repository on the given backend."""
    if backend == "sqlite":
        return Repository.from_url(f"sqlite:///{tmp_path / 'fhir.sqlite3'}")
    repo = _pg_repo(schema)
    with repo.engine.begin() as conn:
        conn.execute(text("TRUNCATE resource_version, search_index RESTART IDENTITY"))
    return repo


@pytest.fixture(params=BACKENDS)
def repo(request, tmp_path):
    repository = make_repo(request.param, tmp_path)
    yield repository
    if request.param == "sqlite":
        repository.dispose()


def make_app(store: Repository, **settings_overrides):
    """A FastAPI app with just the FHIR API (no model), using `store`."""
    from fastapi import FastAPI

    from fhir_server.errors import install_error_handlers
    from fhir_server.fhir import install_fhir
    from fhir_server.settings import Settings

    app = FastAPI()
    install_error_handlers(app)
    install_fhir(app)
    app.state.settings = Settings(**settings_overrides)
    app.state.store = store
    return app


@pytest.fixture
def client(repo):
    from fastapi.testclient import TestClient

    with TestClient(make_app(repo)) as test_client:
        yield test_client


FHIR_JSON = "application/fhir+json"


def outcome_of(response) -> dict:
    """The OperationOutcome of an error response (asserting it is one)."""
    assert response.headers["content-type"].startswith(FHIR_JSON), response.headers
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"], body
    return body
