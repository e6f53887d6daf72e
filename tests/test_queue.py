"""The durable job queue: retries, dedupe, leases taken over after a crash, no double claims."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine as sa_engine
from sqlalchemy import text

from fhir_server.queue import JobStore, TaskDef, TransientError, enqueue_in, register_task
from fhir_server.queue.worker import QueueWorker
from fhir_server.storage import Repository


@pytest.fixture
def repo(tmp_path):
    repo = Repository.from_url(f"sqlite:///{tmp_path / 'q.sqlite3'}")
    yield repo
    repo.dispose()


def _app():
    return SimpleNamespace(state=SimpleNamespace())


def test_enqueue_claim_complete_and_dedupe(repo):
    store = JobStore(repo.engine)
    a = store.enqueue("t", {"x": 1}, dedupe_key="k1")
    assert store.enqueue("t", {"x": 2}, dedupe_key="k1") == a  # same business key: same job
    jobs = store.claim("w1", ["t"], limit=5)
    assert [j.id for j in jobs] == [a] and jobs[0].payload == {"x": 1} and jobs[0].attempts == 1
    assert store.claim("w2", ["t"]) == []  # leased to w1
    assert store.complete(a, "w1", {"ok": True})
    info = store.get(a)
    assert info.status == "done" and info.result == {"ok": True}


def test_outbox_enqueue_rolls_back_with_the_transaction(repo):
    store = JobStore(repo.engine)
    with pytest.raises(RuntimeError):
        with repo.transaction() as tx:
            tx.create({"resourceType": "Patient"})
            enqueue_in(tx.session, "t", {"y": 1})
            raise RuntimeError("boom")
    assert store.list() == []
    with repo.transaction() as tx:
        tx.create({"resourceType": "Patient"})
        job_id = enqueue_in(tx.session, "t", {"y": 1})
    assert store.get(job_id).status == "queued"


def test_transient_failures_retry_with_backoff_then_fail(repo):
    store = JobStore(repo.engine)
    job = store.enqueue("t", {}, max_attempts=2)
    [claimed] = store.claim("w", ["t"])
    assert store.fail(job, "w", "down", retry_in_s=0.0) == "queued"
    [claimed] = store.claim("w", ["t"])
    assert claimed.attempts == 2
    assert store.fail(job, "w", "still down", retry_in_s=0.0) == "failed"
    assert store.get(job).last_error == "still down"


def test_expired_lease_is_taken_over(repo):
    store = JobStore(repo.engine, lease_s=0.05)
    job = store.enqueue("t", {})
    store.claim("dead-worker", ["t"])  # and then it dies without renewing
    time.sleep(0.1)
    [taken] = store.claim("live-worker", ["t"])
    assert taken.id == job and taken.attempts == 2
    assert not store.complete(job, "dead-worker")  # the dead worker's late answer is ignored
    assert store.complete(job, "live-worker")


def test_cancel(repo):
    store = JobStore(repo.engine)
    job = store.enqueue("t", {})
    assert store.cancel(job, "client cancelled")
    assert store.claim("w", ["t"]) == []
    assert store.get(job).status == "cancelled"


def test_worker_runs_handlers_and_retries_transient_errors(repo):
    async def main():
        app = _app()
        store = JobStore(repo.engine)
        calls: list[int] = []

        async def flaky(_app, payload):
            calls.append(payload["n"])
            if len(calls) < 3:
                raise TransientError("destination down")
            return {"sent": payload["n"]}

        async def broken(_app, payload):
            raise ValueError("bad payload")

        register_task(app, TaskDef("flaky", flaky, max_attempts=5, backoff_s=0.01))
        register_task(app, TaskDef("broken", broken, max_attempts=5, backoff_s=0.01))
        ok = store.enqueue("flaky", {"n": 7})
        bad = store.enqueue("broken", {})
        worker = QueueWorker(app, store, poll_s=0.02)
        worker.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (store.get(ok).status != "done" or store.get(bad).status != "failed"):
            await asyncio.sleep(0.02)
        await worker.stop()
        return store, ok, bad, calls

    store, ok, bad, calls = asyncio.run(main())
    assert store.get(ok).status == "done" and store.get(ok).result == {"sent": 7} and calls == [7, 7, 7]
    failed = store.get(bad)
    assert failed.status == "failed" and failed.attempts == 1 and "bad payload" in failed.last_error


@pytest.mark.postgres
def test_postgres_concurrent_claims_never_take_a_job_twice():
    url = os.environ.get("CXR_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("CXR_TEST_POSTGRES_URL not set")
    admin = sa_engine(url, isolation_level="AUTOCOMMIT")
    name = f"cxr_q_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE {name}"))
    db_url = url.rsplit("/", 1)[0] + "/" + name
    try:
        repo = Repository.from_url(db_url)
        store = JobStore(repo.engine)
        ids = {store.enqueue("t", {"i": i}) for i in range(60)}
        taken: list[str] = []
        lock = threading.Lock()

        def worker(wid):
            while True:
                jobs = store.claim(wid, ["t"], limit=3)
                if not jobs:
                    return
                with lock:
                    taken.extend(j.id for j in jobs)

        threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(taken) == sorted(ids)  # every job once, none twice
        repo.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
