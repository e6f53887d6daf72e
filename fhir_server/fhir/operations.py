"""$analyze on Media and ImagingStudy (type and instance level) + their OperationDefinitions.

    POST /fhir/Media/{id}/$analyze            the stored Media
    POST /fhir/Media/$analyze                 Parameters{media: Media} (or a bare Media body)
    POST /fhir/ImagingStudy/{id}/$analyze     the stored ImagingStudy (images via its Endpoint)
    POST /fhir/ImagingStudy/$analyze          Parameters{imagingStudy: ImagingStudy} (or bare)
    optional in-parameter `heatmaps` (boolean, default true): Grad-CAM heatmaps as Media + Binary

Output: the operation's single out-parameter `return` is a Bundle, so (R4 operations.html) the
response body is that Bundle itself: type `collection`, DiagnosticReport first, then the
Observations, heatmap Media and Binary, the Device, the Provenance and (type level) the stored
input; every entry has fullUrl = [base]/Type/id and meta.versionId. 201 + Location of the report
version when the report is new, 200 when an earlier report was versioned (re-analysis).

Everything is written in ONE repository transaction (nothing half-written). Re-analysis of the
same input by the same model version updates the DiagnosticReport, Observations and heatmap
Media (deterministic ids, see resources.py) to new versions and adds a new Provenance whose
targets are the version-specific references of this run; history keeps every earlier result.
A type-level input is stored too, idempotently when it carries an identifier (If-None-Exist), so
re-posting the same study versions the same report.

`Prefer: respond-async` hands the same work to fhir_server.jobs (202 + Content-Location + Task).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from fhir_server import imaging
from fhir_server import resources as fr
from fhir_server.errors import operation_outcome
from fhir_server.inference import ServerBusy, require_analyzer
from fhir_server.storage import Repository, StorageError, StoredResource, Transaction, VersionConflict, new_id
from ml.errors import CXRError, InputError

from .common import base_url, get_store, parse_prefer, resource_headers
from .exceptions import FhirError
from .negotiation import body_media_type, check_format, fhir_json_response, parse_json_body, shape_limits, read_body
from .validation import validate_resource

log = logging.getLogger(__name__)

Json = dict[str, Any]
CANONICAL_BASE = "http://cxr-fhir.org/fhir/OperationDefinition"
INPUT_PARAM = {"Media": "media", "ImagingStudy": "imagingStudy"}
_WRITE_ATTEMPTS = 2  # one retry when a concurrent re-analysis of the same input wins the race

# Paths are relative to the /fhir prefix of fhir_server.fhir.build_router, which includes this
# router before its generic /{type}/{id} routes (and adds auth + format negotiation).
router = APIRouter(tags=["FHIR operations"])


def _err(status_code: int, code: str, diagnostics: str, expression: str | None = None) -> FhirError:
    return FhirError(status_code, diagnostics, code=code, expression=[expression] if expression else None)


def retry_headers(exc: BaseException) -> dict[str, str] | None:
    """Retry-After for a full inference queue (503 server_busy), so clients back off instead of hammering."""
    retry_after = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry_after)} if retry_after else None


def error_outcome(exc: BaseException) -> tuple[int, Json] | None:
    """(status, OperationOutcome) for every error the operation expects; None for bugs."""
    if isinstance(exc, FhirError):
        return exc.status_code, exc.outcome()
    if isinstance(exc, imaging.ImagingError):
        return exc.status_code, operation_outcome(exc.status_code, exc.code, exc.diagnostics, exc.expression)
    if isinstance(exc, CXRError):
        body = operation_outcome(exc.http_status, None, exc.message)
        body["issue"][0]["details"] = {"text": exc.code}
        return exc.http_status, body
    if isinstance(exc, StorageError):
        return exc.http_status, operation_outcome(exc.http_status, exc.issue_code, exc.message, exc.expression)
    return None


# ---------------------------------------------------------------------------------- request


@dataclass
class AnalyzeRequest:
    """One $analyze call, fully parsed: everything the (sync or async) run needs."""

    resource_type: str  # "Media" | "ImagingStudy"
    resource: Json  # the input resource (stored copy at instance level, inline at type level)
    stored: bool  # instance level: already in the repository
    heatmaps: bool = True
    base: str = ""

    @property
    def reference(self) -> str | None:
        return f"{self.resource_type}/{self.resource['id']}" if self.stored else None


@dataclass
class AnalyzeOutcome:
    status_code: int  # 201 new report, 200 new version of an earlier report
    bundle: Json
    report: StoredResource
    input_reference: str
    headers: dict[str, str] = field(default_factory=dict)
    instance_uids: list[str] = field(default_factory=list)  # SOPInstanceUIDs analysed (studies)


async def _json_body(request: Request) -> Json | None:
    """The JSON body, or None when there is none (instance level needs no body)."""
    # an inline image arrives base64-encoded inside JSON: allow for the 4/3 expansion
    limit = request.app.state.settings.max_upload_bytes * 4 // 3 + 1024 * 1024
    raw = await read_body(request, max_bytes=limit)
    if not raw.strip():
        return None
    body = parse_json_body(raw, body_media_type(request), shape_limits(request))
    if not isinstance(body.get("resourceType"), str):
        raise FhirError(
            400, "Body must be a FHIR resource (Parameters) with a resourceType", code="required",
            expression=["resourceType"],
        )
    return body


def _boolean(value: Any, expression: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _err(400, "invalid", "heatmaps must be a boolean (true or false)", expression)


def parse_operation_body(
    body: Json | None, resource_type: str, *, instance: bool
) -> tuple[Json | None, bool | None]:
    """(input resource or None, heatmaps or None) from a Parameters body or a bare resource."""
    if body is None:
        return None, None
    name = INPUT_PARAM[resource_type]
    if body["resourceType"] == resource_type:  # convenience: the resource itself as the body
        if instance:
            raise _err(
                400, "invalid",
                f"Instance-level $analyze takes the {resource_type} from the URL; send Parameters or no body",
            )
        return validate_resource(body, expected_type=resource_type), None
    if body["resourceType"] != "Parameters":
        raise _err(
            400, "invalid", f"Expected a Parameters resource (or a {resource_type}), got {body['resourceType']}",
            "resourceType",
        )
    params = body.get("parameter") or []
    if not isinstance(params, list):
        raise _err(400, "invalid", "Parameters.parameter must be a list", "Parameters.parameter")
    found: Json | None = None
    heatmaps: bool | None = None
    for i, p in enumerate(params):
        where = f"Parameters.parameter[{i}]"
        pname = p.get("name") if isinstance(p, dict) else None
        if pname == name and not instance:
            res = p.get("resource")
            if not isinstance(res, dict) or res.get("resourceType") != resource_type:
                raise _err(
                    400, "invalid", f"Parameter {name!r} must hold a {resource_type} resource", f"{where}.resource"
                )
            if found is not None:
                raise _err(400, "invalid", f"Parameter {name!r} given more than once", where)
            found = validate_resource(res, expected_type=resource_type, prefix=f"{where}.resource")
        elif pname == "heatmaps":
            heatmaps = _boolean(p.get("valueBoolean"), f"{where}.valueBoolean")
        else:
            raise _err(400, "invalid", f"Unknown parameter {pname!r} for {resource_type}/$analyze", f"{where}.name")
    if not instance and found is None:
        raise _err(400, "required", f"Parameter {name!r} with the {resource_type} is required", "Parameters.parameter")
    return found, heatmaps


async def build_request(request: Request, resource_type: str, resource_id: str | None) -> AnalyzeRequest:
    body = await _json_body(request)
    inline, heatmaps = parse_operation_body(body, resource_type, instance=resource_id is not None)
    query = request.query_params.get("heatmaps")
    if heatmaps is None and query is not None:
        heatmaps = _boolean(query, "heatmaps")
    repo = get_store(request)
    if resource_id is not None:
        stored = await run_in_threadpool(repo.read, resource_type, resource_id)
        resource, is_stored = stored.resource or {}, True
    else:
        resource, is_stored = dict(inline or {}), False
    return AnalyzeRequest(resource_type, resource, is_stored, True if heatmaps is None else heatmaps, base_url(request))


# ---------------------------------------------------------------------------------- running


Progress = Callable[[str], None]
AfterWrite = Callable[[Transaction, "AnalyzeOutcome"], None]


async def run_analysis(
    app: Any, req: AnalyzeRequest, *, progress: Progress | None = None, after_write: AfterWrite | None = None,
    wait_when_busy: bool = False, study: imaging.StudyFetch | None = None, repo: Repository | None = None,
) -> AnalyzeOutcome:
    """Fetch pixels, analyse, write every output in one transaction, return the result Bundle.
    `after_write(tx, outcome)` runs inside that same transaction (the async Task update).
    `wait_when_busy`: an accepted async job waits for room in the inference queue (as Retry-After
    says) instead of failing with 503; a synchronous request gets the 503 and retries itself.
    `study`: an ImagingStudy's images already at hand (the DICOM listener's received files)
    instead of retrieving them over its DICOMweb Endpoint.
    `repo`: the store to use (a request's, bound to its audit trail); default app.state.store."""
    settings = app.state.settings
    repo = repo or app.state.store
    analyzer = require_analyzer(app.state)
    note = progress or (lambda _msg: None)
    # fetch_policy_overrides: a seam for tests (a fake DNS resolver); unset in production
    policy = imaging.FetchPolicy.from_settings(settings, **getattr(app.state, "fetch_policy_overrides", {}))

    async def read_resource(rtype: str, rid: str) -> Json | None:
        def _read() -> Json | None:
            with repo.transaction(write=False) as tx:
                found = tx.read_or_none(rtype, rid)
                return found.resource if found else None

        return await run_in_threadpool(_read)

    notes: list[str] = []
    views: list[str] = []
    images: list[fr.ImageResult] = []
    if req.resource_type == "Media":
        note("fetching image")
        data = await imaging.media_bytes(
            req.resource, policy=policy, max_inline_bytes=settings.max_upload_bytes, read_resource=read_resource,
            own_base=req.base,
        )
        note("analysing")
        analysis = await _analyze_image(app, analyzer, data, req.heatmaps, wait_when_busy)
        images.append(fr.ImageResult(analysis))
    else:
        note("retrieving study")
        if study is None:
            study = await imaging.study_images(req.resource, policy=policy, read_resource=read_resource)
        notes += study.notes
        views += study.views
        first_error: CXRError | None = None
        for i, img in enumerate(study.images, 1):
            note(f"analysing image {i}/{len(study.images)}")
            try:
                analysis = await _analyze_image(app, analyzer, img.data, req.heatmaps, wait_when_busy)
            except InputError as exc:  # one unusable image must not sink the other views
                first_error = first_error or exc
                notes.append(f"Image {img.ref.sop_uid} was not analysed: {exc.message}")
                continue
            images.append(fr.ImageResult(analysis, img.ref.sop_uid, img.view))
        if not images:
            assert first_error is not None
            raise first_error
    note("writing results")
    for attempt in range(_WRITE_ATTEMPTS):
        try:
            return await run_in_threadpool(_write_results, repo, req, images, notes, views, after_write)
        except VersionConflict:
            if attempt + 1 == _WRITE_ATTEMPTS:
                raise
            log.info("concurrent re-analysis of the same input; retrying the write once")
    raise AssertionError("unreachable")


async def _analyze_image(app: Any, analyzer: Any, data: bytes, heatmaps: bool, wait_when_busy: bool) -> Any:
    while True:
        try:
            return await app.state.inference.analyze(analyzer, data, heatmaps=heatmaps)
        except ServerBusy as exc:
            if not wait_when_busy:
                raise
            await asyncio.sleep(exc.retry_after)


def _identifier_criteria(resource: Json) -> str | None:
    for ident in resource.get("identifier") or []:
        if ident.get("system") and ident.get("value"):
            return urlencode({"identifier": f"{ident['system']}|{ident['value']}"})
    return None


def _versioned(stored: StoredResource) -> str:
    return f"{stored.reference}/_history/{stored.version_id}"


def _write_results(
    repo: Repository,
    req: AnalyzeRequest,
    images: list[fr.ImageResult],
    notes: list[str],
    views: list[str],
    after_write: AfterWrite | None,
) -> AnalyzeOutcome:
    with repo.transaction() as tx:
        input_stored: StoredResource | None = None
        if req.stored:
            input_ref = req.reference or ""
            input_resource = req.resource
        else:
            criteria = _identifier_criteria(req.resource)  # re-posting the same input versions its report
            input_stored = tx.create(req.resource, resource_id=new_id(), if_none_exist=criteria)
            input_ref, input_resource = input_stored.reference, input_stored.resource or req.resource
        effective = input_resource.get("createdDateTime") or input_resource.get("started")
        inp = fr.AnalysisInput(input_ref, input_resource.get("subject"), effective, tuple(views))
        # flags from ml (gate in warn mode, outside the validated population): a note on the report
        # and an OperationOutcome warning in the Bundle
        warnings = list(dict.fromkeys(w for img in images for w in img.analysis.warnings))
        built = fr.build_results(images, inp, notes=[*notes, *warnings])

        device_criteria = urlencode({"identifier": f"{fr.MODEL_ID_SYSTEM}|{built.device['identifier'][0]['value']}"})
        device = tx.read_or_none("Device", built.device["id"]) or tx.create(
            built.device, resource_id=built.device["id"], if_none_exist=device_criteria
        )
        binaries = [tx.create(b, resource_id=b["id"]) for b in built.binaries]
        heatmaps = [tx.update("Media", m["id"], m) for m in built.heatmap_media]
        observations = [tx.update("Observation", o["id"], o) for o in built.observations]
        report = tx.update("DiagnosticReport", built.report["id"], built.report)
        written = [report, *observations, *heatmaps, *binaries]
        provenance = tx.create(
            fr.build_provenance(
                [_versioned(s) for s in written],
                inp,
                device.reference,
                max(img.analysis.created for img in images),
                activity="CREATE" if report.created else "UPDATE",
                model=images[0].analysis.model,
            )
        )
        ordered = [*written, device, provenance]
        if input_stored is not None:
            ordered.append(input_stored)
        bundle = {
            "resourceType": "Bundle",
            "type": "collection",
            "timestamp": report.last_updated_instant,
            "entry": [{"fullUrl": f"{req.base}/{s.reference}", "resource": s.resource} for s in ordered],
        }
        if warnings:
            bundle["entry"].append(fr.warning_outcome_entry(warnings))
        status = 201 if report.created else 200
        where = report.location(req.base)
        headers = {"Location": where} if status == 201 else {"Content-Location": where}
        outcome = AnalyzeOutcome(
            status, bundle, report, input_ref, headers, [i.instance_uid for i in images if i.instance_uid]
        )
        if after_write is not None:
            after_write(tx, outcome)
        return outcome


# ---------------------------------------------------------------------------------- routes


async def _analyze(request: Request, resource_type: str, resource_id: str | None) -> Response:
    req: AnalyzeRequest | None = None
    try:
        check_format(request)
        req = await build_request(request, resource_type, resource_id)
        require_analyzer(request.app.state)  # 503 now, not after a 202, when no model is loaded
        if parse_prefer(request).respond_async:
            from fhir_server import jobs

            return await jobs.submit(request, req)
        outcome = await run_analysis(request.app, req, repo=get_store(request))
        return fhir_json_response(request, outcome.bundle, status_code=outcome.status_code, headers=outcome.headers)
    except Exception as exc:
        mapped = error_outcome(exc)
        if mapped is None:
            raise
        if req is not None:
            await _log_unsuccessful(request, req, exc, mapped)
        return fhir_json_response(request, mapped[1], status_code=mapped[0], headers=retry_headers(exc))


async def _log_unsuccessful(request: Request, req: AnalyzeRequest, exc: BaseException, mapped: tuple[int, Json]) -> None:
    """A refused or failed analysis of an input is recorded as a Task (see analysis_log)."""
    from fhir_server import analysis_log

    if analysis_log.recordable(exc):
        reason = "; ".join(i.get("diagnostics", "") for i in mapped[1].get("issue", [])) or "failed"
        await run_in_threadpool(analysis_log.record_unsuccessful, get_store(request), req, exc, mapped[0], reason)


@router.post("/Media/$analyze", summary="Analyse an inline Media (Parameters.media)")
async def media_analyze_type(request: Request) -> Response:
    return await _analyze(request, "Media", None)


@router.post("/Media/{resource_id}/$analyze", summary="Analyse a stored Media")
async def media_analyze_instance(resource_id: str, request: Request) -> Response:
    return await _analyze(request, "Media", resource_id)


@router.post("/ImagingStudy/$analyze", summary="Analyse an inline ImagingStudy (Parameters.imagingStudy)")
async def study_analyze_type(request: Request) -> Response:
    return await _analyze(request, "ImagingStudy", None)


@router.post("/ImagingStudy/{resource_id}/$analyze", summary="Analyse a stored ImagingStudy via its DICOMweb Endpoint")
async def study_analyze_instance(resource_id: str, request: Request) -> Response:
    return await _analyze(request, "ImagingStudy", resource_id)


# ---------------------------------------------------------------------------------- definitions


def operation_definition(resource_type: str) -> Json:
    name = INPUT_PARAM[resource_type]
    source = (
        "Media.content.data (base64), Media.content.url (Binary/<id> or an allowlisted http(s) host)"
        if resource_type == "Media"
        else "ImagingStudy.endpoint -> Endpoint (dicom-wado-rs): QIDO-RS + WADO-RS, frontal CR/DX images"
    )
    return {
        "resourceType": "OperationDefinition",
        "id": f"{resource_type}-analyze",
        "url": f"{CANONICAL_BASE}/{resource_type}-analyze",
        "version": "1",
        "name": f"{resource_type}Analyze",
        "title": f"AI analysis of a chest radiograph {resource_type}",
        "status": "active",
        "kind": "operation",
        "publisher": "CXR-FHIR",
        "description": (
            f"Runs the chest X-ray AI model on the image(s) of a {resource_type} ({source}) and stores a "
            "preliminary DiagnosticReport with one Observation per finding, heatmap Media/Binary, the model "
            "Device and a Provenance, in one transaction. Returns them as a collection Bundle. Re-analysis "
            "creates new versions plus a new Provenance. Decision support only, not a diagnosis. "
            "Prefer: respond-async answers 202 with Content-Location and tracks the job in a Task."
        ),
        "affectsState": True,
        "code": "analyze",
        "resource": [resource_type],
        "system": False,
        "type": True,
        "instance": True,
        "parameter": [
            {
                "name": name,
                "use": "in",
                "min": 0,
                "max": "1",
                "documentation": f"The {resource_type} to analyse (type level only; required there).",
                "type": resource_type,
            },
            {
                "name": "heatmaps",
                "use": "in",
                "min": 0,
                "max": "1",
                "documentation": "Produce Grad-CAM heatmaps (default true).",
                "type": "boolean",
            },
            {
                "name": "return",
                "use": "out",
                "min": 1,
                "max": "1",
                "documentation": (
                    "collection Bundle: DiagnosticReport, Observations, heatmap Media and Binary, Device, "
                    "Provenance (+ the stored input at type level)."
                ),
                "type": "Bundle",
            },
        ],
    }


OPERATION_DEFINITIONS: dict[str, Json] = {d["id"]: d for d in (operation_definition(t) for t in INPUT_PARAM)}


def seed_definitions(repo: Repository) -> None:
    """Store the OperationDefinitions so read and search find them like any resource; writes a
    new version only when the content changed. Called once at startup (jobs.lifespan_hook)."""
    with repo.transaction() as tx:
        for resource in OPERATION_DEFINITIONS.values():
            current = tx.read_or_none(resource["resourceType"], resource["id"])
            if current is not None and _same(current.resource or {}, resource):
                continue
            tx.update(resource["resourceType"], resource["id"], resource)


def _same(stored: Json, wanted: Json) -> bool:
    return {k: v for k, v in stored.items() if k != "meta"} == {k: v for k, v in wanted.items() if k != "meta"}


@router.get("/OperationDefinition/{definition_id}", include_in_schema=False)
async def read_operation_definition(definition_id: str, request: Request) -> Response:
    """The stored definition when seeded (with meta), else the one in code, so the canonical
    always resolves even before the startup hook has seeded the store; unknown ids answer 404."""
    repo: Repository | None = getattr(request.app.state, "store", None)
    try:
        if repo is not None:
            with_meta = await run_in_threadpool(_read_or_none, repo, "OperationDefinition", definition_id)
            if with_meta is not None:
                return fhir_json_response(
                    request, with_meta.resource or {}, headers=resource_headers(request, with_meta)
                )
        if definition_id in OPERATION_DEFINITIONS:
            return fhir_json_response(request, OPERATION_DEFINITIONS[definition_id])
        raise _err(404, "not-found", f"OperationDefinition/{definition_id} is not known")
    except Exception as exc:
        mapped = error_outcome(exc)
        if mapped is None:
            raise
        return fhir_json_response(request, mapped[1], status_code=mapped[0], headers=retry_headers(exc))


def _read_or_none(repo: Repository, rtype: str, rid: str) -> StoredResource | None:
    with repo.transaction(write=False) as tx:
        return tx.read_or_none(rtype, rid)


def _include_async_routes() -> None:
    # jobs imports this module, so its router is attached once both are defined.
    from fhir_server import jobs

    router.include_router(jobs.router)


_include_async_routes()
