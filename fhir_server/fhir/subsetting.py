"""`_summary` and `_elements` (R4 search.html#summary, #elements): the reduced views of a resource a
client may ask for on read, vread, search and history.

Only responses are reduced. `subset_resource` never touches its input, so the store (and any
copy of a stored resource held in memory) stays whole. A reduced resource carries the SUBSETTED tag,
so that nobody mistakes it for the full resource and, say, PUTs it back, erasing what it never saw.

Which elements are summary or mandatory comes from the `fhir.resources` R4B models (the same
flags as the official R4 StructureDefinitions for the types this server stores), not a table of
our own. Only top-level elements are chosen and kept whole: R4 puts every property of a data type
in the summary form except Attachment.data (ElementDefinition.isSummary), which is left out on its
own. Children of backbone elements (Observation.component, ImagingStudy.series) have summary
flags of their own in R4 that are not applied here: such elements come back whole.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fhir.resources.R4B import fhirtypes, get_fhir_model_class

from .exceptions import FhirError

SUMMARY_VALUES = ("true", "text", "data", "count", "false")
# the modes that drop elements; "count" drops whole resources (search) and "false" nothing
_REDUCING = ("true", "text", "data")

SUBSETTED_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
SUBSETTED_TAG: dict[str, str] = {"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}

# id and meta are always returned (spec). The root modifiers go with them: a view without a
# modifierExtension or implicitRules could read as the opposite of what the resource says.
_ALWAYS = frozenset({"resourceType", "id", "meta", "implicitRules", "modifierExtension"})


@dataclass(frozen=True)
class Subset:
    """The validated `_summary` / `_elements` of one request; `Subset()` asks for nothing."""

    summary: str | None = None
    elements: tuple[str, ...] | None = None

    def apply(self, resource: Mapping[str, Any], *, elements: bool = True) -> dict[str, Any]:
        """`elements=False` for `_include`d search entries, which `_elements` does not cover."""
        return subset_resource(resource, summary=self.summary, elements=self.elements if elements else None)


def check_subset(summary: str | None, elements: Iterable[str] | None, *, allow_count: bool) -> Subset:
    """Validate the two parameters (FhirError 400 otherwise). `count` only makes sense where a
    Bundle can answer with just its total: search and history, not read."""
    names = tuple(elements) if elements is not None else None
    if summary == "count" and not allow_count:
        raise FhirError(400, "_summary=count is for search and history only", code="invalid", expression=["_summary"])
    if summary is not None and summary not in SUMMARY_VALUES:
        raise FhirError(400, f"_summary must be one of {', '.join(SUMMARY_VALUES)}; not {summary!r}", code="invalid", expression=["_summary"])
    # Two different reductions at once have no defined meaning; refuse rather than guess which
    # one the client wanted. `false` and `count` reduce no element, so they combine harmlessly.
    if names and summary in _REDUCING:
        raise FhirError(400, f"_elements cannot be combined with _summary={summary}; send one of them", code="invalid", expression=["_summary", "_elements"])
    return Subset(summary, names or None)


def split_elements(raw: str) -> list[str]:
    return [name.strip() for name in raw.split(",") if name.strip()]


def subset_from_params(items: Iterable[tuple[str, str]], *, allow_count: bool = False) -> Subset:
    """The Subset of query (or form) parameters; the last `_summary` wins, `_elements` add up."""
    summary: str | None = None
    elements: list[str] | None = None
    for name, value in items:
        if name == "_summary":
            summary = value
        elif name == "_elements":
            elements = (elements or []) + split_elements(value)
    return check_subset(summary, elements, allow_count=allow_count)


@dataclass(frozen=True)
class _Definition:
    names: frozenset[str]  # every top-level element, choice types by their JSON names
    summary: frozenset[str]
    mandatory: frozenset[str]  # min >= 1; every JSON name of a required choice
    choices: Mapping[str, frozenset[str]]  # "value" -> {"valueQuantity", ...}
    attachments: frozenset[str]


def _is_attachment(annotation: Any) -> bool:
    if annotation is fhirtypes.AttachmentType:
        return True
    return any(_is_attachment(arg) for arg in typing.get_args(annotation))


@lru_cache(maxsize=None)
def _definition(resource_type: str) -> _Definition | None:
    try:
        model = get_fhir_model_class(resource_type)
    except ValueError:
        return None
    names: set[str] = set()
    summary: set[str] = set()
    mandatory: set[str] = set()
    choices: dict[str, set[str]] = {}
    attachments: set[str] = set()
    for field in model.model_fields.values():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        name = field.alias or ""
        if not extra.get("element_property") or name.startswith("_"):
            continue  # fhir_comments and the `_x` siblings of primitives, which follow `x`
        names.add(name)
        if extra.get("summary_element_property"):
            summary.add(name)
        if field.is_required() or extra.get("element_required") or extra.get("one_of_many_required"):
            mandatory.add(name)
        choice = extra.get("one_of_many")
        if isinstance(choice, str):
            choices.setdefault(choice, set()).add(name)
        if _is_attachment(field.annotation):
            attachments.add(name)
    return _Definition(
        frozenset(names),
        frozenset(summary),
        frozenset(mandatory),
        {k: frozenset(v) for k, v in choices.items()},
        frozenset(attachments),
    )


def _requested(definition: _Definition, elements: Iterable[str]) -> set[str]:
    """`_elements` names -> JSON names; a choice may be asked for as `value`, `value[x]` or
    `valueQuantity`. Anything else (unknown, dotted paths) is ignored, as the spec allows."""
    out: set[str] = set()
    for name in elements:
        base = name.removesuffix("[x]")
        if base in definition.choices:
            out |= definition.choices[base]
        elif base in definition.names:
            out.add(base)
    return out


def _without_data(value: Any) -> tuple[Any, bool]:
    """An Attachment (or list of them) without `data`; True if anything was removed."""
    if isinstance(value, list):
        pairs = [_without_data(v) for v in value]
        return [v for v, _ in pairs], any(changed for _, changed in pairs)
    if isinstance(value, dict) and ("data" in value or "_data" in value):
        return {k: v for k, v in value.items() if k not in ("data", "_data")}, True
    return value, False


def _tagged(resource: dict[str, Any]) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    tags = list(meta.get("tag") or [])
    if not any(t.get("system") == SUBSETTED_SYSTEM and t.get("code") == "SUBSETTED" for t in tags):
        tags.append(dict(SUBSETTED_TAG))
    meta["tag"] = tags
    return {**resource, "meta": meta}


def subset_resource(
    resource: Mapping[str, Any],
    *,
    summary: str | None = None,
    elements: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The view of `resource` that `_summary` / `_elements` ask for: a new dict (the input is
    never changed), tagged SUBSETTED when something was left out. Call `check_subset` first;
    this function does not reject combinations."""
    out = dict(resource)
    definition = _definition(str(resource.get("resourceType")))
    if definition is None or (summary not in _REDUCING and elements is None):
        return out
    keep: set[str] | frozenset[str] | None
    if summary == "data":
        keep = None  # everything but text
    elif summary == "true":
        keep = definition.summary | definition.mandatory | _ALWAYS
    elif summary == "text":
        keep = definition.mandatory | _ALWAYS | {"text"}
    else:
        keep = _requested(definition, elements or ()) | definition.mandatory | _ALWAYS
    reduced = False
    for key in list(out):
        base = key[1:] if key.startswith("_") else key
        dropped = base == "text" if keep is None else base not in keep
        if dropped:
            del out[key]
            reduced = True
    # The one exception to "nested data types are kept whole" (ElementDefinition.isSummary):
    # Attachment.data, the base64 image of a Media, is what a summary exists to leave out. `text`
    # asks for less than `true`, so it must not carry the bytes that `true` leaves out either.
    if summary in ("true", "text"):
        for key in definition.attachments & out.keys():
            out[key], changed = _without_data(out[key])
            reduced |= changed
    return _tagged(out) if reduced else out


__all__ = [
    "SUBSETTED_TAG",
    "SUMMARY_VALUES",
    "Subset",
    "check_subset",
    "split_elements",
    "subset_from_params",
    "subset_resource",
]
