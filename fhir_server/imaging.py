"""Getting pixels for $analyze: Media.content (inline base64, Binary/<id>, http(s) URL) and
ImagingStudy -> Endpoint (dicom-wado-rs) -> QIDO-RS + WADO-RS.

Network safety (SSRF): every outgoing URL passes `FetchPolicy.check` *before* any connection:
http(s) only, host on the `fetch_allowed_hosts` allowlist (empty list = no fetching at all), and
a hostname on the allowlist must not resolve to a loopback / private / link-local / metadata /
reserved address unless that address (or a CIDR containing it) is itself on the allowlist.
Redirects are followed by hand so every hop is checked again. Bodies are streamed and cut at
`fetch_max_bytes`; the whole fetch (all hops) has one `fetch_timeout_s` deadline.

Known limit: the address check and httpx's own connect resolve DNS separately, so a hostile
DNS server for an *allowlisted* name could still rebind between the two. Allowlist only names
your own DNS serves.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email.message import Message
from io import BytesIO
from typing import Any

import httpx

import mappings

Json = dict[str, Any]
ReadResource = Callable[[str, str], Awaitable[Json | None]]  # (type, id) -> resource or None
Resolver = Callable[[str], Awaitable[list[str]]]  # hostname -> IP addresses

MAX_REDIRECTS = 5
# A chest study rarely has more than a handful of radiographs; a cap keeps one request bounded.
MAX_STUDY_INSTANCES = 16
ANALYZABLE_MODALITIES = ("CR", "DX")
DICOM_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
ENDPOINT_WADO = "dicom-wado-rs"
_CLOUD_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


class ImagingError(Exception):
    """Why pixels could not be obtained; the route turns it into an OperationOutcome."""

    def __init__(self, status_code: int, code: str, diagnostics: str, expression: str | None = None):
        super().__init__(diagnostics)
        self.status_code = status_code
        self.code = code  # OperationOutcome issue code
        self.diagnostics = diagnostics
        self.expression = expression


async def _system_resolve(host: str) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list({info[4][0] for info in infos})


def _is_internal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip in _CLOUD_METADATA
        or ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


@dataclass
class FetchPolicy:
    allowed_hosts: Sequence[str] = ()
    timeout_s: float = 10.0
    max_bytes: int = 64 * 1024 * 1024
    resolver: Resolver = _system_resolve  # injectable so tests never touch real DNS
    _names: set[str] = field(init=False, default_factory=set)
    _networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        for entry in self.allowed_hosts:
            entry = entry.strip().lower().rstrip(".")
            if not entry:
                continue
            try:
                self._networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self._names.add(entry)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> FetchPolicy:
        return cls(
            allowed_hosts=list(settings.fetch_allowed_hosts),
            timeout_s=float(settings.fetch_timeout_s),
            max_bytes=int(settings.fetch_max_bytes),
            **overrides,
        )

    def _ip_allowed(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in net for net in self._networks)

    async def check(self, url: str, expression: str | None) -> httpx.URL:
        """Refuse a URL the server must not reach; called before every request and redirect."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ImagingError(400, "invalid", f"Not a valid URL: {url!r} ({exc})", expression) from exc
        if parsed.scheme not in ("http", "https"):
            raise ImagingError(
                422, "not-supported", f"Only http(s) URLs are fetched, not {parsed.scheme or 'relative'!r}: {url}",
                expression,
            )
        host = (parsed.host or "").lower().rstrip(".")
        if not host:
            raise ImagingError(400, "invalid", f"URL has no host: {url}", expression)
        if not self._names and not self._networks:
            raise ImagingError(
                403, "forbidden",
                "Fetching images by URL is disabled on this server. Send the image inline "
                "(Media.content.data) or ask the operator to list the host in CXR_FETCH_ALLOWED_HOSTS.",
                expression,
            )
        try:
            literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            if not self._ip_allowed(literal):
                raise ImagingError(
                    403, "forbidden",
                    f"Address {host} is not on the fetch allowlist (CXR_FETCH_ALLOWED_HOSTS).", expression,
                )
            return parsed
        if host not in self._names:
            raise ImagingError(
                403, "forbidden",
                f"Host {host!r} is not on the fetch allowlist; the operator can add it to "
                "CXR_FETCH_ALLOWED_HOSTS.",
                expression,
            )
        try:
            addresses = await asyncio.wait_for(self.resolver(host), timeout=self.timeout_s)
        except (OSError, asyncio.TimeoutError):
            # Unresolvable: no address means no connection can reach an internal host either;
            # the request itself will fail with a clear 502.
            addresses = []
        for addr in addresses:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
            if _is_internal(ip) and not self._ip_allowed(ip):
                raise ImagingError(
                    403, "forbidden",
                    f"Host {host!r} resolves to internal address {ip}; list that address or its network "
                    "in CXR_FETCH_ALLOWED_HOSTS to allow it.",
                    expression,
                )
        return parsed


@dataclass(frozen=True)
class Fetched:
    content: bytes
    content_type: str
    url: str


def _client() -> httpx.AsyncClient:
    # trust_env=False: proxy variables must not silently route around the allowlist.
    return httpx.AsyncClient(follow_redirects=False, trust_env=False)


async def fetch(
    url: str,
    policy: FetchPolicy,
    *,
    expression: str | None,
    headers: dict[str, str] | None = None,
    client: httpx.AsyncClient | None = None,
) -> Fetched:
    """GET url within the policy: allowlist per hop, size cap while streaming, one deadline."""
    own = client is None
    client = client or _client()
    try:
        return await asyncio.wait_for(_fetch(client, url, policy, expression, headers or {}), policy.timeout_s)
    except asyncio.TimeoutError as exc:
        raise ImagingError(
            504, "timeout", f"Fetching {url} took longer than {policy.timeout_s:g} s (CXR_FETCH_TIMEOUT_S)",
            expression,
        ) from exc
    finally:
        if own:
            await client.aclose()


async def _fetch(
    client: httpx.AsyncClient, url: str, policy: FetchPolicy, expression: str | None, headers: dict[str, str]
) -> Fetched:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        target = await policy.check(current, expression)
        try:
            async with client.stream(
                "GET", target, headers=headers, timeout=httpx.Timeout(policy.timeout_s)
            ) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        raise ImagingError(502, "exception", f"{current} redirected without a Location", expression)
                    current = str(target.join(location))
                    continue
                if response.status_code >= 400:
                    raise ImagingError(
                        502, "exception", f"{current} answered HTTP {response.status_code}", expression
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                    raise _too_large(current, policy, expression)
                buf = bytearray()
                async for chunk in response.aiter_bytes():
                    buf += chunk
                    if len(buf) > policy.max_bytes:
                        raise _too_large(current, policy, expression)
                return Fetched(bytes(buf), response.headers.get("content-type", ""), current)
        except httpx.TimeoutException as exc:
            raise ImagingError(
                504, "timeout", f"Fetching {current} timed out after {policy.timeout_s:g} s", expression
            ) from exc
        except httpx.HTTPError as exc:
            raise ImagingError(502, "exception", f"Could not fetch {current}: {exc}", expression) from exc
    raise ImagingError(502, "exception", f"Too many redirects fetching {url}", expression)


def _too_large(url: str, policy: FetchPolicy, expression: str | None) -> ImagingError:
    return ImagingError(
        413, "too-costly", f"{url} is larger than the {policy.max_bytes} byte limit (CXR_FETCH_MAX_BYTES)",
        expression,
    )


# ---------------------------------------------------------------------------------- Media


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


# ---------------------------------------------------------------------------------- multipart


def parse_multipart_related(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/related body (RFC 2046 / 2387) into (headers, payload) parts.

    Written here rather than borrowed from dicomweb-client: its decoder is a method of
    DICOMwebClient bound to its requests session, and we need the parts of a body we already
    streamed under our own limits. Binary payloads are never decoded as text.
    """
    msg = Message()
    msg["content-type"] = content_type
    if msg.get_content_type() != "multipart/related":
        raise ValueError(f"expected multipart/related, got {content_type!r}")
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise ValueError("multipart/related response without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    # The first delimiter may start the body or follow a preamble line.
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:
        idx = body.find(b"\r\n" + delimiter)
        if idx < 0:
            raise ValueError("multipart body does not contain its boundary")
        pos = idx + 2 + len(delimiter)
    parts: list[tuple[dict[str, str], bytes]] = []
    while True:
        if body[pos : pos + 2] == b"--":
            return parts  # close delimiter
        # transport padding (spaces/tabs) is allowed after a delimiter, then CRLF
        while body[pos : pos + 1] in (b" ", b"\t"):
            pos += 1
        if body[pos : pos + 2] != b"\r\n":
            raise ValueError("malformed multipart delimiter line")
        pos += 2
        end = body.find(b"\r\n" + delimiter, pos)
        if end < 0:
            raise ValueError("multipart body is truncated (no closing boundary)")
        raw_part = body[pos:end]
        if raw_part.startswith(b"\r\n"):
            headers_blob, payload = b"", raw_part[2:]
        else:
            sep = raw_part.find(b"\r\n\r\n")
            if sep < 0:
                raise ValueError("multipart part without a header/body separator")
            headers_blob, payload = raw_part[:sep], raw_part[sep + 4 :]
        headers: dict[str, str] = {}
        for line in headers_blob.decode("latin-1").split("\r\n"):
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload))
        pos = end + 2 + len(delimiter)


# ---------------------------------------------------------------------------------- DICOMweb


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str | None
    view: str | None = None  # ViewPosition when QIDO returned it


@dataclass(frozen=True)
class StudyImage:
    ref: InstanceRef
    data: bytes  # the DICOM Part 10 file
    view: str | None  # ViewPosition read from the file (or QIDO)


@dataclass
class StudyFetch:
    images: list[StudyImage]  # frontal (or unknown-view) CR/DX images to analyse
    notes: list[str]  # what was skipped and why (lateral, other modality, cap)
    views: list[str] = field(default_factory=list)  # every CR/DX view seen, skipped ones included


def study_uid(study: Json) -> str:
    for ident in study.get("identifier") or []:
        value = str(ident.get("value") or "")
        if value.startswith("urn:oid:"):
            return value[len("urn:oid:") :]
    raise ImagingError(
        422, "required",
        "ImagingStudy needs identifier urn:oid:<StudyInstanceUID> (system urn:dicom:uid) to be retrieved",
        "ImagingStudy.identifier",
    )


async def resolve_endpoint(study: Json, read_resource: ReadResource) -> str:
    """The WADO-RS base address of the study's first dicom-wado-rs Endpoint."""
    refs = [e.get("reference", "") for e in study.get("endpoint") or []]
    refs += [e.get("reference", "") for s in study.get("series") or [] for e in s.get("endpoint") or []]
    if not refs:
        raise ImagingError(
            422, "required", "ImagingStudy has no endpoint to retrieve images from", "ImagingStudy.endpoint"
        )
    contained = {c.get("id"): c for c in study.get("contained") or [] if c.get("resourceType") == "Endpoint"}
    for ref in refs:
        if ref.startswith("#"):
            endpoint = contained.get(ref[1:])
        elif ref.startswith("Endpoint/") and ref.count("/") == 1:
            endpoint = await read_resource("Endpoint", ref.split("/", 1)[1])
        else:
            endpoint = None
        if not endpoint or endpoint.get("status", "active") != "active":
            continue
        kind = (endpoint.get("connectionType") or {}).get("code")
        if kind == ENDPOINT_WADO and endpoint.get("address"):
            return str(endpoint["address"]).rstrip("/")
    raise ImagingError(
        422, "not-supported",
        f"None of the study's endpoints ({', '.join(refs)}) is an active {ENDPOINT_WADO} Endpoint with an address",
        "ImagingStudy.endpoint",
    )


def _dicom_json_value(item: Json, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _listed_instances(study: Json, uid: str) -> list[InstanceRef]:
    out = []
    for series in study.get("series") or []:
        modality = (series.get("modality") or {}).get("code")
        for inst in series.get("instance") or []:
            if series.get("uid") and inst.get("uid"):
                out.append(InstanceRef(uid, series["uid"], inst["uid"], modality))
    return out


async def _qido_instances(
    address: str, uid: str, policy: FetchPolicy, client: httpx.AsyncClient
) -> list[InstanceRef]:
    fetched = await fetch(
        f"{address}/studies/{uid}/instances",
        policy,
        expression="ImagingStudy.endpoint",
        headers={"Accept": "application/dicom+json"},
        client=client,
    )
    try:
        items = json.loads(fetched.content or b"[]")
        if not isinstance(items, list):
            raise ValueError("not a JSON array")
    except ValueError as exc:
        raise ImagingError(
            502, "exception", f"QIDO-RS answer is not DICOM JSON: {exc}", "ImagingStudy.endpoint"
        ) from exc
    out = []
    for item in items:
        series_uid = _dicom_json_value(item, "0020000E")
        sop_uid = _dicom_json_value(item, "00080018")
        if series_uid and sop_uid:
            out.append(
                InstanceRef(
                    _dicom_json_value(item, "0020000D") or uid,
                    series_uid,
                    sop_uid,
                    _dicom_json_value(item, "00080060"),
                    _dicom_json_value(item, "00185101"),
                )
            )
    return out


def _dicom_header(data: bytes) -> tuple[str | None, str | None]:
    """(Modality, ViewPosition) from the file header only: pixels are ml's business."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=False)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImagingError(502, "exception", f"WADO-RS returned something that is not DICOM: {exc}") from exc
    return (str(ds.get("Modality") or "") or None, str(ds.get("ViewPosition") or "") or None)


def _wado_parts(fetched: Fetched) -> list[bytes]:
    ctype = fetched.content_type.split(";", 1)[0].strip().lower()
    if ctype == "application/dicom":
        return [fetched.content]
    try:
        parts = parse_multipart_related(fetched.content, fetched.content_type)
    except ValueError as exc:
        raise ImagingError(
            502, "exception", f"Bad WADO-RS response from {fetched.url}: {exc}", "ImagingStudy.endpoint"
        ) from exc
    return [
        payload
        for headers, payload in parts
        if headers.get("content-type", "application/dicom").startswith("application/dicom")
    ]


async def study_images(
    study: Json,
    *,
    policy: FetchPolicy,
    read_resource: ReadResource,
    client: httpx.AsyncClient | None = None,
) -> StudyFetch:
    """Retrieve the study's CR/DX instances and keep the ones to analyse (frontal or view unknown)."""
    uid = study_uid(study)
    address = await resolve_endpoint(study, read_resource)
    own = client is None
    client = client or _client()
    notes: list[str] = []
    views: list[str] = []
    try:
        refs = _listed_instances(study, uid) or await _qido_instances(address, uid, policy, client)
        if not refs:
            raise ImagingError(422, "not-found", f"Study {uid} has no instances at {address}", "ImagingStudy")
        candidates = []
        for ref in refs:
            if ref.modality and ref.modality.upper() not in ANALYZABLE_MODALITIES:
                notes.append(f"Skipped instance {ref.sop_uid}: modality {ref.modality} is not CR/DX.")
            elif mappings.is_frontal(ref.view) is False:
                views.append(ref.view or "")
                notes.append(f"Skipped instance {ref.sop_uid}: {ref.view} view is not frontal.")
            else:
                candidates.append(ref)
        if len(candidates) > MAX_STUDY_INSTANCES:
            notes.append(f"Only the first {MAX_STUDY_INSTANCES} of {len(candidates)} images were analysed.")
            candidates = candidates[:MAX_STUDY_INSTANCES]
        images: list[StudyImage] = []
        for ref in candidates:
            url = f"{address}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}"
            fetched = await fetch(
                url, policy, expression="ImagingStudy.endpoint", headers={"Accept": DICOM_ACCEPT}, client=client
            )
            for data in _wado_parts(fetched)[:1]:
                modality, view = _dicom_header(data)
                view = view or ref.view
                if view:
                    views.append(view)
                if modality and modality.upper() not in ANALYZABLE_MODALITIES:
                    notes.append(f"Skipped instance {ref.sop_uid}: modality {modality} is not CR/DX.")
                elif mappings.is_frontal(view) is False:
                    notes.append(f"Skipped instance {ref.sop_uid}: {view} view is not frontal.")
                else:
                    images.append(StudyImage(ref, data, view))
    finally:
        if own:
            await client.aclose()
    if not images:
        raise ImagingError(
            422, "not-found",
            f"Study {uid} has no frontal CR/DX image to analyse. " + " ".join(notes),
            "ImagingStudy",
        )
    return StudyFetch(images, notes, views)
