"""Request shape limits (issue 10): JSON depth, number of values, string length and Bundle
entries are checked on the parsed body before any model is built; each refusal is a 4xx
OperationOutcome naming its CXR_ setting, and the limits come from Settings."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from fhir_examples import examples
from fhir_support import make_app, outcome_of, repo  # noqa: F401  (sqlite/postgres fixture)

LIMITS = {"json_max_depth": 20, "json_max_elements": 500, "json_max_string_length": 100, "bundle_max_entries": 3}


@pytest.fixture
def limited(repo):
    with TestClient(make_app(repo, **LIMITS)) as client:
        yield client


def _post(client, url: str, body: object | str):
    text = body if isinstance(body, str) else json.dumps(body)
    return client.post(url, content=text.encode(), headers={"Content-Type": "application/fhir+json"})


def _nested(depth: int) -> dict:
    ext: dict = {"url": "http://example.org/x", "valueString": "leaf"}
    for _ in range(depth):
        ext = {"url": "http://example.org/x", "extension": [ext]}
    return {"resourceType": "Patient", "extension": [ext]}


def _refused(response, status: int, setting: str) -> None:
    assert response.status_code == status, response.text
    assert setting in outcome_of(response)["issue"][0]["diagnostics"]


def test_depth(limited):
    assert _post(limited, "/fhir/Patient", _nested(4)).status_code == 201
    _refused(_post(limited, "/fhir/Patient", _nested(12)), 400, "CXR_JSON_MAX_DEPTH")


def test_depth_beyond_the_parsers_own_recursion_limit(limited):
    _refused(_post(limited, "/fhir/Patient", '{"resourceType":"Patient","x":' + "[" * 100_000 + "]" * 100_000 + "}"), 400, "CXR_JSON_MAX_DEPTH")


def test_number_of_values(limited):
    body = {"resourceType": "Patient", "name": [{"given": [f"g{i}" for i in range(10)]} for _ in range(60)]}
    _refused(_post(limited, "/fhir/Patient", body), 413, "CXR_JSON_MAX_ELEMENTS")


def test_string_length_but_not_base64_data(limited):
    _refused(_post(limited, "/fhir/Patient", {"resourceType": "Patient", "name": [{"family": "x" * 101}]}), 413, "CXR_JSON_MAX_STRING_LENGTH")
    binary = {"resourceType": "Binary", "contentType": "application/octet-stream", "data": "QUFB" * 100}
    assert _post(limited, "/fhir/Binary", binary).status_code == 201


def test_bundle_entries(limited):
    entry = {"request": {"method": "GET", "url": "Patient?name=x"}}
    assert _post(limited, "/fhir", {"resourceType": "Bundle", "type": "batch", "entry": [entry] * 3}).status_code == 200
    _refused(_post(limited, "/fhir", {"resourceType": "Bundle", "type": "batch", "entry": [entry] * 4}), 413, "CXR_BUNDLE_MAX_ENTRIES")


def test_defaults_accept_real_examples_and_refuse_a_200_deep_extension(repo):
    with TestClient(make_app(repo)) as client:
        for rtype, body in examples().items():
            assert _post(client, f"/fhir/{rtype}", body).status_code == 201, rtype
        _refused(_post(client, "/fhir/Patient", _nested(200)), 400, "CXR_JSON_MAX_DEPTH")


@pytest.mark.parametrize("text", ['{"resourceType":"Observation","valueQuantity":{"value":NaN}}',
                                  '{"resourceType":"Patient","multipleBirthInteger":' + "9" * 5000 + "}"])
def test_numbers_json_does_not_have_are_a_400(limited, text):
    response = _post(limited, "/fhir/Patient", text)
    assert response.status_code == 400, response.text
    outcome_of(response)
