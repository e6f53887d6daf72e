"""Which stored types each reference search parameter can point to: what chained search resolves
`subject.name` through (query.py) and what the CapabilityStatement's searchInclude /
searchRevInclude are derived from (R4 CapabilityStatement.rest.resource.searchInclude,
searchRevInclude).

A parameter's `targets` in fhir_server.storage.params (e.g. `patient`: Patient) win where declared;
otherwise the allowed types come from the `fhir.resources` R4B model of the element the parameter
indexes (`enum_reference_types`, the Reference(...) targets of the R4 StructureDefinition; `Resource`
is Reference(Any)). Only the types this server stores are kept: an `_include` can only ever return a
stored resource, and `_revinclude=Source:param` only makes sense on a type `Source.param` can target.
"""

from __future__ import annotations

import typing
from functools import lru_cache

from fhir.resources.R4B import get_fhir_model_class

from .params import READ_ONLY_TYPES, SUPPORTED_TYPES, reference_params

# The audit log takes no part in includes, chains or revincludes: nothing references an
# AuditEvent, and `Patient?_revinclude=AuditEvent:patient` would hand the audit trail to every
# client allowed to read patients.
_LINKED_TYPES = tuple(t for t in SUPPORTED_TYPES if t not in READ_ONLY_TYPES)

# pydantic field names that differ from the FHIR element names (Task.for -> for_fhir)
_RENAMED = {"for": "for_fhir", "class": "class_fhir", "import": "import_fhir"}


def _element_class(annotation: typing.Any) -> type | None:
    """The model class of a backbone / complex element from its annotation (Optional[List[XType]])."""
    for arg in typing.get_args(annotation) or (annotation,):
        name = getattr(arg, "__name__", "")
        if name.endswith("Type") and name not in ("NoneType", "ReferenceType"):
            try:
                return get_fhir_model_class(name[: -len("Type")])
            except (KeyError, ValueError):
                return None
        found = _element_class(arg) if typing.get_args(arg) else None
        if found is not None:
            return found
    return None


def _path_targets(resource_type: str, path: str) -> set[str]:
    """The Reference(...) types of an element path such as `media.link` or `agent.who`."""
    cls: type | None = get_fhir_model_class(resource_type)
    parts = path.split(".")
    for i, part in enumerate(parts):
        if cls is None:
            return set()
        field = cls.model_fields.get(_RENAMED.get(part, part))
        if field is None:
            return set()
        if i == len(parts) - 1:
            return set((field.json_schema_extra or {}).get("enum_reference_types") or ())
        cls = _element_class(field.annotation)
    return set()


@lru_cache(maxsize=None)
def reference_targets(resource_type: str, param: str) -> tuple[str, ...]:
    """The stored types `resource_type`'s reference search parameter `param` can point to, in
    SUPPORTED_TYPES order (none from or to a read-only type such as AuditEvent)."""
    if resource_type in READ_ONLY_TYPES:
        return ()
    sp = reference_params(resource_type)[param]
    if sp.targets:
        allowed = set(sp.targets)
    else:
        allowed = set().union(*(_path_targets(resource_type, path) for path in sp.paths))
    if "Resource" in allowed:  # Reference(Any)
        return _LINKED_TYPES
    return tuple(t for t in _LINKED_TYPES if t in allowed)


def search_includes(resource_type: str) -> list[str]:
    """`_include` values for searching `resource_type`: its reference parameters that can point to a
    stored type, then `Type:*` (every reference parameter)."""
    names = [name for name in reference_params(resource_type) if reference_targets(resource_type, name)]
    return [f"{resource_type}:{name}" for name in names] + ([f"{resource_type}:*"] if names else [])


def search_rev_includes(resource_type: str) -> list[str]:
    """`_revinclude` values for searching `resource_type`: `Source:param` for every stored Source
    whose reference parameter `param` can point to `resource_type`."""
    return sorted(
        f"{source}:{name}"
        for source in SUPPORTED_TYPES
        for name in reference_params(source)
        if resource_type in reference_targets(source, name)
    )
