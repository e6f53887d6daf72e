"""GET /: the single-page upload tool for clinicians (static files, no external resources)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")


@router.get("/static/{name}")
async def static_file(name: str) -> FileResponse:
    # a flat directory: only plain names that exist there, no path traversal
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or not path.is_file():
        from starlette.exceptions import HTTPException

        raise HTTPException(status_code=404)
    return FileResponse(path)
