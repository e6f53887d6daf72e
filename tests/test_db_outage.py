"""PostgreSQL stops while traffic runs (issue 10, Faults): FHIR answers 503 OperationOutcome
(transient) with Retry-After, /readyz says why, /healthz stays 200; when the database returns the
same process serves again without a restart, and no acknowledged write is missing.

The test starts its OWN throwaway PostgreSQL cluster (tests/pg_cluster.py) so it can crash it with
`pg_ctl -m immediate`; it skips when the PostgreSQL server binaries are absent."""

from __future__ import annotations

import time
import uuid

import pytest
from analyze_support import make_client, media
from pg_cluster import PgCluster

SYSTEM = "urn:cxr-test:outage"


@pytest.fixture
def cluster():
    pg = PgCluster()
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


def patient(marker: str) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": SYSTEM, "value": marker}], "gender": "female"}


def test_database_outage_is_503_then_the_same_process_serves_again(cluster, tmp_path) -> None:
    url = cluster.create_database("cxr_outage")
    acknowledged: dict[str, str] = {}  # marker -> id, only for 201 answers
    refused = 0
    with make_client(tmp_path, database_url=url, queue_poll_s=0.2) as client:

        def write(i: int):
            marker = f"p{i}-{uuid.uuid4().hex[:6]}"
            response = client.post("/fhir/Patient", json=patient(marker))
            if response.status_code == 201:
                acknowledged[marker] = response.json()["id"]
            return response

        for i in range(10):
            assert write(i).status_code == 201
        media_id = client.post("/fhir/Media", json=media()).json()["id"]

        cluster.stop("immediate")  # crash: connections cut, nothing flushed politely
        for i in range(10, 20):
            response = write(i)
            if response.status_code == 201:  # only possible before the cut reached the pool
                continue
            refused += 1
            assert response.status_code == 503, response.text
            issue = response.json()["issue"][0]
            assert response.json()["resourceType"] == "OperationOutcome" and issue["code"] == "transient"
            assert int(response.headers["retry-after"]) > 0
        assert refused >= 9
        read = client.get(f"/fhir/Patient/{next(iter(acknowledged.values()))}")
        assert read.status_code == 503 and read.json()["issue"][0]["code"] == "transient"
        search = client.get("/fhir/Patient", params={"identifier": f"{SYSTEM}|x"})
        assert search.status_code == 503
        analyze = client.post(f"/fhir/Media/{media_id}/$analyze", headers={"Prefer": "respond-async"})
        assert analyze.status_code == 503  # not accepted: no 202 without a stored job
        legacy_ready = client.get("/readyz")
        assert legacy_ready.status_code == 503
        body = legacy_ready.json()
        assert body["checks"]["database"] != "ok" and "database" in body["reason"]
        assert body["checks"]["model"] == "ok"
        assert client.get("/healthz").status_code == 200  # liveness never depends on the database

        cluster.start()  # the database returns; the server process is the same
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and write(100).status_code != 201:
            time.sleep(0.5)
        assert client.get("/readyz").status_code == 200
        for i in range(101, 106):
            assert write(i).status_code == 201
        location = client.post(f"/fhir/Media/{media_id}/$analyze",
                               headers={"Prefer": "respond-async"}).headers["content-location"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (done := client.get(location)).status_code == 202:
            time.sleep(0.2)
        assert done.status_code == 200

        for marker, rid in acknowledged.items():  # every acknowledged write, exactly once
            found = client.get("/fhir/Patient", params={"identifier": f"{SYSTEM}|{marker}"}).json()
            assert found["total"] == 1 and found["entry"][0]["resource"]["id"] == rid
