"""The durable job queue: retries, dedupe, leases taken over after a crash, no double claims."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from types import SimpleNamespace

import pytest
from fhir_support import BACKENDS, make_repo
from sqlalchemy import text

from fhir_server.queue import JobFailed, JobStore, TaskDef, TransientError, cancel_in, enqueue_in, register_task
from fhir_server.queue.worker import QueueWorker
from fhir_server.storage import Repository


@pytest.fixture(params=BACKENDS)
def repo(request, tmp_path):
    """The same behaviour on both engines: every test runs on SQLite and on PostgreSQL."""
    repo = make_repo(request.param, tmp_path, schema="queue_tests")
    JobStore(repo.engine)
    with repo.engine.begin() as conn:
        conn.execute(text("DELETE FROM queue_job"))
    yield repo
    if request.param == "sqlite":
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


def test_cancel_in_commits_with_the_callers_transaction(repo):
    store = JobStore(repo.engine)
    job = store.enqueue("t", {})
    with pytest.raises(RuntimeError):
        with repo.transaction() as tx:
            assert cancel_in(tx.session, job, "nope")
            raise RuntimeError("rolled back")
    assert store.get(job).status == "queued"
    with repo.transaction() as tx:
        tx.create({"resourceType": "Patient"})
        assert cancel_in(tx.session, job, "client cancelled")
    assert store.get(job).status == "cancelled" and store.get(job).last_error == "client cancelled"
    with repo.transaction() as tx:
        assert not cancel_in(tx.session, job)  # already final


def test_release_hands_a_job_back_without_counting_the_attempt(repo):
    store = JobStore(repo.engine)
    job = store.enqueue("t", {})
    store.claim("w1", ["t"])
    assert store.release(job, "w1")
    info = store.get(job)
    assert info.status == "queued" and info.attempts == 0
    [again] = store.claim("w2", ["t"])
    assert again.attempts == 1


def _run_worker(app, store, until, *, lease_s=None, timeout=10.0):
    async def main():
        worker = QueueWorker(app, store, poll_s=0.02)
        worker.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until():
            await asyncio.sleep(0.02)
        await worker.stop()

    asyncio.run(main())


def test_worker_lost_on_the_last_attempt_fails_the_job_and_calls_the_hook(repo):
    store = JobStore(repo.engine, lease_s=0.05)
    app = _app()
    hooked: list[tuple[dict, str]] = []
    ran: list[dict] = []

    async def handler(_app, payload):
        ran.append(payload)

    async def on_failed(_app, payload, reason):
        hooked.append((payload, reason))

    register_task(app, TaskDef("t", handler, max_attempts=1, on_failed=on_failed))
    job = store.enqueue("t", {"n": 1}, max_attempts=1)
    store.claim("dead-worker", ["t"])  # its only attempt; then kill -9
    time.sleep(0.1)
    _run_worker(app, store, lambda: store.get(job).status == "failed" and hooked)
    info = store.get(job)
    assert info.status == "failed" and "last allowed attempt" in info.last_error
    assert ran == []  # not run a second time beyond its budget
    assert hooked == [({"n": 1}, info.last_error)]


def test_job_failed_stores_its_result_and_exhausted_transients_call_the_hook(repo):
    store = JobStore(repo.engine)
    app = _app()
    hooked: list[str] = []

    async def refused(_app, payload):
        raise JobFailed("input refused", result={"http_status": 422})

    async def down(_app, payload):
        raise TransientError("still down", result={"http_status": 503})

    async def on_failed(_app, payload, reason):
        hooked.append(reason)

    register_task(app, TaskDef("refused", refused, on_failed=on_failed))
    register_task(app, TaskDef("down", down, max_attempts=3, backoff_s=0.01, on_failed=on_failed))
    a = store.enqueue("refused", {})
    b = store.enqueue("down", {}, max_attempts=3)
    _run_worker(app, store, lambda: {store.get(a).status, store.get(b).status} == {"failed"} and len(hooked) == 2)
    ja, jb = store.get(a), store.get(b)
    assert (ja.status, ja.attempts, ja.last_error, ja.result) == ("failed", 1, "input refused", {"http_status": 422})
    assert (jb.status, jb.attempts, jb.last_error, jb.result) == ("failed", 3, "still down", {"http_status": 503})
    assert sorted(hooked) == ["input refused", "still down"]


def test_graceful_stop_hands_running_jobs_back_at_once(repo):
    store = JobStore(repo.engine, lease_s=60)
    app = _app()
    started = threading.Event()

    async def slow(_app, payload):
        started.set()
        await asyncio.sleep(30)

    register_task(app, TaskDef("slow", slow))
    job = store.enqueue("slow", {})

    async def main():
        worker = QueueWorker(app, store, poll_s=0.02)
        worker.start()
        deadline = time.monotonic() + 10
        while not started.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await worker.stop(timeout=0.2)

    asyncio.run(main())
    info = store.get(job)
    assert info.status == "queued" and info.attempts == 0  # not waiting out a 60 s lease
    assert [j.id for j in store.claim("next", ["slow"])] == [job]


def test_cancel_from_elsewhere_stops_the_running_handler(repo):
    store = JobStore(repo.engine, lease_s=0.6)
    app = _app()
    state = {"cancelled": False, "started": False}

    async def slow(_app, payload):
        state["started"] = True
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise

    register_task(app, TaskDef("slow", slow))
    job = store.enqueue("slow", {})

    def until():
        if state["started"] and store.get(job).status == "running":
            store.cancel(job, "cancelled on another replica")  # what another process's DELETE does
        return state["cancelled"]

    _run_worker(app, store, until)
    assert state["cancelled"] and store.get(job).status == "cancelled"


@pytest.mark.postgres
def test_postgres_concurrent_claims_never_take_a_job_twice():
    if not os.environ.get("CXR_TEST_POSTGRES_URL"):
        pytest.skip("CXR_TEST_POSTGRES_URL not set")
    from pg_cluster import fresh_postgres_database

    with fresh_postgres_database("cxr_q") as db_url:
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
