"""The request-id and access-log middleware (pure ASGI, outermost of ours).

X-Request-ID: a client's value is kept when it is sane (1-128 of A-Z a-z 0-9 . _ : -), otherwise a
new UUID4 hex is generated; it is echoed on every response and attached to every log line written
while the request runs. The access log line (logger `cxr.access`) holds method, path WITHOUT the
query string, status, duration in ms, client id and request id: never a query value, a header
value, a body or a file name (search values are PHI: names, MRNs, birth dates).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_server.errors import error_response

from .logs import reset_request_id, set_request_id

ACCESS_LOGGER = "cxr.access"
HEADER = "x-request-id"
_SANE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_PATH_CHARS = 512

access_log = logging.getLogger(ACCESS_LOGGER)
log = logging.getLogger(__name__)

ClientIdOf = Callable[[Request], "str | None"]


def sane_request_id(value: str | None) -> str:
    if value and _SANE.fullmatch(value):
        return value
    return uuid.uuid4().hex


class RequestLoggingMiddleware:
    def __init__(self, app: ASGIApp, client_id_of: ClientIdOf):
        self.app = app
        self.client_id_of = client_id_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        request_id = sane_request_id(request.headers.get(HEADER))
        scope.setdefault("state", {})["request_id"] = request_id
        token = set_request_id(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"][:MAX_PATH_CHARS])
            if not response_started:  # answer it here so the 500 carries the request id too
                response = error_response(request, 500, "internal_error", "Internal server error; the incident was logged.")
                await response(scope, receive, send_with_id)
            raise
        finally:
            duration_ms = round((time.perf_counter() - started) * 1000, 1)
            client_id = self._client_id(request)
            access_log.info(
                "%s %s %s %.1fms", scope["method"], scope["path"][:MAX_PATH_CHARS], status, duration_ms,
                extra={"method": scope["method"], "path": scope["path"][:MAX_PATH_CHARS], "status": status,
                       "duration_ms": duration_ms, "client_id": client_id, "request_id": request_id},
            )
            reset_request_id(token)

    def _client_id(self, request: Request) -> str | None:
        state = request.scope.get("state", {})
        principal = state.get("principal")
        if principal is not None:
            return getattr(principal, "client_id", None)
        if state.get("client_id"):
            return state["client_id"]  # the token endpoint names the client it just authenticated
        try:
            return self.client_id_of(request)
        except Exception:  # the access line must be written whatever went wrong
            return None


def install_request_logging(app: FastAPI, client_id_of: ClientIdOf) -> None:
    """Add last, so it wraps every other middleware of ours (429s and CORS answers get an id too)."""
    app.add_middleware(RequestLoggingMiddleware, client_id_of=client_id_of)
