"""Mutated HL7-example-like bodies never get a 5xx (issue 10: 25 of 288 did). A seeded generator
mutates every stored type's example (tests/fhir_examples.py): leaves of the wrong JSON type,
nulls, containers where leaves belong and back, removed and unknown elements, lone surrogates,
huge and odd numbers, a 200-deep `extension`. Each is POSTed (create) and PUT (update); every
answer is a 2xx or a 4xx OperationOutcome, and an accepted body reads back as stored."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from fhir_examples import examples
from fhir_support import client, outcome_of, repo  # noqa: F401  (sqlite/postgres fixtures)

pytestmark = pytest.mark.fuzz

SEED = 20261204
MUTANTS = 288

JUNK: list[Any] = [None, 0, -1, 1.5, -1e245, 1e308, True, False, "", "x", " ", [], {}, [None], [[]], {"a": 1},
                   {"extension": []}, "2020-13-45", "\ud800", "a\u0000b", "1" * 5000, ["x"], [1, "a", None]]


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if len(prefix) > 40:  # inside a planted deep extension: deep enough
        return out
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, prefix + (i,))
    return out


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


def _set(body: Any, path: tuple, value: Any) -> None:
    _get(body, path[:-1])[path[-1]] = value


def deep_extension(depth: int) -> dict:
    ext: dict = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(depth):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    return ext


def mutate(rng: random.Random, body: dict) -> dict:
    for _ in range(rng.choice([1, 1, 2, 3])):
        paths = [p for p in _paths(body) if p and p[0] != "resourceType"]
        path = rng.choice(paths)
        current = _get(body, path)
        roll = rng.random()
        if roll < 0.45:
            _set(body, path, rng.choice(JUNK))
        elif roll < 0.55:
            _set(body, path, [current])  # a leaf or object where one belongs becomes an array
        elif roll < 0.62 and isinstance(current, list) and current:
            _set(body, path, current[0])  # an array becomes its first item
        elif roll < 0.7:
            parent = _get(body, path[:-1])
            if isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent.append(None)
        elif roll < 0.8:
            target = _get(body, path[:-1])
            if isinstance(target, dict):
                target[rng.choice(["bogus", "_" + str(path[-1]), "fhir_comments", "resourceType", "id", "meta"])] = rng.choice(JUNK)
        elif roll < 0.88:
            body["extension"] = [deep_extension(rng.choice([30, 200, 400]))]
        else:
            target = _get(body, path[:-1])
            if isinstance(target, dict):
                target[path[-1]] = rng.choice([{"value": rng.choice(JUNK)}, {"reference": rng.choice(JUNK)}, {"coding": [rng.choice(JUNK)]}])
    return body


def mutants() -> list[tuple[str, dict]]:
    rng = random.Random(SEED)
    types = sorted(examples())
    out = []
    for i in range(MUTANTS):
        rtype = types[i % len(types)]
        out.append((rtype, mutate(rng, examples()[rtype])))
    return out


def _send(client, method: str, url: str, body: dict):
    text = json.dumps(body, allow_nan=True)
    return client.request(method, url, content=text.encode("utf-8", "surrogatepass"), headers={"Content-Type": "application/fhir+json"})


def test_mutated_example_bodies_never_get_a_5xx(client):
    failures = []
    accepted = 0
    for n, (rtype, body) in enumerate(mutants()):
        for method, url in (("POST", f"/fhir/{rtype}"), ("PUT", f"/fhir/{rtype}/m{n}")):
            if method == "PUT" and isinstance(body, dict):
                body = {**body, "id": f"m{n}"}
            response = _send(client, method, url, body)
            if response.status_code >= 500:
                failures.append(f"{method} {rtype} #{n}: {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400:
                outcome_of(response)
            else:
                accepted += 1
    assert not failures, f"{len(failures)} 5xx:\n" + "\n".join(failures)
    assert accepted > 0  # the generator also leaves valid bodies: the server still works


@pytest.mark.parametrize("depth", [63, 200])
def test_deep_extension_is_refused_before_validation(client, depth, monkeypatch):
    import fhir_server.fhir.validation as validation

    seen = []
    real = validation.validate_resource
    monkeypatch.setattr(validation, "validate_resource", lambda *a, **k: seen.append(1) or real(*a, **k))
    body = {**examples()["Patient"], "extension": [deep_extension(depth)]}
    response = _send(client, "POST", "/fhir/Patient", body)
    if depth == 200:
        assert response.status_code == 400
        assert "CXR_JSON_MAX_DEPTH" in outcome_of(response)["issue"][0]["diagnostics"]
        assert not seen
    else:
        assert response.status_code in (201, 400), response.text  # within the limit: the models decide


SINGLE_JUNK: list[Any] = [None, 0, 1.5, True, "", "x", [], {}, [None], {"a": 1}, ["x"], "\ud800"]


def test_every_single_leaf_mutation_is_a_400_or_accepted():
    """Exhaustive over every element of every example: each replaced by each JSON type (and
    wrapped in an array); validation answers with a FhirError or accepts, never crashes."""
    import copy

    from fhir_server.fhir.exceptions import FhirError
    from fhir_server.fhir.validation import validate_resource

    crashes = []
    for rtype, body in examples().items():
        for path in _paths(body):
            if not path or path[0] == "resourceType":
                continue
            for junk in [*SINGLE_JUNK, "wrap"]:
                mutant = copy.deepcopy(body)
                current = _get(mutant, path)
                _set(mutant, path, [current] if junk == "wrap" else copy.deepcopy(junk))
                try:
                    validate_resource(mutant, expected_type=rtype)
                except FhirError as exc:
                    assert 400 <= exc.status_code < 500
                except Exception as exc:  # noqa: BLE001 - the point of the test
                    crashes.append(f"{rtype} {path} = {junk!r}: {type(exc).__name__}: {exc}")
    assert not crashes, "\n".join(crashes[:20])


@pytest.mark.parametrize(
    ("element", "value", "message"),
    [
        ("address", 0, "Endpoint.address: expected a string, got an integer"),
        ("payloadMimeType", "application/dicom", "Endpoint.payloadMimeType: a repeating element must be a JSON array"),
        ("period", [{"start": "2014-09-01"}], "Endpoint.period: expected an object, got an array"),
        ("header", [], "Endpoint.header: an array may not be empty"),
        ("name", None, "Endpoint.name: null is not allowed"),
    ],
)
def test_wrong_json_types_name_the_element(client, element, value, message):
    body = {**examples()["Endpoint"], element: value}
    response = _send(client, "POST", "/fhir/Endpoint", body)
    assert response.status_code == 400, response.text
    assert message in outcome_of(response)["issue"][0]["diagnostics"]


def test_coerced_primitives_are_refused(client):
    """pydantic would accept these in lax mode; FHIR JSON does not."""
    for rtype, element, value in (("Observation", ("valueQuantity", "value"), "6.3"), ("Patient", ("active",), "true"),
                                  ("Media", ("height",), 1.5), ("Task", ("input", 0, "valueBoolean"), None)):
        body = examples()[rtype]
        _set(body, element, value)
        response = _send(client, "POST", f"/fhir/{rtype}", body)
        assert response.status_code == 400, (rtype, element, response.text)




def test_hypothesis_bodies_never_get_a_5xx(client):
    """Hypothesis-generated JSON (any type, nested) planted at any element of any example; plus
    whole bodies of arbitrary JSON with a resourceType. Derandomized: the same cases every run."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
    types = sorted(examples())

    @settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        rtype = data.draw(st.sampled_from(types))
        body = examples()[rtype]
        if data.draw(st.booleans()):
            paths = [p for p in _paths(body) if p and p[0] != "resourceType"]
            _set(body, data.draw(st.sampled_from(paths)), data.draw(values))
        else:
            body = {"resourceType": rtype, **data.draw(st.dictionaries(st.sampled_from(sorted({p[0] for p in _paths(body) if p})), values, max_size=4))}
        response = _send(client, "POST", f"/fhir/{rtype}", body)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            outcome_of(response)

    run()
