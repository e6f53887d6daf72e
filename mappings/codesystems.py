"""Our own CodeSystems as FHIR R4 CodeSystem resources, built from the terminology tables.

Observations code every finding with cxr-findings (findings.json) and their components with
cxr-result-parts (loinc.json localCodes); Tasks code their work with cxr-operations (operations.json). A client or validator can only look those codes up when the
server publishes the CodeSystems; building them from the same tables the resources are coded from
(never a hand-written copy) means a code cannot be emitted without also being published.

    from mappings.codesystems import code_systems
    code_systems()["cxr-findings"]    # -> CodeSystem dict (R4 JSON), validated with fhir.resources R4B
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Any, TypedDict

from ml.version import package_version

from . import all_findings, findings_table, loinc_table, operations_table

Json = dict[str, Any]
PUBLISHER = "CXR-FHIR"  # as the OperationDefinitions and the CapabilityStatement say


class Concept(TypedDict, total=False):
    code: str
    display: str
    definition: str


def software_version() -> str:
    """The cxr-fhir package version: the same value the CapabilityStatement reports as
    software.version. Codes change only with a release, so the release names the CodeSystem
    version and nobody has to remember to bump a number in the JSON tables."""
    return package_version()


def code_system_id(url: str) -> str:
    """The logical id is the last segment of the canonical url, so [base]/CodeSystem/<id> and the
    url name the same thing (http://cxr-fhir.org/fhir/CodeSystem/cxr-findings -> cxr-findings)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def build_code_system(meta: Json, concepts: Iterable[Concept], *, software: str) -> Json:
    """A complete, active CodeSystem from a table's `codeSystem` header and its concepts."""
    listed = [dict(c) for c in concepts]
    resource: Json = {
        "resourceType": "CodeSystem",
        "id": code_system_id(meta["url"]),
        "url": meta["url"],
        "version": software,
        "name": meta["name"],
        "title": meta["title"],
        "status": "active",
        "experimental": False,
        "publisher": PUBLISHER,
        "caseSensitive": True,  # codes are compared exactly: "pneumonia", never "Pneumonia"
        "content": "complete",  # every code we emit is listed; there is nothing else to fetch
        "count": len(listed),
        "concept": listed,
    }
    if meta.get("description"):
        resource["description"] = meta["description"]
    # fhir.resources rejects unknown elements and wrong types: fail at build time, not at a client
    from fhir.resources.R4B.codesystem import CodeSystem

    return CodeSystem.model_validate(resource).model_dump(mode="json")


def _concept(code: str, display: str, definition: str | None) -> Concept:
    concept = Concept(code=code, display=display)
    if definition:
        concept["definition"] = definition
    return concept


def findings_code_system(software: str | None = None) -> Json:
    """cxr-findings: one concept per label in findings.json (the labels of every registered model;
    tests/test_mappings.py keeps that table complete), code = the label, as Observation.code says."""
    entries = findings_table()["findings"]
    concepts = (_concept(f.label, f.display, entries[f.label].get("definition")) for f in all_findings().values())
    return build_code_system(findings_table()["codeSystem"], concepts, software=software or software_version())


def operations_code_system(software: str | None = None) -> Json:
    """cxr-operations: the codes of operations.json, the table fhir_server/jobs.py codes Task.code from."""
    table = operations_table()
    concepts = (_concept(code, e["display"], e.get("definition")) for code, e in table["codes"].items())
    return build_code_system(table["codeSystem"], concepts, software=software or software_version())


def result_parts_code_system(software: str | None = None) -> Json:
    """cxr-result-parts: loinc.json's localCodes, the codes of Observation components (per-image
    probability, severity) that no external code system names."""
    table = loinc_table()["localCodes"]
    meta = {
        "url": table["system"], "name": "CxrResultParts", "title": "CXR-FHIR result parts",
        "description": table.get("_comment"),
    }
    concepts = (_concept(e["code"], e["display"], e.get("definition")) for e in table.values() if isinstance(e, dict))
    return build_code_system(meta, concepts, software=software or software_version())


@lru_cache(maxsize=4)
def code_systems(software: str | None = None) -> dict[str, Json]:
    """Every CodeSystem the server publishes, by id. Built once (the tables are read-only at run
    time); callers must copy before changing a returned resource."""
    built = (findings_code_system(software), operations_code_system(software), result_parts_code_system(software))
    return {cs["id"]: cs for cs in built}


__all__ = [
    "PUBLISHER",
    "build_code_system",
    "code_system_id",
    "code_systems",
    "findings_code_system",
    "operations_code_system",
    "result_parts_code_system",
    "software_version",
]
