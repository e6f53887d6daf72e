"""Round-trip fidelity (issue 10): what the server accepts reads back unchanged. Decimals keep
their text (`1.50` stays `1.50`, `-1e+245` stays `-1e+245`), dateTime/instant values keep their
form (`+00:00` is not rewritten to `Z`, `.120` keeps its digits), on create, update, vread,
search and in Bundles, on SQLite and PostgreSQL. Hypothesis runs derandomized (same examples in
every run) so CI stays deterministic."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_examples import examples
from fhir_server import fhirjson
from fhir_support import client, repo  # noqa: F401  (sqlite/postgres fixtures)

FAST = settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = {"Content-Type": "application/fhir+json"}


@st.composite
def decimal_texts(draw) -> str:
    sign = draw(st.sampled_from(["", "-"]))
    whole = draw(st.sampled_from(["0", "1", "7", "42", "123456789012345678901234567890"]))
    frac = draw(st.one_of(st.just(""), st.text("0123456789", min_size=1, max_size=20).map(lambda d: "." + d)))
    exp = draw(st.one_of(st.just(""), st.builds(lambda e, s, n: f"{e}{s}{n}", st.sampled_from(["e", "E"]),
                                                     st.sampled_from(["", "+", "-"]), st.integers(0, 300))))
    if not frac and not exp:
        sign = ""  # an integer: -0 and 0 are the same JSON integer (Python has no -0 int)
    return f"{sign}{whole}{frac}{exp}"


@st.composite
def datetime_texts(draw) -> str:
    year = draw(st.integers(1900, 2100))
    form = draw(st.sampled_from(["Y", "YM", "YMD", "full"]))
    if form == "Y":
        return f"{year:04d}"
    month = draw(st.integers(1, 12))
    if form == "YM":
        return f"{year:04d}-{month:02d}"
    day = draw(st.integers(1, 28))
    if form == "YMD":
        return f"{year:04d}-{month:02d}-{day:02d}"
    h, m, s = draw(st.integers(0, 23)), draw(st.integers(0, 59)), draw(st.integers(0, 59))
    frac = draw(st.sampled_from(["", ".1", ".120", ".000", ".123456789"]))
    tz = draw(st.sampled_from(["Z", "+00:00", "-00:00", "+01:00", "-05:30", "+14:00"]))
    return f"{year:04d}-{month:02d}-{day:02d}T{h:02d}:{m:02d}:{s:02d}{frac}{tz}"


def _observation(value: str, when: str) -> str:
    return ('{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p"},'
            f'"effectiveDateTime":"{when}","valueQuantity":{{"value":{value},"unit":"1"}},'
            f'"component":[{{"code":{{"text":"c"}},"valueQuantity":{{"value":{value}}}}}]}}')


def _texts_in(response_text: str, value: str, when: str) -> None:
    assert f'"value":{value},' in response_text or f'"value":{value}}}' in response_text, (value, response_text)
    assert f'"effectiveDateTime":"{when}"' in response_text, (when, response_text)


@FAST
@given(value=decimal_texts(), when=datetime_texts())
def test_decimals_and_datetimes_read_back_as_sent(client, value, when):
    created = client.post("/fhir/Observation", content=_observation(value, when).encode(), headers=JSON)
    assert created.status_code == 201, created.text
    _texts_in(created.text, value, when)
    rid = created.json()["id"]
    for url in (f"/fhir/Observation/{rid}", f"/fhir/Observation/{rid}/_history/1", f"/fhir/Observation?_id={rid}"):
        _texts_in(client.get(url).text, value, when)
    updated = client.put(f"/fhir/Observation/{rid}", content=_observation(value, when).replace('"status"', f'"id":"{rid}","status"', 1).encode(), headers=JSON)
    assert updated.status_code == 200, updated.text
    _texts_in(client.get(f"/fhir/Observation/{rid}").text, value, when)


def test_the_issues_values(client):
    for value, when in (("-1e+245", "2024-01-01T00:00:00+00:00"), ("1.50", "2024-01-01T10:00:00.120+01:00"), ("0.0000", "2024")):
        created = client.post("/fhir/Observation", content=_observation(value, when).encode(), headers=JSON)
        assert created.status_code == 201, created.text
        _texts_in(client.get(f"/fhir/Observation/{created.json()['id']}").text, value, when)


def test_decimals_stay_searchable(client):
    client.post("/fhir/Observation", content=_observation("1.50", "2024").encode(), headers=JSON)
    client.post("/fhir/Observation", content=_observation("-1e+245", "2024").encode(), headers=JSON)
    assert client.get("/fhir/Observation?value-quantity=gt1").json()["total"] == 1
    assert client.get("/fhir/Observation?value-quantity=lt-1e200").json()["total"] == 1


def _without_server_elements(resource: dict) -> dict:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


@pytest.mark.parametrize("rtype", sorted(examples()))
def test_example_resources_read_back_unchanged(client, rtype):
    sent = fhirjson.dumps(examples()[rtype])
    created = client.post(f"/fhir/{rtype}", content=sent.encode(), headers=JSON)
    assert created.status_code == 201, created.text
    read = client.get(f"/fhir/{rtype}/{created.json()['id']}", headers={"Accept": "application/fhir+json"})
    # the same JSON text element for element (decimals and dates included), meta/id aside
    assert fhirjson.dumps(_without_server_elements(fhirjson.loads(read.text))) == sent
    assert _without_server_elements(json.loads(read.text)) == json.loads(sent)


def test_transaction_entries_read_back_unchanged(client):
    bundle = '{"resourceType":"Bundle","type":"transaction","entry":[{"resource":' + _observation("2.500", "2020-02-02T02:02:02+00:00") + ',"request":{"method":"POST","url":"Observation"}}]}'
    response = client.post("/fhir", content=bundle.encode(), headers=JSON)
    assert response.status_code == 200, response.text
    location = response.json()["entry"][0]["response"]["location"]
    _texts_in(client.get("/fhir/" + location.split("/fhir/")[1]).text, "2.500", "2020-02-02T02:02:02+00:00")
