"""Generated queries against every FHIR query surface never get a 5xx.

Search parameters, chains, modifiers, prefixes, result parameters (_summary, _elements, _include,
_sort, _count) and conditional criteria are assembled from the server's own parameter tables plus
junk (unknown names, broken prefixes, odd Unicode, empty and very long values) by a seeded
generator, so every run sends the same few hundred requests. Each answer must be a 2xx with a
FHIR body or a 4xx with an OperationOutcome, and the store must still answer afterwards.
"""

from __future__ import annotations

import random
from urllib.parse import urlencode

import pytest
from fhir_support import FHIR_JSON, outcome_of

from fhir_server.storage.params import SUPPORTED_TYPES, reference_params, search_params

pytest_plugins = ["fhir_support"]  # the repo / client fixtures (SQLite + PostgreSQL)

SEED = 20261126
REQUESTS_PER_SURFACE = 120

_JUNK_NAMES = ["", "_", ".", "..", "a.b.c", "subject.", ".name", "x:y:z", "_has:Observation:subject:code", "名前", "%00", "_id:", ":exact"]
_MODIFIERS = ["", ":exact", ":contains", ":missing", ":not", ":text", ":above", ":Patient", ":Foo", ":"]
_PREFIXES = ["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap", "zz"]
_VALUES = [
    "", "x", "123", "urn:mrn|12345", "|", "||", "a|b|c", "2024", "2024-05", "2024-05-01", "2024-13-45",
    "2024-05-01T10:00:00Z", "2024-05-01T25:61", "-1", "1e309", "nan", "true", "false", "Patient/p1",
    "http://x/Patient/p1/_history/1", "Müller", "\u202e\u0000", "%", "'; drop table resource_version; --",
    "a,b,,c", ",", "0.5", "3.0|http://unitsofmeasure.org|1", "x" * 3000,
]
_RESULT = [
    ("_summary", ["true", "false", "text", "data", "count", "bogus", ""]),
    ("_elements", ["status", "code,subject", "nope", "", "a.b"]),
    ("_count", ["0", "1", "50", "-1", "x", "99999999999999999999"]),
    ("_offset", ["0", "5", "-3", "y"]),
    ("_sort", ["_lastUpdated", "-date", "status,-_id", "nope", "subject", ""]),
    ("_include", ["*", "DiagnosticReport:result", "Observation:subject:Patient", "x", "Patient:nope", ""]),
    ("_revinclude", ["Provenance:target", "Observation:subject", "y:z", ""]),
    ("_total", ["accurate", "none", "estimate", "bad"]),
]


def _param_name(rng: random.Random, resource_type: str) -> str:
    known = list(search_params(resource_type))
    roll = rng.random()
    if roll < 0.15:
        return rng.choice(_JUNK_NAMES)
    name = rng.choice(known)
    refs = list(reference_params(resource_type))
    if refs and roll < 0.45:  # a chain: ref[:Type].param of a type the reference may point to
        ref = rng.choice(refs)
        target = rng.choice(SUPPORTED_TYPES)
        typed = f":{target}" if rng.random() < 0.5 else ""
        name = f"{ref}{typed}.{rng.choice(list(search_params(target)) + ['nope'])}"
    return name + rng.choice(_MODIFIERS)


def _criteria(rng: random.Random, resource_type: str) -> list[tuple[str, str]]:
    items = []
    for _ in range(rng.randint(1, 3)):
        items.append((_param_name(rng, resource_type), rng.choice(_PREFIXES) + rng.choice(_VALUES)))
    return items


def _query(rng: random.Random, resource_type: str) -> list[tuple[str, str]]:
    items = _criteria(rng, resource_type)
    for name, values in rng.sample(_RESULT, rng.randint(0, 3)):
        items.append((name, rng.choice(values)))
    return items


def _assert_answered(response) -> None:
    assert response.status_code < 500, (response.request.method, str(response.request.url)[:300], response.text[:500])
    if response.status_code >= 400:
        outcome_of(response)
    elif response.status_code != 204:
        assert response.headers["content-type"].startswith(FHIR_JSON), response.headers


@pytest.fixture
def seeded(client):
    """A few linked resources, so chains and includes have something to walk."""
    client.put("/fhir/Patient/p1", json={"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:mrn", "value": "12345"}],
                                         "name": [{"family": "Müller"}], "birthDate": "1970-03-04"})
    client.put("/fhir/Observation/o1", json={
        "resourceType": "Observation", "id": "o1", "status": "preliminary", "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "233604007"}]}, "valueQuantity": {"value": 0.8, "unit": "1"}})
    client.put("/fhir/DiagnosticReport/r1", json={
        "resourceType": "DiagnosticReport", "id": "r1", "status": "preliminary", "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "36554-4"}]}, "result": [{"reference": "Observation/o1"}]})
    return client


def test_generated_searches_never_fail_the_server(seeded):
    rng = random.Random(SEED)
    for _ in range(REQUESTS_PER_SURFACE):
        resource_type = rng.choice(SUPPORTED_TYPES)
        query = _query(rng, resource_type)
        if rng.random() < 0.3:
            response = seeded.post(f"/fhir/{resource_type}/_search", content=urlencode(query),
                                   headers={"Content-Type": "application/x-www-form-urlencoded",
                                            "Prefer": rng.choice(["handling=strict", "handling=lenient"])})
        else:
            response = seeded.get(f"/fhir/{resource_type}?{urlencode(query)}",
                                  headers={"Prefer": rng.choice(["handling=strict", "handling=lenient"])})
        _assert_answered(response)
    assert seeded.get("/fhir/Patient/p1").status_code == 200


def test_generated_reads_and_history_with_result_parameters_never_fail(seeded):
    rng = random.Random(SEED + 1)
    for _ in range(REQUESTS_PER_SURFACE):
        target = rng.choice(["/fhir/Patient/p1", "/fhir/Observation/o1", "/fhir/DiagnosticReport/r1/_history/1",
                             "/fhir/Patient/p1/_history", "/fhir/Observation/_history", "/fhir/_history", "/fhir/CodeSystem/cxr-findings"])
        items = [(name, rng.choice(values)) for name, values in rng.sample(_RESULT, rng.randint(1, 3))]
        _assert_answered(seeded.get(f"{target}?{urlencode(items)}"))


def test_generated_conditional_writes_never_fail_the_server(seeded):
    rng = random.Random(SEED + 2)
    for _ in range(REQUESTS_PER_SURFACE):
        resource_type = rng.choice(["Patient", "Observation", "DiagnosticReport"])
        criteria = urlencode(_criteria(rng, resource_type))
        body = {"resourceType": resource_type, "status": "preliminary",
                "code": {"text": "x"}} if resource_type != "Patient" else {"resourceType": "Patient"}
        kind = rng.random()
        if kind < 0.4:
            response = seeded.put(f"/fhir/{resource_type}?{criteria}", json=body)
        elif kind < 0.7:
            response = seeded.delete(f"/fhir/{resource_type}?{criteria}")
        else:
            response = seeded.post(f"/fhir/{resource_type}", json=body, headers={"If-None-Exist": criteria})
        _assert_answered(response)
    assert seeded.get("/fhir/metadata").status_code == 200


@pytest.mark.parametrize("text", ["a\u0000b", "bell\u0007", "esc\u001b[0m"])
def test_control_characters_in_a_body_are_a_400_on_every_database(client, text):
    """FHIR strings may hold no code point below 32 but tab, CR and LF; PostgreSQL cannot store U+0000."""
    for response in (
        client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": text}]}),
        client.put("/fhir/Patient/p9", json={"resourceType": "Patient", "id": "p9", "name": [{"family": text}]}),
        client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "name": [{"text": text}]}, "request": {"method": "POST", "url": "Patient"}}]}),
    ):
        assert response.status_code == 400, response.text
        assert "control character" in outcome_of(response)["issue"][0]["diagnostics"]
    ok = client.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"text": "tab\there\r\nnew line"}]})
    assert ok.status_code == 201, ok.text


@pytest.mark.parametrize("query", ["name=a%00b", "identifier=a%00b", "_id=x%01", "name%00=x", "subject.name=%1f"])
def test_control_characters_in_search_and_criteria_are_a_400(client, query):
    resource_type = "Observation" if query.startswith("subject") else "Patient"
    for response in (
        client.get(f"/fhir/{resource_type}?{query}"),
        client.post(f"/fhir/{resource_type}/_search", content=query, headers={"Content-Type": "application/x-www-form-urlencoded"}),
        client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers={"If-None-Exist": "identifier=a%00b"}),
        client.put("/fhir/Patient?identifier=a%00b", json={"resourceType": "Patient"}),
        client.delete("/fhir/Patient?identifier=a%00b"),
    ):
        assert response.status_code == 400, response.text
        outcome_of(response)
