"""The "dicom.analyze_study" queue task: once a received study has been quiet for
CXR_DICOM_STUDY_SETTLE_S, analyse its frontal images once and write the FHIR side.

    settle check -> (not quiet yet: a successor job for the remaining time, nothing else)
    Patient + ImagingStudy upsert (own transaction: the study is visible even if analysis refuses it)
    run_analysis (operations.py's writer) on the received files; in ITS transaction:
        dicom_study.analysed_revision, a completed Task, and the "results.deliver" hand-off job
    refused (gate, undecodable, no frontal image): a failed Task with the reason, no report

Idempotent, as queue handlers must be: a job re-run after its worker died finds the revision
already analysed (recorded in the report's own transaction) and does nothing.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
from starlette.concurrency import run_in_threadpool

import mappings
from fhir_server import imaging
from fhir_server.imaging.dicomweb import MAX_STUDY_INSTANCES
from fhir_server.queue import TaskDef, TransientError, enqueue_in, register_task, wake
from fhir_server.resources import stable_id
from fhir_server.storage import Repository, Transaction
from ml.errors import CXRError, InputError
from ml.ingest.dicom_meta import view_position

from .fhir_side import InstanceHeader, upsert_imaging_study
from .instance_store import ANALYZE_TASK, InstanceStore, ensure_pending, settle_remaining
from .tables import DicomStudy

log = logging.getLogger(__name__)

Json = dict[str, Any]
DELIVER_TASK = "results.deliver"  # registered by the delivery side (SR/SC to the PACS, ORU to the RIS)


class AlreadyAnalysed(Exception):
    """Raised inside the result transaction when another run recorded this revision first."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_headers(paths: list[str]) -> tuple[list[InstanceHeader], list[str]]:
    headers, notes = [], []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            headers.append(InstanceHeader(ds, path))
        except Exception as exc:  # noqa: BLE001 - a damaged header is reported, the rest still counts
            notes.append(f"Instance file {Path(path).name} could not be read: {exc}")
    return headers, notes


def select_images(headers: list[InstanceHeader]) -> imaging.StudyFetch:
    """Frontal views only: view position (ViewPosition, ViewCodeSequence, PatientOrientation)
    must not say lateral, and an image of one side (ImageLaterality L/R) needs a frontal view
    position; the gate judges the rest when the image is analysed."""
    images: list[imaging.StudyImage] = []
    notes: list[str] = []
    views: list[str] = []
    for h in headers:
        view = view_position(h.ds)
        sop = h.get("SOPInstanceUID")
        if view:
            views.append(view)
        if mappings.is_frontal(view) is False:
            notes.append(f"Skipped instance {sop}: {view} view is not frontal.")
            continue
        side = (h.get("ImageLaterality") or h.get("Laterality")).upper()
        if view is None and side in ("L", "R"):
            # a frontal chest film shows both sides; a one-sided image without a view position is
            # how some devices label a lateral (or a different body part): not analysed as frontal
            notes.append(f"Skipped instance {sop}: laterality {side} and no view position, not a frontal view.")
            continue
        ref = imaging.InstanceRef(h.get("StudyInstanceUID"), h.get("SeriesInstanceUID"), sop, h.get("Modality") or None, view)
        images.append(imaging.StudyImage(ref, b"", view))
    if len(images) > MAX_STUDY_INSTANCES:  # the same bound as a DICOMweb retrieval
        notes.append(f"Only the first {MAX_STUDY_INSTANCES} of {len(images)} images were analysed.")
        images = images[:MAX_STUDY_INSTANCES]
    return imaging.StudyFetch(images, notes, views)


def _task(study_uid: str, revision: int, study_ref: str, patient_ref: str | None, **changes: Any) -> Json:
    from fhir.resources.R4B.task import Task

    from fhir_server import jobs

    data: Json = {
        "resourceType": "Task",
        "id": stable_id("dicom-intake", study_uid, str(revision)),
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "status": "completed",
        "intent": "order",
        "code": {"coding": [jobs.ANALYZE_CODE.coding()], "text": "DICOM study received: ImagingStudy/$analyze"},
        "focus": {"reference": study_ref},
        "authoredOn": _now(),
        "lastModified": _now(),
        "input": [{"type": {"text": "study revision"}, "valueInteger": revision}],
    }
    if patient_ref:
        data["for"] = {"reference": patient_ref}
    data.update(changes)
    return Task.model_validate(data).model_dump(mode="json")


def _record_refusal(repo: Repository, study_uid: str, revision: int, study_ref: str, patient_ref: str | None,
                    reason: str) -> None:
    with repo.transaction() as tx:
        row = tx.session.get(DicomStudy, study_uid, with_for_update=True)
        if row is None or row.analysed_revision >= revision:
            return
        task = _task(study_uid, revision, study_ref, patient_ref, status="failed",
                     businessStatus={"text": "refused"}, statusReason={"text": reason})
        tx.update("Task", task["id"], task)
        row.analysed_revision, row.state, row.reason = revision, "refused", reason[:4000]
        tx.session.add(row)


def _reschedule(repo: Repository, study_uid: str, delay_s: float) -> None:
    with repo.transaction() as tx:
        row = tx.session.get(DicomStudy, study_uid, with_for_update=True)
        if row is not None:
            ensure_pending(tx.session, row, delay_s)


def _fhir_side(repo: Repository, study_uid: str, headers: list[InstanceHeader]) -> tuple[Json, str, str]:
    with repo.transaction() as tx:
        study, patient = upsert_imaging_study(tx, study_uid, headers)
        return study.resource or {}, study.reference, patient.reference


async def analyze_study(app: Any, payload: dict[str, Any]) -> dict[str, Any] | None:
    from fhir_server.fhir import operations

    settings = app.state.settings
    store: InstanceStore = app.state.dicom_store
    repo: Repository = app.state.store
    study_uid = str(payload.get("study_uid") or "")
    row = await run_in_threadpool(store.study, study_uid)
    if row is None:
        return {"skipped": f"unknown study {study_uid}"}
    if row.analysed_revision >= row.revision:
        return {"skipped": "already analysed", "revision": row.revision}
    remaining = settle_remaining(row, settings.dicom_study_settle_s)
    if remaining > 0:  # instances still arriving: look again when the study has been quiet long enough
        await run_in_threadpool(_reschedule, repo, study_uid, remaining)
        return {"rescheduled_in_s": round(remaining, 3)}
    revision = row.revision
    instances = await run_in_threadpool(store.instances, study_uid)
    headers, notes = await run_in_threadpool(read_headers, [i.path for i in instances])
    if not headers:
        return {"skipped": "no readable instance"}
    resource, study_ref, patient_ref = await run_in_threadpool(_fhir_side, repo, study_uid, headers)
    chosen = select_images(headers)
    chosen.notes[:0] = notes
    paths = {h.get("SOPInstanceUID"): h.path for h in headers}
    if not chosen.images:
        reason = f"Study {study_uid} has no frontal image to analyse. " + " ".join(chosen.notes)
        await run_in_threadpool(_record_refusal, repo, study_uid, revision, study_ref, patient_ref, reason.strip())
        return {"refused": reason}
    # pixels are read only now, one study at a time, so a big study does not sit in memory twice
    loaded = []
    for img in chosen.images:
        data = await run_in_threadpool(Path(paths[img.ref.sop_uid]).read_bytes)
        loaded.append(imaging.StudyImage(img.ref, data, img.view))
    chosen.images = loaded

    def record_in_same_transaction(tx: Transaction, outcome: Any) -> None:
        current = tx.session.get(DicomStudy, study_uid, with_for_update=True)
        if current is None or current.analysed_revision >= revision:
            raise AlreadyAnalysed()  # rolls this run's report version back
        report = outcome.report
        current.analysed_revision, current.state, current.reason = revision, "analysed", None
        current.imaging_study_id, current.report_id = study_ref.split("/", 1)[1], report.id
        tx.session.add(current)
        task = _task(study_uid, revision, study_ref, patient_ref, businessStatus={"text": "analysed"},
                     output=[{"type": {"text": "DiagnosticReport"}, "valueReference": {"reference": report.reference}}])
        tx.update("Task", task["id"], task)
        enqueue_in(
            tx.session, DELIVER_TASK,
            {
                "report": report.reference,
                "imaging_study": study_ref,
                "study_uid": study_uid,
                "instances": [str(Path(paths[uid]).resolve()) for uid in outcome.instance_uids if uid in paths],
            },
            dedupe_key=f"{DELIVER_TASK}:{report.id}:{report.version_id}",
        )

    req = operations.AnalyzeRequest("ImagingStudy", resource, True, True, settings.base_url or "")
    try:
        outcome = await operations.run_analysis(
            app, req, after_write=record_in_same_transaction, wait_when_busy=True, study=chosen
        )
    except AlreadyAnalysed:
        return {"skipped": "analysed by another run", "revision": revision}
    except InputError as exc:  # refused: the gate, an undecodable image, ... -> recorded, never retried
        await run_in_threadpool(_record_refusal, repo, study_uid, revision, study_ref, patient_ref, exc.message)
        return {"refused": exc.message}
    except CXRError as exc:  # the model is not loaded (yet): the study waits, it is not lost
        raise TransientError(exc.message) from exc
    wake(app)  # the delivery job is ready now
    return {"report": outcome.report.reference, "version": outcome.report.version_id, "revision": revision}


def register(app: Any) -> None:
    register_task(app, TaskDef(ANALYZE_TASK, analyze_study, max_attempts=8, backoff_s=5, backoff_max_s=600))
