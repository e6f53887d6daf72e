"""SSRF-safe URL fetching for $analyze: the allowlist check and the bounded GET.

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
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

Resolver = Callable[[str], Awaitable[list[str]]]  # hostname -> IP addresses

MAX_REDIRECTS = 5
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


def new_client() -> httpx.AsyncClient:
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
    client = client or new_client()
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
