"""Prefer: respond-async: 202 + Content-Location, polling (202 + X-Progress, then 200 / error),
DELETE cancels, and the Task resource that tracks the same job; restart recovery. The app tests
run on SQLite and on PostgreSQL (a fresh database each) when CXR_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import threading

import pytest
from analyze_support import by_type, make_client, media, outcome, total, wait_until
from fhir_support import BACKENDS
from model_fixtures import tiny_analyzer
from pg_cluster import fresh_postgres_database

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture(params=BACKENDS)
def db(request):
    """Settings overrides naming the database: the SQLite default or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield {}
    else:
        with fresh_postgres_database("cxr_async") as url:
            yield {"database_url": url}


@pytest.fixture
def client(tmp_path, db):
    with make_client(tmp_path, **db) as c:
        yield c


def create_media(client, **extra) -> str:
    response = client.post("/fhir/Media", json=media(**extra))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def poll_until_done(client, url: str):
    def finished():
        r = client.get(url)
        return r if r.status_code != 202 else None

    return wait_until(finished)


def test_async_analyze_completes_and_task_tracks_it(client) -> None:
    media_id = create_media(client)
    response = client.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC)
    assert response.status_code == 202, response.text
    location = response.headers["content-location"]
    assert "/fhir/_async/" in location
    job_id = location.rsplit("/", 1)[1]
    task = client.get(f"/fhir/Task/{job_id}").json()
    assert task["intent"] == "order" and task["status"] in ("requested", "in-progress", "completed")
    assert task["focus"] == {"reference": f"Media/{media_id}"}

    done = poll_until_done(client, location)
    assert done.status_code == 200, done.text
    report = by_type(done.json())["DiagnosticReport"][0]
    task = client.get(f"/fhir/Task/{job_id}").json()
    assert task["status"] == "completed"
    assert task["output"][0]["valueReference"] == {"reference": f"DiagnosticReport/{report['id']}"}
    assert task["code"]["coding"][0]["code"] == "analyze"
    assert total(client, "Task?status=completed") == 1
    history = client.get(f"/fhir/Task/{job_id}/_history").json()
    assert history["total"] >= 3  # requested -> in-progress -> completed, each a version


def test_async_failure_reports_the_error_and_fails_the_task(client) -> None:
    media_id = create_media(client, content={"url": "https://not-allowed.example.com/x.png"})
    response = client.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC)
    assert response.status_code == 202
    location = response.headers["content-location"]
    done = poll_until_done(client, location)
    assert done.status_code == 403
    assert "allowlist" in outcome(done)["diagnostics"]
    task = client.get(f"/fhir/Task/{location.rsplit('/', 1)[1]}").json()
    assert task["status"] == "failed" and "allowlist" in task["statusReason"]["text"]


def test_bad_request_is_refused_before_any_job_is_started(client) -> None:
    response = client.post("/fhir/Media/$analyze", json={"resourceType": "Parameters", "parameter": []}, headers=ASYNC)
    assert response.status_code == 400
    assert total(client, "Task") == 0


class BlockingAnalyzer:
    """The tiny analyzer, held in analyze_bytes until released: lets a test see a running job."""

    def __init__(self) -> None:
        self.inner = tiny_analyzer()
        self.started = threading.Event()
        self.release = threading.Event()

    @property
    def ready(self) -> bool:
        return True

    @property
    def model_info(self):
        return self.inner.model_info

    def analyze_bytes(self, data, **kw):
        self.started.set()
        self.release.wait(30)
        return self.inner.analyze_bytes(data, **kw)


def test_running_job_reports_progress_and_delete_cancels_it(tmp_path, db) -> None:
    analyzer = BlockingAnalyzer()
    with make_client(tmp_path, **db, analyzer=analyzer) as client:
        media_id = create_media(client)
        location = client.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC).headers["content-location"]
        job_id = location.rsplit("/", 1)[1]
        assert analyzer.started.wait(10)
        running = client.get(location)
        assert running.status_code == 202 and running.headers["x-progress"] == "analysing"
        assert client.get(f"/fhir/Task/{job_id}").json()["status"] == "in-progress"

        assert client.delete(location).status_code == 202
        analyzer.release.set()
        assert client.get(location).status_code == 404
        task = client.get(f"/fhir/Task/{job_id}").json()
        assert task["status"] == "cancelled"
        assert total(client, "DiagnosticReport") == 0


def test_unknown_job_is_404(client) -> None:
    response = client.get("/fhir/_async/does-not-exist")
    assert response.status_code == 404 and outcome(response)["code"] == "not-found"


def test_reconcile_finishes_only_tasks_no_job_can_complete(tmp_path) -> None:
    from fhir_server import jobs
    from fhir_server.queue import JobStore, enqueue_in
    from fhir_server.storage import Repository

    repo = Repository.from_url(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    try:
        store = JobStore(repo.engine)
        base = {"resourceType": "Task", "intent": "order",
                "code": {"coding": [{"system": jobs.TASK_CODE_SYSTEM, "code": "analyze"}]}}
        # t0: no queue row (an older release); t1: a live row (resumed, left alone);
        # t2: row failed but the Task update was lost; t3: already completed
        for i, status in enumerate(("requested", "in-progress", "in-progress", "completed")):
            repo.update("Task", f"t{i}", {**base, "id": f"t{i}", "status": status})
        with repo.transaction() as tx:
            enqueue_in(tx.session, jobs.ANALYZE_TASK, {"job": "t1"}, job_id="t1")
            enqueue_in(tx.session, jobs.ANALYZE_TASK, {"job": "t2"}, job_id="t2")
        [claimed] = store.claim("w", [jobs.ANALYZE_TASK], limit=1) or [None]
        store.fail(claimed.id, "w", "image server refused", retry_in_s=None)
        live = "t1" if claimed.id == "t2" else "t2"
        assert jobs.reconcile_tasks(repo) == 2
        status = {i: repo.read("Task", i).resource["status"] for i in ("t0", "t1", "t2", "t3")}
        assert status["t0"] == "failed" and status[claimed.id] == "failed"
        assert status[live] == "in-progress" and status["t3"] == "completed"
        assert "restarted" in repo.read("Task", "t0").resource["statusReason"]["text"]
        assert repo.read("Task", claimed.id).resource["statusReason"]["text"] == "image server refused"
        assert jobs.reconcile_tasks(repo) == 0
    finally:
        repo.dispose()


def test_lifespan_hook_registers_the_task_and_seeds_definitions(tmp_path) -> None:
    import asyncio
    from types import SimpleNamespace

    from fhir_server import jobs
    from fhir_server.fhir import operations
    from fhir_server.queue import registry
    from fhir_server.storage import Repository

    repo = Repository.from_url(f"sqlite:///{tmp_path / 'h.sqlite3'}")
    try:
        repo.update("Task", "stale", {"resourceType": "Task", "id": "stale", "status": "in-progress", "intent": "order",
                                      "code": {"coding": [{"system": jobs.TASK_CODE_SYSTEM, "code": "analyze"}]}})
        app = SimpleNamespace(state=SimpleNamespace(store=repo, analyzer=object()))

        async def start_and_stop() -> None:
            async with jobs.lifespan_hook(app):
                assert registry(app)[jobs.ANALYZE_TASK] is jobs.ANALYZE_TASK_DEF

        asyncio.run(start_and_stop())
        assert repo.read("Task", "stale").resource["status"] == "failed"  # it had no queue row
        for od_id, definition in operations.OPERATION_DEFINITIONS.items():
            assert repo.read("OperationDefinition", od_id).resource["url"] == definition["url"]
        asyncio.run(start_and_stop())  # seeding again writes no new version when nothing changed
        assert repo.read("OperationDefinition", "Media-analyze").version_id == 1
    finally:
        repo.dispose()


def test_no_model_loaded_is_503_before_any_job(tmp_path, db) -> None:
    with make_client(tmp_path, **db) as client:
        client.app.state.analyzer = None  # as after a failed model load
        client.app.state.model_error = "Model 'cxr:no-such-model' could not be loaded"
        media_id = create_media(client)
        response = client.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC)
        assert response.status_code == 503 and "no-such-model" in outcome(response)["diagnostics"]
        assert total(client, "Task") == 0


# ---- durable jobs: any replica answers, a dead process's job is resumed (issue 13) -------------


def test_poll_rebuilds_exactly_the_stored_versions(client) -> None:
    media_id = create_media(client)
    location = client.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC).headers["content-location"]
    bundle = poll_until_done(client, location).json()
    for entry in bundle["entry"]:
        res = entry["resource"]
        stored = client.get(f"/fhir/{res['resourceType']}/{res['id']}/_history/{res['meta']['versionId']}",
                            headers={"Accept": "application/fhir+json"}).json()
        assert stored == res and entry["fullUrl"].endswith(f"/fhir/{res['resourceType']}/{res['id']}")
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds[0] == "DiagnosticReport" and kinds[-2:] == ["Device", "Provenance"]
    assert client.get(location).json() == bundle  # polling again answers the same


def test_type_level_job_returns_its_stored_input(client) -> None:
    location = client.post("/fhir/Media/$analyze", json=media(identifier=[{"system": "urn:x", "value": "m1"}]),
                           headers=ASYNC).headers["content-location"]
    bundle = poll_until_done(client, location).json()
    assert [e["resource"]["resourceType"] for e in bundle["entry"]][-1] == "Media"
    assert bundle["entry"][-1]["resource"]["identifier"] == [{"system": "urn:x", "value": "m1"}]


def test_job_accepted_by_a_process_that_dies_is_finished_after_restart(tmp_path, db) -> None:
    """An API-only process accepts (202) and is gone; the next process resumes the queued job."""
    with make_client(tmp_path, **db, queue_worker=False) as api:
        media_id = create_media(api)
        location = api.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC).headers["content-location"]
        assert api.get(location).headers["x-progress"] == "queued"
    with make_client(tmp_path, **db) as restarted:
        done = poll_until_done(restarted, location)
        assert done.status_code == 200
        job_id = location.rsplit("/", 1)[1]
        assert restarted.get(f"/fhir/Task/{job_id}").json()["status"] == "completed"


def test_cancel_on_another_replica_stops_the_run(tmp_path, db) -> None:
    analyzer = BlockingAnalyzer()
    with make_client(tmp_path, **db, queue_worker=False) as api, \
            make_client(tmp_path, **db, analyzer=analyzer, queue_lease_s=0.6, queue_poll_s=0.05) as worker:
        media_id = create_media(api)
        location = api.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC).headers["content-location"]
        job_id = location.rsplit("/", 1)[1]
        assert analyzer.started.wait(20)  # running in the other process
        running = api.get(location)
        assert running.status_code == 202 and running.headers["x-progress"].startswith("in progress")
        assert api.delete(location).status_code == 202  # on the replica that does NOT run it
        wait_until(lambda: worker.app.state.queue_worker.running_jobs() == [])  # the run stopped
        analyzer.release.set()
        assert api.get(location).status_code == 404 and worker.get(location).status_code == 404
        assert worker.get(f"/fhir/Task/{job_id}").json()["status"] == "cancelled"
        assert total(api, "DiagnosticReport") == 0


def test_transient_errors_are_retried_a_bounded_number_of_times(tmp_path, monkeypatch, db) -> None:
    import dataclasses

    import httpx
    import respx
    from analyze_support import HOST

    from fhir_server import jobs

    monkeypatch.setattr(jobs, "ANALYZE_TASK_DEF", dataclasses.replace(jobs.ANALYZE_TASK_DEF, backoff_s=0.05))
    url = f"https://{HOST}/wado/down.png"
    with make_client(tmp_path, **db, queue_poll_s=0.05) as client, respx.mock:
        route = respx.get(url).mock(return_value=httpx.Response(503))
        media_id = create_media(client, content={"contentType": "image/png", "url": url})
        location = client.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC).headers["content-location"]
        done = poll_until_done(client, location)
        assert done.status_code == 502 and "503" in outcome(done)["diagnostics"]
        assert route.call_count == jobs.ANALYZE_ATTEMPTS  # retried, then given up: not forever
        task = client.get(f"/fhir/Task/{location.rsplit('/', 1)[1]}").json()
        assert task["status"] == "failed" and "503" in task["statusReason"]["text"]


def test_job_whose_task_was_deleted_fails_with_410(tmp_path, db) -> None:
    with make_client(tmp_path, **db, queue_worker=False) as api:
        media_id = create_media(api)
        location = api.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC).headers["content-location"]
        assert api.delete(f"/fhir/Task/{location.rsplit('/', 1)[1]}").status_code in (200, 204)
    with make_client(tmp_path, **db) as worker:
        done = poll_until_done(worker, location)
        assert done.status_code == 410 and "deleted" in outcome(done)["diagnostics"]
        assert total(worker, "DiagnosticReport") == 0


def test_job_whose_input_was_deleted_meanwhile_fails_with_the_reason(tmp_path, db) -> None:
    with make_client(tmp_path, **db, queue_worker=False) as api:
        media_id = create_media(api)
        location = api.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC).headers["content-location"]
        assert api.delete(f"/fhir/Media/{media_id}").status_code in (200, 204)
    with make_client(tmp_path, **db) as worker:
        done = poll_until_done(worker, location)
        assert done.status_code == 410 and media_id in outcome(done)["diagnostics"]
        task = worker.get(f"/fhir/Task/{location.rsplit('/', 1)[1]}").json()
        assert task["status"] == "failed" and media_id in task["statusReason"]["text"]


def test_async_refusal_by_the_gate_rejects_the_task(tmp_path) -> None:
    """A film the image gate refuses is `rejected` (as a synchronous refusal's Task is), not `failed`."""
    from model_fixtures import RefusingGate, tiny_model

    analyzer = tiny_analyzer(tiny_model(ood_gate=RefusingGate()))
    with make_client(tmp_path, analyzer=analyzer) as client:
        media_id = create_media(client)
        response = client.post(f"/fhir/Media/{media_id}/$analyze", headers=ASYNC)
        assert response.status_code == 202
        location = response.headers["content-location"]
        done = poll_until_done(client, location)
        assert done.status_code == 422
        task = client.get(f"/fhir/Task/{location.rsplit('/', 1)[1]}").json()
        assert task["status"] == "rejected" and RefusingGate.reason.split(":")[0] in task["statusReason"]["text"]
    analyzer.close()
