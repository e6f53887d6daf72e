"""STOW-RS client (PS3.18 10.5): POST DICOM Part 10 objects as multipart/related to a DICOMweb
server's /studies, through the same outbound URL allowlist as every other fetch (FetchPolicy).

Answers are split for a retrying delivery: network errors, timeouts, 408/429/5xx -> StowUnavailable
(retry later); any other 4xx, or an object listed in FailedSOPSequence -> StowRefused (for good).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import pydicom
from pydicom.dataset import Dataset

from fhir_server.imaging import FetchPolicy, ImagingError

_RETRYABLE = {408, 425, 429}


class StowUnavailable(Exception):
    pass


class StowRefused(Exception):
    pass


@dataclass(frozen=True)
class StowResult:
    status_code: int
    stored: list[str]  # SOPInstanceUIDs the server lists as stored
    retrieve_url: str | None


def studies_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/studies") else f"{base}/studies"


def part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart_body(objects: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = f"cxr-{uuid.uuid4().hex}"
    parts = []
    for data in objects:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _uids(items: object) -> list[str]:
    out = []
    for item in items or []:  # type: ignore[attr-defined]
        value = (item.get("00081155") or {}).get("Value") or []
        out += [str(v) for v in value]
    return out


async def stow(url: str, objects: Sequence[bytes], *, policy: FetchPolicy, client: httpx.AsyncClient) -> StowResult:

    target = studies_url(url)
    try:
        checked = await policy.check(target, "CXR_DICOMWEB_STOW_URL")
    except ImagingError as exc:
        raise StowRefused(f"STOW-RS URL not allowed: {exc.diagnostics}") from exc
    body, content_type = multipart_body(objects)
    try:
        response = await client.post(
            checked, content=body, timeout=policy.timeout_s,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
        )
    except httpx.HTTPError as exc:
        raise StowUnavailable(f"STOW-RS to {target} failed: {type(exc).__name__}: {exc}") from exc
    if response.status_code >= 500 or response.status_code in _RETRYABLE:
        raise StowUnavailable(f"STOW-RS to {target} answered {response.status_code}")
    payload: dict = {}
    try:
        parsed = response.json() if response.content else {}
        payload = parsed if isinstance(parsed, dict) else {}
    except ValueError:
        payload = {}
    failed = _uids((payload.get("00081198") or {}).get("Value"))
    if response.status_code >= 400 or failed:
        raise StowRefused(
            f"STOW-RS to {target} answered {response.status_code}" + (f"; failed: {', '.join(failed)}" if failed else "")
        )
    stored = _uids((payload.get("00081199") or {}).get("Value"))
    retrieve = ((payload.get("00081190") or {}).get("Value") or [None])[0]
    return StowResult(response.status_code, stored, retrieve)


def read_part10(data: bytes) -> Dataset:
    return pydicom.dcmread(io.BytesIO(data))
