"""Formats: JSON only. `_format` overrides Accept; XML or anything else -> 406; request bodies
in another format -> 415; `_pretty=true` indents."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from fhir_server import fhirjson

from .exceptions import FhirError
from .shape import ShapeLimits, limits_from, parse_limited

FHIR_JSON = "application/fhir+json"
FHIR_JSON_UTF8 = "application/fhir+json; charset=utf-8"
PLAIN_JSON_UTF8 = "application/json; charset=utf-8"

# Media types we read as FHIR JSON (application/json+fhir is the pre-R3 name clients still send).
JSON_BODY_TYPES = {"application/fhir+json", "application/json", "application/json+fhir"}
_FORMAT_ALIASES = {
    "json": FHIR_JSON_UTF8,
    "application/fhir+json": FHIR_JSON_UTF8,
    "application/json+fhir": FHIR_JSON_UTF8,
    "fhir+json": FHIR_JSON_UTF8,
    "application/json": PLAIN_JSON_UTF8,
}


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _accept_ranges(header: str) -> list[tuple[str, float]]:
    ranges = []
    for index, part in enumerate(header.split(",")):
        pieces = [p.strip() for p in part.split(";")]
        if not pieces[0]:
            continue
        q = 1.0
        for param in pieces[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranges.append((pieces[0].lower(), q, index))
    ranges.sort(key=lambda r: (-r[1], r[2]))
    return [(mt, q) for mt, q, _ in ranges]


def negotiate(request: Request, *, raise_error: bool = True) -> str:
    """The response Content-Type for this request, or FhirError 406."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        # an unencoded '+' in a query string arrives as a space (application/fhir json)
        chosen = _FORMAT_ALIASES.get(_media_type(fmt).replace(" ", "+"))
        if chosen is None:
            if raise_error:
                raise FhirError(406, f"_format={fmt} is not supported; this server speaks JSON only (json, application/fhir+json)", code="not-supported")
            return FHIR_JSON_UTF8
        return chosen
    accept = request.headers.get("accept")
    if not accept or not accept.strip():
        return FHIR_JSON_UTF8
    for media, q in _accept_ranges(accept):
        if q <= 0:
            continue
        if media in ("application/fhir+json", "application/json+fhir", "*/*", "application/*"):
            return FHIR_JSON_UTF8
        if media == "application/json":
            return PLAIN_JSON_UTF8
    if raise_error:
        raise FhirError(406, f"cannot answer in any of Accept: {accept}; this server speaks application/fhir+json only", code="not-supported")
    return FHIR_JSON_UTF8


def wants_fhir(request: Request) -> bool:
    """True when the client asked for a FHIR/JSON representation explicitly (Binary read)."""
    if request.query_params.get("_format") is not None:
        return True
    accept = request.headers.get("accept") or ""
    return any(
        media in ("application/fhir+json", "application/json+fhir", "application/json") and q > 0
        for media, q in _accept_ranges(accept)
    )


def pretty(request: Request) -> bool:
    return request.query_params.get("_pretty", "").lower() == "true"


def shape_limits(request: Request) -> ShapeLimits:
    return limits_from(getattr(request.app.state, "settings", None))


def fhir_json_response(
    request: Request, body: Any, *, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    media = negotiate(request, raise_error=False)
    text = fhirjson.dumps(body, indent=2 if pretty(request) else None)  # decimals as they were sent
    return Response(text.encode("utf-8"), status_code=status_code, media_type=media, headers=headers)


def check_format(request: Request) -> None:
    """Router dependency: 406 before any work when the response format cannot be served.
    Binary reads are exempt from Accept (they answer raw content) but not from _format."""
    parts = request.url.path.rstrip("/").split("/")
    is_binary_read = request.method in ("GET", "HEAD") and "Binary" in parts and request.query_params.get("_format") is None
    if not is_binary_read:
        negotiate(request)


def body_media_type(request: Request) -> str | None:
    value = request.headers.get("content-type")
    return _media_type(value) if value else None


async def read_body(request: Request, *, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FhirError(413, f"request body larger than {max_bytes} bytes", code="too-costly")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise FhirError(413, f"request body larger than {max_bytes} bytes", code="too-costly")
    return bytes(body)


def parse_json_body(raw: bytes, media_type: str | None, limits: ShapeLimits | None = None) -> dict[str, Any]:
    """JSON request body -> dict; 415 for non-JSON content types, 400 for bad JSON, 400/413 past
    the shape limits (fhir_server.fhir.shape; defaults unless `limits`). Decimals stay exact."""
    if media_type is not None and media_type not in JSON_BODY_TYPES:
        raise FhirError(415, f"Content-Type {media_type} is not supported; send application/fhir+json", code="not-supported")
    if not raw.strip():
        raise FhirError(400, "the request body is empty; a FHIR JSON resource is required", code="required")
    try:
        body = parse_limited(raw, limits or ShapeLimits())
    except UnicodeDecodeError:
        raise FhirError(400, "the request body is not UTF-8", code="structure") from None
    except json.JSONDecodeError as exc:
        raise FhirError(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", code="structure") from None
    except ValueError as exc:  # NaN/Infinity, an integer of more digits than Python converts
        raise FhirError(400, f"the request body is not valid FHIR JSON: {exc}", code="structure") from None
    if not isinstance(body, dict):
        raise FhirError(400, "the request body must be a JSON object (a FHIR resource)", code="structure")
    return body


async def read_json_body(request: Request, *, max_bytes: int) -> dict[str, Any]:
    media = body_media_type(request)
    if media is not None and media not in JSON_BODY_TYPES:
        raise FhirError(415, f"Content-Type {media} is not supported; send application/fhir+json", code="not-supported")
    return parse_json_body(await read_body(request, max_bytes=max_bytes), media, shape_limits(request))
