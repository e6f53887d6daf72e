"""Our own CodeSystems are published: every cxr-findings / cxr-operations code that a real $analyze
emits (Observation.code, Task.code) resolves in the served CodeSystem; read, search, $lookup, 404 and
405 behave; the resources pass the offline validators; the CapabilityStatement lists CodeSystem."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import pytest
from analyze_support import by_type, make_client, media, outcome, wait_until
from conformance_checks import node_unavailable_reason, validate_resources

import mappings
from fhir_server import jobs
from mappings.codesystems import code_systems, software_version

FINDINGS = "http://cxr-fhir.org/fhir/CodeSystem/cxr-findings"
OPERATIONS = "http://cxr-fhir.org/fhir/CodeSystem/cxr-operations"
RESULT_PARTS = "http://cxr-fhir.org/fhir/CodeSystem/cxr-result-parts"
OURS = {FINDINGS: "cxr-findings", OPERATIONS: "cxr-operations", RESULT_PARTS: "cxr-result-parts"}
OUR_PREFIX = "http://cxr-fhir.org/fhir/CodeSystem/"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with make_client(tmp_path_factory.mktemp("cxr-codesystems")) as c:
        yield c


def _codings(value: Any) -> Iterator[dict[str, Any]]:
    """Every Coding anywhere in a resource (anything with a system and a code)."""
    if isinstance(value, dict):
        if isinstance(value.get("system"), str) and isinstance(value.get("code"), str):
            yield value
        for child in value.values():
            yield from _codings(child)
    elif isinstance(value, list):
        for child in value:
            yield from _codings(child)


@pytest.fixture(scope="module")
def emitted(client: Any) -> dict[str, set[str]]:
    """system -> codes of our two systems in what a sync and an async $analyze wrote."""
    created = client.post("/fhir/Media", json=media())
    assert created.status_code == 201, created.text
    media_id = created.json()["id"]
    sync = client.post(f"/fhir/Media/{media_id}/$analyze")
    assert sync.status_code == 201, sync.text
    resources = [e["resource"] for e in sync.json()["entry"]]
    assert by_type(sync.json())["Observation"]

    accepted = client.post(f"/fhir/Media/{media_id}/$analyze", headers={"Prefer": "respond-async"})
    assert accepted.status_code == 202, accepted.text
    location = accepted.headers["content-location"]
    done = wait_until(lambda: (r := client.get(location)).status_code != 202 and r)
    assert done.status_code == 200, done.text
    task = client.get(f"/fhir/Task/{location.rsplit('/', 1)[1]}").json()
    assert task["status"] == "completed"
    resources.append(task)
    # and what the store holds, in case a stored version differs from the returned Bundle
    for rtype in ("Observation", "DiagnosticReport", "Task"):
        resources += [e["resource"] for e in client.get(f"/fhir/{rtype}?_count=100").json().get("entry", [])]

    found: dict[str, set[str]] = {url: set() for url in OURS}
    for resource in resources:
        for coding in _codings(resource):
            if coding["system"].startswith(OUR_PREFIX):  # any system of ours, published or not
                found.setdefault(coding["system"], set()).add(coding["code"])
    return found


def _read(client: Any, cs_id: str) -> dict[str, Any]:
    response = client.get(f"/fhir/CodeSystem/{cs_id}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    return response.json()


# ---------------------------------------------------------------------------------- emitted codes


def test_every_emitted_code_is_in_the_served_code_system(client: Any, emitted: dict[str, set[str]]) -> None:
    assert emitted[FINDINGS], "the tiny model's Observations carry no cxr-findings code"
    assert emitted[OPERATIONS] == {"analyze"}
    assert set(emitted) == set(OURS), f"systems of ours emitted but not published: {set(emitted) - set(OURS)}"
    for url, codes in emitted.items():
        served = _read(client, OURS[url])
        concepts = {c["code"]: c for c in served["concept"]}
        missing = codes - set(concepts)
        assert not missing, f"{url}: emitted but not published: {sorted(missing)}"
        for code in codes:
            found = client.get("/fhir/CodeSystem/$lookup", params={"system": url, "code": code})
            assert found.status_code == 200, found.text


def test_displays_agree_with_the_codes_emitted(client: Any) -> None:
    served = {c["code"]: c["display"] for c in _read(client, "cxr-findings")["concept"]}
    for label, mapping in mappings.all_findings().items():
        assert served[label] == mapping.display
    task_coding = jobs.ANALYZE_CODE.coding()
    served_ops = {c["code"]: c["display"] for c in _read(client, "cxr-operations")["concept"]}
    assert served_ops[task_coding["code"]] == task_coding["display"]
    assert task_coding["system"] == jobs.TASK_CODE_SYSTEM == OPERATIONS


# ---------------------------------------------------------------------------------- read / search


@pytest.mark.parametrize(("cs_id", "url"), [(cs_id, url) for url, cs_id in OURS.items()])
def test_read_gives_a_complete_active_code_system(client: Any, cs_id: str, url: str) -> None:
    cs = _read(client, cs_id)
    assert (cs["resourceType"], cs["id"], cs["url"]) == ("CodeSystem", cs_id, url)
    assert (cs["status"], cs["content"], cs["caseSensitive"], cs["experimental"]) == ("active", "complete", True, False)
    assert cs["version"] == software_version() == client.get("/fhir/metadata").json()["software"]["version"]
    assert cs["name"] and cs["title"] and cs["publisher"] == "CXR-FHIR"
    assert cs["count"] == len(cs["concept"]) and all(c["code"] and c["display"] for c in cs["concept"])


def test_findings_code_system_lists_every_label_of_the_table() -> None:
    concepts = {c["code"] for c in code_systems()["cxr-findings"]["concept"]}
    assert concepts == set(mappings.all_findings())


def test_unknown_id_is_404_operation_outcome(client: Any) -> None:
    response = client.get("/fhir/CodeSystem/no-such-id")
    assert response.status_code == 404
    assert outcome(response)["code"] == "not-found"


def _search(client: Any, query: str, **headers: str) -> dict[str, Any]:
    response = client.get(f"/fhir/CodeSystem{query}", headers=headers)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"}


def test_search(client: Any) -> None:
    everything = _search(client, "")
    assert everything["total"] == 3 and _ids(everything) == set(OURS.values())
    for url, cs_id in OURS.items():
        by_url = _search(client, "?" + urlencode({"url": url}))
        assert by_url["total"] == 1 and _ids(by_url) == {cs_id}
        assert by_url["entry"][0]["fullUrl"].endswith(f"/fhir/CodeSystem/{cs_id}")
        assert _ids(_search(client, "?" + urlencode({"url": f"{url}|{software_version()}"}))) == {cs_id}
        assert _ids(_search(client, f"?_id={cs_id}")) == {cs_id}
    assert _search(client, "?" + urlencode({"url": "http://example.org/other"}))["total"] == 0
    assert _search(client, "?" + urlencode({"url": f"{FINDINGS}|0.0.0-other"}))["total"] == 0
    assert _ids(_search(client, "?name=cxrfind")) == {"cxr-findings"}
    assert _ids(_search(client, "?_id=cxr-findings,cxr-operations")) == {"cxr-findings", "cxr-operations"}
    assert _search(client, "?_summary=count")["total"] == 3 and "entry" not in _search(client, "?_summary=count")
    form = client.post("/fhir/CodeSystem/_search", content=urlencode({"url": OPERATIONS}),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 200 and _ids(form.json()) == {"cxr-operations"}


def test_unknown_search_parameter_is_400_when_strict_and_reported_when_lenient(client: Any) -> None:
    strict = client.get("/fhir/CodeSystem?no-such=1", headers={"Prefer": "handling=strict"})
    assert strict.status_code == 400 and outcome(strict)["code"] == "not-supported"
    lenient = _search(client, "?no-such=1")
    assert lenient["total"] == len(OURS)
    assert [e["resource"]["resourceType"] for e in lenient["entry"] if e["search"]["mode"] == "outcome"] == ["OperationOutcome"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/fhir/CodeSystem"), ("PUT", "/fhir/CodeSystem/cxr-findings"), ("DELETE", "/fhir/CodeSystem/cxr-findings"),
     ("PATCH", "/fhir/CodeSystem/cxr-operations"), ("PUT", "/fhir/CodeSystem/new-one")],
)
def test_writes_are_405_operation_outcome(client: Any, method: str, path: str) -> None:
    body = {**code_systems()["cxr-findings"], "id": path.rsplit("/", 1)[-1]}
    response = client.request(method, path, json=body if method in ("POST", "PUT") else None)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "GET"
    issue = outcome(response)
    assert issue["code"] == "not-supported" and "read-only" in issue["diagnostics"]
    assert _read(client, "cxr-findings")["concept"] == code_systems()["cxr-findings"]["concept"]  # unchanged


# ---------------------------------------------------------------------------------- $lookup


def test_lookup(client: Any) -> None:
    found = client.get("/fhir/CodeSystem/$lookup", params={"system": FINDINGS, "code": "pneumonia"})
    assert found.status_code == 200, found.text
    params = {p["name"]: p.get("valueString") for p in found.json()["parameter"]}
    assert params["display"] == "Pneumonia" and params["version"] == software_version() and params["name"]
    instance = client.get("/fhir/CodeSystem/cxr-operations/$lookup", params={"code": "analyze"})
    assert instance.status_code == 200
    assert {p["name"]: p.get("valueString") for p in instance.json()["parameter"]}["display"] == "$analyze"
    posted = client.post("/fhir/CodeSystem/$lookup", json={
        "resourceType": "Parameters", "parameter": [{"name": "coding", "valueCoding": {"system": OPERATIONS, "code": "analyze"}}]
    })
    assert posted.status_code == 200, posted.text
    assert client.get("/fhir/CodeSystem/$lookup", params={"system": FINDINGS, "code": "Pneumonia"}).status_code == 404  # caseSensitive
    assert client.get("/fhir/CodeSystem/$lookup", params={"system": "http://example.org/x", "code": "a"}).status_code == 404
    missing = client.get("/fhir/CodeSystem/$lookup", params={"code": "pneumonia"})
    assert missing.status_code == 400 and outcome(missing)["code"] == "required"


# ---------------------------------------------------------------------------------- conformance


def test_served_resources_pass_the_offline_validators(client: Any) -> None:
    resources = [_read(client, cs_id) for cs_id in OURS.values()]
    resources.append(client.get("/fhir/CodeSystem/$lookup", params={"system": FINDINGS, "code": "effusion"}).json())
    report = validate_resources(resources, node=node_unavailable_reason() is None)  # Node: one call for all
    print("\n" + report.summary())
    assert not report.problems, report.summary()


def test_capability_statement_lists_code_system_read_only(client: Any) -> None:
    cap = client.get("/fhir/metadata").json()
    (resource,) = [r for r in cap["rest"][0]["resource"] if r["type"] == "CodeSystem"]
    assert {i["code"] for i in resource["interaction"]} == {"read", "search-type"}
    params = {p["name"]: p for p in resource["searchParam"]}
    assert params["url"]["type"] == "uri" and params["url"]["definition"] == "http://hl7.org/fhir/SearchParameter/conformance-url"
    assert "system/CodeSystem.rs" in client.get("/.well-known/smart-configuration").json()["scopes_supported"]
