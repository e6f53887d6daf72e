"""Crash tests with real `cxr serve` processes (python -m fhir_server serve) on 127.0.0.1.

- Two replicas on one fresh PostgreSQL database share mixed traffic (creates, conditional
  creates, updates with If-Match, async $analyze); one is SIGKILLed in the middle. Afterwards,
  on the survivor: every acknowledged write is there exactly once, versions are consecutive,
  every accepted job finishes (a job the dead replica held is taken over when its lease runs
  out), every poll works. (issue 13)
- kill -9 of a server during $analyze writes and transaction Bundles, on SQLite and on
  PostgreSQL: after a restart every acknowledged result is readable and nothing half-written
  exists. (issue 10)

The PostgreSQL tests create and drop their own database on CXR_TEST_POSTGRES_URL's server.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import uuid

import httpx
import pytest
from analyze_support import media
from pg_cluster import POSTGRES_URL, fresh_postgres_database
from proc_server import processes, server_env, start_serve

needs_postgres = [pytest.mark.postgres, pytest.mark.skipif(not POSTGRES_URL, reason="CXR_TEST_POSTGRES_URL not set")]
SYSTEM = "urn:cxr-test:crash"
ASYNC = {"Prefer": "respond-async"}
FHIR_JSON = {"Accept": "application/fhir+json"}
GRACEFUL = (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled after a clean shutdown


def marker_patient(marker: str, family: str = "v1") -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": marker}], "name": [{"family": family}]}


def search_marker(http: httpx.Client, base: str, rtype: str, marker: str) -> list[dict]:
    body = http.get(f"{base}/fhir/{rtype}", params={"identifier": f"{SYSTEM}|{marker}"}).json()
    assert body["resourceType"] == "Bundle", body
    return [e["resource"] for e in body.get("entry", [])]


def assert_consecutive_history(http: httpx.Client, base: str, rtype: str, rid: str) -> list[dict]:
    history = http.get(f"{base}/fhir/{rtype}/{rid}/_history", params={"_count": "100"}).json()
    versions = sorted(int(e["resource"]["meta"]["versionId"]) for e in history["entry"] if "resource" in e)
    assert versions == list(range(1, len(versions) + 1)), versions
    return history["entry"]


def poll_until_done(http: httpx.Client, url: str, timeout: float = 180.0) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = http.get(url)
        assert response.status_code in (200, 202), response.text  # a poll always works
        if response.status_code == 200:
            return response
        time.sleep(0.3)
    raise AssertionError(f"job {url} did not finish in {timeout} s")


class Ledger:
    """What the servers acknowledged (2xx answers only), shared by the traffic threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.created: dict[str, str] = {}  # marker -> id
        self.versions: dict[str, set[int]] = {}  # id -> acknowledged version ids (with family "v<n>")
        self.conditional: dict[str, str] = {}  # marker -> id (If-None-Exist sent to both replicas)
        self.jobs: list[str] = []  # polling URLs' paths (/fhir/_async/...), accepted with 202
        self.errors: list[str] = []  # any answer that is neither success nor an expected refusal


def mixed_traffic(ledger: Ledger, bases: list[str], stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=60) as http:
        for _ in range(10_000):
            if stop.is_set():
                return
            base = rng.choice(bases)
            kind = rng.choice(["create", "create", "conditional", "update", "analyze"])
            try:
                if kind == "create":
                    marker = uuid.uuid4().hex
                    r = http.post(f"{base}/fhir/Patient", json=marker_patient(marker))
                    if r.status_code == 201:
                        with ledger.lock:
                            ledger.created[marker] = r.json()["id"]
                            ledger.versions[r.json()["id"]] = {1}
                elif kind == "conditional":
                    marker = uuid.uuid4().hex
                    for target in (base, *[b for b in bases if b != base]):  # the same create on each replica
                        r = http.post(f"{target}/fhir/Patient", json=marker_patient(marker),
                                      headers={"If-None-Exist": f"identifier={SYSTEM}|{marker}"})
                        if r.status_code in (200, 201):
                            with ledger.lock:
                                known = ledger.conditional.setdefault(marker, r.json()["id"])
                                if known != r.json()["id"]:
                                    ledger.errors.append(f"conditional create made two: {known} {r.json()['id']}")
                elif kind == "update":
                    with ledger.lock:
                        if not ledger.versions:
                            continue
                        rid = rng.choice(sorted(ledger.versions))
                    current = http.get(f"{base}/fhir/Patient/{rid}")
                    if current.status_code != 200:
                        continue
                    body = current.json()
                    version = int(body["meta"]["versionId"])
                    body["name"] = [{"family": f"v{version + 1}"}]
                    r = http.put(f"{base}/fhir/Patient/{rid}", json=body, headers={"If-Match": f'W/"{version}"'})
                    if r.status_code == 200:
                        with ledger.lock:
                            ledger.versions[rid].add(int(r.json()["meta"]["versionId"]))
                    elif r.status_code not in (409, 412):  # lost a race: the expected refusal
                        ledger.errors.append(f"update {r.status_code}: {r.text[:200]}")
                else:
                    created = http.post(f"{base}/fhir/Media", json=media())
                    if created.status_code != 201:
                        continue
                    r = http.post(f"{base}/fhir/Media/{created.json()['id']}/$analyze", headers=ASYNC)
                    if r.status_code == 202:
                        with ledger.lock:
                            ledger.jobs.append(httpx.URL(r.headers["content-location"]).path)
                if r.status_code >= 500 and r.status_code != 503:
                    ledger.errors.append(f"{kind} {r.status_code}: {r.text[:200]}")
            except httpx.TransportError:  # the replica was killed under us: not acknowledged
                continue


@pytest.mark.parametrize("dummy", [pytest.param(0, marks=needs_postgres)])
def test_two_replicas_one_killed_mid_traffic(tmp_path, dummy) -> None:
    with fresh_postgres_database() as db_url, processes() as procs:
        env = server_env(tmp_path, CXR_DATABASE_URL=db_url, CXR_QUEUE_LEASE_S="3", CXR_QUEUE_POLL_S="0.2")
        a = start_serve(env, tmp_path / "a.log")
        procs.append(a)
        a.wait_ready()  # creates the tables; then the second replica
        b = start_serve(env, tmp_path / "b.log")
        procs.append(b)
        b.wait_ready()
        with httpx.Client(timeout=60) as http:
            ledger = Ledger()
            stop = threading.Event()
            threads = [threading.Thread(target=mixed_traffic, args=(ledger, [a.base, b.base], stop, s))
                       for s in range(3)]
            for t in threads:
                t.start()
            time.sleep(6)
            # make sure the victim holds accepted jobs when it dies
            for _ in range(3):
                media_id = http.post(f"{a.base}/fhir/Media", json=media()).json()["id"]
                r = http.post(f"{a.base}/fhir/Media/{media_id}/$analyze", headers=ASYNC)
                assert r.status_code == 202
                ledger.jobs.append(httpx.URL(r.headers["content-location"]).path)
            a.kill9()
            time.sleep(3)  # traffic goes on; requests to the dead replica fail unacknowledged
            stop.set()
            for t in threads:
                t.join(120)
            assert not any(t.is_alive() for t in threads)
            assert not ledger.errors, ledger.errors

            survivor = b.base
            assert len(ledger.created) >= 5 and len(ledger.jobs) >= 4
            for marker, rid in ledger.created.items():
                found = search_marker(http, survivor, "Patient", marker)
                assert [p["id"] for p in found] == [rid]  # there, exactly once
            for marker, rid in ledger.conditional.items():
                assert [p["id"] for p in search_marker(http, survivor, "Patient", marker)] == [rid]
            for rid, acked in ledger.versions.items():
                entries = assert_consecutive_history(http, survivor, "Patient", rid)
                by_version = {int(e["resource"]["meta"]["versionId"]): e["resource"] for e in entries}
                for version in acked:
                    assert by_version[version]["name"][0]["family"] == f"v{version}"
            for path in ledger.jobs:  # accepted on either replica; polled on the survivor
                done = poll_until_done(http, f"{survivor}{path}")
                kinds = [e["resource"]["resourceType"] for e in done.json()["entry"]]
                assert kinds[0] == "DiagnosticReport" and "Provenance" in kinds
                task = http.get(f"{survivor}/fhir/Task/{path.rsplit('/', 1)[1]}").json()
                assert task["status"] == "completed"
        assert b.stop() in GRACEFUL  # and the survivor still shuts down cleanly


# ---- kill -9 during $analyze writes and transaction Bundles (issue 10) ----------------------


def transaction(marker: str) -> dict:
    pid = f"urn:uuid:{uuid.uuid4()}"
    ident = [{"system": SYSTEM, "value": marker}]
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": pid, "resource": {"resourceType": "Patient", "identifier": ident},
         "request": {"method": "POST", "url": "Patient"}},
        *[{"resource": {"resourceType": "Observation", "status": "final", "code": {"text": f"part {i}"},
                        "identifier": ident, "subject": {"reference": pid}},
           "request": {"method": "POST", "url": "Observation"}} for i in range(5)],
    ]}


def write_traffic(base: str, stop: threading.Event, acked: dict, sent: list, lock: threading.Lock, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=60) as http:
        for _ in range(10_000):
            if stop.is_set():
                return
            try:
                if rng.random() < 0.5:
                    marker = uuid.uuid4().hex
                    with lock:
                        sent.append(marker)
                    r = http.post(f"{base}/fhir", json=transaction(marker))
                    if r.status_code == 200:
                        with lock:
                            acked.setdefault("bundles", []).append(marker)
                else:
                    marker = uuid.uuid4().hex
                    body = {"resourceType": "Parameters", "parameter": [
                        {"name": "media", "resource": media(identifier=[{"system": SYSTEM, "value": marker}])}]}
                    r = http.post(f"{base}/fhir/Media/$analyze", json=body)
                    if r.status_code in (200, 201):
                        with lock:
                            acked.setdefault("analyses", []).append(r.json())
            except httpx.TransportError:
                return  # killed


def _kill_during_writes(tmp_path, env: dict) -> None:
    with processes() as procs, httpx.Client(timeout=60) as http:
        server = start_serve(env, tmp_path / "first.log")
        procs.append(server)
        server.wait_ready()
        acked: dict = {}
        sent: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()
        threads = [threading.Thread(target=write_traffic, args=(server.base, stop, acked, sent, lock, s))
                   for s in range(3)]
        for t in threads:
            t.start()
        time.sleep(8)
        server.kill9()  # mid-write: three clients have requests in flight
        stop.set()
        for t in threads:
            t.join(60)
        assert acked.get("bundles") and acked.get("analyses"), acked.keys()

        restarted = start_serve(env, tmp_path / "second.log")
        procs.append(restarted)
        restarted.wait_ready()
        base = restarted.base
        for marker in acked["bundles"]:  # acknowledged: all of it
            assert len(search_marker(http, base, "Patient", marker)) == 1
            assert len(search_marker(http, base, "Observation", marker)) == 5
        for marker in sent:  # in flight at the kill: all or nothing, never part
            counts = (len(search_marker(http, base, "Patient", marker)),
                      len(search_marker(http, base, "Observation", marker)))
            assert counts in ((0, 0), (1, 5)), (marker, counts)
        for bundle in acked["analyses"]:  # every acknowledged result readable, as answered
            for entry in bundle["entry"]:
                res = entry["resource"]
                stored = http.get(f"{base}/fhir/{res['resourceType']}/{res['id']}/_history/{res['meta']['versionId']}",
                                  headers=FHIR_JSON)
                assert stored.status_code == 200 and stored.json() == res
        # nothing half-written: every report's results and every provenance's targets exist
        reports = http.get(f"{base}/fhir/DiagnosticReport", params={"_count": "500"}).json()
        for entry in reports.get("entry", []):
            for ref in entry["resource"].get("result", []):
                assert http.get(f"{base}/fhir/{ref['reference']}").status_code == 200
        provenances = http.get(f"{base}/fhir/Provenance", params={"_count": "500"}).json()
        assert provenances["total"] >= len(acked["analyses"])
        for entry in provenances.get("entry", []):
            for target in entry["resource"]["target"]:
                assert http.get(f"{base}/fhir/{target['reference']}", headers=FHIR_JSON).status_code == 200
        assert restarted.stop() in GRACEFUL


def test_kill9_during_writes_sqlite(tmp_path) -> None:
    _kill_during_writes(tmp_path, server_env(tmp_path))


@pytest.mark.parametrize("dummy", [pytest.param(0, marks=needs_postgres)])
def test_kill9_during_writes_postgres(tmp_path, dummy) -> None:
    with fresh_postgres_database() as db_url:
        _kill_during_writes(tmp_path, server_env(tmp_path, CXR_DATABASE_URL=db_url))
