"""history: [base]/_history, [base]/[type]/_history, [base]/[type]/[id]/_history -> history Bundle."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from fhir_server.storage import StoredResource
from fhir_server.storage.query import MAX_COUNT
from fhir_server.storage.timeutil import DateParseError, parse_range

from .common import base_url, get_store, new_bundle
from .crud import check_type
from .exceptions import FhirError
from .negotiation import fhir_json_response
from .subsetting import Subset, subset_from_params

router = APIRouter()

_STATUS = {"create": "201 Created", "update": "200 OK", "delete": "204 No Content"}


def history_entry(base: str, stored: StoredResource, subset: Subset | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"fullUrl": f"{base}/{stored.resource_type}/{stored.id}"}
    if stored.resource is not None:
        entry["resource"] = subset.apply(stored.resource) if subset is not None else stored.resource
    method = {"create": "POST", "update": "PUT", "delete": "DELETE"}[stored.method]
    entry["request"] = {"method": method, "url": stored.resource_type if method == "POST" else stored.reference}
    entry["response"] = {
        "status": _STATUS[stored.method],
        "etag": stored.etag,
        "lastModified": stored.last_updated_instant,
    }
    if method != "DELETE":
        entry["response"]["location"] = stored.location(base)
    return entry


def _params(request: Request) -> tuple[int, int, datetime | None]:
    q = request.query_params
    try:
        count = min(int(q.get("_count", 20)), MAX_COUNT)
        offset = int(q.get("_offset", 0))
        if count < 0 or offset < 0:
            raise ValueError
    except ValueError:
        raise FhirError(400, "_count and _offset must be non-negative integers", code="invalid") from None
    since = None
    if "_since" in q:
        try:
            since = parse_range(q["_since"])[0]
        except DateParseError as exc:
            raise FhirError(400, f"_since: {exc}", code="invalid", expression=["_since"]) from None
    return count, offset, since


def _bundle(request: Request, path: str, resource_type: str | None, resource_id: str | None) -> dict[str, Any]:
    count, offset, since = _params(request)
    subset = subset_from_params(request.query_params.multi_items(), allow_count=True)
    page = get_store(request).history(resource_type, resource_id, since=since, count=count, offset=offset)
    base = base_url(request)

    def link(off: int) -> str:
        params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("_count", "_offset")]
        return f"{base}/{path}?{urlencode(params + [('_count', str(count)), ('_offset', str(off))])}"

    links = [{"relation": "self", "url": link(offset)}]
    if offset > 0:
        links.append({"relation": "previous", "url": link(max(0, offset - count))})
    if count and offset + count < page.total:
        links.append({"relation": "next", "url": link(offset + count)})
    bundle = new_bundle("history", total=page.total, link=links)
    if page.entries and subset.summary != "count":
        bundle["entry"] = [history_entry(base, e, subset) for e in page.entries]
    return bundle


@router.get("/_history", summary="history-system")
async def history_system(request: Request) -> Response:
    return fhir_json_response(request, await run_in_threadpool(_bundle, request, "_history", None, None))


@router.get("/{resource_type}/_history", summary="history-type")
async def history_type(resource_type: str, request: Request) -> Response:
    check_type(resource_type)
    return fhir_json_response(request, await run_in_threadpool(_bundle, request, f"{resource_type}/_history", resource_type, None))


@router.get("/{resource_type}/{resource_id}/_history", summary="history-instance")
async def history_instance(resource_type: str, resource_id: str, request: Request) -> Response:
    check_type(resource_type)
    return fhir_json_response(request, await run_in_threadpool(_bundle, request, f"{resource_type}/{resource_id}/_history", resource_type, resource_id))
