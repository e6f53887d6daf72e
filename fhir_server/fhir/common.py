"""Shared pieces of the FHIR routes: the FhirError exception, the base URL, the store, Prefer,
response headers of a stored resource, and OperationOutcome responses.

Routes raise FhirError (or a storage error); `install_fhir_error_handlers` renders both as an
OperationOutcome with the right status, issue code and expression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fhir_server.storage import Repository, StoredResource, new_id
from fhir_server.storage.errors import StorageError
from fhir_server.storage.timeutil import format_instant, utcnow

from .exceptions import FhirError
from .negotiation import fhir_json_response


def error_from_storage(exc: StorageError) -> FhirError:
    return FhirError(exc.http_status, exc.message, code=exc.issue_code, expression=exc.expression)


def outcome_response(request: Request, exc: FhirError) -> Response:
    return fhir_json_response(request, exc.outcome(), status_code=exc.status_code, headers=exc.headers)


def install_fhir_error_handlers(app: FastAPI) -> None:
    """FhirError and storage errors -> OperationOutcome (app-level handlers)."""

    async def _fhir_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FhirError)
        return outcome_response(request, exc)

    async def _storage_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StorageError)
        return outcome_response(request, error_from_storage(exc))

    app.add_exception_handler(FhirError, _fhir_error)
    app.add_exception_handler(StorageError, _storage_error)


def new_bundle(bundle_type: str, **elements: Any) -> dict[str, Any]:
    """A Bundle this server generates (search, history, batch/transaction responses): its own id
    and the instant it was assembled, then `elements` (total, link, ...)."""
    return {
        "resourceType": "Bundle",
        "id": new_id(),
        "meta": {"lastUpdated": format_instant(utcnow())},
        "type": bundle_type,
        **elements,
    }


def get_store(request: Request) -> Repository:
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise FhirError(503, "The FHIR store is not available", code="transient")
    trail = getattr(request.state, "audit", None)  # fhir_server.audit: this request's AuditTrail
    return store.with_hooks(trail) if trail is not None else store


def base_url(request: Request) -> str:
    """The FHIR base: settings.base_url when configured (behind a proxy), else from the request."""
    settings = getattr(request.app.state, "settings", None)
    configured = getattr(settings, "base_url", None)
    if configured:
        return configured.rstrip("/")
    return str(request.base_url).rstrip("/") + "/fhir"


@dataclass(frozen=True)
class Prefer:
    return_: str = "representation"  # minimal | representation | OperationOutcome
    handling: str = "lenient"  # strict | lenient
    respond_async: bool = False


def parse_prefer(request: Request) -> Prefer:
    values: dict[str, str] = {}
    respond_async = False
    for header in request.headers.getlist("prefer"):
        for part in header.split(","):
            for token in part.split(";"):
                name, _, value = token.strip().partition("=")
                name = name.strip().lower()
                if name == "respond-async":
                    respond_async = True
                elif name in ("return", "handling"):
                    values[name] = value.strip().strip('"')
    ret = values.get("return", "representation")
    if ret.lower() == "operationoutcome":
        ret = "OperationOutcome"
    elif ret not in ("minimal", "representation"):
        ret = "representation"
    handling = values.get("handling", "lenient").lower()
    return Prefer(ret, handling if handling in ("strict", "lenient") else "lenient", respond_async)


def resource_headers(request: Request, stored: StoredResource, *, location: bool = False) -> dict[str, str]:
    headers = {"ETag": stored.etag, "Last-Modified": stored.last_modified}
    if location:
        headers["Location"] = stored.location(base_url(request))
    return headers


def information_outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": text}],
    }


def write_response(request: Request, stored: StoredResource, *, status_code: int, message: str) -> Response:
    """The answer to create/update honouring Prefer: return=minimal|representation|OperationOutcome."""
    prefer = parse_prefer(request)
    headers = resource_headers(request, stored, location=True)
    if prefer.return_ == "minimal":
        return Response(status_code=status_code, headers=headers)
    if prefer.return_ == "OperationOutcome":
        return fhir_json_response(request, information_outcome(message), status_code=status_code, headers=headers)
    return fhir_json_response(request, stored.resource, status_code=status_code, headers=headers)


__all__ = [
    "FhirError",
    "JSONResponse",
    "Prefer",
    "base_url",
    "error_from_storage",
    "get_store",
    "information_outcome",
    "install_fhir_error_handlers",
    "outcome_response",
    "parse_prefer",
    "resource_headers",
    "write_response",
]
