"""What auditing costs per request: `python -m fhir_server.audit.bench [DATABASE_URL] [N]`.

Runs N reads (GET Patient/p1) and N creates (POST Observation) through the FHIR API in process,
with the AuditMiddleware and without it, twice each in alternation, and prints milliseconds per
request. DATABASE_URL defaults to a temporary SQLite file; a PostgreSQL URL uses (and fills) that
database."""

from __future__ import annotations

import sys
import tempfile
import time

from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_server.errors import install_error_handlers
from fhir_server.fhir import install_fhir
from fhir_server.settings import Settings
from fhir_server.storage import Repository

from .middleware import AuditMiddleware

OBSERVATION = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}}


def _app(repo: Repository, audit: bool) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    install_fhir(app)
    if not audit:
        app.user_middleware = [m for m in app.user_middleware if m.cls is not AuditMiddleware]
    app.state.settings = Settings(_env_file=None)
    app.state.store = repo
    return app


def measure(repo: Repository, audit: bool, n: int) -> tuple[float, float]:
    repo.update("Patient", "p1", {"resourceType": "Patient", "id": "p1", "name": [{"family": "Doe"}]})
    with TestClient(_app(repo, audit)) as client:
        for _ in range(20):  # warm-up
            client.get("/fhir/Patient/p1")
        start = time.perf_counter()
        for _ in range(n):
            assert client.get("/fhir/Patient/p1").status_code == 200
        reads = (time.perf_counter() - start) / n * 1000
        start = time.perf_counter()
        for _ in range(n):
            assert client.post("/fhir/Observation", json=OBSERVATION).status_code == 201
        creates = (time.perf_counter() - start) / n * 1000
    return reads, creates


def main(argv: list[str]) -> None:
    url = argv[0] if argv and argv[0] != "sqlite" else f"sqlite:///{tempfile.mkdtemp()}/audit-bench.sqlite3"
    n = int(argv[1]) if len(argv) > 1 else 300
    repo = Repository.from_url(url)
    try:
        for audit in (False, True, False, True):
            reads, creates = measure(repo, audit, n)
            print(f"audit {'on ' if audit else 'off'}  read {reads:6.2f} ms  create {creates:6.2f} ms  "
                  f"(N={n}, {repo.dialect})")
    finally:
        repo.dispose()


if __name__ == "__main__":
    main(sys.argv[1:])
