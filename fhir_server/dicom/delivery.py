"""Result delivery: the durable jobs that take an analysed study's result to the PACS, RIS and EHR.

    results.deliver   {"report", "imaging_study", "study_uid", "instances": [paths]}  (enqueued by
                      intake in the report's transaction) -> builds the SR + heatmap SCs and the
                      ORU once, stores the DICOM objects as Binary, and in ONE transaction writes a
                      Task per configured destination and enqueues one job per destination:
    dicom.store       C-STORE to CXR_DICOM_DESTINATION
    dicomweb.stow     STOW-RS to CXR_DICOMWEB_STOW_URL
    hl7.oru           ORU^R01 over MLLP to CXR_HL7_DESTINATION

Each destination job retries with back-off (TransientError) while the destination is down, for
up to CXR_DELIVERY_MAX_ATTEMPTS attempts, so an outage delays a result but never loses it.

Where a result went is recorded as a FHIR Task per (report version, destination): code
cxr-operations#deliver, focus = the DiagnosticReport, for = the patient, input = destination +
report version + the DICOM Binary objects, status requested -> in-progress (retrying, with the
last error in statusReason) -> completed (output: each stored SOP Instance with the status, or
the HL7 ACK code, control id and message) | failed. An EHR asks
`GET /fhir/Task?focus=DiagnosticReport/<id>&code=<cxr-operations>|deliver`.

Idempotency (a job may run twice when a worker dies): UIDs, Binary ids, Task ids and dedupe keys
are derived from the report version, so a rerun reuses them; a PACS that receives the same SOP
Instance again keeps one copy; an ORU whose ACK is recorded on its Task is never sent again.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NoReturn

from fhir.resources.R4B.task import Task
from pydantic import BaseModel, Field, ValidationError
from pydicom.dataset import Dataset
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

import mappings
from fhir_server import resources as fr
from fhir_server.hl7v2 import mllp
from fhir_server.hl7v2.oru import build_oru, control_id
from fhir_server.imaging import FetchPolicy
from fhir_server.imaging.fetch import new_client
from fhir_server.queue import TaskDef, TransientError, enqueue_in, register_task, wake
from fhir_server.storage import Repository

from . import stow as stow_client
from . import store_scu
from .result_set import ResultSet, ResultSetError, read_result_set
from .sc import build_scs
from .sr import build_sr

log = logging.getLogger(__name__)

Json = dict[str, Any]
DELIVER = "results.deliver"
DICOM_STORE, DICOMWEB_STOW, HL7_ORU = "dicom.store", "dicomweb.stow", "hl7.oru"
DELIVERY_ID_SYSTEM = "http://cxr-fhir.org/fhir/identifier/delivery"
DELIVER_CODE = mappings.operation_code("deliver")


class DeliverPayload(BaseModel):
    """The contract with study intake (issue 12 "In")."""

    report: str = Field(pattern=r"^DiagnosticReport/[A-Za-z0-9\-.]{1,64}$")
    imaging_study: str | None = Field(None, pattern=r"^ImagingStudy/[A-Za-z0-9\-.]{1,64}$")
    study_uid: str | None = None
    instances: list[str] = Field(min_length=1)


class DeliveryPayload(BaseModel):
    task: str  # Task id
    destination: str
    objects: list[str] = Field(default_factory=list)  # Binary ids (DICOM) for dicom.store / dicomweb.stow
    message: str | None = None  # ER7 for hl7.oru
    control_id: str | None = None


@dataclass(frozen=True)
class Route:
    kind: str  # job task name
    destination: str
    label: str  # how the Task names it

    @property
    def wants_dicom(self) -> bool:
        return self.kind in (DICOM_STORE, DICOMWEB_STOW)


def routes(settings: Any) -> list[Route]:
    """The configured destinations; a malformed one is a configuration error (ValueError)."""
    out = []
    if settings.dicom_destination:
        dest = store_scu.parse_destination(settings.dicom_destination)
        out.append(Route(DICOM_STORE, str(dest), f"DICOM C-STORE {dest}"))
    if settings.dicomweb_stow_url:
        out.append(Route(DICOMWEB_STOW, settings.dicomweb_stow_url, f"DICOMweb STOW-RS {settings.dicomweb_stow_url}"))
    if settings.hl7_destination:
        host, port = _host_port(settings.hl7_destination)
        out.append(Route(HL7_ORU, f"{host}:{port}", f"HL7 v2 MLLP {host}:{port}"))
    return out


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"HL7 destination must look like host:port, got {value!r}")
    return host.strip("[]"), int(port)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _calling_ae(settings: Any) -> str:
    # the node's own AE title is a setting of the receiving side (CXR_DICOM_AE_TITLE, default CXR)
    return str(getattr(settings, "dicom_ae_title", None) or "CXR")


# ---------------------------------------------------------------------------------- results.deliver


def _dicom_binary(ds: Dataset, report_ref: str) -> Json:
    return {
        "resourceType": "Binary",
        "id": fr.stable_id("dicom-object", str(ds.SOPInstanceUID)),
        "meta": {"security": [mappings.ai_security().coding()]},
        "contentType": "application/dicom",
        "securityContext": {"reference": report_ref},
        "data": base64.b64encode(stow_client.part10(ds)).decode("ascii"),
    }


def _delivery_key(rs: ResultSet, route: Route) -> str:
    return f"{rs.versioned_ref}|{route.kind}|{route.destination}"


def _task(rs: ResultSet, route: Route, objects: list[tuple[str, Dataset]], imaging_study: str | None) -> Json:
    key = _delivery_key(rs, route)
    inputs: list[Json] = [
        {"type": {"text": "destination"}, "valueString": route.label},
        {"type": {"text": "report-version"}, "valueReference": {"reference": rs.versioned_ref}},
    ]
    if route.wants_dicom:
        for binary_id, ds in objects:
            kind = "SR" if ds.Modality == "SR" else "SC"
            inputs.append({"type": {"text": f"dicom-{kind}"}, "valueReference": {
                "reference": f"Binary/{binary_id}", "display": f"SOP Instance {ds.SOPInstanceUID}"}})
    else:
        inputs.append({"type": {"text": "hl7-message-control-id"}, "valueString": control_id(rs.versioned_ref)})
    data: Json = {
        "resourceType": "Task",
        "id": fr.stable_id("delivery", key),
        "meta": {"security": [mappings.ai_security().coding()]},
        "identifier": [{"system": DELIVERY_ID_SYSTEM, "value": key}],
        "status": "requested",
        "businessStatus": {"text": "queued"},
        "intent": "order",
        "code": {"coding": [DELIVER_CODE.coding()]},
        "description": f"Deliver {rs.versioned_ref} (study {rs.study_uid}) to {route.label}",
        "focus": {"reference": rs.report_ref},
        "authoredOn": _now(),
        "lastModified": _now(),
        "input": inputs,
    }
    if rs.report.get("subject"):
        data["for"] = rs.report["subject"]
    if imaging_study:
        data["input"].append({"type": {"text": "imaging-study"}, "valueReference": {"reference": imaging_study}})
    return Task.model_validate(data).model_dump(mode="json")


def _fan_out(app: Any, rs: ResultSet, objects: list[Dataset], message: str | None, todo: list[Route],
             imaging_study: str | None) -> list[str]:
    repo: Repository = app.state.store
    settings = app.state.settings
    tasks = []
    with repo.transaction() as tx:
        stored: list[tuple[str, Dataset]] = []
        if any(r.wants_dicom for r in todo):
            for ds in objects:
                binary = _dicom_binary(ds, rs.report_ref)
                if tx.read_or_none("Binary", binary["id"]) is None:
                    tx.create(binary, resource_id=binary["id"])
                stored.append((binary["id"], ds))
        for route in todo:
            task = _task(rs, route, stored, imaging_study)
            if tx.read_or_none("Task", task["id"]) is None:
                tx.create(task, resource_id=task["id"])
            payload = DeliveryPayload(
                task=task["id"], destination=route.destination,
                objects=[b for b, _ in stored] if route.wants_dicom else [],
                message=None if route.wants_dicom else message,
                control_id=None if route.wants_dicom else control_id(rs.versioned_ref),
            )
            enqueue_in(tx.session, route.kind, payload.model_dump(), dedupe_key=_delivery_key(rs, route),
                       max_attempts=settings.delivery_max_attempts)
            tasks.append(f"Task/{task['id']}")
    return tasks


def _build(app: Any, payload: DeliverPayload, todo: list[Route]) -> tuple[ResultSet, list[Dataset], str | None]:
    settings = app.state.settings
    rs = read_result_set(app.state.store, payload.report, payload.instances)
    if payload.study_uid and payload.study_uid != rs.study_uid:
        raise ResultSetError(f"study_uid {payload.study_uid} does not match the instances' study {rs.study_uid}")
    objects: list[Dataset] = []
    if any(r.wants_dicom for r in todo):
        objects = [build_sr(rs), *build_scs(rs)]
    message = None
    if any(r.kind == HL7_ORU for r in todo):
        message = build_oru(
            rs, sending_app=settings.hl7_sending_application, sending_facility=settings.hl7_sending_facility,
            receiving_app=settings.hl7_receiving_application, receiving_facility=settings.hl7_receiving_facility,
        )
    return rs, objects, message


async def deliver_results(app: Any, raw: Json) -> Json | None:
    try:
        payload = DeliverPayload.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"bad {DELIVER} payload: {exc.errors(include_url=False)}") from exc
    todo = routes(app.state.settings)
    if not todo:
        return {"report": payload.report, "deliveries": [], "note": "no destination configured"}
    try:
        rs, objects, message = await run_in_threadpool(_build, app, payload, todo)
        tasks = await run_in_threadpool(_fan_out, app, rs, objects, message, todo, payload.imaging_study)
    except OperationalError as exc:  # database briefly away: the whole step is redone, idempotently
        raise TransientError(f"database unavailable: {exc}") from exc
    wake(app)
    return {
        "report": rs.versioned_ref,
        "objects": [str(ds.SOPInstanceUID) for ds in objects],
        "deliveries": tasks,
    }


# ---------------------------------------------------------------------------------- Task updates


def _update_task(repo: Repository, task_id: str, **changes: Any) -> Json | None:
    with repo.transaction() as tx:
        current = tx.read_or_none("Task", task_id)
        if current is None or current.resource is None:
            return None
        task = {k: v for k, v in current.resource.items() if k != "meta"}
        task["meta"] = {"security": (current.resource.get("meta") or {}).get("security", [])}
        for key, value in changes.items():
            if value is None:
                task.pop(key, None)
            else:
                task[key] = value
        task["lastModified"] = _now()
        validated = Task.model_validate(task).model_dump(mode="json")
        return tx.update("Task", task_id, validated).resource


def _read_task(repo: Repository, task_id: str) -> Json | None:
    with repo.transaction(write=False) as tx:
        found = tx.read_or_none("Task", task_id)
        return found.resource if found else None


async def _started(app: Any, task_id: str) -> Json | None:
    task = await run_in_threadpool(_read_task, app.state.store, task_id)
    if task is None or task.get("status") in ("completed", "failed", "cancelled", "in-progress"):
        return task  # a retry keeps the Task as the last failure left it (one version per attempt)
    period = task.get("executionPeriod") or {"start": _now()}
    return await run_in_threadpool(
        _update_task, app.state.store, task_id, status="in-progress", executionPeriod=period,
        businessStatus={"text": "sending"},
    )


def _attempts(app: Any, task: Json) -> tuple[int, int]:
    key = ((task.get("identifier") or [{}])[0]).get("value")
    job = app.state.queue.find(key) if key and getattr(app.state, "queue", None) else None
    if job is None:  # run outside the queue (by hand): never declare the delivery lost for good
        return 1, int(app.state.settings.delivery_max_attempts)
    return job.attempts, job.max_attempts


async def _retry_later(app: Any, task: Json, reason: str) -> NoReturn:
    """Record the failed attempt on the Task (or its final failure) and hand the job back for retry."""
    attempts, most = await run_in_threadpool(_attempts, app, task)
    if attempts >= most:
        await _failed(app, task, f"{reason} (gave up after {attempts} attempts)")
    else:
        await run_in_threadpool(
            _update_task, app.state.store, task["id"], status="in-progress",
            businessStatus={"text": f"retrying (attempt {attempts} of {most} failed)"},
            statusReason={"text": reason[:1000]},
        )
    raise TransientError(reason)


async def _failed(app: Any, task: Json, reason: str) -> None:
    period = dict(task.get("executionPeriod") or {})
    period["end"] = _now()
    await run_in_threadpool(
        _update_task, app.state.store, task["id"], status="failed", businessStatus={"text": "failed"},
        statusReason={"text": reason[:1000]}, executionPeriod=period,
    )


async def _completed(app: Any, task: Json, outputs: list[Json], note: str) -> None:
    period = dict(task.get("executionPeriod") or {"start": _now()})
    period["end"] = _now()
    await run_in_threadpool(
        _update_task, app.state.store, task["id"], status="completed", businessStatus={"text": note},
        statusReason=None, executionPeriod=period, output=outputs,
    )


def _load_objects(repo: Repository, ids: list[str]) -> list[bytes]:
    out = []
    with repo.transaction(write=False) as tx:
        for binary_id in ids:
            found = tx.read_or_none("Binary", binary_id)
            if found is None or not (found.resource or {}).get("data"):
                raise ResultSetError(f"Binary/{binary_id} (a DICOM object to deliver) is missing")
            out.append(base64.b64decode(found.resource["data"]))
    return out


# ---------------------------------------------------------------------------------- destinations


async def _delivery(app: Any, raw: Json) -> tuple[DeliveryPayload, Json] | None:
    payload = DeliveryPayload.model_validate(raw)
    task = await _started(app, payload.task)
    if task is None:
        raise ValueError(f"Task/{payload.task} of this delivery does not exist")
    if task.get("status") in ("completed", "failed", "cancelled"):
        return None  # already recorded: never deliver twice
    return payload, task


async def deliver_dicom_store(app: Any, raw: Json) -> Json | None:
    found = await _delivery(app, raw)
    if found is None:
        return {"skipped": "already recorded"}
    payload, task = found
    settings = app.state.settings
    try:
        datasets = [stow_client.read_part10(b) for b in await run_in_threadpool(_load_objects, app.state.store, payload.objects)]
        dest = store_scu.parse_destination(payload.destination)
        stored = await run_in_threadpool(
            store_scu.store, dest, datasets, calling_ae=_calling_ae(settings), timeout_s=settings.dicom_timeout_s
        )
    except store_scu.StoreUnavailable as exc:
        await _retry_later(app, task, str(exc))
    except (store_scu.StoreRefused, ResultSetError, ValueError) as exc:
        await _failed(app, task, str(exc))
        raise
    outputs = [
        {"type": {"text": "stored"}, "valueString": f"SOP Instance {s.sop_instance_uid}: C-STORE status 0x{s.status:04X}"}
        for s in stored
    ]
    await _completed(app, task, outputs, f"stored {len(stored)} object(s) at {payload.destination}")
    return {"stored": [s.sop_instance_uid for s in stored]}


async def deliver_dicomweb_stow(app: Any, raw: Json) -> Json | None:
    found = await _delivery(app, raw)
    if found is None:
        return {"skipped": "already recorded"}
    payload, task = found
    settings = app.state.settings
    policy = FetchPolicy.from_settings(settings, **getattr(app.state, "fetch_policy_overrides", {}))
    try:
        objects = await run_in_threadpool(_load_objects, app.state.store, payload.objects)
        async with new_client() as client:
            result = await stow_client.stow(payload.destination, objects, policy=policy, client=client)
    except stow_client.StowUnavailable as exc:
        await _retry_later(app, task, str(exc))
    except (stow_client.StowRefused, ResultSetError) as exc:
        await _failed(app, task, str(exc))
        raise
    outputs = [{"type": {"text": "stored"}, "valueString": f"SOP Instance {uid}: STOW-RS {result.status_code}"}
               for uid in result.stored]
    if result.retrieve_url:
        outputs.append({"type": {"text": "retrieve-url"}, "valueUrl": result.retrieve_url})
    if not outputs:
        outputs = [{"type": {"text": "http-status"}, "valueString": str(result.status_code)}]
    await _completed(app, task, outputs, f"STOW-RS {result.status_code}: {len(result.stored)} object(s) stored")
    return {"status": result.status_code, "stored": result.stored}


async def deliver_hl7_oru(app: Any, raw: Json) -> Json | None:
    found = await _delivery(app, raw)
    if found is None:
        return {"skipped": "already acknowledged"}
    payload, task = found
    if not payload.message or not payload.control_id:
        await _failed(app, task, "no HL7 message in the delivery job")
        raise ValueError("no HL7 message in the delivery job")
    host, port = _host_port(payload.destination)
    try:
        ack = await mllp.send(host, port, payload.message, timeout_s=app.state.settings.hl7_ack_timeout_s)
    except mllp.MllpError as exc:
        await _retry_later(app, task, str(exc))
    if ack.control_id and ack.control_id != payload.control_id:
        await _retry_later(app, task, f"ACK for another message ({ack.control_id}, sent {payload.control_id})")
    if not ack.accepted:
        await _retry_later(app, task, f"receiver answered {ack.code}" + (f": {ack.text}" if ack.text else ""))
    outputs = [
        {"type": {"text": "hl7-ack-code"}, "valueString": ack.code},
        {"type": {"text": "hl7-message-control-id"}, "valueString": payload.control_id},
        {"type": {"text": "hl7-ack"}, "valueString": ack.raw[:10000]},
    ]
    # recorded before the job completes: a rerun finds the Task completed and does not resend
    await _completed(app, task, outputs, f"acknowledged {ack.code} by {payload.destination}")
    return {"ack": ack.code, "control_id": payload.control_id}


# ---------------------------------------------------------------------------------- registration


def register(app: Any) -> None:
    s = app.state.settings
    backoff = {"backoff_s": s.delivery_backoff_s, "backoff_max_s": s.delivery_backoff_max_s,
               "max_attempts": s.delivery_max_attempts}
    register_task(app, TaskDef(DELIVER, deliver_results, max_attempts=5, backoff_s=s.delivery_backoff_s))
    register_task(app, TaskDef(DICOM_STORE, deliver_dicom_store, concurrency=2, **backoff))
    register_task(app, TaskDef(DICOMWEB_STOW, deliver_dicomweb_stow, concurrency=2, **backoff))
    register_task(app, TaskDef(HL7_ORU, deliver_hl7_oru, **backoff))


@asynccontextmanager
async def delivery_lifespan(app: Any) -> AsyncIterator[None]:
    """Registers the delivery tasks; a malformed destination setting is logged loudly at startup."""
    register(app)
    try:
        todo = routes(app.state.settings)
        if todo:
            log.info("Results are delivered to: %s", ", ".join(r.label for r in todo))
    except ValueError as exc:
        log.error("Result delivery misconfigured: %s", exc)
    yield
