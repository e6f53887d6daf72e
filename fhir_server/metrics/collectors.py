"""The metrics and where their values come from."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ml.errors import CXRError, ModelUnavailable, NotChestXRay

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


def analysis_outcome(result: object) -> str:
    """served | refused_by_gate | rejected_input | unavailable | error: a closed label set."""
    if not isinstance(result, BaseException):
        return "served"
    if isinstance(result, NotChestXRay):
        return "refused_by_gate"
    if isinstance(result, ModelUnavailable):
        return "unavailable"
    if isinstance(result, CXRError) and 400 <= getattr(result, "http_status", 500) < 500:
        return "rejected_input"
    return "error"


class _StateCollector:
    """Values read at scrape time from the app's live objects (inference pool, queue, database)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def collect(self):  # noqa: ANN201 - the prometheus_client collector protocol
        state = self.app.state
        pool = getattr(state, "inference", None)
        if pool is not None:
            yield GaugeMetricFamily("cxr_inference_in_flight", "Analyses running or waiting in the inference pool",
                                    value=pool.admitted)
            yield GaugeMetricFamily("cxr_inference_capacity", "Analyses the pool admits before answering 503",
                                    value=pool.capacity)
        queue = getattr(state, "queue", None)
        if queue is not None:
            depth = GaugeMetricFamily("cxr_job_queue_depth", "Durable jobs queued or running", labels=["task"])
            age = GaugeMetricFamily("cxr_job_queue_oldest_age_seconds", "Age of the oldest unfinished job",
                                    labels=["task"])
            try:
                for task, (count, oldest) in sorted(queue.depth().items()):
                    depth.add_metric([task], count)
                    age.add_metric([task], oldest)
            except Exception:  # database away: the scrape still answers, without these values
                log.debug("metrics: job queue depth unavailable", exc_info=True)
            yield depth
            yield age
        store = getattr(state, "store", None)
        pool_obj = getattr(getattr(store, "engine", None), "pool", None)
        if pool_obj is not None and hasattr(pool_obj, "checkedout"):
            yield GaugeMetricFamily("cxr_db_pool_checked_out", "Database connections in use", value=pool_obj.checkedout())
            if hasattr(pool_obj, "size"):
                yield GaugeMetricFamily("cxr_db_pool_size", "Database connection pool size", value=pool_obj.size())


class Metrics:
    def __init__(self, app: FastAPI) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("cxr_http_requests", "HTTP requests by route template and status class",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("cxr_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("cxr_inference_batch_size", "Requests sharing one forward pass",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.analyses = Counter("cxr_analyses", "Image analyses by model and outcome", ["model", "outcome"],
                                registry=self.registry)
        self.orientation_comparisons = Counter(
            "cxr_gate_orientation_comparisons", "Analyses whose gate compared the film with its four turned / "
            "inverted copies (four extra backbone passes)", ["model"], registry=self.registry)
        self.registry.register(_StateCollector(app))

    # hooks the inference pool calls (fhir_server.inference.InferencePool.observer)
    def on_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def on_result(self, model: str, result: object) -> None:
        self.analyses.labels(model=model, outcome=analysis_outcome(result)).inc()
        ood = getattr(result, "ood", None)
        if getattr(ood, "compared_copies", False) or getattr(result, "compared_copies", False):
            self.orientation_comparisons.labels(model=model).inc()


def route_template(scope: Scope) -> str:
    """The matched route as a template over the full path: `/fhir/{resource_type}/{resource_id}`.
    The route object's own path lacks the prefixes of the routers it was included from, so the
    template is rebuilt from the request path by putting each path parameter's name in its place."""
    if scope.get("route") is None:
        return "unmatched"
    params = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    if any("/" in value for value in params):  # a {x:path} parameter: its value could be anything
        return getattr(scope["route"], "path", "unmatched")
    segments = scope.get("path", "").split("/")
    return "/".join(f"{{{params[seg]}}}" if seg in params else seg for seg in segments)


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = route_template(scope)
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method=method, route=template, status=f"{status // 100}xx").inc()
            self.metrics.latency.labels(method=method, route=template).observe(time.perf_counter() - start)


router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI) -> Metrics:
    metrics = Metrics(app)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(router)
    return metrics


def model_name(analyzer: Any) -> str:
    info = getattr(analyzer, "model_info", None)
    return getattr(info, "name", None) or "unknown"
