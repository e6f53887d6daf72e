"""A database that is away (stopped, restarting, network cut) is a 503, not a 500.

Every request that needs the database while it is unreachable gets 503 + Retry-After: an
OperationOutcome with code `transient` on FHIR paths, the legacy JSON error elsewhere. Nothing
needs restarting when it returns: the engine's pool drops dead connections (pool_pre_ping on
PostgreSQL) and the next request connects again. Liveness (/healthz) never touches the database;
readiness (/readyz) reports it (see `database_check`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Request
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from fhir_server.errors import error_response

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
CHECK_TIMEOUT_S = 3.0


def database_unavailable(exc: BaseException) -> bool:
    """A lost or refused connection (as opposed to a bad statement, which is a bug)."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _reason(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return f"{type(orig).__name__}: {first}"[:300]


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if not database_unavailable(exc):
        log.error("database error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request, 500, "internal_error", "Internal server error; the incident was logged.")
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, _reason(exc))
    return error_response(
        request, 503, "database_unavailable",
        f"The database is unavailable; retry in {RETRY_AFTER_S} s. Nothing was written by this request.",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def install_database_fault_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DBAPIError, _database_error)


async def database_check(app: Any) -> str | None:
    """None when the database answers `SELECT 1` within CHECK_TIMEOUT_S, else why not."""
    store = getattr(app.state, "store", None)
    if store is None:
        return "the database is not connected yet"

    def ping() -> None:
        with store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        await asyncio.wait_for(run_in_threadpool(ping), CHECK_TIMEOUT_S)
    except asyncio.TimeoutError:
        return f"the database did not answer within {CHECK_TIMEOUT_S:g} s"
    except Exception as exc:  # any failure to reach it is the answer, not an error of the probe
        return f"the database is unavailable ({_reason(exc)})"
    return None


def queue_check(app: Any) -> str | None:
    """None when this process's job worker (if it should run one) is alive."""
    settings = app.state.settings
    if not settings.queue_worker:
        return None
    worker = getattr(app.state, "queue_worker", None)
    if worker is None or not worker.alive:
        return "the job queue worker is not running"
    return None
