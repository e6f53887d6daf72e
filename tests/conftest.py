"""Shared fixtures. Real data is read from ../shared/data (or CXR_SHARED_DATA) and skipped when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shared_data_dir() -> Path:
    return Path(os.environ.get("CXR_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real chest X-ray data folder; tests using it skip cleanly when it is not there."""
    path = _shared_data_dir()
    if not (path / "README.md").exists():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture
def tiny_model():
    """A small hand-wired LoadedModel (see tests/model_fixtures.py): pneumonia <- top-left quadrant."""
    from model_fixtures import tiny_model as make

    return make()


@pytest.fixture
def tiny_analyzer():
    """Factory: tiny_analyzer(model=None, *, ood_gate=None, max_bytes=..., max_pixels=..., heatmap_top_k=3)."""
    from model_fixtures import tiny_analyzer as make

    return make


@pytest.fixture(scope="module")
def bundled_model():
    """The shipped cxr:pneumonia-v1 model; skips when its weights are not installed."""
    from ml.errors import ModelUnavailable
    from ml.models.bundled import load_bundled

    try:
        return load_bundled()
    except ModelUnavailable as exc:
        pytest.skip(f"bundled weights not installed: {exc.message}")
