"""Media.content -> image bytes: inline base64, a stored Binary/<id>, or an allowlisted URL."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from fhir_server.imaging.fetch import FetchPolicy, ImagingError, fetch

Json = dict[str, Any]
ReadResource = Callable[[str, str], Awaitable[Json | None]]  # (type, id) -> resource or None


def decode_base64(data: str, *, max_bytes: int, expression: str) -> bytes:
    # FHIR base64Binary has no whitespace, but wrapped base64 from other tools is common.
    compact = "".join(data.split())
    if len(compact) * 3 // 4 > max_bytes:
        raise ImagingError(413, "too-costly", f"Inline image is larger than {max_bytes} bytes", expression)
    try:
        if len(compact) % 4:  # b64decode tolerates stray padding; FHIR base64Binary does not
            raise ValueError(f"length {len(compact)} is not a multiple of 4")
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImagingError(400, "invalid", f"Not valid base64: {exc}", expression) from exc
    if not raw:
        raise ImagingError(400, "required", "The inline image is empty", expression)
    return raw


async def media_bytes(
    media: Json,
    *,
    policy: FetchPolicy,
    max_inline_bytes: int,
    read_resource: ReadResource,
    client: httpx.AsyncClient | None = None,
    own_base: str | None = None,
) -> bytes:
    """The image of a Media: content.data, else content.url (Binary/<id> or [own_base]/Binary/<id>
    from the store, never over the network; else an allowlisted http(s) URL)."""
    content = media.get("content") or {}
    if content.get("data"):
        return decode_base64(content["data"], max_bytes=max_inline_bytes, expression="Media.content.data")
    url = content.get("url")
    if not url:
        raise ImagingError(
            400, "required", "Media.content needs data (base64) or url to be analysed", "Media.content"
        )
    local = url[len(own_base.rstrip("/")) + 1 :] if own_base and url.startswith(own_base.rstrip("/") + "/") else url
    binary_id = _relative_binary(local)
    if binary_id is not None:
        binary = await read_resource("Binary", binary_id)
        if binary is None or not binary.get("data"):
            raise ImagingError(422, "not-found", f"{url} does not exist or has no data", "Media.content.url")
        return decode_base64(binary["data"], max_bytes=max_inline_bytes, expression="Binary.data")
    fetched = await fetch(url, policy, expression="Media.content.url", client=client)
    if not fetched.content:
        raise ImagingError(422, "invalid", f"{url} returned an empty body", "Media.content.url")
    return fetched.content


def _relative_binary(url: str) -> str | None:
    parts = url.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "Binary" and parts[1]:
        return parts[1]
    return None
