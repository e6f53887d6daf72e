"""Every exception -> a JSON error in the format the caller's API speaks; never a traceback.

Paths under /fhir get an OperationOutcome (application/fhir+json); everything else gets the legacy
`{"status": "error", "error": {"code": ..., "message": ...}}`. Unexpected exceptions are logged here
with their traceback and answered with a generic 500.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ml.errors import CXRError

log = logging.getLogger(__name__)

FHIR_PREFIX = "/fhir"
FHIR_JSON = "application/fhir+json"

# HTTP status -> FHIR IssueType (http://hl7.org/fhir/issue-type) for OperationOutcome.issue.code
_ISSUE_TYPE = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    500: "exception",
    503: "transient",
}

# HTTP status -> our stable legacy error code when no typed error supplied one
_LEGACY_CODE = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    410: "gone",
    412: "precondition_failed",
    413: "input_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


def issue_type_for(status_code: int) -> str:
    if status_code in _ISSUE_TYPE:
        return _ISSUE_TYPE[status_code]
    return "exception" if status_code >= 500 else "processing"


def operation_outcome(
    status_code: int, code: str | None, diagnostics: str, expression: str | list[str] | None = None
) -> dict[str, Any]:
    """An R4 OperationOutcome with one issue.

    `code` is a FHIR IssueType (e.g. "invalid", "not-found"); None picks one from the status.
    `expression` is a FHIRPath (or list of them) locating the problem, when known.
    """
    issue: dict[str, Any] = {
        "severity": "fatal" if status_code >= 500 and status_code != 503 else "error",
        "code": code or issue_type_for(status_code),
        "diagnostics": diagnostics,
    }
    if expression:
        issue["expression"] = [expression] if isinstance(expression, str) else list(expression)
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def legacy_error(code: str, message: str) -> dict[str, Any]:
    return {"status": "error", "error": {"code": code, "message": message}}


def is_fhir_path(path: str) -> bool:
    return path == FHIR_PREFIX or path.startswith(FHIR_PREFIX + "/")


def error_response(
    request: Request,
    status_code: int,
    code: str,
    message: str,
    *,
    expression: str | list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error in the caller's format. `code` is our stable snake_case code (legacy API)."""
    if is_fhir_path(request.url.path):
        body = operation_outcome(status_code, None, message, expression)
        # keep our machine-readable code visible to FHIR clients too
        body["issue"][0]["details"] = {"text": code}
        return JSONResponse(body, status_code=status_code, media_type=FHIR_JSON, headers=headers)
    return JSONResponse(legacy_error(code, message), status_code=status_code, headers=headers)


async def _cxr_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CXRError)
    if exc.http_status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    retry_after = getattr(exc, "retry_after", None)  # inference.ServerBusy: when to try again
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    response = error_response(request, exc.http_status, exc.code, exc.message, headers=headers)
    fields = getattr(exc, "fields", None)  # e.g. NotChestXRay: which gate check refused, its score
    if callable(fields) and not is_fhir_path(request.url.path):
        body = legacy_error(exc.code, exc.message)
        body["error"].update(fields())
        response = JSONResponse(body, status_code=exc.http_status, headers=headers)
    return response


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else None
    if not detail:
        try:
            detail = HTTPStatus(status).phrase
        except ValueError:
            detail = "HTTP error"
    if status == 404 and exc.detail == "Not Found":
        detail = f"No such endpoint: {request.method} {request.url.path}"
    elif status == 405:
        detail = f"Method {request.method} is not allowed on {request.url.path}"
    code = _LEGACY_CODE.get(status, "http_error")
    return error_response(request, status, code, detail, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    locations = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        locations.append(loc)
        problems.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    message = "Invalid request: " + "; ".join(problems) if problems else "Invalid request"
    return error_response(request, 400, "invalid_request", message, expression=[l for l in locations if l] or None)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("Unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, "internal_error", "Internal server error; the incident was logged.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(CXRError, _cxr_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
