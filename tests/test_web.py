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
        assert asset.startswith("/static/"), asset  # offline: nothing from a CDN
        assert client.get(asset).status_code == 200
    js = client.get("/static/app.js").text
    assert "/api/v1/predict?heatmaps=true" in js
    assert not re.search(r"https?://", js + client.get("/static/app.css").text)


@pytest.mark.parametrize("path", ["/static/../settings.py", "/static/.hidden", "/static/nope.js"])
def test_static_refuses_unknown_and_traversal(client, path):
    assert client.get(path).status_code == 404
