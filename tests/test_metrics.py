"""GET /metrics: Prometheus text format, per route template (never per URL), analyses per model and
outcome, batch sizes, inference and job queue depth, database pool; no patient data in labels."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from live_server import make_test_app
from model_fixtures import RefusingGate, png_bytes, quadrant_pixels, tiny_analyzer, tiny_model

PHI = ("Zzyzxfamily", "MRN-314159", "1931-02-03")


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def client(tmp_path):
    analyzer = tiny_analyzer()
    app = make_test_app(tmp_path, analyzer=analyzer)
    with TestClient(app) as c:
        yield c
    analyzer.close()


def test_metrics_count_routes_by_template_and_analyses_by_outcome(client):
    png = png_bytes(quadrant_pixels(64, 64))
    for _ in range(2):
        assert client.post("/api/v1/predict", files={"image": ("film.png", png, "image/png")}).status_code == 200
    assert client.post("/api/v1/predict", files={"image": ("x.png", b"not an image", "image/png")}).status_code == 415
    created = client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": PHI[0]}],
                                                 "identifier": [{"value": PHI[1]}], "birthDate": PHI[2]})
    pid = created.json()["id"]
    assert client.get(f"/fhir/Patient/{pid}").status_code == 200
    assert client.get(f"/fhir/Patient?family={PHI[0]}&identifier={PHI[1]}").status_code == 200
    media = {"resourceType": "Media", "status": "completed",
             "content": {"contentType": "image/png", "data": base64.b64encode(png).decode()}}
    assert client.post("/fhir/Media/$analyze", json=media).status_code in (200, 201)

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for value in (*PHI, pid):
        assert value not in text  # neither ids, names nor query values become labels
    s = _samples(text)
    model = client.app.state.analyzer.model_info.name
    assert _value(s, "cxr_analyses_total", model=model, outcome="served") == 3  # 2 legacy + 1 $analyze
    assert _value(s, "cxr_http_requests_total", method="POST", route="/api/v1/predict", status="2xx") == 2
    assert _value(s, "cxr_http_requests_total", method="POST", route="/api/v1/predict", status="4xx") == 1
    reads = [k for k in s if k[0] == "cxr_http_requests_total" and ("method", "GET") in k[1]
             and dict(k[1])["route"].startswith("/fhir/{")]
    assert reads and all("{" in dict(k[1])["route"] for k in reads)  # templates, not ids
    assert _value(s, "cxr_http_request_duration_seconds_count", method="POST", route="/api/v1/predict") == 3
    assert _value(s, "cxr_inference_batch_size_count") >= 1
    assert ("cxr_inference_capacity", ()) in s and ("cxr_db_pool_checked_out", ()) in s


def test_gate_refusals_and_queue_depth_are_visible(tmp_path):
    analyzer = tiny_analyzer(tiny_model(ood_gate=RefusingGate()))
    app = make_test_app(tmp_path, analyzer=analyzer, queue_worker=False)
    with TestClient(app) as client:
        png = png_bytes(quadrant_pixels(64, 64))
        assert client.post("/api/v1/predict", files={"image": ("f.png", png, "image/png")}).status_code == 422
        app.state.queue.enqueue("results.deliver", {"report": "DiagnosticReport/x"})
        s = _samples(client.get("/metrics").text)
        model = analyzer.model_info.name
        assert _value(s, "cxr_analyses_total", model=model, outcome="refused_by_gate") == 1
        assert _value(s, "cxr_job_queue_depth", task="results.deliver") == 1
        assert _value(s, "cxr_job_queue_oldest_age_seconds", task="results.deliver") >= 0
    analyzer.close()


def test_unmatched_urls_share_one_label(client):
    for i in range(5):
        client.get(f"/no/such/path/{i}")
    s = _samples(client.get("/metrics").text)
    assert _value(s, "cxr_http_requests_total", method="GET", route="unmatched", status="4xx") == 5
    assert not any("/no/such" in dict(k[1]).get("route", "") for k in s)


class _ComparingGate:
    """Like the bundled gate's reports: the 1st film passes after the orientation comparison, the 2nd
    is refused after it, the rest pass without one (the requests below are sent one at a time)."""

    def __init__(self) -> None:
        self.calls = 0

    def check(self, image):
        from ml.analysis import OODResult

        self.calls += 1
        if self.calls == 1:
            return OODResult(passed=True, score=0.9, threshold=0.5, compared_copies=True)
        if self.calls == 2:
            return OODResult(passed=False, score=0.2, threshold=0.5, reason="the film looks turned",
                             check="orientation", compared_copies=True)
        return OODResult(passed=True, score=0.99, threshold=0.5)


def test_orientation_comparisons_are_counted(tmp_path):
    analyzer = tiny_analyzer(tiny_model(ood_gate=_ComparingGate()))
    app = make_test_app(tmp_path, analyzer=analyzer)
    with TestClient(app) as client:
        png = png_bytes(quadrant_pixels(64, 64))
        codes = [client.post("/api/v1/predict", files={"image": ("f.png", png, "image/png")}).status_code
                 for _ in range(4)]
        assert codes == [200, 422, 200, 200]
        s = _samples(client.get("/metrics").text)
        model = analyzer.model_info.name
        assert _value(s, "cxr_gate_orientation_comparisons_total", model=model) == 2
        assert _value(s, "cxr_analyses_total", model=model, outcome="served") == 3
    analyzer.close()
