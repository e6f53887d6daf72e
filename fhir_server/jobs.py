"""Asynchronous $analyze on the durable job queue: `Prefer: respond-async` -> 202 + Content-Location;
the job is a queue row plus the Task resource that tracks it, both in the database, so any replica
answers a poll or a cancel and a job survives the death of the process that accepted it.

    POST .../$analyze  + Prefer: respond-async
        -> 202 Accepted, Content-Location: [base]/_async/{job}, body: OperationOutcome (information)
    GET  [base]/_async/{job}
        -> 202 + X-Progress while queued or running; 200/201 + the result Bundle when done;
           the error's status + OperationOutcome when it failed; 404 once cancelled
    DELETE [base]/_async/{job}
        -> 202; the job is cancelled on whichever replica runs it (results not yet committed are
           rolled back: the result transaction re-checks the Task)
    GET  [base]/Task/{job}   (job id == Task id)
        status requested -> in-progress -> completed | failed | cancelled; output -> DiagnosticReport
        and the run's Provenance

The request is parsed and validated before the 202, so a bad request still gets its 4xx at once.
The Task and the queue row are written in ONE transaction (outbox): a 202 means the job is stored.
Any process running the queue (`cxr serve` by default, `cxr worker`) claims it; a worker killed
mid-job loses its lease and another one (or the restarted one) runs it again -- safe, because the
results are written in one transaction together with the Task's completion, and a re-run of a
completed job only reports what was stored. The result Bundle is not copied into the queue: the
poll rebuilds it from the stored versions the run's Provenance lists. Errors that may pass (an
image server or the database away) are retried with back-off, at most ANALYZE_ATTEMPTS times;
others fail the job and the Task at once, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fhir.resources.R4B.task import Task
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool

import mappings
from ml.errors import NotChestXRay
from fhir_server.audit import audit_context, background_trail
from fhir_server.errors import operation_outcome
from fhir_server.fhir.common import information_outcome
from fhir_server.fhir.negotiation import fhir_json_response
from fhir_server.queue import JobFailed, JobInfo, TaskDef, TransientError, cancel_in, enqueue_in, register_task, wake
from fhir_server.storage import Repository, StorageBusy, Transaction, VersionConflict

if TYPE_CHECKING:
    from fhir_server.fhir import operations

log = logging.getLogger(__name__)

Json = dict[str, Any]
# Task.code comes from mappings/operations.json, the table the server also publishes as
# CodeSystem/cxr-operations: a Task can carry no code that a client cannot look up.
TASK_CODE_SYSTEM = mappings.operations_code_system_url()
ANALYZE_CODE = mappings.operation_code("analyze")
ACTIVE = ("requested", "in-progress")
ANALYZE_TASK = "fhir.analyze"  # the queue's task name
ANALYZE_ATTEMPTS = 3
ANALYZE_CONCURRENCY = 4  # jobs one process runs at once; the inference pool batches and bounds them
TRANSIENT_HTTP = (502, 503, 504)  # an image server or PACS away, the database busy: worth a retry
CANCEL_REASON = "Cancelled by the client (DELETE on the polling URL)"

router = APIRouter(tags=["FHIR async"])


class JobCancelled(Exception):
    """Raised inside the result transaction when the client cancelled meanwhile: rolls it back."""


# ---------------------------------------------------------------------------------- Task


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _operations():
    # imported late: operations mounts this module's router when it is imported itself
    from fhir_server.fhir import operations

    return operations


def build_task(job_id: str, req: operations.AnalyzeRequest) -> Json:
    data: Json = {
        "resourceType": "Task",
        "id": job_id,
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{job_id}"}],
        "instantiatesCanonical": _operations().OPERATION_DEFINITIONS[f"{req.resource_type}-analyze"]["url"],
        "status": "requested",
        "intent": "order",
        "code": {
            "coding": [ANALYZE_CODE.coding()],
            "text": f"{req.resource_type}/$analyze",
        },
        "authoredOn": _now(),
        "lastModified": _now(),
        "businessStatus": {"text": "queued"},
        "input": [{"type": {"text": "heatmaps"}, "valueBoolean": req.heatmaps}],
    }
    if req.reference:
        data["focus"] = {"reference": req.reference}
    if req.resource.get("subject"):
        data["for"] = req.resource["subject"]
    return Task.model_validate(data).model_dump(mode="json")


def _task_changes(task: Json, **changes: Any) -> Json:
    updated = {k: v for k, v in task.items() if k != "meta"}
    updated.update(changes)
    updated["lastModified"] = _now()
    return Task.model_validate(updated).model_dump(mode="json")


def _period(task_start: str | None, end: bool = False) -> Json:
    period: Json = {"start": task_start or _now()}
    if end:
        period["end"] = _now()
    return period


# ---------------------------------------------------------------------------------- submitting


def _payload(job_id: str, req: operations.AnalyzeRequest) -> Json:
    # a stored input is referenced, not copied (it may hold a whole image inline); an inline
    # (type-level) input has nowhere else to live until the run stores it with the results
    payload: Json = {"job": job_id, "type": req.resource_type, "stored": req.stored, "heatmaps": req.heatmaps,
                     "base": req.base}
    if req.stored:
        payload["id"] = req.resource["id"]
    else:
        payload["resource"] = req.resource
    return payload


def _request_of(repo: Repository, payload: Json) -> operations.AnalyzeRequest:
    """The request again; a stored input is read now. ResourceNotFound/Gone when it was deleted."""
    resource = payload.get("resource")
    if payload["stored"]:
        resource = repo.read(payload["type"], payload["id"]).resource or {}
    return _operations().AnalyzeRequest(payload["type"], resource, payload["stored"], payload["heatmaps"],
                                        payload["base"])


def _store_job(repo: Repository, job_id: str, req: operations.AnalyzeRequest, audit: Json | None = None) -> None:
    payload = _payload(job_id, req)
    if audit:
        payload["audit"] = audit  # who asked, for the AuditEvent of the results (written by any replica)
    with repo.transaction() as tx:
        tx.create(build_task(job_id, req), resource_id=job_id)
        enqueue_in(tx.session, ANALYZE_TASK, payload, job_id=job_id, max_attempts=ANALYZE_ATTEMPTS)


async def submit(request: Request, req: operations.AnalyzeRequest) -> Response:
    """Store the Task and its queue row in one transaction, answer 202. `req` is already validated."""
    from fhir_server.storage import new_id

    from fhir_server.fhir.common import get_store

    app = request.app
    job_id = new_id()
    # the request's store is bound to its audit trail: the Task, its queue row and the AuditEvent
    # of the accepted request commit together
    await run_in_threadpool(_store_job, get_store(request), job_id, req, audit_context(request))
    wake(app)
    location = f"{req.base}/_async/{job_id}"
    body = information_outcome(f"Accepted: poll {location}; Task/{job_id} tracks the job.")
    return fhir_json_response(request, body, status_code=202, headers={"Content-Location": location})


# ---------------------------------------------------------------------------------- running


def _progress_map(app: Any) -> dict[str, str]:
    """What this process's runs are doing now (X-Progress); other replicas answer from the database."""
    progress = getattr(app.state, "job_progress", None)
    if progress is None:
        progress = app.state.job_progress = {}
    return progress


def _provenance_id(bundle: Json) -> str:
    return next(e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Provenance")


def _start(repo: Repository, job_id: str) -> Json | None:
    """Mark the Task in progress; None when there is nothing to run (deleted, or already final)."""
    with repo.transaction() as tx:
        current = tx.read_or_none("Task", job_id)
        if current is None or current.resource is None:
            return None
        task = current.resource
        if task.get("status") not in ACTIVE:
            return task
        started = (task.get("executionPeriod") or {}).get("start") or _now()
        tx.update("Task", job_id, _task_changes(task, status="in-progress", businessStatus={"text": "in progress"},
                                                 executionPeriod={"start": started}))
        return {**task, "status": "in-progress", "executionPeriod": {"start": started}}


def _completed_result(task: Json) -> Json | None:
    """The job's result from a completed Task (a re-run after a crash between commit and ack)."""
    for out in task.get("output") or []:
        ref = (out.get("valueReference") or {}).get("reference", "")
        if ref.startswith("Provenance/"):
            return {"provenance": ref.split("/", 1)[1]}
    return None


async def run_job(app: Any, payload: Json) -> Json | None:
    """The queue handler of an async $analyze (idempotent: safe to run again after a crash)."""
    repo: Repository = app.state.store
    job_id = payload["job"]
    try:
        task = await run_in_threadpool(_start, repo, job_id)
    except (VersionConflict, StorageBusy) as exc:  # e.g. a cancel on another replica moved the Task
        raise TransientError(f"{exc}") from exc
    if task is None:
        reason = f"Task/{job_id} was deleted before the job ran"
        raise JobFailed(reason, result={"http_status": 410, "outcome": operation_outcome(410, "deleted", reason)})
    if task.get("status") == "completed":
        return _completed_result(task)
    if task.get("status") not in ACTIVE:  # cancelled or failed meanwhile
        return None
    started = task["executionPeriod"]["start"]
    progress = _progress_map(app)
    progress[job_id] = "queued"

    def note(message: str) -> None:
        progress[job_id] = message

    def complete_in_same_transaction(tx: Transaction, outcome: operations.AnalyzeOutcome) -> None:
        current = tx.read_or_none("Task", job_id)
        if current is None or current.resource is None or current.resource.get("status") not in ACTIVE:
            raise JobCancelled()  # cancelled (maybe on another replica) while analysing: roll back
        tx.update("Task", job_id, _task_changes(
            current.resource,
            status="completed",
            businessStatus={"text": "completed"},
            focus={"reference": outcome.input_reference},
            executionPeriod=_period(started, end=True),
            output=[
                {"type": {"text": "DiagnosticReport"}, "valueReference": {"reference": outcome.report.reference}},
                {"type": {"text": "Provenance"},
                 "valueReference": {"reference": f"Provenance/{_provenance_id(outcome.bundle)}"}},
            ],
        ))

    try:
        req = await run_in_threadpool(_request_of, repo, payload)
        outcome = await _operations().run_analysis(
            app, req, progress=note, after_write=complete_in_same_transaction, wait_when_busy=True,
            # the results get their own AuditEvent (same client and address), written with them
            repo=repo.with_hooks(background_trail(payload.get("audit"), "$analyze (asynchronous result)")),
        )
    except JobCancelled:
        return None
    except (OperationalError, InterfaceError, TransientError):
        raise  # the queue retries these with back-off
    except (VersionConflict, StorageBusy) as exc:  # a concurrent re-analysis of the same input won
        raise TransientError(f"{exc}") from exc
    except Exception as exc:
        mapped = _operations().error_outcome(exc)
        if mapped is None:
            log.exception("async $analyze job %s failed unexpectedly", job_id)
            mapped = (500, operation_outcome(500, "exception", "Internal server error; the incident was logged."))
        reason = "; ".join(i.get("diagnostics", "") for i in mapped[1].get("issue", [])) or "failed"
        result = {"http_status": mapped[0], "outcome": mapped[1]}
        if mapped[0] in TRANSIENT_HTTP:
            raise TransientError(reason, result=result) from exc
        if isinstance(exc, NotChestXRay):  # refused by the image gate: `rejected`, as a synchronous refusal is
            await run_in_threadpool(_finish_task, repo, job_id, "rejected", reason)
        raise JobFailed(reason, result=result) from exc
    finally:
        progress.pop(job_id, None)
    return {"http_status": outcome.status_code, "provenance": _provenance_id(outcome.bundle)}


async def _job_failed(app: Any, payload: Json, reason: str) -> None:
    """The queue gave up on the job: the Task says so, with the reason."""
    await run_in_threadpool(_finish_task, app.state.store, payload["job"], "failed", reason)


def _finish_task(repo: Repository, job_id: str, status: str, reason: str) -> bool:
    """Move an active Task to a final status; False when it was already final (or is gone)."""
    for attempt in range(3):
        try:
            with repo.transaction() as tx:
                current = tx.read_or_none("Task", job_id)
                if current is None or current.resource is None or current.resource.get("status") not in ACTIVE:
                    return False
                started = (current.resource.get("executionPeriod") or {}).get("start")
                tx.update("Task", job_id, _task_changes(
                    current.resource, status=status, businessStatus={"text": status},
                    statusReason={"text": reason}, executionPeriod=_period(started, end=True),
                ))
                if status == "cancelled":
                    cancel_in(tx.session, job_id, reason)
                return True
        except VersionConflict:  # the worker moved the Task meanwhile: look again
            if attempt == 2:
                raise
    return False


ANALYZE_TASK_DEF = TaskDef(
    ANALYZE_TASK, run_job, max_attempts=ANALYZE_ATTEMPTS, backoff_s=2.0, backoff_max_s=30.0,
    concurrency=ANALYZE_CONCURRENCY, on_failed=_job_failed,
)


# ---------------------------------------------------------------------------------- polling


def _rebuild_bundle(repo: Repository, job: JobInfo) -> Json:
    """The result Bundle as the run returned it, from the stored versions its Provenance lists."""
    result = job.result or {}
    base = job.payload.get("base", "")
    with repo.transaction(write=False) as tx:
        provenance = tx.read("Provenance", result["provenance"])
        resource = provenance.resource or {}
        written = []
        for target in resource.get("target", []):
            rtype, rid, _, version = target["reference"].split("/")
            written.append(tx.vread(rtype, rid, version))
        device_type, device_id = resource["agent"][0]["who"]["reference"].split("/")
        ordered = [*written, tx.read(device_type, device_id), provenance]
        if not job.payload.get("stored"):  # type level: the input was stored by the run too
            input_type, input_id = resource["entity"][0]["what"]["reference"].split("/")[:2]
            ordered.append(tx.read(input_type, input_id))
    report = written[0]
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": report.last_updated_instant,
        "entry": [{"fullUrl": f"{base}/{s.reference}", "resource": s.resource} for s in ordered],
    }
    return bundle


async def _job(request: Request, job_id: str) -> JobInfo | None:
    queue = getattr(request.app.state, "queue", None)
    if queue is None:
        return None
    job = await run_in_threadpool(queue.get, job_id)
    return job if job is not None and job.task == ANALYZE_TASK else None


@router.get("/_async/{job_id}", summary="Poll an asynchronous $analyze")
async def poll(job_id: str, request: Request) -> Response:
    job = await _job(request, job_id)
    if job is None or job.status == "cancelled":
        return await _unknown_job(request, job_id)
    if job.status in ("queued", "running"):
        progress = _progress_map(request.app).get(job_id) or (
            "queued" if job.status == "queued" else f"in progress (attempt {job.attempts} of {job.max_attempts})"
        )
        if job.status == "queued" and job.attempts:
            progress = f"waiting to retry after: {job.last_error}"
        return fhir_json_response(
            request,
            information_outcome(f"Job {job_id} is {job.status}: {progress}"),
            status_code=202,
            headers={"X-Progress": progress, "Retry-After": "1"},
        )
    if job.status == "failed":
        # the queue's failure hook may still be on its way: the Task must not say otherwise meanwhile
        await run_in_threadpool(_finish_task, request.app.state.store, job_id, "failed", job.last_error or "failed")
        if job.result and "outcome" in job.result:
            return fhir_json_response(request, job.result["outcome"], status_code=job.result["http_status"])
        body = operation_outcome(500, "exception", f"The job failed: {job.last_error or 'unknown error'}")
        return fhir_json_response(request, body, status_code=500)
    if not job.result or "provenance" not in job.result:  # done without a result: its Task was gone
        return await _unknown_job(request, job_id)
    bundle = await run_in_threadpool(_rebuild_bundle, request.app.state.store, job)
    return fhir_json_response(request, bundle, status_code=200)  # the poll succeeded; the report's own 201/200 is history


@router.delete("/_async/{job_id}", summary="Cancel an asynchronous $analyze")
async def cancel(job_id: str, request: Request) -> Response:
    app = request.app
    job = await _job(request, job_id)
    if job is None:
        return await _unknown_job(request, job_id)
    cancelled = await run_in_threadpool(_finish_task, app.state.store, job_id, "cancelled", CANCEL_REASON)
    if not cancelled and job.status in ("queued", "running"):  # its Task is gone or final: stop the row too
        await run_in_threadpool(app.state.queue.cancel, job_id, CANCEL_REASON)
    worker = getattr(app.state, "queue_worker", None)
    if worker is not None:
        worker.cancel_local(job_id)  # another replica's run stops at its next lease renewal
    message = f"Job {job_id} cancelled" if cancelled else f"Job {job_id} had already finished ({job.status})"
    return fhir_json_response(request, information_outcome(message), status_code=202)


async def _unknown_job(request: Request, job_id: str) -> Response:
    repo: Repository | None = getattr(request.app.state, "store", None)
    hint = ""
    if repo is not None:
        try:
            task = await run_in_threadpool(repo.read, "Task", job_id)
            hint = f" Task/{job_id} is {task.resource.get('status')}." if task.resource else ""
        except Exception:  # unknown id or invalid: the plain 404 below is the answer
            hint = ""
    body = operation_outcome(404, "not-found", f"No job {job_id} on this server (or it was cancelled).{hint}")
    return fhir_json_response(request, body, status_code=404)


# ---------------------------------------------------------------------------------- lifespan


def reconcile_tasks(repo: Repository) -> int:
    """Tasks still requested/in-progress whose job cannot run any more (no queue row: written by a
    release without the queue; or a row already failed/cancelled whose Task update was lost) are
    finished like their row, so no client waits forever. Tasks with a live row are left alone:
    the queue resumes them. Returns how many Tasks were finished."""
    from sqlmodel import select

    from fhir_server.queue.tables import QueueJob

    count, seen = 0, set()
    while True:
        fixes: list[tuple[str, str, str]] = []
        with repo.transaction(write=False) as tx:
            found = tx.search_params(
                "Task", [("status", ",".join(ACTIVE)), ("code", f"{ANALYZE_CODE.system}|{ANALYZE_CODE.code}"),
                         ("_count", "100")]
            ).matches
            ids = [s.id for s in found if s.id not in seen]
            rows = {r.id: r for r in tx.session.execute(select(QueueJob).where(QueueJob.id.in_(ids))).scalars()}
        for task_id in ids:
            seen.add(task_id)
            row = rows.get(task_id)
            if row is None:
                fixes.append((task_id, "failed", "The server restarted before this job was queued; run $analyze again."))
            elif row.status == "failed":
                fixes.append((task_id, "failed", row.last_error or "failed"))
            elif row.status == "cancelled":
                fixes.append((task_id, "cancelled", row.last_error or CANCEL_REASON))
        for task_id, status, reason in fixes:
            count += _finish_task(repo, task_id, status, reason)
        if not ids:
            return count


@asynccontextmanager
async def lifespan_hook(app: Any) -> AsyncIterator[None]:
    """Register in app.LIFESPAN_HOOKS after the store and queue hooks: registers the $analyze
    task with the queue when a model is loaded (whose worker then resumes jobs left by a dead or restarted process),
    finishes Tasks no job can complete, and seeds the OperationDefinitions."""
    repo: Repository = app.state.store
    if getattr(app.state, "analyzer", None) is not None:
        # only a process with a model claims $analyze jobs; without one they wait for one that has
        register_task(app, ANALYZE_TASK_DEF)
    finished = await run_in_threadpool(reconcile_tasks, repo)
    if finished:
        log.warning("finished %d $analyze Task(s) that no queued job could complete", finished)
    await run_in_threadpool(_operations().seed_definitions, repo)
    wake(app)
    yield


