"""Prometheus metrics: GET /metrics in the text exposition format.

Why prometheus-client: the reference client library of the format every scraper reads; it gives
histograms with correct cumulative buckets and a per-app registry (no process-global state, so two
apps in one test process do not share counters).

No patient data ever becomes a label: routes are templates (`/fhir/{resource_type}/{resource_id}`,
never the URL), models are registry names, outcomes a closed set.

    install_metrics(app)   # middleware + /metrics route + app.state.metrics
"""

from .collectors import Metrics, install_metrics

__all__ = ["Metrics", "install_metrics"]
