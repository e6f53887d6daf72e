"""openapi/openapi.json: the HTTP API as FastAPI describes it, written in a stable form.

The committed file is a contract for integrators; tests/test_openapi_drift.py regenerates it in
memory and fails when it no longer matches the code. Regenerate with `cxr openapi` (or
`python -m fhir_server.openapi_export`) after any route change.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI

DEFAULT_OUT = Path("openapi") / "openapi.json"


def export_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (a deep copy: FastAPI caches and shares the original)."""
    return copy.deepcopy(app.openapi())


def render_openapi(spec: dict[str, Any]) -> str:
    """Byte-stable text: sorted keys, 2-space indent, UTF-8 kept readable, trailing newline."""
    return json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def app_for_export() -> FastAPI:
    """The app with default settings, whatever CXR_* variables or .env say: the document must not
    depend on who generates it. Building the app loads no model (that happens in its lifespan)."""
    from fhir_server.app import create_app
    from fhir_server.settings import Settings

    return create_app(Settings.model_construct())


def write_openapi(out: Path = DEFAULT_OUT, app: FastAPI | None = None) -> bool:
    """Write the document to `out`; True when the file changed."""
    text = render_openapi(export_openapi(app or app_for_export()))
    old = out.read_text(encoding="utf-8") if out.exists() else None
    if old == text:
        return False
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return True


def cmd_openapi(args: argparse.Namespace) -> int:
    out: Path = args.out
    if str(out) == "-":
        sys.stdout.write(render_openapi(export_openapi(app_for_export())))
        return 0
    changed = write_openapi(out)
    print(f"{out}: {'updated' if changed else 'unchanged'}", file=sys.stderr)
    return 0


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """`cxr openapi [--out PATH]` (for fhir_server/cli.py: `add_subcommand(sub)`)."""
    parser = subparsers.add_parser("openapi", help="Write the OpenAPI document (default openapi/openapi.json)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output file, '-' for stdout")
    parser.set_defaults(func=cmd_openapi)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m fhir_server.openapi_export")
    _parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    sys.exit(cmd_openapi(_parser.parse_args()))
