"""The catalog of TorchXRayVision release files (catalog.json, shipped with the package)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CATALOG_FILE = Path(__file__).with_name("catalog.json")


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # torchxrayvision weights key, e.g. "densenet121-res224-all"
    registry_name: str  # CXR_MODEL value, e.g. "xrv:densenet121-res224-all"
    architecture: str  # "densenet121" | "resnet50"
    file: str  # release file name
    size: int | None  # bytes, None when no public record was found
    sha256: str | None  # hex, None when no public record was found
    evidence: str

    @property
    def pinned(self) -> bool:
        """True when the catalog knows the hash: a download is checked against it."""
        return self.sha256 is not None

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.file}"


@dataclass(frozen=True)
class Catalog:
    base_url: str
    licence: str
    entries: tuple[CatalogEntry, ...]

    def get(self, name: str) -> CatalogEntry:
        """By weights key ("densenet121-res224-all"), registry name ("xrv:...") or release file name."""
        key = name.removeprefix("xrv:")
        for entry in self.entries:
            if key in (entry.name, entry.file):
                return entry
        known = ", ".join(e.name for e in self.entries)
        raise KeyError(f"unknown model {name!r}; the catalog has: {known}")

    def by_file(self, file_name: str) -> CatalogEntry | None:
        return next((e for e in self.entries if e.file == file_name), None)


@lru_cache(maxsize=4)
def load_catalog(path: Path = CATALOG_FILE) -> Catalog:
    raw = json.loads(Path(path).read_text())
    entries = tuple(
        CatalogEntry(
            name=m["name"], registry_name=m["registry_name"], architecture=m["architecture"], file=m["file"],
            size=m.get("size"), sha256=(m.get("sha256") or None), evidence=m.get("evidence", ""),
        )
        for m in raw["models"]
    )
    return Catalog(base_url=raw["base_url"], licence=raw["licence"], entries=entries)


def findings(entry: CatalogEntry) -> list[str]:
    """The findings the model reports (outputs with a calibrated operating point), from torchxrayvision."""
    import math

    import torchxrayvision as xrv

    spec = xrv.models.model_urls[entry.name]
    threshs = spec.get("op_threshs") or [math.nan] * len(spec["labels"])
    return [lb for lb, t in zip(spec["labels"], threshs, strict=True) if lb and t is not None and not math.isnan(t)]
