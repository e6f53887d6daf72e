"""The upload page in a real browser (Debian's chromium through playwright) against a server with
authentication on: without a token it says one is needed; with a pasted access token it analyses."""

from __future__ import annotations

import shutil

import pytest
from auth_support import assertion, new_key, token_form, write_jwks
from live_server import make_test_app, run_live_server, tiny_test_analyzer
from model_fixtures import png_bytes, quadrant_pixels

from fhir_server.cli import main as cxr

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


def test_upload_page_sends_the_access_token(tmp_path, monkeypatch):
    import httpx

    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CXR_DATABASE_URL", raising=False)
    key = new_key("ES384", "web-1")
    assert cxr(["clients", "add", "viewer", "--jwks", str(write_jwks(tmp_path / "k.json", key)),
                "--scopes", "system/*.rs system/DiagnosticReport.c"]) == 0  # $analyze: read input, create report
    image = tmp_path / "chest.png"
    image.write_bytes(png_bytes(quadrant_pixels(96, 96, quadrant="top_left")))
    analyzer = tiny_test_analyzer()
    app = make_test_app(tmp_path, analyzer=analyzer, auth_enabled=True)
    try:
        with run_live_server(app) as server:
            url = f"{server.root}/auth/token"
            r = httpx.post(url, data=token_form(assertion(key, "viewer", aud=url), scope="system/*.rs system/DiagnosticReport.c"))
            token = r.json()["access_token"]
            with playwright.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
                page = browser.new_page()
                page.goto(server.root + "/")
                page.set_input_files("#file", str(image))
                page.wait_for_selector("#error:not([hidden])", timeout=30_000)
                assert "access token" in page.inner_text("#error")
                page.fill("#token", token)
                page.dispatch_event("#token", "change")
                page.set_input_files("#file", str(image))
                page.wait_for_selector("#result:not([hidden])", timeout=60_000)
                page.wait_for_selector("#triage:not([hidden])", timeout=30_000)  # the viewer fills it in
                assert page.inner_text("#triage")
                # the token survives a reload of the tab (sessionStorage), never appears in the URL
                page.reload()
                assert page.input_value("#token") == token and token not in page.url
                browser.close()
    finally:
        if analyzer is not None:
            analyzer.close()
