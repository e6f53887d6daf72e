"""Logs without PHI: structured JSON lines, a request id on every line and response, our own access log.

    from fhir_server.observability import configure_logging, install_request_logging

Modules: logs (JSON formatter, request-id context, configure_logging), middleware (X-Request-ID,
the access log line: method, path without query, status, duration, client id, request id).
"""

from .logs import configure_logging, current_request_id
from .middleware import ACCESS_LOGGER, RequestLoggingMiddleware, install_request_logging, sane_request_id

__all__ = [
    "ACCESS_LOGGER",
    "RequestLoggingMiddleware",
    "configure_logging",
    "current_request_id",
    "install_request_logging",
    "sane_request_id",
]
