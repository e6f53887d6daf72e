"""openapi/openapi.json must be exactly what the code generates (CI fails on drift)."""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from fhir_server.openapi_export import app_for_export, export_openapi, render_openapi, write_openapi

COMMITTED = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def test_committed_openapi_matches_the_code() -> None:
    generated = render_openapi(export_openapi(app_for_export()))
    assert COMMITTED.exists(), f"{COMMITTED} is missing: run `cxr openapi` to create it"
    committed = COMMITTED.read_text(encoding="utf-8")
    if committed != generated:
        diff = "".join(
            list(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                      "openapi/openapi.json (committed)", "generated from the code"))[:80]
        )
        raise AssertionError(
            "openapi/openapi.json is out of date: run `cxr openapi` to update it "
            f"(or `python -m fhir_server.openapi_export`).\n{diff}"
        )


def test_export_is_stable_and_describes_the_fhir_api(tmp_path: Path) -> None:
    app = app_for_export()
    first = render_openapi(export_openapi(app))
    assert render_openapi(export_openapi(app_for_export())) == first  # independent of the instance
    spec = json.loads(first)
    assert spec["openapi"].startswith("3.")
    assert list(spec) == sorted(spec)  # sorted keys
    paths = spec["paths"]
    for path in ("/api/v1/predict", "/fhir/metadata", "/fhir/Media/$analyze", "/fhir/Media/{resource_id}/$analyze"):
        assert path in paths, f"{path} missing from the OpenAPI document"
    out = tmp_path / "openapi.json"
    assert write_openapi(out, app) is True
    assert write_openapi(out, app) is False  # unchanged the second time
    assert out.read_text(encoding="utf-8") == first


def test_export_does_not_mutate_the_apps_cached_schema() -> None:
    app = app_for_export()
    spec = export_openapi(app)
    spec["paths"].clear()
    assert export_openapi(app)["paths"], "export_openapi must return a copy"
