"""openapi/openapi.json is a valid OpenAPI document (checked by a validator we did not write)."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conformance_checks import CONFORMANCE_DIR
from fhir_server.openapi_export import app_for_export, export_openapi, render_openapi

VALIDATOR = CONFORMANCE_DIR / "validate_openapi.mjs"


def test_operation_ids_are_unique() -> None:
    """OpenAPI: operationId MUST be unique. FastAPI gives a multi-method route one id for all
    methods, picked from a set (so it also changes with the hash seed)."""
    spec = export_openapi(app_for_export())
    ids = Counter(op["operationId"] for item in spec["paths"].values() for op in item.values()
                  if isinstance(op, dict) and "operationId" in op)
    assert not [i for i, n in ids.items() if n > 1], f"duplicate operationIds: {[i for i, n in ids.items() if n > 1]}"


def test_document_is_valid_openapi(tmp_path: Path) -> None:
    import shutil

    if shutil.which("node") is None or not (CONFORMANCE_DIR / "node_modules" / "@seriousme" / "openapi-schema-validator").exists():
        pytest.skip("node or @seriousme/openapi-schema-validator (conformance/node_modules) is not installed")
    path = tmp_path / "openapi.json"
    path.write_text(render_openapi(export_openapi(app_for_export())), encoding="utf-8")
    proc = subprocess.run(["node", str(VALIDATOR), str(path)], cwd=CONFORMANCE_DIR, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.stdout.strip(), proc.stderr
    result = json.loads(proc.stdout)
    assert proc.returncode == 0 and result["valid"], result["errors"]
    assert result["version"].startswith("3.") and result["operations"] >= 15
    # the validator itself rejects a broken document
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"openapi": "3.1.0", "info": {"title": "x"}, "paths": {}}), encoding="utf-8")
    rejected = subprocess.run(["node", str(VALIDATOR), str(bad)], cwd=CONFORMANCE_DIR, capture_output=True, text=True,
                              timeout=120, check=False)
    assert rejected.returncode == 1 and "version" in rejected.stdout
