"""The upload page (GET /) and its static files."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from fhir_server.app import create_app
from fhir_server.settings import Settings
from model_fixtures import tiny_analyzer


@pytest.fixture
def client(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, ood_gate=False)
    with TestClient(create_app(settings, analyzer=tiny_analyzer())) as c:
        yield c


def test_page_served_with_banner_and_no_external_resources(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "not a diagnosis" in html and 'type="file"' in html
    for asset in re.findall(r'(?:src|href)="([^"]+)"', html):
        if asset.startswith("#") or asset == "data:,":  # in-page links; the empty favicon (no request)
            continue
        assert asset.startswith("/static/"), asset  # offline: nothing from a CDN
        assert client.get(asset).status_code == 200
    js = client.get("/static/app.js").text
    modules = re.findall(r'from "\./([a-z]+\.js)"', js)
    assert {"api.js", "upload.js", "viewer.js", "worklist.js"} <= set(modules)
    sources = {name: client.get(f"/static/{name}") for name in modules}
    assert all(r.status_code == 200 and r.headers["content-type"].startswith("text/javascript") for r in sources.values())
    assert "/fhir/Media/$analyze" in sources["upload.js"].text  # uploads land in the FHIR store (worklist)
    # offline: no absolute URL to anywhere (FHIR system URIs are compared, never fetched)
    code = js + client.get("/static/app.css").text + "".join(r.text for r in sources.values())
    fetched = re.findall(r"(?:fetch|request|src|href)\s*\(?\s*[\"'`](https?://[^\"'`]+)", code)
    assert not fetched, fetched
    assert not re.search(r"@import|url\(https?:", client.get("/static/app.css").text)


def test_config_and_preview_endpoints(client):
    import base64
    import io

    from PIL import Image

    cfg = client.get("/web/api/config").json()
    assert cfg["auth_enabled"] is False and "not a diagnosis" in cfg["disclaimer"]
    assert {c["label"] for c in cfg["critical_findings"]} >= {"pneumonia", "pneumothorax"}
    buf = io.BytesIO()
    Image.fromarray(__import__("numpy").tile(__import__("numpy").arange(256, dtype="uint8"), (64, 1))).save(buf, "PNG")
    media = {"resourceType": "Media", "status": "completed", "meta": {"source": cfg["upload_source"]},
             "content": {"contentType": "image/png", "data": base64.b64encode(buf.getvalue()).decode()}}
    bundle = client.post("/fhir/Media/$analyze", json={"resourceType": "Parameters", "parameter": [
        {"name": "media", "resource": media}]}).json()
    media_id = next(e["resource"]["id"] for e in bundle["entry"]
                    if e["resource"]["resourceType"] == "Media" and e["resource"]["meta"].get("source"))
    pixels = {}
    for preset in ("default", "lung", "bone"):
        r = client.get(f"/web/api/preview/{media_id}?preset={preset}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-image-width"] == "256" and r.headers["x-image-height"] == "64"
        pixels[preset] = list(Image.open(io.BytesIO(r.content)).tobytes())[:256]
    # lung stretches the dark end, bone the bright end: a mid-gray ramp value moves opposite ways
    assert pixels["lung"][100] > pixels["default"][100] > pixels["bone"][100]
    manual = client.get(f"/web/api/preview/{media_id}?center=128&width=2")
    assert manual.headers["x-window-center"] == "128" and set(Image.open(io.BytesIO(manual.content)).tobytes()) <= {0, 128, 255}


@pytest.mark.parametrize("query, status", [
    ("?preset=soft", 400), ("?center=1", 400), ("?center=x&width=2", 400), ("?center=1&width=0", 400),
    ("?center=nan&width=3", 400),
])
def test_preview_refuses_bad_parameters(client, query, status):
    cfg = client.get("/web/api/config").json()
    assert cfg  # the route exists; parameters are checked before the Media is looked up
    r = client.get(f"/web/api/preview/any-id{query}")
    assert r.status_code == status and r.json()["status"] == "error"


def test_preview_of_unknown_or_imageless_media_is_a_clear_4xx(client):
    assert client.get("/web/api/preview/nope").status_code == 404
    made = client.post("/fhir/Media", json={"resourceType": "Media", "status": "completed",
                                            "content": {"contentType": "image/png", "url": "Binary/missing"}})
    assert made.status_code == 201
    r = client.get(f"/web/api/preview/{made.json()['id']}")
    assert r.status_code == 422 and r.json()["error"]["message"]


def test_refused_analysis_is_recorded_as_a_task(client):
    import base64

    media = {"resourceType": "Media", "status": "completed",
             "content": {"contentType": "image/png", "data": base64.b64encode(b"plain text, not a film").decode()}}
    r = client.post("/fhir/Media/$analyze", json={"resourceType": "Parameters", "parameter": [
        {"name": "media", "resource": media}]})
    assert r.status_code == 415
    tasks = client.get("/fhir/Task?status=failed,rejected").json()["entry"]
    task = tasks[0]["resource"]
    assert task["status"] == "failed" and "not an image" in task["statusReason"]["text"]
    assert task["code"]["coding"][0]["code"] == "analyze" and task["focus"]["reference"].startswith("Media/")
    assert client.get(f"/fhir/{task['focus']['reference']}").status_code == 200
    # a malformed request ran nothing and is not an analysis: no Task
    assert client.post("/fhir/Media/$analyze", json={"resourceType": "Parameters"}).status_code == 400
    assert len(client.get("/fhir/Task?status=failed,rejected").json()["entry"]) == 1


@pytest.mark.parametrize("path", ["/static/../settings.py", "/static/.hidden", "/static/nope.js"])
def test_static_refuses_unknown_and_traversal(client, path):
    assert client.get(path).status_code == 404


def test_preview_of_real_dicom_films_windows_pre_voi_values(client, shared_data):
    """MONOCHROME1 is inverted for display; a 12-bit DX keeps its range: lung and bone differ."""
    import base64
    import io

    from PIL import Image

    films = {"mono1": shared_data / "dicom" / "barre_CR-MONO1-10-chest_nometa.dcm",
             "dx12": shared_data / "dicom" / "feline_dx_chest_ap_deid_data.dcm"}
    if not all(p.exists() for p in films.values()):
        pytest.skip("real DICOM samples not present")
    answers = {}
    for name, path in films.items():
        made = client.post("/fhir/Media", json={"resourceType": "Media", "status": "completed", "content": {
            "contentType": "application/dicom", "data": base64.b64encode(path.read_bytes()).decode()}})
        assert made.status_code == 201
        for preset in ("default", "lung", "bone"):
            r = client.get(f"/web/api/preview/{made.json()['id']}?preset={preset}&max_side=512")
            assert r.status_code == 200, r.text
            answers[name, preset] = r
    mono1 = answers["mono1", "default"]
    assert mono1.headers["x-inverted"] == "true" and mono1.headers["x-image-width"] == "440"
    dx = answers["dx12", "default"]
    assert dx.headers["x-inverted"] == "false" and int(dx.headers["x-image-width"]) == 3072
    assert float(dx.headers["x-value-max"]) > 255  # pre-VOI 12-bit values, not an 8-bit rendering
    assert max(Image.open(io.BytesIO(dx.content)).size) == 512
    mean = {p: sum(Image.open(io.BytesIO(answers["dx12", p].content)).tobytes()) for p in ("lung", "bone")}
    assert mean["lung"] > mean["bone"]  # lung window brightens, bone window darkens the same film
