"""/readyz names what is wrong (model, database, queue) and /healthz never depends on them."""

from __future__ import annotations

from analyze_support import make_client
from sqlalchemy.exc import OperationalError


def test_ready_reports_each_part(tmp_path) -> None:
    with make_client(tmp_path) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.queue_worker._loop_task.cancel()  # the job loop died
        client.get("/healthz")  # let the cancellation land
        ready = client.get("/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["checks"] == {"model": "ok", "database": "ok", "queue": "the job queue worker is not running"}
        assert body["reason"].startswith("queue:")
        assert client.get("/healthz").status_code == 200


def test_api_only_replica_is_ready_without_a_worker(tmp_path) -> None:
    with make_client(tmp_path, queue_worker=False) as client:
        assert client.app.state.queue_worker is None
        assert client.get("/readyz").status_code == 200


def test_database_errors_are_503_and_named_by_readiness(tmp_path, monkeypatch) -> None:
    with make_client(tmp_path) as client:
        store = client.app.state.store

        def down(*_a, **_k):
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

        monkeypatch.setattr(store.engine, "connect", down)
        monkeypatch.setattr(type(store), "transaction", lambda *a, **k: down())
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "connection refused" in ready.json()["checks"]["database"]
        fhir = client.get("/fhir/Patient/x")
        assert fhir.status_code == 503 and fhir.json()["issue"][0]["code"] == "transient"
        assert fhir.headers["retry-after"]
        assert client.get("/healthz").status_code == 200
