"""FHIR JSON types of every element, checked against the fhir.resources model BEFORE pydantic
sees the body (R4 json.html: primitives are JSON strings, numbers or booleans by type; repeating
elements are arrays, never bare values; null only inside a primitive array paired with its
`_element` extensions).

Why not leave it to pydantic: in lax mode it coerces `"1.5"` into a decimal and a bare object
into a one-item list, and some fhir.resources validators assume the JSON type and crash on
another one (Endpoint.address = 0 raised AttributeError: a 500). One walk over the body, with
the model's field table per class cached, turns all of these into 400s naming the element."""

from __future__ import annotations

import types
import typing
from functools import lru_cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class

_INTEGER_MARKERS = {"Integer", "UnsignedInt", "PositiveInt", "Integer64"}
MAX_ISSUES = 20

# kind: "boolean" | "integer" | "number" | "string" | "object" | "resource" | "extension"
Spec = tuple[bool, str, Any]  # (repeats, kind, model class for objects)


def _model(name: str) -> Any:
    try:
        return get_fhir_model_class(name)
    except (KeyError, ValueError):
        return None


def _describe(annotation: Any) -> Spec | None:
    repeats = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if not args:
                return None
            annotation = args[0]
        elif origin is list:
            repeats, annotation = True, typing.get_args(annotation)[0]
        elif origin is typing.Annotated:
            base, *meta = typing.get_args(annotation)
            marker = type(meta[0]).__name__ if meta else ""
            if marker == "Boolean" or base is bool:
                return repeats, "boolean", None
            if marker in _INTEGER_MARKERS or base is int:
                return repeats, "integer", None
            if marker == "Decimal":
                return repeats, "number", None
            return repeats, "string", None
        else:
            break
    if annotation is bool:
        return repeats, "boolean", None
    if annotation is int:
        return repeats, "integer", None
    if annotation in (float,):
        return repeats, "number", None
    if annotation is str:
        return repeats, "string", None
    name = getattr(annotation, "__name__", "")
    if name == "ResourceType":
        return repeats, "resource", None
    if name == "FHIRPrimitiveExtensionType":
        return repeats, "extension", None
    if name.endswith("Type"):
        model = _model(name[: -len("Type")])
        if model is not None:
            return repeats, "object", model
    return None


@lru_cache(maxsize=None)
def _fields(model: Any) -> dict[str, Spec]:
    """JSON name -> Spec of every element of `model` (aliases: `_birthDate`, `for`, `class`)."""
    out: dict[str, Spec] = {}
    for name, field in model.model_fields.items():
        spec = _describe(field.annotation)
        if spec is not None:
            out[field.alias or name] = spec
    return out


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


_ACCEPTS = {
    "boolean": {"boolean"},
    "integer": {"integer"},
    "number": {"integer", "number"},
    "string": {"string"},
    "object": {"object"},
    "resource": {"object"},
    "extension": {"object"},
}
_WORDS = {"integer": "an integer", "object": "an object", "resource": "a resource object", "extension": "an object",
          "array": "an array", "null": "null"}


def _word(kind: str) -> str:
    return _WORDS.get(kind, f"a {kind}")


def json_type_issues(resource: dict[str, Any], path: str) -> list[tuple[str, str, str]]:
    """(code, text, expression) for every element whose JSON type is wrong; at most MAX_ISSUES."""
    issues: list[tuple[str, str, str]] = []
    model = _model(resource.get("resourceType", "")) if isinstance(resource.get("resourceType"), str) else None
    if model is None:
        return issues
    stack: list[tuple[dict[str, Any], Any, str]] = [(resource, model, path)]
    while stack and len(issues) < MAX_ISSUES:
        node, model, where = stack.pop()
        fields = _fields(model)
        for key, value in node.items():
            spec = fields.get(key)
            if spec is None or key == "resourceType":
                continue  # unknown elements: pydantic names them (extra_forbidden)
            repeats, kind, child = spec
            at = f"{where}.{key}"
            if value is None:
                issues.append(("structure", f"{at}: null is not allowed in FHIR JSON; leave the element out", at))
                continue
            if repeats:
                if not isinstance(value, list):
                    issues.append(("structure", f"{at}: a repeating element must be a JSON array, not {_word(_kind_of(value))}", at))
                    continue
                if not value:
                    issues.append(("structure", f"{at}: an array may not be empty in FHIR JSON; leave the element out", at))
                    continue
                items = [(v, f"{at}[{i}]") for i, v in enumerate(value)]
            else:
                items = [(value, at)]
            for item, item_at in items:
                got = _kind_of(item)
                if got == "null" and repeats and kind in ("boolean", "integer", "number", "string", "extension"):
                    continue  # a primitive array's gap, filled by its `_element` extension (json.html#primitive)
                if got not in _ACCEPTS[kind]:
                    issues.append(("structure", f"{item_at}: expected {_word(kind)}, got {_word(got)}", item_at))
                elif kind == "object":
                    stack.append((item, child, item_at))
                elif kind == "resource":
                    inner = _model(item.get("resourceType")) if isinstance(item.get("resourceType"), str) else None
                    if inner is not None:
                        stack.append((item, inner, item_at))
    return issues[:MAX_ISSUES]
