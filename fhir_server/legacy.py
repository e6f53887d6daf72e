"""POST /api/v1/predict: the original (non-FHIR) JSON API. Analysis -> the seed response shape.

The multipart body is parsed here from the raw stream rather than through FastAPI's `UploadFile`
parameter, because FastAPI reads (and spools) the whole body before any of our code runs: we refuse
an oversized body from its Content-Length before reading anything, and count bytes while streaming
for chunked uploads or lying headers, so an upload is never read past the limit.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ml.analysis import Analysis, Finding
from ml.errors import EmptyInput, InputError, InputTooLarge
from ml.findings import DISCLAIMER, UNTRAINED_WARNING
from fhir_server.inference import require_analyzer

router = APIRouter(tags=["legacy"])

FIELD = "image"
# Room for the multipart envelope (boundaries, part headers, a few small fields) on top of the image.
MULTIPART_OVERHEAD = 64 * 1024


class UnsupportedMediaType(InputError):
    code = "unsupported_media_type"
    http_status = 415


class MissingField(InputError):
    code = "missing_field"
    http_status = 400


_REQUEST_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FIELD],
                "properties": {
                    FIELD: {
                        "type": "string",
                        "format": "binary",
                        "description": "A chest radiograph: DICOM, PNG or JPEG",
                    }
                },
            }
        }
    },
}


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise InputTooLarge(f"The request body exceeds the upload limit of {limit:,} bytes.")
        yield chunk


async def read_upload(request: Request, *, field: str, max_bytes: int) -> tuple[bytes, str | None]:
    """The bytes and filename of one multipart file field, never reading more than the limit."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType(
            f"Send the image as multipart/form-data with a file field named {field!r} "
            f"(got Content-Type {content_type or 'none'!r})."
        )
    body_limit = max_bytes + MULTIPART_OVERHEAD
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_len = int(declared)
        except ValueError:
            raise InputError("Invalid Content-Length header.") from None
        if declared_len > body_limit:
            raise InputTooLarge(
                f"The upload is {declared_len:,} bytes, over the limit of {max_bytes:,} bytes."
            )
    parser = MultiPartParser(request.headers, _limited(request.stream(), body_limit), max_files=4, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InputError(f"Malformed multipart body: {exc}") from None
    try:
        upload = form.get(field)
        if upload is None:
            raise MissingField(f"Missing the multipart file field {field!r}.")
        if not isinstance(upload, UploadFile):
            raise MissingField(f"The field {field!r} must be a file upload, not a text value.")
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise InputTooLarge(f"The image is over the limit of {max_bytes:,} bytes.")
        if not data:
            raise EmptyInput("The uploaded file is empty.")
        return data, upload.filename
    finally:
        await form.close()


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _diagnosis(f: Finding, *, heatmaps: bool) -> dict[str, Any]:
    item: dict[str, Any] = {
        "condition": f.label,
        "display": f.display,
        "probability": round(f.probability, 4),
        "severity": f.severity,
        "regions": f.regions,
        "detected": f.detected,
        "threshold": round(f.threshold, 4),
        "critical": f.critical,
    }
    if heatmaps:
        item["heatmap_png"] = base64.b64encode(f.heatmap_png).decode("ascii") if f.heatmap_png else None
    return item


def legacy_response(analysis: Analysis, *, heatmaps: bool) -> dict[str, Any]:
    meta = analysis.image
    model = analysis.model
    metadata: dict[str, Any] = {
        "model_version": model.version,
        "model": model.name,
        "software_version": model.software_version,
        "untrained": model.untrained,
        "timestamp": _timestamp(analysis.created),
        "disclaimer": DISCLAIMER,
        "image": {
            "format": meta.source_format,
            "width": meta.width,
            "height": meta.height,
            "modality": meta.modality,
            "view_position": meta.view_position,
            "photometric": meta.photometric,
        },
    }
    if model.untrained:
        metadata["warning"] = UNTRAINED_WARNING
    if analysis.ood is not None:
        metadata["ood"] = {"passed": analysis.ood.passed, "score": round(analysis.ood.score, 4)}
        if not analysis.ood.passed:  # CXR_OOD_GATE=warn: which check failed
            metadata["ood"]["check"] = analysis.ood.check
        pop = analysis.ood.population
        if pop is not None:
            metadata["population"] = {"population": pop.population, "source": pop.source,
                                      "score": round(pop.score, 4), "age_years": pop.age_years,
                                      "outside_validated_population": analysis.outside_population}
    body: dict[str, Any] = {
        "status": "success",
        "prediction": {
            "diagnoses": [_diagnosis(f, heatmaps=heatmaps) for f in analysis.findings],
            "confidence_score": round(analysis.confidence_score, 4),
            "processing_time_ms": round(analysis.processing_time_ms),
            "triage": analysis.triage,
            "impression": analysis.impression,
            "report": analysis.report_text,
        },
        "metadata": metadata,
    }
    if analysis.warnings:  # only when flagged (warn-mode gate, outside the validated population)
        body["warnings"] = list(analysis.warnings)
    return body


@router.post(
    "/api/v1/predict",
    summary="Analyse one chest radiograph (multipart field 'image')",
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def predict(
    request: Request,
    heatmaps: bool = Query(False, description="Add base64 PNG Grad-CAM overlays to the diagnoses"),
) -> dict[str, Any]:
    state = request.app.state
    analyzer = require_analyzer(state)  # 503 before reading a possibly large body
    data, filename = await read_upload(request, field=FIELD, max_bytes=state.settings.max_upload_bytes)
    analysis = await state.inference.analyze(analyzer, data, heatmaps=heatmaps, filename=filename)
    return legacy_response(analysis, heatmaps=heatmaps)
