"""pyfhircheck's built-in `base-r4` REST pack against the real server over HTTP (uvicorn, 127.0.0.1).

The pack checks: /metadata (200, FHIR JSON, CapabilityStatement with fhirVersion), JSON content
negotiation, read (200, ETag W/"..", Last-Modified, resource validated), vread, `_id` search
(searchset Bundle), paging (`_count=1` has a self link), instance history, and the 404/410
OperationOutcome for a missing id. The pack needs one existing resource; it is run once for each
resource type the server produces, against resources made by a real $analyze.

Responses that pyfhircheck validates (read, vread) may only fail on the validator bugs listed in
conformance_checks.KNOWN_FALSE_POSITIVES (each matched exactly); everything else must pass.
pyfhircheck's `scan_api` then pages through every resource type and validates all that is stored.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from conformance_checks import chest_like_png, known_false_positive, pyfhircheck_config
from live_server import LiveServer, live_server  # noqa: F401  (fixture)
from pyfhircheck import (
    ApiScanOptions,
    ApiTestOptions,
    ApiTestPlan,
    ApiTestReport,
    ApiTestStatus,
    load_builtin_api_test_plan,
    run_api_tests,
    scan_api,
)

FHIR_JSON = "application/fhir+json"
RESOURCE_TYPES = ("Patient", "Media", "DiagnosticReport", "Observation", "Device", "Provenance", "Binary", "OperationDefinition")


@pytest.fixture(scope="module")
def seeded(live_server: LiveServer) -> Iterator[dict[str, tuple[str, str]]]:  # noqa: F811
    """resourceType -> (id, versionId) of real resources: a Patient, a Media and what $analyze made."""
    headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    with httpx.Client(base_url=live_server.fhir_base, headers=headers, timeout=60) as client:
        patient = client.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Pyfhircheck"}]})
        assert patient.status_code == 201, patient.text
        pid = patient.json()["id"]
        media = client.post("/Media", json={
            "resourceType": "Media", "status": "completed", "subject": {"reference": f"Patient/{pid}"},
            "content": {"contentType": "image/png", "data": base64.b64encode(chest_like_png()).decode()},
        })
        assert media.status_code == 201, media.text
        result = client.post(f"/Media/{media.json()['id']}/$analyze")
        assert result.status_code == 201, result.text
        found: dict[str, tuple[str, str]] = {}
        for resource in [patient.json(), media.json()] + [e["resource"] for e in result.json()["entry"]]:
            found.setdefault(resource["resourceType"], (resource["id"], resource["meta"]["versionId"]))
        definition = client.get("/OperationDefinition/Media-analyze").json()
        found["OperationDefinition"] = (definition["id"], definition.get("meta", {}).get("versionId", "1"))
    yield found


def _unexcused_failures(scenario: Any, inputs: dict[str, str]) -> list[str]:
    """Failed assertions of a scenario, except a validation failure made only of known false positives."""
    failures = []
    for assertion in scenario.assertions:
        if assertion.status is not ApiTestStatus.FAIL:
            continue
        if assertion.kind == "resource-validation" and scenario.validation_report is not None:
            resource = {"resourceType": inputs["resourceType"]}
            real = [
                f"{issue.path}: {issue.message}"
                for issue in scenario.validation_report.errors
                if known_false_positive("pyfhircheck", resource, issue.path or "", issue.message) is None
            ]
            failures += [f"{scenario.id}: validation: {r}" for r in real]
            continue
        failures.append(f"{scenario.id}: {assertion.kind} expected {assertion.expected!r}, got {assertion.actual!r}")
    if scenario.request is not None and scenario.request.error:
        failures.append(f"{scenario.id}: request error {scenario.request.error}")
    return failures


def _run(base: str, plan: ApiTestPlan, inputs: dict[str, str]) -> ApiTestReport:
    return run_api_tests(
        base, plan, config=pyfhircheck_config(), options=ApiTestOptions(inputs=inputs, timeout_seconds=60, retry_attempts=1)
    )


@pytest.mark.parametrize("resource_type", RESOURCE_TYPES)
def test_base_r4_pack_passes(live_server: LiveServer, seeded: dict[str, tuple[str, str]], resource_type: str) -> None:  # noqa: F811
    resource_id, version_id = seeded[resource_type]
    inputs = {"resourceType": resource_type, "resourceId": resource_id, "versionId": version_id}
    plan = load_builtin_api_test_plan("base-r4")
    assert [s.id for s in plan.scenarios] == [
        "metadata", "read", "vread", "search", "paging", "instance-history", "not-found", "json-negotiation"
    ], "the pyfhircheck base-r4 pack changed: review this test"
    report = _run(live_server.fhir_base, plan, inputs)
    results = {scenario.id: scenario for scenario in report.scenarios}
    excused_only = {sid for sid, r in results.items() if r.status is ApiTestStatus.FAIL and not _unexcused_failures(r, inputs)}
    # A scenario skipped only because its prerequisite failed on a known validator bug is run on its
    # own, unchanged except for the prerequisite, so that it is still checked.
    for scenario in plan.scenarios:
        result = results[scenario.id]
        if result.status is ApiTestStatus.SKIP and set(scenario.prerequisites) <= excused_only:
            alone = ApiTestPlan(name=f"{plan.name} ({scenario.id})", scenarios=(replace(scenario, prerequisites=()),))
            results[scenario.id] = _run(live_server.fhir_base, alone, inputs).scenarios[0]

    def label(result: Any) -> str:
        if result.status is ApiTestStatus.FAIL and not _unexcused_failures(result, inputs):
            return "PASS (validation failed only on known pyfhircheck bugs)"
        return result.status.value

    print(f"\npyfhircheck {report.plan_name} on {resource_type}/{resource_id}: "
          + ", ".join(f"{sid} {label(r)}" for sid, r in results.items()))
    failures = [f for result in results.values() for f in _unexcused_failures(result, inputs)]
    assert not failures, "\n".join(failures)
    skipped = {sid: r.skip_reason for sid, r in results.items() if r.status is ApiTestStatus.SKIP}
    assert not skipped, skipped
    assert len(results) == 8


def test_scan_api_validates_everything_the_server_stores(live_server: LiveServer, seeded: dict[str, tuple[str, str]]) -> None:  # noqa: F811
    """pyfhircheck's `scan_api`: reads /metadata, searches every resource type it declares, follows
    the paging links to the end and validates every resource found."""
    report = scan_api(live_server.fhir_base, config=pyfhircheck_config(), options=ApiScanOptions(max_pages=200, timeout_seconds=60))
    scan = report.api_scan
    assert scan is not None
    print(f"\npyfhircheck scan_api: {scan.resources_fetched} resources on {scan.pages_fetched} pages, types {scan.resource_types}")
    assert scan.complete, f"scan incomplete: {scan.stop_reason}"
    assert set(seeded) <= set(scan.resource_types)
    assert scan.resources_fetched >= len(seeded)
    assert all(r.status_code == 200 and r.error is None for r in scan.requests), [r for r in scan.requests if r.error]
    real = [
        f"{issue.resource_type}/{issue.resource_id} {issue.path}: {issue.message}"
        for issue in report.errors
        if known_false_positive("pyfhircheck", {}, issue.path or "", issue.message) is None
    ]
    assert not real, "\n".join(real)
