"""A synchronous $analyze that produced no report still leaves a record in the FHIR store.

Why a Task and not a DiagnosticReport: a report with status `cancelled` and no results would say
"a report exists and was withdrawn", and every consumer of DiagnosticReport (EHR inboxes, search
by patient) would have to learn to skip it. The request to run the model is work the server was
asked to do, which is what Task records (R4 workflow), and Task already has the two states we
need, the same ones the asynchronous $analyze writes (fhir_server/jobs.py):

    status `rejected` + statusReason   the out-of-distribution gate refused the image before any
                                       analysis ("the performer decided not to execute it")
    status `failed`   + statusReason   the image could not be read, fetched or analysed

`code` is the server's own `analyze` code (CodeSystem cxr-operations), `focus` the input (a
type-level input is stored first, so the viewer can show what was sent), `for` its subject.
Find them with `GET /fhir/Task?code=<system>|analyze&status=rejected,failed`.

Only errors about the input are recorded: a malformed request (400 before anything ran), a full
queue (503, retry) or a missing model are answered but not logged as analyses.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fhir.resources.R4B.task import Task

from fhir_server import imaging
from fhir_server.storage import Repository, new_id
from ml.errors import InputError, NotChestXRay

if TYPE_CHECKING:
    from fhir_server.fhir.operations import AnalyzeRequest

log = logging.getLogger(__name__)
Json = dict[str, Any]

# Media.meta.source of images uploaded from the web page: how the worklist tells "upload" from
# "FHIR" (an EHR or client that posted the Media itself). meta.source is R4's minimal provenance
# of "the source system of the resource".
SOURCE_WEB_UPLOAD = "urn:cxr-fhir:source:web-page"


def recordable(exc: BaseException) -> bool:
    return isinstance(exc, InputError | imaging.ImagingError)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def record_unsuccessful(repo: Repository, req: AnalyzeRequest, exc: BaseException, http_status: int,
                        reason: str) -> str | None:
    """Store the input (type level) and a rejected/failed Task; returns the Task reference.
    Best effort: the client's error answer must not depend on this write."""
    from fhir_server import jobs
    from fhir_server.fhir.operations import _identifier_criteria

    rejected = isinstance(exc, NotChestXRay)
    try:
        with repo.transaction() as tx:
            focus = req.reference
            if focus is None and req.resource:
                stored = tx.create(
                    req.resource, resource_id=new_id(), if_none_exist=_identifier_criteria(req.resource)
                )
                focus = stored.reference
            task_id = new_id()
            task = jobs.build_task(task_id, req)
            now = _now()
            task.update(
                status="rejected" if rejected else "failed",
                businessStatus={
                    "text": f"refused by the image gate (HTTP {http_status})" if rejected
                    else f"failed (HTTP {http_status})"
                },
                statusReason={"text": reason},
                executionPeriod={"start": task.get("authoredOn") or now, "end": now},
                lastModified=now,
            )
            if focus:
                task["focus"] = {"reference": focus}
            task.pop("meta", None)
            tx.create(Task.model_validate(task).model_dump(mode="json"), resource_id=task_id)
            return f"Task/{task_id}"
    except Exception:
        log.exception("could not record the unsuccessful $analyze")
        return None
