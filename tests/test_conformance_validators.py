"""Self-tests of the conformance validators: they accept the official R4 examples and real resources
built with fhir.resources, and they reject deliberately broken resources. A validator that accepted
everything would make the server conformance tests meaningless; these tests fail if that happens."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from conformance_checks import (
    CONFORMANCE_DIR,
    NODE_VALIDATORS,
    PYTHON_CHECKS,
    Report,
    VALIDATE_MJS,
    fhirclient_errors,
    fhirkit_errors,
    known_false_positive,
    node_unavailable_reason,
    pyfhircheck_errors,
    run_node_validators,
    validate_resources,
)

EXAMPLES_DIR = CONFORMANCE_DIR / "node_modules" / "hl7.fhir.r4.examples"
# The resource types this server reads or returns.
SERVER_TYPES = (
    "Binary", "CapabilityStatement", "Device", "DiagnosticReport", "Endpoint", "ImagingStudy", "Media",
    "Observation", "OperationDefinition", "OperationOutcome", "Parameters", "Patient", "Provenance", "Task",
)
# Official examples that are themselves wrong, as the validators say (checked by hand):
FLAWED_EXAMPLES = {
    # base64 with embedded spaces (copied from the XML rendering): not valid base64Binary in JSON
    ("Binary/example", "medplum"): "Binary.data",
    ("Media/example", "medplum"): "Media.content.data",
    ("DiagnosticReport/gingival-mass", "medplum"): "DiagnosticReport.presentedForm[0].data",
    # a display string with characters outside the string pattern (control character)
    ("DiagnosticReport/gingival-mass", "json-schema"): ".resultsInterpreter[0].display",
    # Observation.performer may not reference an Encounter in R4
    ("Observation/clinical-gender", "fhir.js"): "Observation.performer[0]",
}

needs_node = pytest.mark.skipif(node_unavailable_reason() is not None, reason=str(node_unavailable_reason()))

PNG_1x1 = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
        "3a7e9b550000000a49444154789c6360000000020001e221bc330000000049454e44ae426082"
    )
).decode()

# name -> (resource, validators that must reject it). Each case is caught by at least two
# independent tools; the sets list what each tool is relied on to catch (measured, pinned versions).
BROKEN = {
    "bad status code": (
        {"resourceType": "Observation", "status": "bogus", "code": {"text": "x"}},
        {"fhir.js", "json-schema", "pyfhircheck"},
    ),
    "bad status code inside a Bundle entry": (
        {"resourceType": "Bundle", "type": "searchset",
         "entry": [{"resource": {"resourceType": "DiagnosticReport", "status": "done", "code": {"text": "x"}}}]},
        {"fhir.js", "json-schema", "pyfhircheck"},
    ),
    "bad Bundle.type": ({"resourceType": "Bundle", "type": "search"}, {"fhir.js", "json-schema", "pyfhircheck"}),
    "missing required element": (
        {"resourceType": "Observation", "code": {"text": "x"}},
        {"medplum", "fhir.js", "fhirclient", "fhirkit", "pyfhircheck"},
    ),
    "missing required Media.content": (
        {"resourceType": "Media", "status": "completed"},
        {"medplum", "fhir.js", "json-schema", "fhirclient", "fhirkit"},
    ),
    "OperationOutcome without issue": (
        {"resourceType": "OperationOutcome"},
        {"medplum", "fhir.js", "json-schema", "fhirclient", "fhirkit"},
    ),
    "wrong JSON type (string for decimal)": (
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": "0.5"}},
        {"medplum", "fhir.js", "json-schema", "fhirclient", "fhirkit"},
    ),
    "object where an array is required": (
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "category": {"text": "y"}},
        {"medplum", "fhir.js", "json-schema", "fhirclient", "fhirkit"},
    ),
    "unknown element": (
        {"resourceType": "Patient", "foo": 1},
        {"medplum", "fhir.js", "json-schema", "fhirclient", "fhirkit", "pyfhircheck"},
    ),
    "impossible date": ({"resourceType": "Patient", "birthDate": "1974-13-45"}, {"medplum", "json-schema", "fhirclient", "fhirkit"}),
    "empty string": ({"resourceType": "Patient", "gender": ""}, {"fhir.js", "json-schema", "fhirkit", "pyfhircheck"}),
    "invalid id": ({"resourceType": "Patient", "id": "bad id!"}, {"json-schema", "pyfhircheck"}),
    "two value[x] choices": (
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueString": "a", "valueBoolean": True},
        {"fhirkit", "pyfhircheck"},
    ),
    "invariant obs-6 (dataAbsentReason with a value)": (
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueString": "a",
         "dataAbsentReason": {"text": "y"}},
        {"medplum"},
    ),
    "reference to a disallowed target type": (
        {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "performer": [{"reference": "Encounter/1"}]},
        {"fhir.js", "pyfhircheck"},
    ),
    "invalid base64": (
        {"resourceType": "Binary", "contentType": "image/png", "data": "not base64!!"},
        {"medplum", "fhirkit", "pyfhircheck"},
    ),
}


_OBS = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
_AI_CONFIDENCE = "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AIconfidence"
# One valid resource per entry of KNOWN_FALSE_POSITIVES: the validator must still report exactly
# that false positive (else the excuse is stale and must go), and the other validators accept it.
FALSE_POSITIVE_CASES = {
    "json-schema": [{"resourceType": "CapabilityStatement", "status": "active", "date": "2026-11-25", "kind": "instance",
                     "fhirVersion": "4.0.1", "format": ["json"], "implementation": {"description": "x"},
                     "rest": [{"mode": "server"}]}],
    "pyfhircheck": [
        {"resourceType": "Task", "status": "completed", "intent": "order"},
        {**_OBS, "status": "cancelled"},
        {"resourceType": "DiagnosticReport", "status": "amended", "code": {"text": "x"}},
        {"resourceType": "CapabilityStatement", "status": "active", "date": "2026-11-25", "kind": "instance",
         "fhirVersion": "4.0.1", "format": ["json", "application/fhir+json"], "implementation": {"description": "x"},
         "rest": [{"mode": "server"}]},
        {"resourceType": "Binary", "contentType": "image/png", "data": PNG_1x1},
        {**_OBS, "referenceRange": [{"text": "probability >= 0.5 is positive"}]},
        {**_OBS, "extension": [{"url": _AI_CONFIDENCE, "valueDecimal": 0.9}]},
    ],
}


def _official_examples() -> list[dict]:
    files = sorted(p for p in EXAMPLES_DIR.glob("*.json") if p.name.split("-", 1)[0] in SERVER_TYPES)
    return [json.loads(p.read_text(encoding="utf-8")) for p in files]


@pytest.fixture(scope="module")
def node_results() -> dict[str, list[dict]]:
    """All Node validation of this module in ONE node process (start-up costs ~2 s)."""
    reason = node_unavailable_reason()
    if reason:
        pytest.skip(reason)
    groups = {
        "examples": _official_examples() if EXAMPLES_DIR.is_dir() else [],
        "broken": [resource for resource, _ in BROKEN.values()],
        "realistic": _r4b_resources(),
        "false-positives": FALSE_POSITIVE_CASES["json-schema"] + FALSE_POSITIVE_CASES["pyfhircheck"],
    }
    everything = [r for group in groups.values() for r in group]
    lines = run_node_validators(everything)
    out, start = {}, 0
    for name, group in groups.items():
        out[name] = lines[start : start + len(group)]
        start += len(group)
    return out


def _node_report(resources: list[dict], lines: list[dict]) -> Report:
    report = Report(resources=len(resources))
    for resource, line in zip(resources, lines, strict=True):
        for result in line["results"]:
            errors = [(m["location"], m["message"]) for m in result["messages"] if m["severity"] in ("error", "fatal")]
            report.add(result["validator"], resource, errors)
    return report


@needs_node
def test_official_r4_examples_pass_except_known_flaws(node_results: dict[str, list[dict]]) -> None:
    if not EXAMPLES_DIR.is_dir():
        pytest.skip("hl7.fhir.r4.examples is not installed in conformance/node_modules")
    examples = _official_examples()
    assert len(examples) >= 150, f"only {len(examples)} official examples of the server's types found"
    report = _node_report(examples, node_results["examples"])
    python = validate_resources(examples, node=False, python=("fhirclient", "fhirkit"))
    report.problems += python.problems
    report.checked.update(python.checked)
    report.passed.update(python.passed)
    print(report.summary())
    found = {(f"{p.resource_type}/{p.resource_id}", p.validator): p.location for p in report.problems}
    assert found == FLAWED_EXAMPLES, report.summary()
    # The JSON-schema fhirVersion false positive is real and the only thing excused.
    assert {(p.validator, p.resource_type) for p, _ in report.excused} == {("json-schema", "CapabilityStatement")}


@needs_node
@pytest.mark.parametrize("name", list(BROKEN))
def test_node_validators_reject_broken_resource(name: str, node_results: dict[str, list[dict]]) -> None:
    resource, must_reject = BROKEN[name]
    line = node_results["broken"][list(BROKEN).index(name)]
    assert line["resourceType"] == resource["resourceType"]
    rejected = {r["validator"] for r in line["results"] if not r["valid"]}
    expected = must_reject & set(NODE_VALIDATORS)
    assert expected <= rejected, f"{name}: {sorted(expected - rejected)} accepted {resource}"
    for result in line["results"]:
        if not result["valid"]:
            assert any(m["severity"] in ("error", "fatal") for m in result["messages"]), result


@pytest.mark.parametrize("name", list(BROKEN))
def test_python_validators_reject_broken_resource(name: str) -> None:
    resource, must_reject = BROKEN[name]
    for validator in must_reject & set(PYTHON_CHECKS):
        errors = PYTHON_CHECKS[validator](resource)
        assert errors, f"{validator} accepted {name}: {resource}"


def test_every_broken_case_is_caught_by_two_independent_tools() -> None:
    for name, (_, must_reject) in BROKEN.items():
        if name.startswith("invariant"):
            continue  # FHIRPath invariants: only medplum evaluates them
        assert len(must_reject) >= 2, name


def _r4b_resources() -> list[dict]:
    """Realistic resources of the shapes this server produces, built with fhir.resources (R4B = R4 here)."""
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport
    from fhir.resources.R4B.media import Media
    from fhir.resources.R4B.observation import Observation
    from fhir.resources.R4B.patient import Patient
    from fhir.resources.R4B.task import Task

    patient = Patient(id="p1", name=[{"family": "Test", "given": ["Chest"]}], gender="female", birthDate="1970-01-01")
    media = Media(
        id="m1", status="completed", subject={"reference": "Patient/p1"},
        modality={"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "DX"}]},
        view={"coding": [{"system": "http://snomed.info/sct", "code": "399348003", "display": "AP"}]},
        content={"contentType": "image/png", "data": PNG_1x1},
    )
    observation = Observation(
        id="o1", status="preliminary",
        category=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}],
        code={"coding": [{"system": "http://snomed.info/sct", "code": "233604007", "display": "Pneumonia"}]},
        subject={"reference": "Patient/p1"}, valueQuantity={"value": 0.42, "unit": "probability",
        "system": "http://unitsofmeasure.org", "code": "1"}, derivedFrom=[{"reference": "Media/m1"}],
        interpretation=[{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": "NEG"}]}],
    )
    report = DiagnosticReport(
        id="r1", status="preliminary",
        code={"coding": [{"system": "http://loinc.org", "code": "36554-4"}]},
        subject={"reference": "Patient/p1"}, result=[{"reference": "Observation/o1"}], conclusion="No finding",
    )
    task = Task(id="t1", status="requested", intent="order")
    return [json.loads(r.model_dump_json()) for r in (patient, media, observation, report, task)]


def test_python_validators_accept_realistic_resources() -> None:
    report = validate_resources(_r4b_resources(), node=False)
    print(report.summary())
    assert not report.problems, report.summary()
    assert report.passed["fhirclient"] == report.passed["fhirkit"] == 5


@needs_node
def test_node_validators_accept_realistic_resources(node_results: dict[str, list[dict]]) -> None:
    report = _node_report(_r4b_resources(), node_results["realistic"])
    assert not report.problems, report.summary()
    assert all(report.passed[v] == 5 for v in NODE_VALIDATORS), report.summary()


def _excused_and_real(validator: str, resource: dict, errors: list[tuple[str, str]]) -> tuple[int, list]:
    excused = [e for e in errors if known_false_positive(validator, resource, *e) is not None]
    return len(excused), [e for e in errors if e not in excused]


def test_pyfhircheck_false_positives_are_real_and_exactly_matched() -> None:
    for resource in FALSE_POSITIVE_CASES["pyfhircheck"]:
        excused, real = _excused_and_real("pyfhircheck", resource, pyfhircheck_errors(resource))
        assert excused == 1 and not real, f"{resource}: excused {excused}, unexcused {real}"
        assert not fhirclient_errors(resource) and not fhirkit_errors(resource), resource
    # the excuses are narrow: a genuinely bad code or an unknown extension is still an error
    for bad in ({"resourceType": "Task", "status": "finished", "intent": "order"},
                {**_OBS, "extension": [{"url": "http://example.org/unknown", "valueDecimal": 0.9}]}):
        excused, real = _excused_and_real("pyfhircheck", bad, pyfhircheck_errors(bad))
        assert real and not excused, bad


@needs_node
def test_node_false_positives_are_real_and_exactly_matched(node_results: dict[str, list[dict]]) -> None:
    cases = FALSE_POSITIVE_CASES["json-schema"] + FALSE_POSITIVE_CASES["pyfhircheck"]
    for resource, line in zip(cases, node_results["false-positives"], strict=True):
        for result in line["results"]:
            errors = [(m["location"], m["message"]) for m in result["messages"] if m["severity"] == "error"]
            excused, real = _excused_and_real(result["validator"], resource, errors)
            assert not real, f"{result['validator']} on {resource}: {real}"
            expected = 1 if (result["validator"] == "json-schema" and resource["resourceType"] == "CapabilityStatement") else 0
            assert excused == expected, f"{result['validator']} on {resource}: {excused} excused"
    # the fhirVersion excuse applies to 4.0.1 only
    bogus = {**FALSE_POSITIVE_CASES["json-schema"][0], "fhirVersion": "9.9.9"}
    assert known_false_positive("json-schema", bogus, ".fhirVersion",
                                'should be equal to one of the allowed values {"allowedValues":["0.01","4.0.0"]}') is None


@needs_node
def test_validate_mjs_command_line_contract(tmp_path: Path) -> None:
    good, bad = _r4b_resources()[0], BROKEN["unknown element"][0]
    ok = subprocess.run(["node", str(VALIDATE_MJS), "--validators", "fhir.js"], input=json.dumps([good]), capture_output=True, text=True,
                        cwd=CONFORMANCE_DIR, timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(x) for x in ok.stdout.splitlines()]
    assert lines[-1]["summary"] == {"resources": 1, "invalid": 0, "byValidator": {"fhir.js": {"valid": 1, "invalid": 0}}}
    path = tmp_path / "in.json"
    path.write_text(json.dumps(bad))  # a single resource (not an array) is accepted too
    failed = subprocess.run(["node", str(VALIDATE_MJS), str(path), "--validators", "fhir.js"], capture_output=True,
                            text=True, cwd=CONFORMANCE_DIR, timeout=120, check=False)
    assert failed.returncode == 1
    assert json.loads(failed.stdout.splitlines()[0])["results"][0]["messages"][0]["location"] == "Patient.foo"
    garbage = subprocess.run(["node", str(VALIDATE_MJS)], input='[{"no": "resourceType"}]', capture_output=True,
                             text=True, cwd=CONFORMANCE_DIR, timeout=120, check=False)
    assert garbage.returncode == 2 and "not a FHIR resource" in garbage.stderr
