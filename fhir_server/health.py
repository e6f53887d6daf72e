"""Liveness and readiness probes (for load balancers and orchestrators)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


# GET and HEAD as two routes: one route with both methods gets ONE operationId for both (invalid
# OpenAPI) chosen from a set, so openapi.json changed with the hash seed. HEAD is kept out of it.
@router.get("/healthz", summary="Liveness: the process answers")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the model is loaded and requests can be analysed")
@router.head("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    analyzer = getattr(state, "analyzer", None)
    if analyzer is None or not analyzer.ready:
        reason = getattr(state, "model_error", None) or "The model is not loaded yet."
        return JSONResponse(
            {"status": "unavailable", "model": state.settings.model, "reason": reason}, status_code=503
        )
    schema_error = getattr(state, "schema_error", None)
    if schema_error:
        return JSONResponse({"status": "unavailable", "reason": schema_error}, status_code=503)
    info = analyzer.model_info
    body = {
        "status": "ready",
        "model": info.name,
        "model_version": info.version,
        "software_version": info.software_version,
        "untrained": info.untrained,
        "ood_gate": analyzer.has_ood_gate,
        "engine": getattr(analyzer, "engine", "torch"),
        "precision": getattr(analyzer, "precision", "fp32"),
    }
    return JSONResponse(body)
