"""Asynchronous $analyze: `Prefer: respond-async` -> 202 + Content-Location, polled to the result,
and a Task resource that tracks the same job in the repository.

    POST .../$analyze  + Prefer: respond-async
        -> 202 Accepted, Content-Location: [base]/_async/{job}, body: OperationOutcome (information)
    GET  [base]/_async/{job}
        -> 202 + X-Progress while running; 200 + the result Bundle when done;
           the error's status + OperationOutcome when it failed
    DELETE [base]/_async/{job}
        -> 202; the job is cancelled (its results are rolled back if it was already writing)
    GET  [base]/Task/{job}   (job id == Task id)
        status requested -> in-progress -> completed | failed | cancelled; output -> DiagnosticReport

The request is parsed and validated before the 202, so a bad request still gets its 4xx at once.
The job runs as an asyncio task on the event loop; its inference goes through app.state.inference
like a synchronous call. Jobs live in memory only (finished ones for FINISHED_TTL_S); their Task
lives in the database. A restart therefore loses running jobs: `lifespan_hook` marks every Task
still requested/in-progress as failed at startup, so no client waits forever on a dead job. The
Task's completion is written in the same transaction as the results, so the two never disagree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fhir.resources.R4B.task import Task
from starlette.concurrency import run_in_threadpool

import mappings
from fhir_server.errors import operation_outcome
from fhir_server.fhir.common import information_outcome
from fhir_server.fhir.negotiation import fhir_json_response
from fhir_server.storage import Repository, Transaction

if TYPE_CHECKING:
    from fhir_server.fhir import operations

log = logging.getLogger(__name__)

Json = dict[str, Any]
# Task.code comes from mappings/operations.json, the table the server also publishes as
# CodeSystem/cxr-operations: a Task can carry no code that a client cannot look up.
TASK_CODE_SYSTEM = mappings.operations_code_system_url()
ANALYZE_CODE = mappings.operation_code("analyze")
FINISHED_TTL_S = 3600.0
MAX_FINISHED_JOBS = 500
ACTIVE = ("requested", "in-progress")

router = APIRouter(tags=["FHIR async"])


class JobCancelled(Exception):
    """Raised inside the result transaction when the client cancelled meanwhile: rolls it back."""


@dataclass
class Job:
    id: str
    base: str
    status: str = "requested"  # Task.status vocabulary
    progress: str = "queued"
    cancel_requested: bool = False
    cancel_reason: str = "Cancelled by the client (DELETE on the polling URL)"
    finished_at: float | None = None
    result_status: int | None = None
    result_body: Json | None = None
    handle: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finished_at is not None


class JobManager:
    """In-memory registry of this process's jobs (one per app, on app.state.jobs)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def add(self, job: Job) -> None:
        self._prune()
        self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        self._prune()
        return self._jobs.get(job_id)

    def remove(self, job_id: str) -> Job | None:
        return self._jobs.pop(job_id, None)

    def running(self) -> list[Job]:
        return [j for j in self._jobs.values() if not j.done]

    def _prune(self) -> None:
        now = time.monotonic()
        finished = sorted((j for j in self._jobs.values() if j.done), key=lambda j: j.finished_at or 0)
        for job in finished:
            if now - (job.finished_at or now) > FINISHED_TTL_S or len(self._jobs) > MAX_FINISHED_JOBS:
                self._jobs.pop(job.id, None)


def get_manager(app: Any) -> JobManager:
    manager = getattr(app.state, "jobs", None)
    if manager is None:  # the lifespan hook normally creates it; be usable without it
        manager = app.state.jobs = JobManager()
    return manager


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


def _update_task(repo: Repository, job_id: str, **changes: Any) -> None:
    with repo.transaction() as tx:
        _update_task_in(tx, job_id, **changes)


def _update_task_in(tx: Transaction, job_id: str, **changes: Any) -> None:
    current = tx.read_or_none("Task", job_id)
    if current is None or current.resource is None:
        return  # deleted by a client: nothing to track any more
    tx.update("Task", job_id, _task_changes(current.resource, **changes))


def _period(task_start: str | None, end: bool = False) -> Json:
    period: Json = {"start": task_start or _now()}
    if end:
        period["end"] = _now()
    return period


# ---------------------------------------------------------------------------------- running


async def submit(request: Request, req: operations.AnalyzeRequest) -> Response:
    """Create the Task, start the job, answer 202. `req` is already validated."""
    from fhir_server.storage import new_id

    from fhir_server.fhir.common import get_store

    app = request.app
    repo: Repository = get_store(request)  # bound to the request's audit trail: the Task and its AuditEvent commit together
    job_id = new_id()
    await run_in_threadpool(repo.create, build_task(job_id, req), resource_id=job_id)
    job = Job(job_id, req.base)
    get_manager(app).add(job)
    trail = getattr(request.state, "audit", None)  # the results get their own AuditEvent, written with them
    job_trail = trail.for_background("$analyze (asynchronous result)") if trail is not None else None
    job.handle = asyncio.create_task(_run(app, job, req, job_trail), name=f"analyze-{job_id}")
    location = f"{req.base}/_async/{job_id}"
    body = information_outcome(f"Accepted: poll {location}; Task/{job_id} tracks the job.")
    return fhir_json_response(request, body, status_code=202, headers={"Content-Location": location})


async def _run(app: Any, job: Job, req: operations.AnalyzeRequest, audit_trail: Any = None) -> None:
    repo: Repository = app.state.store
    started = _now()

    def progress(message: str) -> None:
        job.progress = message

    def complete_in_same_transaction(tx: Transaction, outcome: operations.AnalyzeOutcome) -> None:
        if job.cancel_requested:
            raise JobCancelled()
        _update_task_in(
            tx,
            job.id,
            status="completed",
            businessStatus={"text": "completed"},
            focus={"reference": outcome.input_reference},
            executionPeriod=_period(started, end=True),
            output=[
                {"type": {"text": "DiagnosticReport"}, "valueReference": {"reference": outcome.report.reference}}
            ],
        )

    try:
        job.status = "in-progress"
        await run_in_threadpool(
            _update_task, repo, job.id, status="in-progress", businessStatus={"text": "in progress"},
            executionPeriod=_period(started),
        )
        outcome = await _operations().run_analysis(
            app, req, progress=progress, after_write=complete_in_same_transaction, wait_when_busy=True,
            repo=repo.with_hooks(audit_trail) if audit_trail is not None else None,
        )
        job.result_status, job.result_body, job.status = 200, outcome.bundle, "completed"
    except (asyncio.CancelledError, JobCancelled):
        job.status = "cancelled" if job.cancel_requested else "failed"
        try:
            await asyncio.shield(
                run_in_threadpool(
                    _update_task, repo, job.id, status=job.status, businessStatus={"text": job.status},
                    statusReason={"text": job.cancel_reason}, executionPeriod=_period(started, end=True),
                )
            )
        except Exception:  # shutting down: the next startup fails the Task instead
            log.warning("could not record the end of job %s", job.id)
    except Exception as exc:
        mapped = _operations().error_outcome(exc)
        if mapped is None:
            log.exception("async $analyze job %s failed unexpectedly", job.id)
            mapped = (500, operation_outcome(500, "exception", "Internal server error; the incident was logged."))
        job.result_status, job.result_body, job.status = mapped[0], mapped[1], "failed"
        reason = "; ".join(i.get("diagnostics", "") for i in mapped[1].get("issue", []))
        try:
            await run_in_threadpool(
                _update_task, repo, job.id, status="failed",
                businessStatus={"text": f"failed (HTTP {mapped[0]})"},
                statusReason={"text": reason or "failed"},
                executionPeriod=_period(started, end=True),
            )
        except Exception:  # the job's own answer is still correct; the Task update is best effort
            log.exception("could not mark Task/%s failed", job.id)
    finally:
        job.finished_at = time.monotonic()


# ---------------------------------------------------------------------------------- polling


@router.get("/_async/{job_id}", summary="Poll an asynchronous $analyze")
async def poll(job_id: str, request: Request) -> Response:
    job = get_manager(request.app).get(job_id)
    if job is None:
        return await _unknown_job(request, job_id)
    if not job.done:
        return fhir_json_response(
            request,
            information_outcome(f"Job {job_id} is {job.status}: {job.progress}"),
            status_code=202,
            headers={"X-Progress": job.progress, "Retry-After": "1"},
        )
    if job.status == "cancelled":
        return await _unknown_job(request, job_id)
    return fhir_json_response(request, job.result_body, status_code=job.result_status or 500)


@router.delete("/_async/{job_id}", summary="Cancel an asynchronous $analyze")
async def cancel(job_id: str, request: Request) -> Response:
    manager = get_manager(request.app)
    job = manager.get(job_id)
    if job is None:
        return await _unknown_job(request, job_id)
    job.cancel_requested = True
    if job.handle is not None and not job.done:
        job.handle.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(job.handle), timeout=5)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            pass
    manager.remove(job_id)
    return fhir_json_response(request, information_outcome(f"Job {job_id} cancelled"), status_code=202)


async def _unknown_job(request: Request, job_id: str) -> Response:
    repo: Repository | None = getattr(request.app.state, "store", None)
    hint = ""
    if repo is not None:
        try:
            task = await run_in_threadpool(repo.read, "Task", job_id)
            hint = f" Task/{job_id} is {task.resource.get('status')}." if task.resource else ""
        except Exception:  # unknown id or invalid: the plain 404 below is the answer
            hint = ""
    body = operation_outcome(
        404, "not-found",
        f"No job {job_id} on this server (finished jobs are kept {FINISHED_TTL_S:g} s, none survive a restart).{hint}",
    )
    return fhir_json_response(request, body, status_code=404)


# ---------------------------------------------------------------------------------- lifespan


def fail_interrupted_tasks(repo: Repository) -> int:
    """Tasks left requested/in-progress by a previous process can never finish: mark them failed."""
    count = 0
    while True:
        with repo.transaction() as tx:
            found = tx.search_params(
                "Task", [("status", ",".join(ACTIVE)), ("code", f"{ANALYZE_CODE.system}|{ANALYZE_CODE.code}"), ("_count", "100")]
            ).matches
            for stored in found:
                if stored.resource is None:
                    continue
                tx.update(
                    "Task",
                    stored.id,
                    _task_changes(
                        stored.resource,
                        status="failed",
                        businessStatus={"text": "interrupted"},
                        statusReason={"text": "The server restarted before this job finished; run $analyze again."},
                    ),
                )
        count += len(found)
        if not found:
            return count


@asynccontextmanager
async def lifespan_hook(app: Any) -> AsyncIterator[None]:
    """Register in app.LIFESPAN_HOOKS after the store hook: fails interrupted Tasks, seeds the
    OperationDefinitions, and cancels still-running jobs at shutdown."""
    repo: Repository = app.state.store
    failed = await run_in_threadpool(fail_interrupted_tasks, repo)
    if failed:
        log.warning("marked %d interrupted $analyze Task(s) failed", failed)
    await run_in_threadpool(_operations().seed_definitions, repo)
    manager = get_manager(app)
    try:
        yield
    finally:
        running = [j for j in manager.running() if j.handle is not None]
        for job in running:
            job.cancel_reason = "The server shut down before this job finished; run $analyze again."
            job.handle.cancel()  # type: ignore[union-attr]
        if running:
            await asyncio.wait([j.handle for j in running], timeout=5)  # type: ignore[misc]
