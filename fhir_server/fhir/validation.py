"""Incoming resources: structure via fhir.resources R4B, plus the required value sets that
fhir.resources does not enforce.

Structural problems (unknown elements, wrong JSON types, bad formats, missing required
elements) -> 400; a well-formed resource with a code outside a required value set -> 422.
Every issue carries the element path as `expression`.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError


from .exceptions import FhirError
from .jsontypes import json_type_issues

EVENT_STATUS = {"preparation", "in-progress", "not-done", "on-hold", "stopped", "completed", "entered-in-error", "unknown"}
PUBLICATION_STATUS = {"draft", "active", "retired", "unknown"}

# (resource type or "*", element path, allowed codes): required bindings in R4 we check ourselves.
REQUIRED_CODES: list[tuple[str, str, frozenset[str]]] = [
    (t, p, frozenset(c))
    for t, p, c in [
        ("DiagnosticReport", "status", {"registered", "partial", "preliminary", "final", "amended", "corrected", "appended", "cancelled", "entered-in-error", "unknown"}),
        ("Observation", "status", {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error", "unknown"}),
        ("Media", "status", EVENT_STATUS),
        ("ImagingStudy", "status", {"registered", "available", "cancelled", "entered-in-error", "unknown"}),
        ("Task", "status", {"draft", "requested", "received", "accepted", "rejected", "ready", "cancelled", "in-progress", "on-hold", "failed", "completed", "entered-in-error"}),
        ("Task", "intent", {"unknown", "proposal", "plan", "order", "original-order", "reflex-order", "filler-order", "instance-order", "option"}),
        ("Task", "priority", {"routine", "urgent", "asap", "stat"}),
        ("Endpoint", "status", {"active", "suspended", "error", "off", "entered-in-error", "test"}),
        ("Device", "status", {"active", "inactive", "entered-in-error", "unknown"}),
        ("Patient", "gender", {"male", "female", "other", "unknown"}),
        ("Patient", "contact.gender", {"male", "female", "other", "unknown"}),
        ("Patient", "link.type", {"replaced-by", "replaces", "refer", "seealso"}),
        ("Provenance", "entity.role", {"derivation", "revision", "quotation", "source", "removal"}),
        ("OperationDefinition", "status", PUBLICATION_STATUS),
        ("OperationDefinition", "kind", {"operation", "query"}),
        ("OperationDefinition", "parameter.use", {"in", "out"}),
        ("Bundle", "type", {"document", "message", "transaction", "transaction-response", "batch", "batch-response", "history", "searchset", "collection"}),
        ("Bundle", "entry.request.method", {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}),
        ("Bundle", "entry.search.mode", {"match", "include", "outcome"}),
        ("*", "text.status", {"generated", "extensions", "additional", "empty"}),
        ("*", "identifier.use", {"usual", "official", "temp", "secondary", "old"}),
        ("Patient", "name.use", {"usual", "official", "temp", "nickname", "anonymous", "old", "maiden"}),
    ]
]

# base64Binary elements fhir.resources decodes leniently (it silently drops invalid characters)
BASE64_PATHS: dict[str, tuple[str, ...]] = {
    "Binary": ("data",),
    "Media": ("content.data",),
    "DiagnosticReport": ("presentedForm.data",),
    "Observation": ("valueAttachment.data", "component.valueAttachment.data"),
}

# Data types R4B added (4.3.0) that R4 (4.0.1, what we speak) lacks: fhir.resources R4B accepts
# them as choice-type suffixes (extension.valueCodeableReference ...), R4 clients would reject them.
R4B_ONLY_TYPE_SUFFIXES = ("CodeableReference", "RatioRange")

# pydantic field names that differ from the FHIR element names
_FIELD_NAMES = {"resource_type": "resourceType", "class_fhir": "class", "import_fhir": "import"}


def element_path(resource_type: str, loc: tuple[Any, ...], prefix: str | None = None) -> str:
    """A pydantic error location -> FHIRPath-style element path, e.g. Patient.name[0].given."""
    path = prefix or resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str):
            if part.startswith("function-") or part in ("body",):
                continue  # pydantic validator names, not elements
            path += "." + _FIELD_NAMES.get(part, part)
    return path


def _outcome(issues: list[tuple[str, str, str]]) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": code, "diagnostics": text, "expression": [expr]} for code, text, expr in issues
        ],
    }


def _code_paths(resource_type: str) -> list[tuple[str, frozenset[str]]]:
    return [(path, codes) for rtype, path, codes in REQUIRED_CODES if rtype in (resource_type, "*")]


def _walk_indexed(node: Any, parts: list[str], path: str):
    """Like indexing.walk, but yields (FHIRPath with list indexes, value)."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            yield from _walk_indexed(item, parts, f"{path}[{i}]")
        return
    if not parts:
        yield path, node
        return
    if isinstance(node, dict) and parts[0] in node:
        yield from _walk_indexed(node[parts[0]], parts[1:], f"{path}.{parts[0]}")


def required_code_issues(resource: dict[str, Any], prefix: str | None = None) -> list[tuple[str, str, str]]:
    rtype = resource.get("resourceType", "")
    issues = []
    for path, codes in _code_paths(rtype):
        for where, value in _walk_indexed(resource, path.split("."), prefix or rtype):
            if value not in codes:
                issues.append(
                    ("code-invalid", f"{where}: {value!r} is not in the required value set ({' | '.join(sorted(codes))})", where)
                )
    return issues


def base64_issues(resource: dict[str, Any], prefix: str | None = None) -> list[tuple[str, str, str]]:
    rtype = resource.get("resourceType", "")
    issues = []
    for path in BASE64_PATHS.get(rtype, ()):
        for where, value in _walk_indexed(resource, path.split("."), prefix or rtype):
            compact = "".join(str(value).split())
            try:
                ok = len(compact) % 4 == 0 and base64.b64decode(compact, validate=True) is not None
            except (binascii.Error, ValueError):
                ok = False
            if not ok:
                issues.append(("value", f"{where}: not valid base64", where))
    return issues


# R4 datatypes.html#string: no code points below 32 but tab, CR and LF. PostgreSQL also cannot store
# U+0000 in text or jsonb: without this check such a body failed there as a 500, after validation.
_FORBIDDEN_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def control_character_issues(value: Any, path: str) -> list[tuple[str, str, str]]:
    issues: list[tuple[str, str, str]] = []
    if isinstance(value, str):
        found = _FORBIDDEN_CONTROL.search(value)
        if found:
            issues.append(("value", f"{path}: contains the control character U+{ord(found.group()):04X}, "
                                    "which FHIR strings may not contain (only tab, CR and LF are allowed)", path))
    elif isinstance(value, dict):
        for key, item in value.items():
            issues.extend(control_character_issues(item, f"{path}.{key}"))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            issues.extend(control_character_issues(item, f"{path}[{i}]"))
    return issues


def r4b_only_issues(value: Any, path: str) -> list[tuple[str, str, str]]:
    issues: list[tuple[str, str, str]] = []
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}"
            if key.startswith("value") and key.endswith(R4B_ONLY_TYPE_SUFFIXES):
                issues.append(("structure", f"{where}: not part of FHIR R4 (4.0.1); this server speaks R4", where))
            issues.extend(r4b_only_issues(item, where))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            issues.extend(r4b_only_issues(item, f"{path}[{i}]"))
    return issues


_JSON_KIND = {bool: "boolean", str: "string", dict: "object", list: "array", type(None): "null"}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return _JSON_KIND.get(type(value), type(value).__name__)


def as_sent(original: Any, normalised: Any, path: str) -> Any:
    """The validated resource with every primitive exactly as the client wrote it.

    pydantic's dump rewrites values (`+00:00` -> `Z`, `.120` -> `.120000`, `1.50` -> `1.5`,
    `-1e+245` -> an integer of 246 digits); R4 says a server keeps what it accepts. The dump
    gives the structure (which elements exist), the original gives each leaf. A leaf whose JSON
    type the dump had to coerce (`"1.5"` for a decimal, `"true"` for a boolean) is a 400: FHIR JSON
    types are part of the format, and pydantic's lax mode must not launder them."""
    if isinstance(normalised, dict):
        if not isinstance(original, dict):
            raise _type_error(path, original, normalised)
        # the client's element order; anything the dump adds (nothing, today) after it
        ordered = [k for k in original if k in normalised] + [k for k in normalised if k not in original]
        return {k: as_sent(original[k], normalised[k], f"{path}.{k}") if k in original else normalised[k] for k in ordered}
    if isinstance(normalised, list):
        if not isinstance(original, list) or len(original) != len(normalised):
            raise _type_error(path, original, normalised)
        return [as_sent(o, n, f"{path}[{i}]") for i, (o, n) in enumerate(zip(original, normalised))]
    if _kind(original) != _kind(normalised):
        raise _type_error(path, original, normalised)
    return original


def _type_error(path: str, original: Any, normalised: Any) -> FhirError:
    expected, got = _kind(normalised), _kind(original)
    text = f"{path}: expected a JSON {expected}, got a JSON {got}"
    return FhirError(400, text, outcome=_outcome([("structure", text, path)]))


def validate_resource(body: Any, *, expected_type: str | None = None, prefix: str | None = None) -> dict[str, Any]:
    """Validate one resource; returns it as sent (the structure pydantic validated, every
    primitive verbatim: see `as_sent`).

    `expected_type`: the type named by the URL (400 when the body's resourceType differs).
    `prefix`: where the resource sits, for error paths (e.g. "Bundle.entry[2].resource").
    """
    where = prefix or (expected_type or "resource")
    if not isinstance(body, dict):
        raise FhirError(400, f"{where}: a resource must be a JSON object", code="structure", expression=[where])
    rtype = body.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise FhirError(400, f"{where}: resourceType is missing", code="required", expression=[f"{where}.resourceType"])
    if expected_type is not None and rtype != expected_type:
        raise FhirError(
            400,
            f"resourceType {rtype!r} does not match the type in the URL ({expected_type})",
            code="invalid",
            expression=[f"{where}.resourceType"],
        )
    try:
        model_class = get_fhir_model_class(rtype)
    except ValueError:
        raise FhirError(400, f"{rtype!r} is not a FHIR resource type", code="invalid", expression=[f"{where}.resourceType"]) from None
    base = prefix or rtype
    issues = json_type_issues(body, base)
    if issues:
        raise FhirError(400, issues[0][1], outcome=_outcome(issues))
    try:
        model = model_class.model_validate(body)
    except (TypeError, AttributeError, KeyError, RecursionError) as exc:
        # a fhir.resources validator that assumed a shape the JSON-type check let through: still
        # the client's body at fault, never a 500
        text = f"{base}: the resource could not be validated ({type(exc).__name__}: {str(exc)[:200]})"
        raise FhirError(400, text, outcome=_outcome([("structure", text, base)])) from None
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            path = element_path(rtype, tuple(err.get("loc", ())), base)
            message = str(err.get("msg", "invalid")).split("\n")[0]
            code = "structure" if err.get("type") == "extra_forbidden" else ("required" if err.get("type") == "missing" else "value")
            if err.get("type") == "extra_forbidden":
                message = "unknown element (not part of FHIR R4 " + rtype + ")"
            issues.append((code, f"{path}: {message}", path))
        raise FhirError(400, issues[0][1], outcome=_outcome(issues)) from None
    data = model.model_dump(mode="json")
    issues = r4b_only_issues(body, base) + control_character_issues(body, base) + base64_issues(body, base)
    if issues:
        raise FhirError(400, issues[0][1], outcome=_outcome(issues))
    issues = required_code_issues(data, base)
    if issues:
        raise FhirError(422, issues[0][1], outcome=_outcome(issues))
    return as_sent(body, data, base)
