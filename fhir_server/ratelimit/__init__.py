"""Per-client rate limits (CXR_RATE_LIMIT_PER_MINUTE, CXR_RATE_LIMIT_BURST) with the `limits` library.

Why `limits`: maintained, storage-pluggable (memory:// per process, redis:// shared by workers via
CXR_RATE_LIMIT_STORAGE_URI) and its moving-window strategy is exact, so no hand-written counters.

Token-bucket-like semantics from two moving windows, both of which a request must pass:
- burst window: BURST requests per BURST*60/PER_MINUTE seconds (rounded up to whole seconds).
  A full bucket of BURST tokens refilled at PER_MINUTE/60 per second admits BURST requests at
  once and then PER_MINUTE/60 per second; this window admits the same BURST at once and the same
  average afterwards. The difference: a bucket refills continuously, the window frees a slot when
  the request that took it leaves the window (slightly burstier refill, never a higher rate).
- minute window: PER_MINUTE requests per 60 s, so the sustained rate is exact whatever the rounding.

The key is the authenticated client id (client:<id>) or, without a valid token, the caller's
address (addr:<ip>; behind a proxy uvicorn's --proxy-headers / --forwarded-allow-ips decide it).
Over the limit: 429 + Retry-After (seconds until the window frees a slot) + an OperationOutcome
(`throttled`) under /fhir, the legacy JSON error elsewhere. Never limited: /healthz, /readyz,
/metadata, /fhir/metadata, /.well-known/*, CORS preflights. CXR_RATE_LIMIT_PER_MINUTE=0 disables it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from limits import RateLimitItem, RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.types import ASGIApp, Receive, Scope, Send

from fhir_server.errors import error_response

log = logging.getLogger(__name__)
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metadata", "/fhir/metadata"})
EXEMPT_PREFIXES = ("/.well-known/",)

ClientIdOf = Callable[[Request], "str | None"]


def is_exempt(method: str, path: str) -> bool:
    return method == "OPTIONS" or path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIXES)


@dataclass
class Limiter:
    per_minute: int
    burst: int
    storage_uri: str = "memory://"

    def __post_init__(self) -> None:
        self._strategy = MovingWindowRateLimiter(storage_from_string(self.storage_uri))
        window_s = max(1, math.ceil(self.burst * 60 / self.per_minute))
        self.items: tuple[RateLimitItem, ...] = (
            RateLimitItemPerSecond(self.burst, window_s),
            RateLimitItemPerMinute(self.per_minute),
        )

    def acquire(self, key: str) -> int | None:
        """None when the request may go ahead (and is counted), else seconds to wait (>= 1)."""
        # test all first: a request refused by one window must not consume the other
        blocked = [item for item in self.items if not self._strategy.test(item, key)]
        if not blocked:
            if all(self._strategy.hit(item, key) for item in self.items):
                return None
            blocked = list(self.items)  # lost a race with a concurrent request
        now = time.time()
        waits = [self._strategy.get_window_stats(item, key).reset_time - now for item in blocked]
        return max(1, math.ceil(max(waits)))


class RateLimitMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streamed responses)."""

    def __init__(self, app: ASGIApp, client_id_of: ClientIdOf, limiter: Limiter):
        self.app = app
        self.client_id_of = client_id_of
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_exempt(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        client_id = self.client_id_of(request)
        key = f"client:{client_id}" if client_id else f"addr:{request.client.host if request.client else 'unknown'}"
        try:
            retry_after = self.limiter.acquire(key)
        except Exception:  # e.g. redis:// unreachable: serve unthrottled rather than fail every request
            log.warning("rate limit storage unavailable; request not counted", exc_info=True)
            retry_after = None
        if retry_after is None:
            await self.app(scope, receive, send)
            return
        who = "this client" if client_id else "this address"
        response = error_response(
            request, 429, "too_many_requests",
            f"Too many requests from {who}: the limit is {self.limiter.per_minute} per minute with bursts of "
            f"{self.limiter.burst}; retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )
        await response(scope, receive, send)


def install_ratelimit(app: FastAPI, client_id_of: ClientIdOf) -> None:
    """Add the middleware when app.state.settings asks for a limit. The storage is set up here, so a
    bad CXR_RATE_LIMIT_STORAGE_URI (or its missing driver, e.g. `redis`) stops start-up, loudly."""
    settings = app.state.settings
    if settings.rate_limit_per_minute <= 0:
        return
    limiter = Limiter(settings.rate_limit_per_minute, settings.rate_limit_burst, settings.rate_limit_storage_uri)
    app.add_middleware(RateLimitMiddleware, client_id_of=client_id_of, limiter=limiter)
