"""Logging set-up for `cxr serve`: one JSON object per line on stderr, each with the request id.

Only what a log call passes is written: the formatter adds the fields in ACCESS_FIELDS when a
record carries them (the access log does) and nothing else from the request.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import datetime, timezone

_request_id: ContextVar[str | None] = ContextVar("cxr_request_id", default=None)
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "client_id")


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(value: str | None):  # -> contextvars.Token
    return _request_id.set(value)


def reset_request_id(token) -> None:
    _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


# Third-party loggers that write URLs (with their query strings) at INFO: httpx logs every outgoing
# request line (Media.content.url, DICOMweb, JWKS fetches). Warnings and errors still come through.
URL_LOGGERS = ("httpx", "httpcore")


def quiet_url_loggers() -> None:
    for name in URL_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_logging(fmt: str = "json", level: str | int = "INFO", stream=None) -> None:
    """Replace the root handlers: JSON (or plain text) lines with the request id, to stderr."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    quiet_url_loggers()
    # uvicorn's own loggers propagate to ours; its access log is replaced by fhir_server's (no query strings)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.disabled = True
