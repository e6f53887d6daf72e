"""The FHIR REST API under /fhir: router assembly, error handlers and the store's lifespan.

    from fhir_server.fhir import install_fhir, store_lifespan
    install_fhir(app)                  # handlers + /fhir routers + /.well-known/smart-configuration + CORS
    LIFESPAN_HOOKS.append(store_lifespan)   # app.state.store = Repository(settings.sqlalchemy_url)

Route order matters: fixed paths (metadata, _history, _search, $operations) come before the
generic /{type}/{id} patterns that would otherwise swallow them.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from fhir_server.auth import add_cors, require_auth
from fhir_server.audit import routes as audit_routes
from fhir_server.audit.middleware import AuditMiddleware
from fhir_server.storage import Repository

from . import bundles, codesystems, crud, history, metadata, search
from .common import install_fhir_error_handlers
from .negotiation import check_format

FHIR_PREFIX = "/fhir"


def _operations_router() -> APIRouter | None:
    """$analyze and friends (fhir_server.fhir.operations), when that module is present."""
    try:
        module = importlib.import_module("fhir_server.fhir.operations")
    except ModuleNotFoundError as exc:
        if exc.name != "fhir_server.fhir.operations":
            raise  # a missing dependency inside the module is a real error
        return None
    return getattr(module, "router", None)


def build_router() -> APIRouter:
    router = APIRouter(prefix=FHIR_PREFIX, dependencies=[Depends(require_auth), Depends(check_format)], tags=["fhir"])
    router.include_router(metadata.router)
    # POST [base]: the path is the prefix itself, which include_router cannot express
    router.add_api_route("", bundles.transaction_or_batch, methods=["POST"], summary="transaction / batch")
    router.add_api_route("/", bundles.transaction_or_batch, methods=["POST"], include_in_schema=False)
    router.include_router(history.router)  # before operations: GET /OperationDefinition/_history is history-type
    operations = _operations_router()
    if operations is not None:
        router.include_router(operations)
    # read-only CodeSystems: before search/crud, whose /{type} routes would answer 404 not-supported
    router.include_router(codesystems.router)
    router.include_router(search.router)
    router.include_router(audit_routes.router)  # 405 for AuditEvent writes: after POST _search, before crud
    router.include_router(crud.router)
    return router


def install_fhir(app: FastAPI, *, cors: bool = True) -> None:
    install_fhir_error_handlers(app)
    app.include_router(build_router())
    app.include_router(metadata.smart_router, dependencies=[Depends(require_auth)])
    app.add_middleware(AuditMiddleware)  # issue 10: an AuditEvent for every FHIR and legacy predict request
    if cors:
        add_cors(app)


def _migrate(store: Repository, auto_upgrade: bool) -> str | None:
    """Bring the schema to the newest revision, or say why this replica is not ready."""
    from fhir_server.migrations import runner

    if auto_upgrade:
        runner.upgrade(store.engine)
        return None
    state = runner.status(store.engine)
    if state.up_to_date:
        return None
    return (f"The database schema is at revision {state.current or '(none)'}, this server needs {state.head}: "
            "run `cxr db upgrade`.")


@asynccontextmanager
async def store_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Create the database engine and tables once; dispose on shutdown. An injected store
    (tests) is kept and left to its owner."""
    if getattr(app.state, "store", None) is not None:
        yield
        return
    settings = app.state.settings
    store = Repository.from_url(settings.sqlalchemy_url, create=False)
    app.state.schema_error = await run_in_threadpool(_migrate, store, settings.db_auto_upgrade)
    app.state.store = store
    try:
        yield
    finally:
        store.dispose()
        app.state.store = None


__all__ = ["build_router", "install_fhir", "store_lifespan"]
