"""Conditional update `PUT [type]?criteria` and conditional delete `DELETE [type]?criteria`
(R4 http.html#cond-update, #cdelete; conditionalDelete "single"), over HTTP and in Bundles, on
every available database, including concurrent twins that must create exactly one resource."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir_support import make_app, outcome_of

from fhir_server.storage import Repository

pytest_plugins = ["fhir_support"]  # the repo / client fixtures (SQLite + PostgreSQL)

MRN = "urn:mrn"


def patient(mrn: str = "1", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": MRN, "value": mrn}], "gender": "female", **extra}


def by_mrn(mrn: str) -> str:
    return f"identifier={MRN}|{mrn}"


def total(client: TestClient, query: str) -> int:
    return client.get(f"/fhir/Patient?{query}&_summary=count").json()["total"]


def issue_text(response) -> str:
    return outcome_of(response)["issue"][0]["diagnostics"]


# ---- conditional update ------------------------------------------------------------------


def test_no_match_without_id_creates(client):
    r = client.put(f"/fhir/Patient?{by_mrn('1')}", json=patient())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["meta"]["versionId"] == "1" and r.headers["etag"] == 'W/"1"'
    assert r.headers["location"] == f"http://testserver/fhir/Patient/{body['id']}/_history/1"
    assert total(client, by_mrn("1")) == 1


def test_no_match_with_free_id_is_update_as_create(client):
    # plain PUT here is update-as-create (CapabilityStatement updateCreate), so the body id is used
    r = client.put(f"/fhir/Patient?{by_mrn('1')}", json=patient(id="mrn-1"))
    assert r.status_code == 201 and r.json()["id"] == "mrn-1"
    assert client.get("/fhir/Patient/mrn-1").json()["meta"]["versionId"] == "1"


def test_no_match_with_id_of_another_resource_is_400(client):
    other = client.put("/fhir/Patient/taken", json=patient("2", id="taken"))
    assert other.status_code == 201
    r = client.put(f"/fhir/Patient?{by_mrn('1')}", json=patient("1", id="taken"))
    assert r.status_code == 400 and "does not match" in issue_text(r)
    assert client.get("/fhir/Patient/taken").json()["identifier"][0]["value"] == "2"  # untouched


def test_one_match_updates_it_and_history_grows(client):
    first = client.post("/fhir/Patient", json=patient()).json()
    r = client.put(f"/fhir/Patient?{by_mrn('1')}", json=patient(gender="male"))  # no id in the body
    assert r.status_code == 200, r.text
    assert r.json()["id"] == first["id"] and r.json()["meta"]["versionId"] == "2" and r.headers["etag"] == 'W/"2"'
    r = client.put(f"/fhir/Patient?{by_mrn('1')}", json=patient(id=first["id"], gender="other"))  # the match's id
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "3"
    history = client.get(f"/fhir/Patient/{first['id']}/_history").json()
    assert history["total"] == 3
    assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["3", "2", "1"]
    assert client.get(f"/fhir/Patient/{first['id']}/_history/1").json()["gender"] == "female"
    assert client.get(f"/fhir/Patient/{first['id']}/_history/2").json()["gender"] == "male"
    assert total(client, by_mrn("1")) == 1


def test_one_match_with_a_different_body_id_is_400(client):
    first = client.post("/fhir/Patient", json=patient()).json()
    r = client.put(f"/fhir/Patient?{by_mrn('1')}", json=patient(id="someone-else"))
    assert r.status_code == 400 and first["id"] in issue_text(r)
    assert client.get(f"/fhir/Patient/{first['id']}").json()["meta"]["versionId"] == "1"


def test_several_matches_are_412_and_change_nothing(client):
    client.post("/fhir/Patient", json=patient())
    client.post("/fhir/Patient", json=patient())
    r = client.put(f"/fhir/Patient?{by_mrn('1')}", json=patient(gender="male"))
    assert r.status_code == 412 and outcome_of(r)["issue"][0]["code"] == "conflict"
    assert "more than one" in issue_text(r)
    assert total(client, f"{by_mrn('1')}&gender=male") == 0


def test_if_match_is_checked_against_the_match(client):
    first = client.post("/fhir/Patient", json=patient()).json()
    url = f"/fhir/Patient?{by_mrn('1')}"
    r = client.put(url, json=patient(gender="male"), headers={"If-Match": 'W/"7"'})
    assert r.status_code == 412
    r = client.put(url, json=patient(gender="male"), headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.json()["id"] == first["id"] and r.json()["meta"]["versionId"] == "2"
    r = client.put(url, json=patient(gender="other"), headers={"If-Match": 'W/"1"'})  # stale now
    assert r.status_code == 412
    # If-Match names a version of an existing resource: with no match there is none to compare
    r = client.put(f"/fhir/Patient?{by_mrn('9')}", json=patient("9"), headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412 and total(client, by_mrn("9")) == 0


@pytest.mark.parametrize(
    "query",
    [
        "nonsense=1",  # unknown: lenient search would ignore it and match everything
        f"{by_mrn('1')}&nonsense=1",
        "_count=1",  # shapes the result, selects nothing
        f"{by_mrn('1')}&_summary=count",
        "birthdate=not-a-date",
        "identifier=",
        "",  # no criteria at all: R4 has no "match everything" conditional update
        "_format=json",  # presentation only: still no criteria
    ],
)
def test_bad_criteria_are_400_never_match_all(client, query):
    client.post("/fhir/Patient", json=patient())
    r = client.put(f"/fhir/Patient?{query}", json=patient(gender="male"), headers={"Prefer": "handling=lenient"})
    assert r.status_code == 400, r.text
    assert outcome_of(r)
    r = client.delete(f"/fhir/Patient?{query}", headers={"Prefer": "handling=lenient"})
    assert r.status_code == 400, r.text
    assert total(client, by_mrn("1")) == 1 and total(client, "gender=male") == 0


def test_conditional_update_of_an_unsupported_type_is_404(client):
    r = client.put("/fhir/Encounter?identifier=x", json={"resourceType": "Encounter"})
    assert r.status_code == 404 and outcome_of(r)


# ---- conditional delete ------------------------------------------------------------------


def test_conditional_delete_one_match_then_read_is_410(client):
    first = client.post("/fhir/Patient", json=patient()).json()
    client.post("/fhir/Patient", json=patient("2"))
    r = client.delete(f"/fhir/Patient?{by_mrn('1')}")
    assert r.status_code == 204 and r.headers["etag"] == 'W/"2"'
    r = client.get(f"/fhir/Patient/{first['id']}")
    assert r.status_code == 410 and outcome_of(r)["issue"][0]["code"] == "deleted"
    assert total(client, by_mrn("2")) == 1  # only the match went
    history = client.get(f"/fhir/Patient/{first['id']}/_history").json()
    assert history["total"] == 2 and history["entry"][0]["request"]["method"] == "DELETE"


def test_conditional_delete_without_match_is_a_no_op(client):
    r = client.delete(f"/fhir/Patient?{by_mrn('1')}")
    assert r.status_code == 204 and "etag" not in r.headers
    r = client.delete(f"/fhir/Patient?{by_mrn('1')}", headers={"Prefer": "return=OperationOutcome"})
    assert r.status_code == 200 and "nothing deleted" in issue_text(r)
    assert outcome_of(r)["issue"][0]["severity"] == "information"
    assert client.delete(f"/fhir/Patient?{by_mrn('1')}", headers={"If-Match": 'W/"1"'}).status_code == 412


def test_conditional_delete_of_several_is_412(client):
    client.post("/fhir/Patient", json=patient())
    client.post("/fhir/Patient", json=patient())
    r = client.delete(f"/fhir/Patient?{by_mrn('1')}")
    assert r.status_code == 412 and "more than one" in issue_text(r)
    assert total(client, by_mrn("1")) == 2


def test_conditional_delete_if_match(client):
    first = client.post("/fhir/Patient", json=patient()).json()
    assert client.delete(f"/fhir/Patient?{by_mrn('1')}", headers={"If-Match": 'W/"2"'}).status_code == 412
    assert client.delete(f"/fhir/Patient?{by_mrn('1')}", headers={"If-Match": 'W/"1"'}).status_code == 204
    assert client.get(f"/fhir/Patient/{first['id']}").status_code == 410


def test_a_deleted_match_no_longer_matches(client):
    client.post("/fhir/Patient", json=patient())
    assert client.delete(f"/fhir/Patient?{by_mrn('1')}").status_code == 204
    r = client.put(f"/fhir/Patient?{by_mrn('1')}", json=patient())
    assert r.status_code == 201  # the criteria match nothing current: a new resource


# ---- Bundles -----------------------------------------------------------------------------


def entry(method: str, url: str, resource: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"request": {"method": method, "url": url}}
    if resource is not None:
        out["resource"] = resource
    for key in ("fullUrl",):
        if key in extra:
            out[key] = extra.pop(key)
    out["request"].update(extra)
    return out


def bundle(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def test_transaction_with_conditional_update_and_delete(client):
    kept = client.post("/fhir/Patient", json=patient("1")).json()
    doomed = client.post("/fhir/Patient", json=patient("2")).json()
    obs = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "urn:uuid:new-patient"},
    }
    r = client.post(
        "/fhir",
        json=bundle(
            entry("PUT", f"Patient?{by_mrn('1')}", patient("1", gender="male")),
            entry("DELETE", f"Patient?{by_mrn('2')}"),
            entry("PUT", f"Patient?{by_mrn('3')}", patient("3"), fullUrl="urn:uuid:new-patient"),
            entry("POST", "Observation", obs),
            entry("DELETE", f"Patient?{by_mrn('404')}"),
        ),
    )
    assert r.status_code == 200, r.text
    responses = [e["response"] for e in r.json()["entry"]]
    assert [x["status"] for x in responses] == ["200 OK", "204 No Content", "201 Created", "201 Created", "204 No Content"]
    assert responses[0]["location"].endswith(f"/Patient/{kept['id']}/_history/2")
    assert client.get(f"/fhir/Patient/{kept['id']}").json()["gender"] == "male"
    assert client.get(f"/fhir/Patient/{doomed['id']}").status_code == 410
    created = r.json()["entry"][2]["fullUrl"].rsplit("/", 2)[-2:]
    new_obs = client.get("/fhir/Observation").json()["entry"][0]["resource"]
    assert new_obs["subject"]["reference"] == "/".join(created)  # urn:uuid -> the resolved id


def test_transaction_rolls_back_conditionals_when_an_entry_fails(client):
    kept = client.post("/fhir/Patient", json=patient("1")).json()
    doomed = client.post("/fhir/Patient", json=patient("2")).json()
    client.post("/fhir/Patient", json=patient("dup"))
    client.post("/fhir/Patient", json=patient("dup"))
    r = client.post(
        "/fhir",
        json=bundle(
            entry("PUT", f"Patient?{by_mrn('1')}", patient("1", gender="male")),
            entry("DELETE", f"Patient?{by_mrn('2')}"),
            entry("PUT", f"Patient?{by_mrn('3')}", patient("3")),
            entry("PUT", f"Patient?{by_mrn('dup')}", patient("dup")),  # two matches: 412
        ),
    )
    assert r.status_code == 412 and "Bundle.entry[3]" in issue_text(r)
    assert client.get(f"/fhir/Patient/{kept['id']}").json()["meta"]["versionId"] == "1"
    assert client.get(f"/fhir/Patient/{doomed['id']}").status_code == 200
    assert total(client, by_mrn("3")) == 0


def test_transaction_rejects_a_resolved_identity_changed_twice(client):
    first = client.post("/fhir/Patient", json=patient("1")).json()
    r = client.post(
        "/fhir",
        json=bundle(
            entry("DELETE", f"Patient?{by_mrn('1')}"),
            entry("PUT", f"Patient/{first['id']}", patient("1", id=first["id"], gender="male")),
        ),
    )
    assert r.status_code == 400 and "touch each resource once" in issue_text(r)
    assert client.get(f"/fhir/Patient/{first['id']}").json()["meta"]["versionId"] == "1"


def test_batch_conditionals_answer_one_by_one(client):
    client.post("/fhir/Patient", json=patient("dup"))
    client.post("/fhir/Patient", json=patient("dup"))
    r = client.post(
        "/fhir",
        json=bundle(
            entry("PUT", f"Patient?{by_mrn('dup')}", patient("dup")),
            entry("PUT", f"Patient?{by_mrn('1')}", patient("1")),
            entry("DELETE", f"Patient?{by_mrn('dup')}"),
            entry("DELETE", "Patient?nonsense=1"),
            entry("DELETE", "Patient"),
            kind="batch",
        ),
    )
    assert r.status_code == 200, r.text
    statuses = [e["response"]["status"] for e in r.json()["entry"]]
    assert statuses == ["412 Precondition Failed", "201 Created", "412 Precondition Failed", "400 Bad Request", "400 Bad Request"]
    assert total(client, by_mrn("1")) == 1 and total(client, by_mrn("dup")) == 2


# ---- authorization and capabilities ------------------------------------------------------


def test_conditional_writes_need_update_and_delete_scopes(tmp_path):
    store = Repository.from_url(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    tokens = {"creator": "system/Patient.cr", "updater": "system/Patient.u", "deleter": "system/Patient.d"}
    app = make_app(store, auth_enabled=True, auth_dev_static_tokens=True, auth_tokens=tokens)
    try:
        with TestClient(app) as c:
            url = f"/fhir/Patient?{by_mrn('1')}"

            def auth(name: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {name}"}

            assert c.put(url, json=patient(), headers=auth("creator")).status_code == 403
            assert c.put(url, json=patient(), headers=auth("updater")).status_code == 201
            assert c.delete(url, headers=auth("updater")).status_code == 403
            assert c.delete(url, headers=auth("deleter")).status_code == 204
    finally:
        store.dispose()


def test_capability_statement_declares_conditional_update_and_single_delete(client):
    from fhir_server.storage import SUPPORTED_TYPES
    from fhir_server.storage.params import READ_ONLY_TYPES

    cap = client.get("/fhir/metadata").json()
    by_type = {res["type"]: res for res in cap["rest"][0]["resource"]}
    for rtype in (t for t in SUPPORTED_TYPES if t not in READ_ONLY_TYPES):  # AuditEvent: no writes at all
        assert by_type[rtype]["conditionalUpdate"] is True
        assert by_type[rtype]["conditionalDelete"] == "single"


# ---- atomicity ---------------------------------------------------------------------------


def _race(n: int, work) -> list[Any]:
    """Run `work` in n threads released together; their results (or exceptions)."""
    barrier = threading.Barrier(n)
    results: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        try:
            outcome = work()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_conditional_updates_create_one_resource(repo):
    criteria = "identifier=urn:mrn|race"
    results = _race(4, lambda: repo.conditional_update("Patient", criteria, patient("race")))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r.created for r in results) == [False, False, False, True]
    assert len({r.id for r in results}) == 1
    assert sorted(r.version_id for r in results) == [1, 2, 3, 4]  # each twin wrote one version
    assert repo.search_params("Patient", [("identifier", "urn:mrn|race")]).total == 1


def test_concurrent_conditional_create_and_update_share_the_lock(repo):
    criteria = "identifier=urn:mrn|twin"

    def either(i: int):
        if i % 2:
            return repo.create(patient("twin"), if_none_exist=criteria)
        return repo.conditional_update("Patient", criteria, patient("twin"))

    counter = iter(range(4))
    counter_lock = threading.Lock()

    def work():
        with counter_lock:
            i = next(counter)
        return either(i)

    results = _race(4, work)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(r.created for r in results) == 1
    assert repo.search_params("Patient", [("identifier", "urn:mrn|twin")]).total == 1


def test_concurrent_conditional_deletes_delete_once(repo):
    repo.create(patient("gone"))
    results = _race(4, lambda: repo.conditional_delete("Patient", "identifier=urn:mrn|gone"))
    assert not [r for r in results if isinstance(r, Exception)], results
    tombs = [r for r in results if r is not None]
    assert len(tombs) == 1 and tombs[0].version_id == 2
