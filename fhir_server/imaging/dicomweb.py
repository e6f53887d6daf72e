"""ImagingStudy -> Endpoint (dicom-wado-rs) -> QIDO-RS + WADO-RS: the study's CR/DX images."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from io import BytesIO

import httpx

import mappings
from fhir_server.imaging.fetch import Fetched, FetchPolicy, ImagingError, fetch, new_client
from fhir_server.imaging.media import Json, ReadResource
from fhir_server.imaging.multipart import parse_multipart_related

# A chest study rarely has more than a handful of radiographs; a cap keeps one request bounded.
MAX_STUDY_INSTANCES = 16
ANALYZABLE_MODALITIES = ("CR", "DX")
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ENDPOINT_WADO = "dicom-wado-rs"


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str | None
    view: str | None = None  # ViewPosition when QIDO returned it


@dataclass(frozen=True)
class StudyImage:
    ref: InstanceRef
    data: bytes  # the DICOM Part 10 file
    view: str | None  # ViewPosition read from the file (or QIDO)


@dataclass
class StudyFetch:
    images: list[StudyImage]  # frontal (or unknown-view) CR/DX images to analyse
    notes: list[str]  # what was skipped and why (lateral, other modality, cap)
    views: list[str] = field(default_factory=list)  # every CR/DX view seen, skipped ones included


def study_uid(study: Json) -> str:
    for ident in study.get("identifier") or []:
        value = str(ident.get("value") or "")
        if value.startswith("urn:oid:"):
            return value[len("urn:oid:") :]
    raise ImagingError(
        422, "required",
        "ImagingStudy needs identifier urn:oid:<StudyInstanceUID> (system urn:dicom:uid) to be retrieved",
        "ImagingStudy.identifier",
    )


async def resolve_endpoint(study: Json, read_resource: ReadResource) -> str:
    """The WADO-RS base address of the study's first dicom-wado-rs Endpoint."""
    refs = [e.get("reference", "") for e in study.get("endpoint") or []]
    refs += [e.get("reference", "") for s in study.get("series") or [] for e in s.get("endpoint") or []]
    if not refs:
        raise ImagingError(
            422, "required", "ImagingStudy has no endpoint to retrieve images from", "ImagingStudy.endpoint"
        )
    contained = {c.get("id"): c for c in study.get("contained") or [] if c.get("resourceType") == "Endpoint"}
    for ref in refs:
        if ref.startswith("#"):
            endpoint = contained.get(ref[1:])
        elif ref.startswith("Endpoint/") and ref.count("/") == 1:
            endpoint = await read_resource("Endpoint", ref.split("/", 1)[1])
        else:
            endpoint = None
        if not endpoint or endpoint.get("status", "active") != "active":
            continue
        kind = (endpoint.get("connectionType") or {}).get("code")
        if kind == ENDPOINT_WADO and endpoint.get("address"):
            return str(endpoint["address"]).rstrip("/")
    raise ImagingError(
        422, "not-supported",
        f"None of the study's endpoints ({', '.join(refs)}) is an active {ENDPOINT_WADO} Endpoint with an address",
        "ImagingStudy.endpoint",
    )


def _dicom_json_value(item: Json, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _listed_instances(study: Json, uid: str) -> list[InstanceRef]:
    out = []
    for series in study.get("series") or []:
        modality = (series.get("modality") or {}).get("code")
        for inst in series.get("instance") or []:
            if series.get("uid") and inst.get("uid"):
                out.append(InstanceRef(uid, series["uid"], inst["uid"], modality))
    return out


async def _qido_instances(
    address: str, uid: str, policy: FetchPolicy, client: httpx.AsyncClient
) -> list[InstanceRef]:
    fetched = await fetch(
        f"{address}/studies/{uid}/instances",
        policy,
        expression="ImagingStudy.endpoint",
        headers={"Accept": "application/dicom+json"},
        client=client,
    )
    try:
        items = json.loads(fetched.content or b"[]")
        if not isinstance(items, list):
            raise ValueError("not a JSON array")
    except ValueError as exc:
        raise ImagingError(
            502, "exception", f"QIDO-RS answer is not DICOM JSON: {exc}", "ImagingStudy.endpoint"
        ) from exc
    out = []
    for item in items:
        series_uid = _dicom_json_value(item, "0020000E")
        sop_uid = _dicom_json_value(item, "00080018")
        if series_uid and sop_uid:
            out.append(
                InstanceRef(
                    _dicom_json_value(item, "0020000D") or uid,
                    series_uid,
                    sop_uid,
                    _dicom_json_value(item, "00080060"),
                    _dicom_json_value(item, "00185101"),
                )
            )
    return out


def _dicom_header(data: bytes) -> tuple[str | None, str | None]:
    """(Modality, ViewPosition) from the file header only: pixels are ml's business."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=False)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImagingError(502, "exception", f"WADO-RS returned something that is not DICOM: {exc}") from exc
    return (str(ds.get("Modality") or "") or None, str(ds.get("ViewPosition") or "") or None)


def _wado_parts(fetched: Fetched) -> list[bytes]:
    ctype = fetched.content_type.split(";", 1)[0].strip().lower()
    if ctype == "application/dicom":
        return [fetched.content]
    try:
        parts = parse_multipart_related(fetched.content, fetched.content_type)
    except ValueError as exc:
        raise ImagingError(
            502, "exception", f"Bad WADO-RS response from {fetched.url}: {exc}", "ImagingStudy.endpoint"
        ) from exc
    return [
        payload
        for headers, payload in parts
        if headers.get("content-type", "application/dicom").startswith("application/dicom")
    ]


async def study_images(
    study: Json,
    *,
    policy: FetchPolicy,
    read_resource: ReadResource,
    client: httpx.AsyncClient | None = None,
) -> StudyFetch:
    """Retrieve the study's CR/DX instances and keep the ones to analyse (frontal or view unknown)."""
    uid = study_uid(study)
    address = await resolve_endpoint(study, read_resource)
    own = client is None
    client = client or new_client()
    notes: list[str] = []
    views: list[str] = []
    try:
        refs = _listed_instances(study, uid) or await _qido_instances(address, uid, policy, client)
        if not refs:
            raise ImagingError(422, "not-found", f"Study {uid} has no instances at {address}", "ImagingStudy")
        candidates = []
        for ref in refs:
            if ref.modality and ref.modality.upper() not in ANALYZABLE_MODALITIES:
                notes.append(f"Skipped instance {ref.sop_uid}: modality {ref.modality} is not CR/DX.")
            elif mappings.is_frontal(ref.view) is False:
                views.append(ref.view or "")
                notes.append(f"Skipped instance {ref.sop_uid}: {ref.view} view is not frontal.")
            else:
                candidates.append(ref)
        if len(candidates) > MAX_STUDY_INSTANCES:
            notes.append(f"Only the first {MAX_STUDY_INSTANCES} of {len(candidates)} images were analysed.")
            candidates = candidates[:MAX_STUDY_INSTANCES]
        images: list[StudyImage] = []
        for ref in candidates:
            url = f"{address}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}"
            fetched = await fetch(
                url, policy, expression="ImagingStudy.endpoint", headers={"Accept": DICOM_ACCEPT}, client=client
            )
            for data in _wado_parts(fetched)[:1]:
                modality, view = _dicom_header(data)
                view = view or ref.view
                if view:
                    views.append(view)
                if modality and modality.upper() not in ANALYZABLE_MODALITIES:
                    notes.append(f"Skipped instance {ref.sop_uid}: modality {modality} is not CR/DX.")
                elif mappings.is_frontal(view) is False:
                    notes.append(f"Skipped instance {ref.sop_uid}: {view} view is not frontal.")
                else:
                    images.append(StudyImage(ref, data, view))
    finally:
        if own:
            await client.aclose()
    if not images:
        raise ImagingError(
            422, "not-found",
            f"Study {uid} has no frontal CR/DX image to analyse. " + " ".join(notes),
            "ImagingStudy",
        )
    return StudyFetch(images, notes, views)
