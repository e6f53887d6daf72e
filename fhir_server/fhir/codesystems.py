"""Our own CodeSystems, published read-only: cxr-findings (Observation.code), cxr-result-parts
(Observation.component.code) and cxr-operations (Task.code), built by mappings.codesystems from the same tables the resources are coded from.

    GET  /fhir/CodeSystem/{id}                 read (cxr-findings, cxr-operations, cxr-result-parts); else 404
    GET  /fhir/CodeSystem?url=|_id=|name=|version=   searchset Bundle with total (none = all)
    POST /fhir/CodeSystem/_search              the same, form body
    GET  /fhir/CodeSystem/$lookup?system=&code=[&version=]   Parameters (name, version, display)
    GET  /fhir/CodeSystem/{id}/$lookup?code=   the same on one CodeSystem
    POST, PUT, PATCH, DELETE                   405 OperationOutcome + Allow: the server owns them

CodeSystem is deliberately not a stored type (fhir_server.storage SUPPORTED_TYPES): storing it
would make it writable through the generic routes, and a client-edited copy could then disagree
with the codes the server actually emits. These routes are included before the generic
/{type} and /{type}/{id} routes (fhir_server.fhir.build_router), as the OperationDefinition read is.
"""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from mappings.codesystems import code_systems

from .common import base_url, new_bundle, parse_prefer
from .crud import max_body
from .exceptions import FhirError
from .negotiation import body_media_type, fhir_json_response, parse_json_body, shape_limits, read_body
from .search import ignored_entry, search_items
from .subsetting import Subset, subset_from_params

Json = dict[str, Any]
RESOURCE_TYPE = "CodeSystem"
SP_BASE = "http://hl7.org/fhir/SearchParameter/"
# Search parameters, told to the CapabilityStatement (metadata.py) from this one table:
# name -> (type, SearchParameter definition, documentation)
SEARCH_PARAMS: dict[str, tuple[str, str, str]] = {
    "_id": ("token", SP_BASE + "Resource-id", "Logical id of the CodeSystem (cxr-findings, cxr-operations, cxr-result-parts)"),
    "url": ("uri", SP_BASE + "conformance-url", "The canonical url (exact; url|version also accepted)"),
    "name": ("string", SP_BASE + "conformance-name", "Computationally friendly name (case-insensitive prefix)"),
    "version": ("token", SP_BASE + "conformance-version", "The business version (the software version)"),
}
# Result parameters a search accepts without filtering on them (the generic search knows more;
# paging is meaningless for two resources, so _count/_offset are accepted and ignored).
_RESULT_PARAMS = frozenset({"_format", "_pretty", "_summary", "_elements", "_count", "_offset"})
READ_ONLY_ALLOW = "GET"

router = APIRouter(tags=["FHIR terminology"])


def published() -> dict[str, Json]:
    return code_systems()


def _read_only() -> FhirError:
    return FhirError(
        405,
        "CodeSystem is read-only on this server: our CodeSystems are generated from its "
        "terminology tables (mappings/*.json) and change only with a release. Supported: read, search-type, $lookup.",
        code="not-supported",
        headers={"Allow": READ_ONLY_ALLOW},
    )


def _unknown(cs_id: str) -> FhirError:
    known = ", ".join(published())
    return FhirError(404, f"CodeSystem/{cs_id} is not known (this server publishes: {known})", code="not-found")


# ---------------------------------------------------------------------------------- search


def _token(value: str) -> str:
    return value.rsplit("|", 1)[-1]  # token search: "system|code" or "code"; ids have no system


def _matches(cs: Json, name: str, value: str) -> bool:
    """One parameter, comma = OR (R4 search.html). Missing modifiers are refused earlier."""
    for alternative in value.split(","):
        if name == "_id" and cs["id"] == _token(alternative):
            return True
        if name == "url":
            url, _, wanted_version = alternative.partition("|")  # canonical reference url|version
            if cs["url"] == url and (not wanted_version or cs.get("version") == wanted_version):
                return True
        if name == "name" and cs["name"].lower().startswith(alternative.lower()):
            return True
        if name == "version" and cs.get("version") == _token(alternative):
            return True
    return False


def search_code_systems(request: Request, items: list[tuple[str, str]]) -> Json:
    """The searchset Bundle of `items`; unknown parameters: 400 when strict, else ignored and
    reported in an outcome entry (as the generic search does)."""
    strict = parse_prefer(request).handling == "strict"
    subset = subset_from_params(items, allow_count=True)
    used: list[tuple[str, str]] = []
    ignored: list[str] = []
    for name, value in items:
        if name in _RESULT_PARAMS:
            continue
        if name not in SEARCH_PARAMS:  # includes modifiers (url:below ...): not supported here
            if strict:
                raise FhirError(
                    400, f"search parameter {name!r} is not supported for CodeSystem (supported: {', '.join(SEARCH_PARAMS)})",
                    code="not-supported", expression=[name],
                )
            ignored.append(name)
            continue
        used.append((name, value))
    matches = [cs for cs in published().values() if all(_matches(cs, n, v) for n, v in used)]
    base = base_url(request)
    query = urlencode(used)
    entries: list[Json] = []
    if subset.summary != "count":
        entries = [
            {"fullUrl": f"{base}/CodeSystem/{cs['id']}", "resource": subset.apply(cs), "search": {"mode": "match"}}
            for cs in matches
        ]
    if ignored:
        entries.append(ignored_entry(ignored))
    bundle = new_bundle("searchset", total=len(matches),
                        link=[{"relation": "self", "url": f"{base}/CodeSystem" + (f"?{query}" if query else "")}])
    if entries:
        bundle["entry"] = entries
    return bundle


# ---------------------------------------------------------------------------------- $lookup


def lookup(system: str | None, code: str | None, version: str | None = None, *, cs_id: str | None = None) -> Json:
    """R4 CodeSystem-lookup: Parameters with name (the CodeSystem's title), version, display and,
    when the table has one, the concept's definition as a property."""
    if cs_id is not None:
        cs = published().get(cs_id)
        if cs is None:
            raise _unknown(cs_id)
        if system and system != cs["url"]:
            raise FhirError(400, f"system {system!r} is not the url of CodeSystem/{cs_id}", code="invalid", expression=["system"])
    else:
        if not system:
            raise FhirError(400, "$lookup needs a system (or a coding) at type level", code="required", expression=["system"])
        cs = next((c for c in published().values() if c["url"] == system), None)
        if cs is None:
            raise FhirError(404, f"CodeSystem {system!r} is not known to this server", code="not-found", expression=["system"])
    if not code:
        raise FhirError(400, "$lookup needs a code (or a coding)", code="required", expression=["code"])
    if version and version != cs.get("version"):
        raise FhirError(404, f"{cs['url']} version {version!r} is not known (this server has {cs.get('version')})", code="not-found", expression=["version"])
    concept = next((c for c in cs.get("concept", []) if c["code"] == code), None)  # caseSensitive
    if concept is None:
        raise FhirError(404, f"code {code!r} is not in {cs['url']}", code="code-invalid", expression=["code"])
    parameters: list[Json] = [
        {"name": "name", "valueString": cs.get("title") or cs["name"]},
        {"name": "version", "valueString": cs["version"]},
        {"name": "display", "valueString": concept.get("display", code)},
    ]
    if concept.get("definition"):
        parameters.append(
            {"name": "property", "part": [{"name": "code", "valueCode": "definition"}, {"name": "value", "valueString": concept["definition"]}]}
        )
    return {"resourceType": "Parameters", "parameter": parameters}


def _lookup_inputs(pairs: list[tuple[str, Any]]) -> tuple[str | None, str | None, str | None]:
    """(system, code, version) from query pairs or Parameters; a coding fills what is missing."""
    values = dict(pairs)
    system, code, version = values.get("system"), values.get("code"), values.get("version")
    coding = values.get("coding")
    if isinstance(coding, dict):
        system, code, version = system or coding.get("system"), code or coding.get("code"), version or coding.get("version")
    return system, code, version


async def _lookup_request(request: Request) -> tuple[str | None, str | None, str | None]:
    pairs: list[tuple[str, Any]] = list(request.query_params.multi_items())
    if request.method == "POST":
        raw = await read_body(request, max_bytes=max_body(request))
        if raw.strip():
            body = parse_json_body(raw, body_media_type(request), shape_limits(request))
            if body.get("resourceType") != "Parameters":
                raise FhirError(400, "POST $lookup takes a Parameters resource", code="invalid", expression=["resourceType"])
            for p in body.get("parameter") or []:
                if not isinstance(p, dict):
                    continue
                value = next((v for k, v in p.items() if k.startswith("value")), None)
                pairs.append((p.get("name", ""), value))
    return _lookup_inputs(pairs)


@router.get("/CodeSystem/$lookup", summary="$lookup: display of one of our codes (system, code)")
async def lookup_type(request: Request) -> Response:
    return fhir_json_response(request, lookup(*await _lookup_request(request)))


@router.post("/CodeSystem/$lookup", summary="$lookup: display of one of our codes (Parameters body)")
async def lookup_type_post(request: Request) -> Response:
    return fhir_json_response(request, lookup(*await _lookup_request(request)))


@router.api_route("/CodeSystem/{cs_id}/$lookup", methods=["GET", "POST"], include_in_schema=False)
async def lookup_instance(cs_id: str, request: Request) -> Response:
    system, code, version = await _lookup_request(request)
    return fhir_json_response(request, lookup(system, code, version, cs_id=cs_id))


# ---------------------------------------------------------------------------------- read / search


@router.get("/CodeSystem", include_in_schema=False)
async def search_get(request: Request) -> Response:
    return fhir_json_response(request, search_code_systems(request, list(request.query_params.multi_items())))


@router.post("/CodeSystem/_search", include_in_schema=False)
async def search_post(request: Request) -> Response:
    return fhir_json_response(request, search_code_systems(request, await search_items(request)))


@router.get("/CodeSystem/{cs_id}", include_in_schema=False)
async def read(cs_id: str, request: Request) -> Response:
    subset: Subset = subset_from_params(request.query_params.multi_items())
    cs = published().get(cs_id)
    if cs is None:
        raise _unknown(cs_id)
    return fhir_json_response(request, subset.apply(copy.deepcopy(cs)))


@router.api_route("/CodeSystem", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
@router.api_route("/CodeSystem/{cs_id}", methods=["POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def write(request: Request) -> Response:
    raise _read_only()


__all__ = ["RESOURCE_TYPE", "SEARCH_PARAMS", "lookup", "published", "router", "search_code_systems"]
