"""Repository behaviour on SQLite (and PostgreSQL when CXR_TEST_POSTGRES_URL is set)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from fhir_server.storage import (
    InvalidResource,
    PreconditionFailed,
    Repository,
    ResourceExists,
    ResourceGone,
    ResourceNotFound,
    UnsupportedResourceType,
    VersionConflict,
    new_id,
)

pytest_plugins = ["fhir_support"]  # the repo / client fixtures (SQLite + PostgreSQL)


def patient(**extra):
    return {"resourceType": "Patient", "name": [{"family": "Doe", "given": ["Jane"]}], "gender": "female", **extra}


def test_create_assigns_id_version_and_meta(repo):
    stored = repo.create(patient(id="ignored-on-create", meta={"security": [{"code": "AIAST"}]}))
    assert stored.created and stored.version_id == 1 and stored.method == "create"
    assert stored.id != "ignored-on-create" and len(stored.id) == 32
    body = stored.resource
    assert body["id"] == stored.id
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] == stored.last_updated_instant
    assert body["meta"]["security"] == [{"code": "AIAST"}]  # client meta kept
    assert stored.etag == 'W/"1"'
    assert stored.location("http://x/fhir/") == f"http://x/fhir/Patient/{stored.id}/_history/1"
    assert repo.read("Patient", stored.id).resource == body


def test_update_makes_new_versions_and_vread_keeps_old(repo):
    first = repo.create(patient())
    second = repo.update("Patient", first.id, {**first.resource, "gender": "other"})
    assert (second.version_id, second.created, second.method) == (2, False, "update")
    assert second.last_updated > first.last_updated
    assert repo.read("Patient", first.id).resource["gender"] == "other"
    assert repo.vread("Patient", first.id, 1).resource["gender"] == "female"
    assert repo.vread("Patient", first.id, "2").version_id == 2
    with pytest.raises(ResourceNotFound):
        repo.vread("Patient", first.id, 9)


def test_update_as_create_with_client_id(repo):
    stored = repo.update("Patient", "client-1", patient(id="client-1"))
    assert stored.created and stored.version_id == 1 and stored.id == "client-1"
    again = repo.update("Patient", "client-1", patient())
    assert not again.created and again.version_id == 2


def test_update_rejects_mismatched_id_type_and_bad_ids(repo):
    with pytest.raises(InvalidResource):
        repo.update("Patient", "a", patient(id="b"))
    with pytest.raises(InvalidResource):
        repo.update("Patient", "a", {"resourceType": "Observation"})
    with pytest.raises(InvalidResource):
        repo.update("Patient", "bad id!", patient())
    with pytest.raises(UnsupportedResourceType):
        repo.create({"resourceType": "Encounter"})
    with pytest.raises(UnsupportedResourceType):
        repo.read("Encounter", "x")


def test_if_match(repo):
    first = repo.create(patient())
    with pytest.raises(PreconditionFailed):
        repo.update("Patient", first.id, first.resource, if_match='W/"2"')
    ok = repo.update("Patient", first.id, first.resource, if_match='W/"1"')
    assert ok.version_id == 2
    with pytest.raises(PreconditionFailed):
        repo.update("Patient", first.id, first.resource, if_match=first.etag)  # stale
    with pytest.raises(PreconditionFailed):
        repo.delete("Patient", first.id, if_match=1)
    assert repo.delete("Patient", first.id, if_match=2).deleted


def test_delete_then_read_is_gone_and_history_keeps_everything(repo):
    first = repo.create(patient())
    repo.update("Patient", first.id, first.resource)
    tomb = repo.delete("Patient", first.id)
    assert tomb.deleted and tomb.version_id == 3 and tomb.resource is None
    with pytest.raises(ResourceGone):
        repo.read("Patient", first.id)
    with pytest.raises(ResourceGone):
        repo.vread("Patient", first.id, 3)
    assert repo.vread("Patient", first.id, 1).version_id == 1
    assert repo.delete("Patient", first.id) is None  # already deleted: nothing to do
    assert repo.delete("Patient", "never-existed") is None
    page = repo.history("Patient", first.id)
    assert page.total == 3
    assert [(e.version_id, e.method) for e in page.entries] == [(3, "delete"), (2, "update"), (1, "create")]
    # deleted resources are not found by search, and an update brings them back as a new version
    assert repo.search_params("Patient", [("_id", first.id)]).total == 0
    back = repo.update("Patient", first.id, patient())
    assert back.created and back.version_id == 4
    assert repo.search_params("Patient", [("_id", first.id)]).total == 1


def test_history_of_type_and_system_with_paging(repo):
    a = repo.create(patient())
    repo.create({"resourceType": "Device", "status": "active"})
    repo.update("Patient", a.id, a.resource)
    assert repo.history("Patient").total == 2
    assert repo.history().total == 3
    page = repo.history(count=2, offset=2)
    assert page.total == 3 and len(page.entries) == 1
    assert repo.history(since=a.last_updated).total == 3
    with pytest.raises(ResourceNotFound):
        repo.history("Patient", "nope")


def test_transaction_commits_all_together(repo):
    with repo.transaction() as tx:
        pid, oid = new_id(), new_id()
        tx.create(patient(), resource_id=pid)
        tx.create(
            {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": f"Patient/{pid}"}},
            resource_id=oid,
        )
        # reads inside the transaction see its own writes
        assert tx.read("Patient", pid).version_id == 1
        assert tx.search_params("Observation", [("patient", pid)]).total == 1
    assert repo.read("Observation", oid).resource["subject"]["reference"] == f"Patient/{pid}"


def test_transaction_rolls_back_everything_on_error(repo):
    existing = repo.create(patient())

    class Crash(RuntimeError):
        pass

    with pytest.raises(Crash):
        with repo.transaction() as tx:
            tx.create(patient(), resource_id="half-written")
            tx.update("Patient", existing.id, {**existing.resource, "gender": "male"})
            tx.delete("Patient", existing.id)
            raise Crash("power cut")
    with pytest.raises(ResourceNotFound):
        repo.read("Patient", "half-written")
    assert repo.read("Patient", existing.id).version_id == 1
    assert repo.history().total == 1
    assert repo.search_params("Patient", [("gender", "male")]).total == 0


def test_transaction_rolls_back_on_storage_error_midway(repo):
    taken = repo.create(patient())
    with pytest.raises(ResourceExists):
        with repo.transaction() as tx:
            tx.create(patient(), resource_id="first")
            tx.create(patient(), resource_id=taken.id)  # duplicate id -> 409, first must vanish too
    with pytest.raises(ResourceNotFound):
        repo.read("Patient", "first")


def test_conditional_create(repo):
    study = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": "Patient/p1"},
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}],
    }
    criteria = "identifier=urn:dicom:uid|urn:oid:1.2.3"
    first = repo.create(study, if_none_exist=criteria)
    assert first.created
    second = repo.create(study, if_none_exist=criteria)
    assert not second.created and second.id == first.id
    repo.create(study)  # a duplicate without the condition
    with pytest.raises(PreconditionFailed):
        repo.create(study, if_none_exist=criteria)
    assert repo.search_params("ImagingStudy", [("identifier", "urn:oid:1.2.3")]).total == 2


def test_index_follows_updates_and_deletes(repo):
    stored = repo.create(patient())
    assert repo.search_params("Patient", [("family", "doe")]).total == 1
    repo.update("Patient", stored.id, {**stored.resource, "name": [{"family": "Smith"}]})
    assert repo.search_params("Patient", [("family", "doe")]).total == 0
    assert repo.search_params("Patient", [("family", "smith")]).total == 1
    repo.delete("Patient", stored.id)
    assert repo.search_params("Patient", [("family", "smith")]).total == 0


def test_accepts_fhir_resources_models(repo):
    from fhir.resources.R4B import get_fhir_model_class

    model = get_fhir_model_class("Device").model_validate({"resourceType": "Device", "status": "active"})
    stored = repo.create(model)
    assert stored.resource["status"] == "active" and stored.resource["resourceType"] == "Device"


def test_concurrent_updates_never_lose_or_duplicate_versions(repo):
    base = repo.create(patient())
    results: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def writer(n: int) -> None:
        barrier.wait()
        for i in range(5):
            try:
                repo.update("Patient", base.id, {**patient(), "birthDate": f"19{n}{i}-01-01"})
                outcome = "ok"
            except VersionConflict:
                outcome = "conflict"
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    successes = results.count("ok")
    current = repo.read("Patient", base.id)
    assert current.version_id == 1 + successes
    versions = sorted(e.version_id for e in repo.history("Patient", base.id, count=100).entries)
    assert versions == list(range(1, 2 + successes))
    with repo.engine.connect() as conn:
        currents = conn.execute(
            text("SELECT count(*) FROM resource_version WHERE resource_id = :i AND is_current"), {"i": base.id}
        ).scalar_one()
    assert currents == 1


def test_sqlite_file_uses_wal_and_pragmas(tmp_path):
    repo = Repository.from_url(f"sqlite:///{tmp_path / 'sub' / 'db.sqlite3'}")
    try:
        with repo.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert (tmp_path / "sub" / "db.sqlite3").exists()
    finally:
        repo.dispose()


def test_sqlite_writers_lock_up_front_and_readers_do_not(tmp_path):
    import sqlite3

    path = tmp_path / "lock.sqlite3"
    repo = Repository.from_url(f"sqlite:///{path}")
    try:
        with repo.transaction() as tx:
            tx.read_or_none("Patient", "x")  # no write yet, but the write lock is already held
            other = sqlite3.connect(path, timeout=0.05)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.close()
        with repo.transaction(write=False) as tx:
            tx.read_or_none("Patient", "x")
            other = sqlite3.connect(path, timeout=0.05)
            other.execute("BEGIN IMMEDIATE")  # a reader never blocks a writer
            other.rollback()
            other.close()
    finally:
        repo.dispose()


def test_sqlite_lock_timeout_is_storage_busy(tmp_path, monkeypatch):
    import sqlite3

    from fhir_server.storage import StorageBusy
    from fhir_server.storage import engine as engine_module

    monkeypatch.setattr(engine_module, "SQLITE_BUSY_TIMEOUT_MS", 50)
    path = tmp_path / "busy.sqlite3"
    repo = Repository.from_url(f"sqlite:///{path}")
    holder = sqlite3.connect(path)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageBusy):
            repo.create(patient())
    finally:
        holder.rollback()
        holder.close()
        repo.dispose()
    assert StorageBusy.http_status == 503


def test_concurrent_conditional_creates_make_one_resource(repo):
    study = {
        "resourceType": "ImagingStudy",
        "status": "available",
        "subject": {"reference": "Patient/p"},
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:2.25.99"}],
    }
    barrier = threading.Barrier(4)
    created: list[bool] = []
    lock = threading.Lock()

    def ingest() -> None:
        barrier.wait()
        stored = repo.create(study, if_none_exist="identifier=urn:dicom:uid|urn:oid:2.25.99")
        with lock:
            created.append(stored.created)

    threads = [threading.Thread(target=ingest) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(created) == [False, False, False, True]
    assert repo.search_params("ImagingStudy", [("identifier", "urn:oid:2.25.99")]).total == 1
