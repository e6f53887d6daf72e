"""Shape limits on a request body, checked on the parsed JSON before anything is built from it
(no pydantic model ever sees a structure past these limits): nesting depth, number of JSON
values, string length and Bundle entries. Each refusal names the limit and its setting.

Depth: the stdlib parser itself stops at the interpreter's recursion limit (RecursionError, which
`parse_limited` turns into the same refusal); the walk here is iterative, so no input can make
the check itself recurse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhir_server import fhirjson

from .exceptions import FhirError

# base64Binary elements (Attachment.data, Binary.data) are bounded by the body size, not by the
# string limit, which is FHIR's own 1 MB bound for `string` (datatypes.html#string)
_BINARY_KEYS = frozenset({"data"})


@dataclass(frozen=True)
class ShapeLimits:
    max_depth: int = 64
    max_elements: int = 200_000
    max_string_length: int = 1_048_576
    max_bundle_entries: int = 1_000


def limits_from(settings: Any) -> ShapeLimits:
    """The configured limits (CXR_JSON_MAX_DEPTH ...), defaults for a settings object without them."""
    defaults = ShapeLimits()
    return ShapeLimits(
        max_depth=getattr(settings, "json_max_depth", defaults.max_depth),
        max_elements=getattr(settings, "json_max_elements", defaults.max_elements),
        max_string_length=getattr(settings, "json_max_string_length", defaults.max_string_length),
        max_bundle_entries=getattr(settings, "bundle_max_entries", defaults.max_bundle_entries),
    )


def _too_deep(limits: ShapeLimits) -> FhirError:
    return FhirError(400, f"the JSON body is nested deeper than {limits.max_depth} levels (limit CXR_JSON_MAX_DEPTH)", code="structure")


def check_shape(value: Any, limits: ShapeLimits) -> None:
    """Raise FhirError (400 depth, 413 the size limits) when `value` exceeds `limits`."""
    elements = 0
    stack: list[tuple[Any, int, str | None]] = [(value, 1, None)]
    while stack:
        node, depth, key = stack.pop()
        elements += 1
        if elements > limits.max_elements:
            raise FhirError(413, f"the JSON body has more than {limits.max_elements} values (limit CXR_JSON_MAX_ELEMENTS)", code="too-costly")
        if isinstance(node, dict):
            if depth > limits.max_depth:
                raise _too_deep(limits)
            entries = node.get("entry")
            if node.get("resourceType") == "Bundle" and isinstance(entries, list) and len(entries) > limits.max_bundle_entries:
                raise FhirError(413, f"the Bundle has {len(entries)} entries; at most {limits.max_bundle_entries} are accepted "
                                     "(limit CXR_BUNDLE_MAX_ENTRIES)", code="too-costly", expression=["Bundle.entry"])
            stack.extend((item, depth + 1, k) for k, item in node.items())
        elif isinstance(node, list):
            if depth > limits.max_depth:
                raise _too_deep(limits)
            stack.extend((item, depth + 1, key) for item in node)
        elif isinstance(node, str) and len(node) > limits.max_string_length and key not in _BINARY_KEYS:
            raise FhirError(413, f"a string of {len(node)} characters exceeds the limit of {limits.max_string_length} "
                                 "(CXR_JSON_MAX_STRING_LENGTH)", code="too-costly")


def parse_limited(raw: bytes, limits: ShapeLimits) -> Any:
    """fhirjson.loads + check_shape. JSON errors propagate (the caller words them)."""
    try:
        value = fhirjson.loads(raw)
    except RecursionError:
        raise _too_deep(limits) from None
    check_shape(value, limits)
    return value
