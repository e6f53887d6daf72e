"""Search: GET [base]/[type]?... and POST [base]/[type]/_search (form body) -> searchset Bundle."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from fhir_server.storage import SearchQuery, SearchResult, StoredResource, new_id, parse_search

from .common import base_url, get_store, new_bundle, parse_prefer
from .crud import check_type, max_body
from .exceptions import FhirError
from .negotiation import body_media_type, fhir_json_response, read_body
from .subsetting import Subset, check_subset

router = APIRouter()

_PAGING = ("_count", "_offset")


def entry_for(base: str, stored: StoredResource, mode: str, subset: Subset | None = None) -> dict[str, Any]:
    resource = stored.resource
    if subset is not None:
        # the spec scopes _elements to the matches; _summary covers included resources as well
        resource = subset.apply(resource, elements=mode == "match")
    return {
        "fullUrl": f"{base}/{stored.resource_type}/{stored.id}",
        "resource": resource,
        "search": {"mode": mode},
    }


def _link(base: str, query: SearchQuery, offset: int) -> str:
    params = [(n, v) for n, v in query.used if n not in _PAGING]
    params += [("_count", str(query.count)), ("_offset", str(offset))]
    return f"{base}/{query.resource_type}?{urlencode(params)}"


def ignored_outcome(ignored: list[str]) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {
                "severity": "warning",
                "code": "not-supported",
                "diagnostics": f"search parameter {name!r} is not supported and was ignored (Prefer: handling=lenient)",
                "expression": [name],
            }
            for name in ignored
        ],
    }


def ignored_entry(ignored: list[str]) -> dict[str, Any]:
    """The searchset entry (mode outcome) that tells a lenient search which parameters it ignored."""
    return {"fullUrl": f"urn:uuid:{new_id()}", "resource": ignored_outcome(ignored), "search": {"mode": "outcome"}}


def searchset(base: str, query: SearchQuery, result: SearchResult) -> dict[str, Any]:
    links = [{"relation": "self", "url": _link(base, query, query.offset)}]
    if query.summary != "count" and query.count > 0:
        links.append({"relation": "first", "url": _link(base, query, 0)})
        if query.offset > 0:
            links.append({"relation": "previous", "url": _link(base, query, max(0, query.offset - query.count))})
        if query.offset + query.count < result.total:
            links.append({"relation": "next", "url": _link(base, query, query.offset + query.count)})
        last = ((result.total - 1) // query.count) * query.count if result.total else 0
        links.append({"relation": "last", "url": _link(base, query, last)})
    subset = Subset(query.summary, tuple(query.elements) if query.elements else None)
    entries = [entry_for(base, m, "match", subset) for m in result.matches]
    entries += [entry_for(base, m, "include", subset) for m in result.included]
    if query.ignored:
        entries.append(ignored_entry(query.ignored))
    bundle = new_bundle("searchset", total=result.total, link=links)
    if entries:
        bundle["entry"] = entries
    return bundle


def parse_query(request: Request, resource_type: str, items: list[tuple[str, str]]) -> SearchQuery:
    """The SearchQuery of `items`, its _summary/_elements combination checked before any work."""
    strict = parse_prefer(request).handling == "strict"
    query = parse_search(resource_type, items, strict=strict)
    check_subset(query.summary, query.elements, allow_count=True)
    return query


def run_search(request: Request, resource_type: str, items: list[tuple[str, str]]) -> dict[str, Any]:
    check_type(resource_type)
    query = parse_query(request, resource_type, items)
    result = get_store(request).search(query)
    return searchset(base_url(request), query, result)


@router.get("/{resource_type}", summary="search-type")
async def search_get(resource_type: str, request: Request) -> Response:
    bundle = await run_in_threadpool(run_search, request, resource_type, list(request.query_params.multi_items()))
    return fhir_json_response(request, bundle)


async def search_items(request: Request) -> list[tuple[str, str]]:
    """The parameters of POST [type]/_search: the query string's, then the form body's."""
    media = body_media_type(request)
    raw = await read_body(request, max_bytes=max_body(request))
    if raw.strip() and media != "application/x-www-form-urlencoded":
        raise FhirError(415, f"POST _search takes application/x-www-form-urlencoded, not {media}", code="not-supported")
    try:
        form = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise FhirError(400, "the form body is not UTF-8", code="structure") from None
    return list(request.query_params.multi_items()) + form


@router.post("/{resource_type}/_search", summary="search-type (form body)")
async def search_post(resource_type: str, request: Request) -> Response:
    check_type(resource_type)
    items = await search_items(request)
    trail = getattr(request.state, "audit", None)
    if trail is not None:  # the form body's parameters belong in the AuditEvent's query too
        trail.set_query(urlencode(items))
    return fhir_json_response(request, await run_in_threadpool(run_search, request, resource_type, items))
