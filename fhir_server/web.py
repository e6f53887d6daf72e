"""GET /: the reading page (worklist, viewer, upload), its static files, and the two small JSON/PNG
helpers it needs beyond the FHIR API:

    GET /web/api/config                  what the page cannot learn from FHIR: auth on/off, the
                                         critical findings (urgent triage), the disclaimer (open)
    GET /web/api/preview/{media_id}      the film of a stored Media, windowed (see preview.py)

Everything else the page shows comes from the FHIR API (search, read, $analyze), so what it
shows is exactly what an EHR or PACS integration gets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

import mappings
from fhir_server import imaging, preview
from fhir_server.analysis_log import SOURCE_WEB_UPLOAD
from fhir_server.auth import authorize, require_auth
from fhir_server.storage import StorageError
from ml.errors import CXRError
from ml.findings import CRITICAL_FINDINGS, DISCLAIMER

STATIC_DIR = Path(__file__).resolve().parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    # a flat directory: only plain names that exist there, no path traversal
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or not path.is_file():
        from starlette.exceptions import HTTPException

        raise HTTPException(status_code=404)
    media_type = "text/javascript; charset=utf-8" if name.endswith(".js") else None
    return FileResponse(path, media_type=media_type)


@router.get("/web/api/config")
async def config(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    critical = sorted(CRITICAL_FINDINGS)
    return {
        "auth_enabled": settings.auth_enabled,
        "disclaimer": DISCLAIMER,
        "critical_findings": [
            {"label": label, "system": mappings.finding(label).local.system, "code": mappings.finding(label).local.code}
            for label in critical
        ],
        "analyze_task_code": {
            "system": mappings.operations_code_system_url(),
            "code": mappings.operation_code("analyze").code,
        },
        "upload_source": SOURCE_WEB_UPLOAD,
        "presets": list(preview.PRESETS),
    }


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"status": "error", "error": {"code": code, "message": message}}, status_code=status)


@router.get("/web/api/preview/{media_id}", dependencies=[Depends(require_auth)])
async def media_preview(media_id: str, request: Request) -> Response:
    authorize(request, "Media", "r")
    q = request.query_params
    try:
        preset = q.get("preset", "default")
        if preset not in preview.PRESETS:
            raise preview.PreviewError(400, "invalid_parameter", f"preset must be one of {', '.join(preview.PRESETS)}.")
        center = preview.parse_number("center", q.get("center"))
        width = preview.parse_number("width", q.get("width"))
        if (center is None) != (width is None):
            raise preview.PreviewError(400, "invalid_parameter", "Give center and width together.")
        if width is not None and width <= 0:
            raise preview.PreviewError(400, "invalid_parameter", "width must be positive.")
        max_side = preview.parse_number("max_side", q.get("max_side")) or preview.CACHE_MAX_SIDE
        max_side = int(min(max(max_side, 64), preview.CACHE_MAX_SIDE))
        prepared = await _prepared(request, media_id)
        c, w = preview.choose_window(prepared, preset, center, width)
        png = await run_in_threadpool(preview.render, prepared, c, w, max_side)
    except preview.PreviewError as exc:
        return _error(exc.status, exc.code, exc.message)
    return Response(png, media_type="image/png", headers=preview.headers(prepared, c, w))


async def _prepared(request: Request, media_id: str) -> preview.Prepared:
    state = request.app.state
    settings = state.settings
    repo = state.store

    def _read(rtype: str, rid: str) -> Any:
        with repo.transaction(write=False) as tx:
            return tx.read_or_none(rtype, rid)

    try:
        stored = await run_in_threadpool(_read, "Media", media_id)
    except StorageError as exc:
        raise preview.PreviewError(exc.http_status, "not_found", exc.message) from None
    if stored is None or stored.resource is None:
        raise preview.PreviewError(404, "not_found", f"Media/{media_id} does not exist.")
    key = (media_id, str(stored.version_id))
    cache = preview.cache_for(state)
    found = cache.get(key)
    if found is not None:
        return found

    async def read_resource(rtype: str, rid: str) -> dict[str, Any] | None:
        got = await run_in_threadpool(_read, rtype, rid)
        return got.resource if got else None

    try:
        data = await imaging.media_bytes(
            stored.resource, policy=imaging.FetchPolicy.from_settings(settings),
            max_inline_bytes=settings.max_upload_bytes, read_resource=read_resource,
        )
        prepared = await run_in_threadpool(
            preview.prepare, data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels
        )
    except imaging.ImagingError as exc:
        raise preview.PreviewError(exc.status_code, exc.code, exc.diagnostics) from None
    except CXRError as exc:
        raise preview.decode_error(exc) from None
    cache.put(key, prepared)
    return prepared
