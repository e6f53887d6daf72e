"""The installed cxr-fhir release: one answer for the API, the model Devices and our CodeSystems."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version(default: str = "0.0.0") -> str:
    """The cxr-fhir distribution's version; `default` in a source tree that was never installed."""
    try:
        return version("cxr-fhir")
    except PackageNotFoundError:
        return default
