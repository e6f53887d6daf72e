"""Scripted sessions of real third-party FHIR clients against the running server (uvicorn on
127.0.0.1, tiny test model): fhirpy (async), SMART fhirclient (strict R4 models) and the Node
fhir-kit-client (conformance/client_session.mjs).

Each creates a Patient, posts a Media with a real chest X-ray (../shared/data; the Node session
falls back to a generated chest-like PNG when the data is absent, so it always runs), runs
$analyze, searches DiagnosticReport?patient=..., reads the Observations and the history. With the
tiny test model there is no OOD gate; these are protocol checks, not accuracy checks.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conformance_checks import (
    CONFORMANCE_DIR,
    chest_like_png,
    collect_resources,
    node_unavailable_reason,
    unique_resources,
    validate_resources,
)
from live_server import LiveServer, live_server  # noqa: F401  (fixture)

CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _real_chest_xray(shared_data: Path) -> Path:
    """The first image listed in kermany_fullres (full-size pediatric film), else nih_cxr14."""
    for folder in ("kermany_fullres", "nih_cxr14"):
        labels = shared_data / folder / "labels.csv"
        if labels.exists():
            with labels.open(newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    path = shared_data / folder / row["file"]
                    if path.suffix.lower() in CONTENT_TYPES and path.exists():
                        return path
    pytest.skip("no chest X-ray image found in the shared data")


@pytest.fixture(scope="module")
def xray(request: pytest.FixtureRequest) -> Path:
    return _real_chest_xray(request.getfixturevalue("shared_data"))


def _check_validators(resources: list[dict[str, Any]]) -> None:
    """What a client saw must also pass the Python validators (the Node ones run elsewhere)."""
    report = validate_resources(unique_resources(resources), node=False)
    assert not report.problems, report.summary()


# ----------------------------------------------------------------------------------- fhirpy


async def _fhirpy_session(base: str, image: Path) -> list[dict[str, Any]]:
    from fhirpy import AsyncFHIRClient
    from fhirpy.base.exceptions import ResourceNotFound

    client = AsyncFHIRClient(base, extra_headers={"Accept": "application/fhir+json"})
    seen: list[dict[str, Any]] = []

    patient = client.resource("Patient", name=[{"family": "Fhirpy", "given": ["Session"]}], gender="female")
    await patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1"
    seen.append(patient.serialize())

    media = client.resource(
        "Media",
        status="completed",
        subject=patient.to_reference().serialize(),
        modality={"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}]},
        content={"contentType": CONTENT_TYPES[image.suffix.lower()], "data": base64.b64encode(image.read_bytes()).decode(),
                 "title": image.name},
    )
    await media.save()
    assert media.id
    seen.append(media.serialize())

    result = await media.execute("$analyze", method="post")
    assert result["resourceType"] == "Bundle"
    seen.extend(collect_resources(dict(result)))
    types = [e["resource"]["resourceType"] for e in result["entry"]]
    assert types[0] == "DiagnosticReport" and "Observation" in types and "Provenance" in types, types

    reports = await client.resources("DiagnosticReport").search(patient=patient.id).fetch_all()
    assert len(reports) == 1, f"{len(reports)} DiagnosticReports for the patient"
    report = reports[0]
    seen.append(report.serialize())
    assert report["subject"]["reference"] == f"Patient/{patient.id}"
    assert report["status"] == "preliminary"

    observations = [await client.reference(reference=ref["reference"]).to_resource() for ref in report["result"]]
    assert observations and all(o["resourceType"] == "Observation" for o in observations)
    assert all(o["status"] == "preliminary" for o in observations)
    seen.extend(o.serialize() for o in observations)

    same = await client.resources("Observation").search(**{"derived-from": f"Media/{media.id}"}).fetch_all()
    assert {o.id for o in same} == {o.id for o in observations}

    history = await client.execute(f"DiagnosticReport/{report.id}/_history", method="get")
    assert history["type"] == "history" and history["entry"]
    seen.extend(collect_resources(dict(history)))

    with pytest.raises(ResourceNotFound):  # 404 (an OperationOutcome, checked in test_conformance_server)
        await client.reference("Observation", "no-such-observation").to_resource()
    return seen


def test_fhirpy_session(live_server: LiveServer, xray: Path) -> None:  # noqa: F811
    seen = asyncio.run(_fhirpy_session(live_server.fhir_base, xray))
    _check_validators(seen)


# ------------------------------------------------------------------------- SMART fhirclient


def test_fhirclient_session(live_server: LiveServer, xray: Path) -> None:  # noqa: F811
    """SMART fhirclient parses every response with its strict R4 models (the CapabilityStatement too,
    when it connects), so this also checks that real R4 model code accepts what we return."""
    from fhirclient import client as smart_client
    from fhirclient.models.diagnosticreport import DiagnosticReport
    from fhirclient.models.media import Media
    from fhirclient.models.observation import Observation
    from fhirclient.models.patient import Patient

    smart = smart_client.FHIRClient(settings={"app_id": "cxr-conformance", "api_base": live_server.fhir_base})
    smart.prepare()  # reads /metadata into fhirclient's CapabilityStatement model
    assert smart.server.capabilityStatement.fhirVersion == "4.0.1"

    patient = Patient({"name": [{"family": "Fhirclient"}], "gender": "unknown"})
    created = patient.create(smart.server)
    pid = created["id"]
    media = Media({
        "status": "completed", "subject": {"reference": f"Patient/{pid}"},
        "content": {"contentType": CONTENT_TYPES[xray.suffix.lower()], "data": base64.b64encode(xray.read_bytes()).decode()},
    })
    mid = media.create(smart.server)["id"]
    bundle = smart.server.post_json(f"Media/{mid}/$analyze", {"resourceType": "Parameters", "parameter": []}).json()
    assert bundle["resourceType"] == "Bundle"

    reports = DiagnosticReport.where(struct={"patient": pid}).perform_resources(smart.server)
    assert len(reports) == 1 and reports[0].status == "preliminary"
    observations = [Observation.read(ref.reference.split("/", 1)[1], smart.server) for ref in reports[0].result]
    assert observations and all(o.valueQuantity is not None and o.valueQuantity.code == "1" for o in observations)
    assert Patient.read(pid, smart.server).gender == "unknown"


# -------------------------------------------------------------------------- fhir-kit-client


@pytest.mark.skipif(node_unavailable_reason() is not None, reason=str(node_unavailable_reason()))
def test_fhir_kit_client_session(live_server: LiveServer, request: pytest.FixtureRequest, tmp_path: Path) -> None:  # noqa: F811
    if not (CONFORMANCE_DIR / "node_modules" / "fhir-kit-client").exists():
        pytest.skip("fhir-kit-client is not installed in conformance/node_modules")
    try:
        image = _real_chest_xray(request.getfixturevalue("shared_data"))
    except pytest.skip.Exception:
        image = tmp_path / "generated-chest.png"  # no shared data: a generated film keeps this test on
        image.write_bytes(chest_like_png(512))
    proc = subprocess.run(
        ["node", str(CONFORMANCE_DIR / "client_session.mjs"), live_server.fhir_base, str(image)],
        cwd=CONFORMANCE_DIR, capture_output=True, text=True, timeout=180, check=False,
    )
    assert proc.stdout.strip(), f"no output (exit {proc.returncode}): {proc.stderr[-3000:]}"
    result = json.loads(proc.stdout)
    for step in result["steps"]:
        print(f"  {'ok  ' if step['ok'] else 'FAIL'} {step['name']}: {step['detail']}")
    failed = [f"{s['name']}: {s['detail']}" for s in result["steps"] if not s["ok"]]
    assert not failed and proc.returncode == 0, "\n".join(failed) or proc.stderr[-3000:]
    assert len(result["steps"]) == 8
    _check_validators(result["resources"])
