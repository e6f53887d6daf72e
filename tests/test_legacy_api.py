"""POST /api/v1/predict, /healthz, /readyz and error rendering through the real FastAPI app."""

from __future__ import annotations

import base64
import csv
import io
import os
import threading
import time
from datetime import datetime

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fhir_server.app import create_app
from fhir_server.settings import Settings
from ml.findings import DISCLAIMER
from ml.pipeline import Analyzer
from model_fixtures import (
    CT_SOP,
    RefusingGate,
    dicom_bytes,
    png_bytes,
    quadrant_pixels,
    tiny_analyzer,
    tiny_model,
)
from fixtures_ingest import png_bomb

LIMIT = 2 * 1024 * 1024


def _settings(tmp_path, **kw) -> Settings:
    values = {"data_dir": tmp_path, "max_upload_bytes": LIMIT, "model": "cxr:untrained-demo", "ood_gate": False}
    values.update(kw)
    return Settings(_env_file=None, **values)


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(_settings(tmp_path), analyzer=tiny_analyzer())) as c:
        yield c


def _post(client, data: bytes, name: str = "film.png", query: str = ""):
    return client.post(f"/api/v1/predict{query}", files={"image": (name, data, "application/octet-stream")})


def _assert_error(response, status: int, code: str | None = None):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == "error"
    assert set(body["error"]) >= {"code", "message"} and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    assert "Traceback" not in response.text
    return body


def test_predict_response_shape(client):
    r = _post(client, png_bytes(quadrant_pixels(320, 240)))
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "success"
    assert set(body) == {"status", "prediction", "metadata"}
    pred = body["prediction"]
    assert {"diagnoses", "confidence_score", "processing_time_ms", "triage", "report", "impression"} <= set(pred)
    assert isinstance(pred["processing_time_ms"], int) and pred["processing_time_ms"] >= 0
    assert 0.5 <= pred["confidence_score"] <= 1 and pred["triage"] == "urgent"
    assert [d["condition"] for d in pred["diagnoses"]][0] == "pneumonia"
    assert {d["condition"] for d in pred["diagnoses"]} == {"pneumonia", "effusion", "cardiomegaly"}
    for d in pred["diagnoses"]:
        assert {"condition", "probability", "severity", "regions", "detected", "threshold"} <= set(d)
        assert 0 <= d["probability"] <= 1 and d["severity"] in {"none", "low", "moderate", "high"}
        assert d["detected"] == (d["probability"] >= d["threshold"])
        assert "heatmap_png" not in d
    pneumonia = pred["diagnoses"][0]
    assert pneumonia["detected"] and pneumonia["severity"] == "high" and pneumonia["threshold"] == 0.6
    assert len(pneumonia["regions"]) == 1 and all(isinstance(v, int) for v in pneumonia["regions"][0])
    assert pred["report"].endswith(DISCLAIMER)
    meta = body["metadata"]
    assert meta["model_version"] == "tiny-1" and meta["model"] == "test:tiny"
    assert meta["timestamp"].endswith("Z")
    datetime.fromisoformat(meta["timestamp"].replace("Z", "+00:00"))
    assert meta["disclaimer"] == DISCLAIMER
    assert meta["image"]["width"] == 320 and meta["image"]["height"] == 240
    assert meta["untrained"] is False and "warning" not in meta


def test_heatmaps_are_base64_png(client):
    r = _post(client, png_bytes(quadrant_pixels(320, 240)), query="?heatmaps=true")
    assert r.status_code == 200
    maps = [d for d in r.json()["prediction"]["diagnoses"] if d.get("heatmap_png")]
    assert [d["condition"] for d in maps] == ["pneumonia"]
    img = Image.open(io.BytesIO(base64.b64decode(maps[0]["heatmap_png"])))
    assert img.format == "PNG" and img.size == (320, 240)


def test_untrained_model_flagged_in_every_response(tmp_path):
    analyzer = tiny_analyzer(tiny_model(untrained=True))
    with TestClient(create_app(_settings(tmp_path), analyzer=analyzer)) as c:
        body = _post(c, png_bytes(quadrant_pixels(64, 64))).json()
        assert body["metadata"]["untrained"] is True
        assert "UNTRAINED" in body["metadata"]["warning"]
        assert "UNTRAINED" in body["prediction"]["report"] and "UNTRAINED" in body["prediction"]["impression"]
        assert c.get("/readyz").json()["untrained"] is True


def test_missing_field_and_text_field(client):
    r = client.post("/api/v1/predict", files={"file": ("a.png", png_bytes(quadrant_pixels(64, 64)))})
    _assert_error(r, 400, "missing_field")
    r = client.post("/api/v1/predict", data={"image": "not a file"}, files={"x": ("a", b"1")})
    _assert_error(r, 400, "missing_field")


def test_not_multipart_is_415(client):
    r = client.post("/api/v1/predict", content=png_bytes(quadrant_pixels(64, 64)), headers={"content-type": "image/png"})
    _assert_error(r, 415, "unsupported_media_type")
    r = client.post("/api/v1/predict", json={"image": "x"})
    _assert_error(r, 415)


def test_wrong_file_type_is_415(client):
    _assert_error(_post(client, b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "report.pdf"), 415, "unsupported_format")
    gif = io.BytesIO()
    Image.new("L", (32, 32)).save(gif, format="GIF")
    _assert_error(_post(client, gif.getvalue(), "x.gif"), 415)


def test_too_large_by_content_length(client):
    big = os.urandom(LIMIT + 200_000)
    _assert_error(_post(client, big, "big.png"), 413, "input_too_large")


def test_too_large_without_content_length_is_counted_while_streaming(client):
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    sent = []

    def body():
        yield head
        for _ in range(40):  # 40 x 128 KiB = 5 MiB > 2 MiB limit
            sent.append(1)
            yield b"\0" * (128 * 1024)
        yield tail

    r = client.post("/api/v1/predict", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    _assert_error(r, 413, "input_too_large")


def _bad_inputs():
    png = png_bytes(quadrant_pixels(300, 300))
    rng = np.random.default_rng(0)
    return [
        ("empty", b"", "empty.png", 400),
        ("truncated png", png[: len(png) // 3], "cut.png", None),
        ("random bytes", rng.bytes(5000), "noise.bin", None),
        ("pdf", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", "a.pdf", 415),
        ("text named .dcm", b"patient: john\nfindings: none\n" * 20, "study.dcm", 415),
        ("png bomb", png_bomb(), "bomb.png", 413),
        ("ct slice", dicom_bytes(quadrant_pixels(128, 128), modality="CT", sop_class=CT_SOP), "ct.dcm", 422),
        ("multi-frame", dicom_bytes(quadrant_pixels(128, 128), frames=3), "mf.dcm", 422),
        ("truncated dicom", dicom_bytes(quadrant_pixels(256, 256))[:2000], "cut.dcm", None),
    ]


@pytest.mark.parametrize(("label", "data", "name", "status"), _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_bad_inputs_get_4xx_json_and_server_keeps_answering(client, label, data, name, status):
    start = time.perf_counter()
    r = _post(client, data, name)
    assert time.perf_counter() - start < 10
    assert 400 <= r.status_code < 500, (label, r.status_code, r.text)
    _assert_error(r, r.status_code)
    if status:
        assert r.status_code == status, (label, r.text)
    assert client.get("/healthz").status_code == 200
    assert _post(client, png_bytes(quadrant_pixels(64, 64))).status_code == 200


def test_ood_refusal_is_422_with_reason(tmp_path):
    with TestClient(create_app(_settings(tmp_path), analyzer=tiny_analyzer(ood_gate=RefusingGate()))) as c:
        body = _assert_error(_post(c, png_bytes(quadrant_pixels(64, 64))), 422, "not_chest_xray")
        assert body["error"]["message"].startswith(RefusingGate.reason)  # + which check refused, its score
        assert body["error"]["check"] is None and body["error"]["score"] == 0.1


def test_model_unavailable_keeps_server_up(tmp_path):
    settings = _settings(tmp_path, model="xrv:densenet121-res224-all", weights_dir=tmp_path / "none")
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "densenet121" in ready.json()["reason"]
        body = _assert_error(_post(c, png_bytes(quadrant_pixels(64, 64))), 503, "model_unavailable")
        assert "cxr models pull densenet121-res224-all" in body["error"]["message"]  # what to run


def test_readyz_reports_model(client):
    body = client.get("/readyz").json()
    assert body["status"] == "ready" and body["model"] == "test:tiny" and body["model_version"] == "tiny-1"


def test_server_loads_untrained_demo_by_name(tmp_path):
    with TestClient(create_app(_settings(tmp_path, model="cxr:untrained-demo"))) as c:
        assert c.get("/readyz").json()["model"] == "cxr:untrained-demo"
        body = _post(c, png_bytes(quadrant_pixels(256, 256))).json()
        assert body["status"] == "success" and body["metadata"]["untrained"] is True


class _Exploding(Analyzer):
    def analyze_bytes(self, data, *, heatmaps=False, filename=None):
        raise RuntimeError("secret internal detail /etc/passwd")


def test_unexpected_error_is_generic_500(tmp_path):
    app = create_app(_settings(tmp_path), analyzer=_Exploding(tiny_model(), ood_gate=None, max_bytes=LIMIT, max_pixels=10**8))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = _post(c, png_bytes(quadrant_pixels(64, 64)))
        _assert_error(r, 500, "internal_error")
        assert "secret" not in r.text and "RuntimeError" not in r.text


def test_404_405_and_validation_errors_per_path_format(client):
    _assert_error(client.get("/api/v1/nothing"), 404, "not_found")
    _assert_error(client.get("/api/v1/predict"), 405, "method_not_allowed")
    _assert_error(_post(client, png_bytes(quadrant_pixels(64, 64)), query="?heatmaps=maybe"), 400, "invalid_request")
    r = client.get("/fhir/NoSuchThing/1/nonsense/deeper")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error" and body["issue"][0]["code"] == "not-found"


def test_operation_outcome_helper():
    from fhir_server.errors import operation_outcome

    oo = operation_outcome(400, "invalid", "bad subject", "DiagnosticReport.subject")
    assert oo == {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": "invalid", "diagnostics": "bad subject", "expression": ["DiagnosticReport.subject"]}
        ],
    }
    assert operation_outcome(500, None, "boom")["issue"][0] == {"severity": "fatal", "code": "exception", "diagnostics": "boom"}


class _Slow(Analyzer):
    def analyze_bytes(self, data, *, heatmaps=False, filename=None):
        time.sleep(2.0)
        return super().analyze_bytes(data, heatmaps=heatmaps, filename=filename)


def test_health_answers_while_an_image_is_analysed(tmp_path):
    app = create_app(_settings(tmp_path), analyzer=_Slow(tiny_model(), ood_gate=None, max_bytes=LIMIT, max_pixels=10**8))
    with TestClient(app) as c:
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("r", _post(c, png_bytes(quadrant_pixels(64, 64)))))
        worker.start()
        time.sleep(0.3)
        start = time.perf_counter()
        assert c.get("/healthz").status_code == 200
        assert time.perf_counter() - start < 1.0  # well before the 2 s analysis ends
        assert worker.is_alive()  # the analysis was still running
        worker.join()
        assert result["r"].status_code == 200


def _first_rows(folder, n):
    with (folder / "labels.csv").open() as fh:
        return list(csv.DictReader(fh))[:n]


@pytest.mark.parametrize("folder", ["dicom", "kermany_fullres", "nih_cxr14_fullres"])
def test_real_files_through_the_api(tmp_path, shared_data, folder):
    path = shared_data / folder
    if not (path / "labels.csv").exists():
        pytest.skip(f"{folder} not present")
    settings = _settings(tmp_path, max_upload_bytes=64 * 1024 * 1024)
    with TestClient(create_app(settings, analyzer=tiny_analyzer())) as client:
        for row in _first_rows(path, 5 if folder == "dicom" else 2):
            data = (path / row["file"]).read_bytes()
            r = _post(client, data, name=os.path.basename(row["file"]), query="?heatmaps=true")
            assert r.status_code == 200, (row["file"], r.text)
            body = r.json()
            assert len(body["prediction"]["diagnoses"]) == 3
            assert body["metadata"]["image"]["width"] == int(row.get("cols") or row.get("width"))


def test_inference_pool_refuses_when_full():
    import asyncio

    from fhir_server.inference import InferencePool, ServerBusy

    async def scenario():
        pool = InferencePool(1, queue=0)
        try:
            first = asyncio.create_task(pool.run(time.sleep, 0.5))
            await asyncio.sleep(0.05)
            with pytest.raises(ServerBusy):
                await pool.run(time.sleep, 0)
            await first
            await pool.run(time.sleep, 0)  # capacity is released afterwards
        finally:
            pool.shutdown()

    asyncio.run(scenario())


def test_head_on_health_endpoints(client):
    assert client.head("/healthz").status_code == 200
    assert client.head("/readyz").status_code == 200


def test_bundled_model_end_to_end_refuses_the_cat(tmp_path, shared_data):
    """The default model with its OOD gate, through the API, on real files (skips without weights)."""
    cat = shared_data / "dicom" / "feline_dx_chest_ap_deid_data.dcm"
    chest = shared_data / "dicom" / "siim_cr_pa_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    if not (cat.exists() and chest.exists()):
        pytest.skip("real DICOM samples not present")
    settings = _settings(tmp_path, model="cxr:pneumonia-v1", ood_gate=True, max_upload_bytes=64 * 1024 * 1024)
    with TestClient(create_app(settings)) as c:
        if c.get("/readyz").status_code != 200:
            pytest.skip("bundled model weights not installed")
        body = _assert_error(_post(c, cat.read_bytes(), "cat.dcm"), 422, "not_chest_xray")
        assert body["error"]["message"][0].isupper()
        r = _post(c, chest.read_bytes(), "chest.dcm", query="?heatmaps=true")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["metadata"]["model"] == "cxr:pneumonia-v1" and body["metadata"]["untrained"] is False
        assert body["metadata"]["ood"]["passed"] is True
        assert "pneumonia" in {d["condition"] for d in body["prediction"]["diagnoses"]}
