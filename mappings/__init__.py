"""Terminology tables as data (findings.json, loinc.json) and a tiny typed loader over them.

Codes live in the JSON files so a terminologist can review them without reading Python; this
module only parses them once and answers lookups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

_DIR = Path(__file__).resolve().parent

SNOMED = "http://snomed.info/sct"


@dataclass(frozen=True)
class Code:
    system: str
    code: str
    display: str
    verified: bool = True
    note: str | None = None

    def coding(self) -> dict[str, str]:
        return {"system": self.system, "code": self.code, "display": self.display}


@dataclass(frozen=True)
class FindingMapping:
    label: str
    display: str
    local: Code  # our own CodeSystem code: every label has one, so every finding is codable
    codings: tuple[Code, ...]  # external codes, verified or not
    body_site: Code | None

    @property
    def verified_codings(self) -> tuple[Code, ...]:
        return tuple(c for c in self.codings if c.verified)

    @property
    def snomed(self) -> Code | None:
        return next((c for c in self.codings if c.system == SNOMED), None)


def _load(name: str) -> dict[str, Any]:
    return json.loads((_DIR / name).read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def findings_table() -> dict[str, Any]:
    return _load("findings.json")


@lru_cache(maxsize=1)
def loinc_table() -> dict[str, Any]:
    return _load("loinc.json")


@lru_cache(maxsize=1)
def operations_table() -> dict[str, Any]:
    return _load("operations.json")


def _code(d: dict[str, Any]) -> Code:
    return Code(d["system"], d["code"], d["display"], bool(d.get("verified", True)), d.get("note"))


def code_system_url() -> str:
    return findings_table()["codeSystem"]["url"]


@lru_cache(maxsize=1)
def all_findings() -> dict[str, FindingMapping]:
    table = findings_table()
    sites = table["bodySites"]
    url = table["codeSystem"]["url"]
    out: dict[str, FindingMapping] = {}
    for label, entry in table["findings"].items():
        site = entry.get("bodySite")
        out[label] = FindingMapping(
            label=label,
            display=entry["display"],
            local=Code(url, label, entry["display"]),
            codings=tuple(_code(c) for c in entry.get("codings", [])),
            body_site=_code(sites[site]) if site else None,
        )
    return out


def finding(label: str, display: str | None = None) -> FindingMapping:
    """The mapping for `label`. An unmapped label (a new model shipped without a table update)
    still gets our local code so results are never dropped; the mappings test catches the gap."""
    known = all_findings().get(label)
    if known is not None:
        return known
    name = display or label.replace("_", " ").capitalize()
    return FindingMapping(label, name, Code(code_system_url(), label, name), (), None)


def report_code(kind: str = "single_view") -> Code:
    return _code(loinc_table()["report"][kind])


def report_categories() -> list[Code]:
    return [_code(c) for c in loinc_table()["category"]]


def observation_category() -> Code:
    return _code(loinc_table()["observationCategory"])


def canonical_view(view_position: str | None) -> str | None:
    """DICOM ViewPosition (PA, AP, LL, LAT ...) -> "PA" | "AP" | "LATERAL" | None (unknown)."""
    if not view_position:
        return None
    return loinc_table()["viewAliases"].get(view_position.strip().upper())


def view_code(view_position: str | None) -> Code | None:
    view = canonical_view(view_position)
    return _code(loinc_table()["views"][view]) if view else None


def is_frontal(view_position: str | None) -> bool | None:
    """True for PA/AP, False for lateral views, None when the view is not recorded."""
    view = canonical_view(view_position)
    if view is None:
        return None
    return view in loinc_table()["frontalViews"]


def modality_code(modality: str | None) -> Code | None:
    m = loinc_table()["modalities"].get((modality or "").upper())
    return _code(m) if m else None


def interpretation(code: str) -> Code:
    table = loinc_table()["interpretation"]
    return Code(table["system"], code, table[code])


def indeterminate_band() -> float:
    return float(loinc_table()["interpretation"]["indeterminateBand"])


def ai_security() -> Code:
    return _code(loinc_table()["aiTransparency"]["security"])


def ai_confidence_extension_url() -> str:
    return loinc_table()["aiTransparency"]["confidenceExtension"]


def local_part_code(name: str) -> Code:
    """Our own code for a result part (e.g. "instanceProbability"), see loinc.json localCodes."""
    table = loinc_table()["localCodes"]
    return Code(table["system"], table[name]["code"], table[name]["display"])


def operations_code_system_url() -> str:
    return operations_table()["codeSystem"]["url"]


def operation_code(name: str) -> Code:
    """Our code for an operation the server runs (Task.code), see operations.json. A KeyError for
    an unknown name is deliberate: every code a Task carries must be in the published CodeSystem."""
    entry = operations_table()["codes"][name]
    return Code(operations_code_system_url(), name, entry["display"])


def code_system_resource() -> dict[str, Any]:
    """Our findings CodeSystem as a FHIR R4 CodeSystem resource (so the local codes resolve);
    built by mappings.codesystems, the one builder the server publishes too."""
    from .codesystems import findings_code_system

    return findings_code_system()
