"""AuditMiddleware (pure ASGI): every audited request gets an AuditTrail before any route or
dependency runs (so refusals by auth, format negotiation or routing are audited too), and the
trail's unwritten records are written when the response starts -- before the client sees it.
If that write fails the client gets a 503 OperationOutcome instead of an unaudited answer."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .record import classify
from .trail import AuditTrail

log = logging.getLogger(__name__)

_WITHHELD = "The audit trail could not be written; the request's answer is withheld. Retry shortly."
_UNAVAILABLE_FHIR = json.dumps({
    "resourceType": "OperationOutcome",
    "issue": [{"severity": "error", "code": "transient", "diagnostics": _WITHHELD}],
}).encode("utf-8")
# the legacy API answers its own error shape (README: Legacy API)
_UNAVAILABLE_LEGACY = json.dumps({"status": "error", "error": {"code": "audit_unavailable", "message": _WITHHELD}}).encode("utf-8")


def _unavailable(path: str) -> tuple[bytes, bytes]:
    if path.startswith("/fhir"):
        return _UNAVAILABLE_FHIR, b"application/fhir+json; charset=utf-8"
    return _UNAVAILABLE_LEGACY, b"application/json"


def _server_base(scope: Scope) -> str:
    app = scope.get("app")
    configured = getattr(getattr(getattr(app, "state", None), "settings", None), "base_url", None)
    if configured:
        return str(configured).rstrip("/")
    return str(Request(scope).base_url).rstrip("/") + "/fhir"


class AuditMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = classify(scope["method"], scope["path"], scope.get("query_string", b""))
        if record is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        state = scope.setdefault("state", {})
        trail = AuditTrail(record, client_address=client[0] if client else None, server=_server_base(scope), state=state)
        state["audit"] = trail
        failed = False

        async def send_audited(message: Message) -> None:
            nonlocal failed
            if message["type"] == "http.response.start":
                if not await self._finish(scope, trail, message["status"]):
                    failed = True
                    body, media = _unavailable(scope["path"])
                    await send({"type": "http.response.start", "status": 503, "headers": [
                        (b"content-type", media), (b"retry-after", b"5"), (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
            elif failed:
                return  # the withheld answer's body
            await send(message)

        try:
            await self.app(scope, receive, send_audited)
        except Exception:
            await self._finish(scope, trail, 500)  # the error handler answers 500 after us
            raise

    async def _finish(self, scope: Scope, trail: AuditTrail, status: int) -> bool:
        store: Any = getattr(getattr(scope.get("app"), "state", None), "store", None)
        if store is None:  # no database configured (a bare test app): nothing to write to
            log.error("audit: no store; the AuditEvent of a %s answer is not recorded", status)
            return True
        try:
            await run_in_threadpool(trail.finish, store, status)
            return True
        except Exception:
            log.exception("audit: writing the AuditEvent failed")
            return False
