"""The CapabilityStatement tells the truth: everything /fhir/metadata declares works.

For every resource type: each declared search parameter is accepted with a value of its type (200
searchset, not 400), each declared _include / _revinclude is accepted, the declared read / vread /
history / search interactions answer as FHIR says (404 OperationOutcome for a missing id, never
405), and each declared operation's canonical resolves to its OperationDefinition (by
`OperationDefinition?url=` as a canonical reference is resolved, and by reading it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from live_server import make_test_app, tiny_test_analyzer

FHIR_JSON = {"Accept": "application/fhir+json"}
SAMPLE_VALUES = {
    "token": "http://example.org|x",
    "reference": "Patient/does-not-exist",
    "date": "ge2020-01-01",
    "string": "x",
    "uri": "http://example.org/x",
    "number": "0.5",
    "quantity": "0.5",
    "composite": None,  # not declared by this server; would need a type-specific value
    "special": None,
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    analyzer = tiny_test_analyzer()
    app = make_test_app(tmp_path_factory.mktemp("cxr-capabilities"), analyzer=analyzer)
    try:
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client
    finally:
        if analyzer is not None:
            analyzer.close()


@pytest.fixture(scope="module")
def capabilities(client: Any) -> dict[str, Any]:
    response = client.get("/fhir/metadata", headers=FHIR_JSON)
    assert response.status_code == 200
    cap = response.json()
    assert cap["resourceType"] == "CapabilityStatement"
    assert cap["fhirVersion"] == "4.0.1" and cap["kind"] == "instance"
    assert any("json" in f for f in cap["format"])
    return cap


def _resources(cap: dict[str, Any]) -> list[dict[str, Any]]:
    (rest,) = [r for r in cap["rest"] if r["mode"] == "server"]
    return rest["resource"]


def _is_searchset(response: Any) -> bool:
    body = response.json() if "json" in response.headers.get("content-type", "") else {}
    return response.status_code == 200 and body.get("resourceType") == "Bundle" and body.get("type") == "searchset"


def test_declared_search_parameters_are_supported(client: Any, capabilities: dict[str, Any]) -> None:
    failures, checked = [], 0
    for resource in _resources(capabilities):
        for param in resource.get("searchParam", []):
            value = SAMPLE_VALUES.get(param["type"])
            if value is None:
                continue
            query = urlencode({param["name"]: value})
            response = client.get(f"/fhir/{resource['type']}?{query}", headers={**FHIR_JSON, "Prefer": "handling=strict"})
            checked += 1
            if not _is_searchset(response):
                failures.append(f"{resource['type']}?{query} -> {response.status_code} {response.text[:200]}")
    print(f"\n{checked} declared search parameters checked")
    assert checked >= 50
    assert not failures, "\n".join(failures)


def test_declared_includes_and_revincludes_are_supported(client: Any, capabilities: dict[str, Any]) -> None:
    failures, checked = [], 0
    for resource in _resources(capabilities):
        for kind in ("searchInclude", "searchRevInclude"):
            for value in resource.get(kind, []):
                param = "_include" if kind == "searchInclude" else "_revinclude"
                response = client.get(f"/fhir/{resource['type']}?{urlencode({param: value})}",
                                      headers={**FHIR_JSON, "Prefer": "handling=strict"})
                checked += 1
                if not _is_searchset(response):
                    failures.append(f"{resource['type']}?{param}={value} -> {response.status_code} {response.text[:200]}")
    print(f"\n{checked} declared _include/_revinclude values checked")
    assert not failures, "\n".join(failures)


def test_declared_interactions_answer_as_fhir_specifies(client: Any, capabilities: dict[str, Any]) -> None:
    failures = []
    for resource in _resources(capabilities):
        rtype = resource["type"]
        codes = {i["code"] for i in resource.get("interaction", [])}
        checks = []
        if "read" in codes:
            checks.append((f"/fhir/{rtype}/no-such-id", 404))
        if "vread" in codes:
            checks.append((f"/fhir/{rtype}/no-such-id/_history/1", 404))
        if "history-instance" in codes:
            checks.append((f"/fhir/{rtype}/no-such-id/_history", (200, 404)))  # empty history or unknown id
        if "history-type" in codes:
            checks.append((f"/fhir/{rtype}/_history", 200))
        if "search-type" in codes:
            checks.append((f"/fhir/{rtype}", 200))
        for path, expected in checks:
            response = client.get(path, headers=FHIR_JSON)
            allowed = expected if isinstance(expected, tuple) else (expected,)
            body = response.json()
            if response.status_code not in allowed:
                failures.append(f"GET {path} -> {response.status_code}, expected {expected}")
            elif response.status_code >= 400 and body.get("resourceType") != "OperationOutcome":
                failures.append(f"GET {path} -> {response.status_code} without an OperationOutcome")
    assert not failures, "\n".join(failures)


def test_undeclared_search_parameter_is_rejected_only_when_strict(client: Any) -> None:
    strict = client.get("/fhir/Observation?no-such-param=1", headers={**FHIR_JSON, "Prefer": "handling=strict"})
    assert strict.status_code == 400 and strict.json()["resourceType"] == "OperationOutcome"
    lenient = client.get("/fhir/Observation?no-such-param=1", headers={**FHIR_JSON, "Prefer": "handling=lenient"})
    assert _is_searchset(lenient)
    self_link = next(link["url"] for link in lenient.json()["link"] if link["relation"] == "self")
    assert "no-such-param" not in self_link, "the self link must show only the parameters actually used"


def test_declared_operations_resolve_to_their_definitions(client: Any, capabilities: dict[str, Any]) -> None:
    declared = [(r["type"], op) for r in _resources(capabilities) for op in r.get("operation", [])]
    assert {(t, op["name"]) for t, op in declared} >= {("Media", "analyze"), ("ImagingStudy", "analyze")}
    failures = []
    for rtype, op in declared:
        canonical = op["definition"]
        found = client.get(f"/fhir/OperationDefinition?{urlencode({'url': canonical})}", headers=FHIR_JSON).json()
        matches = [e["resource"] for e in found.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]
        if len(matches) != 1:
            failures.append(f"{rtype} ${op['name']}: OperationDefinition?url={canonical} found {len(matches)}")
            continue
        definition = matches[0]
        if definition.get("code") != op["name"] or rtype not in definition.get("resource", []):
            failures.append(f"{rtype} ${op['name']}: {canonical} defines ${definition.get('code')} on {definition.get('resource')}")
        read = client.get(f"/fhir/OperationDefinition/{definition['id']}", headers=FHIR_JSON)
        if read.status_code != 200 or read.json().get("url") != canonical:
            failures.append(f"{rtype} ${op['name']}: read OperationDefinition/{definition['id']} -> {read.status_code}")
    assert not failures, "\n".join(failures)
