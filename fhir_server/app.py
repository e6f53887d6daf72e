"""create_app(): the FastAPI application with its routers, error handlers and lifespan.

Lifespan: creates the inference pool, loads the Analyzer once (unless one is injected, as tests
do), then runs the extra lifespan hooks (database engine, HTTP client, ...). A model that fails to
load does not stop the server: /healthz stays 200, /readyz and predictions answer 503 with the reason.

Extending (FHIR routers, storage): add the router in `_include_routers` and a lifespan hook in
`LIFESPAN_HOOKS` -- both marked below. A hook is `hook(app) -> AsyncContextManager`: setup before
`yield`, teardown after; it may read app.state.settings and store what it creates on app.state.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from fastapi import Depends, FastAPI

from fhir_server import auth, health, jobs, legacy, web
from fhir_server.dbfaults import install_database_fault_handlers
from fhir_server.errors import install_error_handlers
from fhir_server.auth import require_auth
from fhir_server.dicom import dicom_lifespan
from fhir_server.dicom.delivery import delivery_lifespan
from fhir_server.fhir import install_fhir, store_lifespan
from fhir_server.inference import InferencePool
from fhir_server.metrics import install_metrics
from fhir_server.queue import queue_lifespan
from fhir_server.observability import install_request_logging
from fhir_server.ratelimit import install_ratelimit
from fhir_server.settings import Settings
from ml.errors import CXRError, ModelUnavailable
from ml.pipeline import Analyzer
from ml.version import package_version

log = logging.getLogger(__name__)

LifespanHook = Callable[[FastAPI], AbstractAsyncContextManager[None]]

# ---- FHIR helpers: add lifespan hooks here (run in order after the model is loaded) ------------
# app.state.store (FHIR storage), the durable job queue (app.state.queue, app.state.queue_worker),
# then $analyze jobs (fails interrupted Tasks, seeds OperationDefinitions)
LIFESPAN_HOOKS: list[LifespanHook] = [store_lifespan, queue_lifespan, jobs.lifespan_hook]
LIFESPAN_HOOKS.append(auth.lifespan_hook)  # issue 10: logs the auth mode, loads the signing key and client registry
LIFESPAN_HOOKS.append(dicom_lifespan)  # ---- DICOM listener + study intake (issue 12)
LIFESPAN_HOOKS.append(delivery_lifespan)  # issue 12: results.deliver + dicom.store/dicomweb.stow/hl7.oru jobs
# -------------------------------------------------------------------------------------------------


def load_analyzer(settings: Settings) -> Analyzer:
    """The configured model (+ the bundled OOD gate when enabled). Raises CXRError subclasses."""
    from ml.models.registry import load_model

    model = load_model(settings.model, weights_dir=settings.weights_dir)
    gate = None
    if settings.ood_gate and model.ood_gate is None:
        gate = _default_gate(settings)
    return Analyzer(
        model,
        ood_gate=gate,
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_pixels,
        heatmap_top_k=settings.heatmap_top_k,
        engine=settings.engine,
        engine_cache_dir=settings.onnx_cache_dir,
        precision=settings.precision,
        gate_mode="warn" if settings.ood_gate == "warn" else ("refuse" if settings.ood_gate else "off"),
    )


def _default_gate(settings: Settings):  # -> OODGate | None
    try:
        from ml.ood import load_default_gate
    except ModuleNotFoundError as exc:  # TODO(remove once ml/ood.py is in every install)
        if exc.name != "ml.ood":
            raise
        log.warning("ml.ood is not available: serving WITHOUT the out-of-distribution gate")
        return None
    try:
        if settings.engine == "onnx":
            from ml.engine import onnx_default_gate

            return onnx_default_gate(settings.onnx_cache_dir)  # the gate's backbone on ONNX Runtime too
        return load_default_gate()
    except CXRError as exc:
        raise ModelUnavailable(
            f"The out-of-distribution gate could not be loaded ({exc.message}). Install the bundled "
            f"model's weights, or set CXR_OOD_GATE=false to serve {settings.model!r} without the gate "
            "(then images that are not chest X-rays are analysed too)."
        ) from exc


def _include_routers(app: FastAPI) -> None:
    app.include_router(health.router)
    app.include_router(legacy.router, dependencies=[Depends(require_auth)])  # the one auth boundary
    app.include_router(web.router)
    app.include_router(auth.router)  # POST /auth/token (SMART Backend Services)
    # ---- FHIR helpers: app.include_router(<fhir router>) here ------------------------------------
    install_fhir(app)  # /fhir routers, /.well-known/smart-configuration, OperationOutcome handlers, CORS
    # -----------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, *, analyzer: Analyzer | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = InferencePool(
            settings.inference_workers,
            queue=settings.inference_queue,
            batch_max_size=settings.batch_max_size,
            batch_max_wait_ms=settings.batch_max_wait_ms,
            lone_batch_all_cores=settings.lone_batch_all_cores,
        )
        pool.observer = getattr(app.state, "metrics", None)
        app.state.inference = pool
        app.state.model_error = None
        app.state.analyzer = analyzer
        if analyzer is None:
            try:
                # in a worker thread: loading takes seconds and must not block the loop
                app.state.analyzer = await pool.run(load_analyzer, settings)
                info = app.state.analyzer.model_info
                log.info("Model %s (%s) loaded", info.name, info.version)
            except CXRError as exc:
                app.state.model_error = exc.message
                log.error("Model %r could not be loaded: %s", settings.model, exc.message)
            except Exception as exc:  # an unexpected loader bug must still leave /healthz up
                app.state.model_error = f"Model {settings.model!r} failed to load: {type(exc).__name__}: {exc}"
                log.exception("Model %r failed to load", settings.model)
        try:
            async with AsyncExitStack() as stack:
                for hook in LIFESPAN_HOOKS:
                    await stack.enter_async_context(hook(app))
                yield
        finally:
            pool.shutdown()
            if analyzer is None and app.state.analyzer is not None:
                app.state.analyzer.close()  # only the one we created; an injected one belongs to the caller

    app = FastAPI(
        title="CXR-FHIR",
        summary="FHIR R4 server for AI analysis of chest radiographs (decision support, not a diagnosis)",
        version=package_version(),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.analyzer = analyzer
    app.state.model_error = None
    install_error_handlers(app)
    install_database_fault_handlers(app)  # database away: 503 + Retry-After, not 500 (issue 10)
    install_ratelimit(app, auth.client_id_of)  # issue 10: before the routers' CORS, so 429s carry CORS headers
    _include_routers(app)
    install_metrics(app)  # outermost middleware: it times everything, errors included
    install_request_logging(app, auth.client_id_of)  # issue 10: outermost: request id + access log for everything
    return app


