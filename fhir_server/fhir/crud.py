"""read, vread, create (incl. conditional), update, delete of [base]/[type]/[id], and the
conditional update / delete of [base]/[type]?criteria (R4 http.html#cond-update, #cdelete)."""

from __future__ import annotations

import base64
import binascii
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fhir.resources.R4B import get_fhir_model_class

from fhir_server.storage import SUPPORTED_TYPES, StoredResource
from fhir_server.storage.errors import ResourceGone

from .common import base_url, get_store, information_outcome, parse_prefer, resource_headers, write_response
from .exceptions import FhirError
from .negotiation import JSON_BODY_TYPES, body_media_type, fhir_json_response, parse_json_body, shape_limits, read_body, wants_fhir
from .subsetting import Subset, subset_from_params
from .validation import validate_resource

router = APIRouter()

DEFAULT_MAX_BODY = 64 * 1024 * 1024


def check_type(resource_type: str) -> None:
    """404 for anything but the supported types, saying whether the type exists in FHIR at all."""
    if resource_type in SUPPORTED_TYPES:
        return
    try:
        get_fhir_model_class(resource_type)
        known = resource_type[:1].isupper()
    except ValueError:
        known = False
    if known:
        raise FhirError(404, f"Resource type {resource_type} is not supported by this server (supported: {', '.join(SUPPORTED_TYPES)})", code="not-supported")
    raise FhirError(404, f"Unknown resource type {resource_type!r}", code="not-found")


def max_body(request: Request) -> int:
    settings = getattr(request.app.state, "settings", None)
    return getattr(settings, "max_upload_bytes", DEFAULT_MAX_BODY)


async def incoming_resource(request: Request, resource_type: str) -> dict[str, Any]:
    """The validated request body. A Binary may also arrive as raw bytes with their own type."""
    media = body_media_type(request)
    raw = await read_body(request, max_bytes=max_body(request))
    if resource_type == "Binary" and media is not None and media not in JSON_BODY_TYPES:
        body: dict[str, Any] = {"resourceType": "Binary", "contentType": request.headers["content-type"]}
        if raw:
            body["data"] = base64.b64encode(raw).decode("ascii")
    else:
        body = parse_json_body(raw, media, shape_limits(request))
    # pydantic validation of a large resource (base64 images) is CPU work: keep it off the loop
    return await run_in_threadpool(validate_resource, body, expected_type=resource_type)


def _not_modified(request: Request, stored: StoredResource) -> bool:
    tags = request.headers.get("if-none-match")
    if not tags:
        return False
    return any(t.strip() in (stored.etag, f'"{stored.version_id}"', "*") for t in tags.split(","))


def read_response(request: Request, stored: StoredResource, subset: Subset | None = None) -> Response:
    headers = resource_headers(request, stored)
    if _not_modified(request, stored):
        return Response(status_code=304, headers=headers)
    if stored.resource_type == "Binary" and not wants_fhir(request):
        data = stored.resource.get("data") or ""
        try:
            content = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):  # pragma: no cover - validated on the way in
            raise FhirError(500, "stored Binary data is not base64", code="exception") from None
        # stored bytes are user content: never let a browser sniff or run them on our origin
        headers |= {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
        return Response(content, media_type=stored.resource.get("contentType") or "application/octet-stream", headers=headers)
    resource = subset.apply(stored.resource) if subset is not None else stored.resource
    return fhir_json_response(request, resource, headers=headers)


def _gone(exc: ResourceGone, resource_type: str, resource_id: str) -> FhirError:
    headers = {"ETag": f'W/"{exc.version_id}"'} if exc.version_id else None
    return FhirError(410, f"{resource_type}/{resource_id} was deleted", code="deleted", headers=headers)


@router.get("/{resource_type}/{resource_id}", summary="read")
async def read(resource_type: str, resource_id: str, request: Request) -> Response:
    check_type(resource_type)
    subset = subset_from_params(request.query_params.multi_items())
    try:
        stored = await run_in_threadpool(get_store(request).read, resource_type, resource_id)
    except ResourceGone as exc:
        raise _gone(exc, resource_type, resource_id) from None
    return read_response(request, stored, subset)


@router.get("/{resource_type}/{resource_id}/_history/{version_id}", summary="vread")
async def vread(resource_type: str, resource_id: str, version_id: str, request: Request) -> Response:
    check_type(resource_type)
    subset = subset_from_params(request.query_params.multi_items())
    try:
        stored = await run_in_threadpool(get_store(request).vread, resource_type, resource_id, version_id)
    except ResourceGone as exc:
        raise _gone(exc, resource_type, f"{resource_id}/_history/{version_id}") from None
    return read_response(request, stored, subset)


@router.post("/{resource_type}", summary="create (If-None-Exist for conditional create)")
async def create(resource_type: str, request: Request) -> Response:
    check_type(resource_type)
    resource = await incoming_resource(request, resource_type)
    if_none_exist = request.headers.get("if-none-exist")
    stored = await run_in_threadpool(lambda: get_store(request).create(resource, if_none_exist=if_none_exist or None))
    if not stored.created:  # conditional create matched one existing resource
        return write_response(request, stored, status_code=200, message=f"{stored.reference} already exists (If-None-Exist)")
    return write_response(request, stored, status_code=201, message=f"Created {stored.reference}")


@router.put("/{resource_type}/{resource_id}", summary="update (update-as-create allowed; If-Match)")
async def update(resource_type: str, resource_id: str, request: Request) -> Response:
    check_type(resource_type)
    resource = await incoming_resource(request, resource_type)
    media = body_media_type(request)
    if resource_type == "Binary" and media is not None and media not in JSON_BODY_TYPES:
        resource["id"] = resource_id  # raw bytes carry no id; the URL names it
    elif resource.get("id") is None:
        raise FhirError(400, f"the resource body needs an id (equal to {resource_id!r}) for update", code="required", expression=[f"{resource_type}.id"])
    if resource.get("id") not in (None, resource_id):
        raise FhirError(400, f"the body id {resource.get('id')!r} does not match the URL id {resource_id!r}", code="invalid", expression=[f"{resource_type}.id"])
    if_match = request.headers.get("if-match") or None
    stored = await run_in_threadpool(lambda: get_store(request).update(resource_type, resource_id, resource, if_match=if_match))
    status = 201 if stored.created else 200
    return write_response(request, stored, status_code=status, message=f"{'Created' if stored.created else 'Updated'} {stored.reference}")


def delete_response(request: Request, tomb: StoredResource | None, message: str) -> Response:
    """204, or 200 with an informational OperationOutcome under Prefer: return=OperationOutcome."""
    headers = {"ETag": tomb.etag} if tomb is not None else {}
    if parse_prefer(request).return_ == "OperationOutcome":
        return fhir_json_response(request, information_outcome(message), status_code=200, headers=headers)
    return Response(status_code=204, headers=headers)


@router.delete("/{resource_type}/{resource_id}", summary="delete")
async def delete(resource_type: str, resource_id: str, request: Request) -> Response:
    check_type(resource_type)
    if_match = request.headers.get("if-match") or None
    tomb = await run_in_threadpool(lambda: get_store(request).delete(resource_type, resource_id, if_match=if_match))
    message = f"Deleted {resource_type}/{resource_id}" if tomb else f"{resource_type}/{resource_id} did not exist or was already deleted"
    return delete_response(request, tomb, message)


def conditional_criteria(request: Request) -> str:
    """The search criteria of `PUT|DELETE [type]?criteria`, as the store checks them (Transaction.find):
    strictly, presentation parameters dropped, and none at all a 400, since read as "everything"
    they could overwrite or delete any resource of the type."""
    return urlencode(list(request.query_params.multi_items()))


@router.put("/{resource_type}", summary="conditional update ([type]?criteria: 0 matches create, 1 updates, more 412)")
async def conditional_update(resource_type: str, request: Request) -> Response:
    check_type(resource_type)
    criteria = conditional_criteria(request)
    resource = await incoming_resource(request, resource_type)
    if_match = request.headers.get("if-match") or None
    stored = await run_in_threadpool(lambda: get_store(request).conditional_update(resource_type, criteria, resource, if_match=if_match))
    status = 201 if stored.created else 200
    return write_response(request, stored, status_code=status, message=f"{'Created' if stored.created else 'Updated'} {stored.reference} (conditional update)")


@router.delete("/{resource_type}", summary="conditional delete ([type]?criteria, single: more than one match 412)")
async def conditional_delete(resource_type: str, request: Request) -> Response:
    check_type(resource_type)
    criteria = conditional_criteria(request)
    if_match = request.headers.get("if-match") or None
    tomb = await run_in_threadpool(lambda: get_store(request).conditional_delete(resource_type, criteria, if_match=if_match))
    message = f"Deleted {tomb.reference} (conditional delete)" if tomb else f"no {resource_type} matched {criteria}: nothing deleted"
    return delete_response(request, tomb, message)


__all__ = ["router", "check_type", "read_response", "base_url"]
