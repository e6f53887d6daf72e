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


@router.get("/readyz", summary="Readiness: the model is loaded, the database answers, the job queue runs")
@router.head("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    from fhir_server.dbfaults import database_check, queue_check

    state = request.app.state
    analyzer = getattr(state, "analyzer", None)
    # what is wrong, by part: a probe's log line or a person reading it sees which one to fix
    checks = {
        "model": None if analyzer is not None and analyzer.ready
        else getattr(state, "model_error", None) or "The model is not loaded yet.",
        # reachable, and at the schema revision this server needs (CXR_DB_AUTO_UPGRADE=false)
        "database": await database_check(request.app) or getattr(state, "schema_error", None),
        "queue": queue_check(request.app),
    }
    problems = {part: why for part, why in checks.items() if why}
    if problems:
        return JSONResponse(
            {"status": "unavailable", "model": state.settings.model,
             "reason": "; ".join(f"{part}: {why}" for part, why in problems.items()),
             "checks": {part: why or "ok" for part, why in checks.items()}},
            status_code=503,
        )
    assert analyzer is not None
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
