"""Search request (name/value pairs) -> a validated SearchQuery.

Unknown parameters are collected in `SearchQuery.ignored` (lenient handling) or raise
InvalidSearch (strict). Bad values, unknown modifiers and bad prefixes are always 400: guessing
what a malformed criterion meant would silently return wrong results.

Chained parameters (R4 search.html#chaining), one level deep: `subject.name=x` or
`subject:Patient.identifier=sys|v` become a ChainedCriterion. Without `:Type` every stored type the
reference parameter can point to and that defines the chained parameter is searched (ORed); the
chained value is parsed exactly like a direct search on that type. An unknown chained parameter and
a deeper chain (`a.b.c`) are handled like unknown parameters (strict 400, lenient ignored).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import InvalidSearch, UnsupportedResourceType
from .params import READ_ONLY_TYPES, SUPPORTED_TYPES, SearchParam, reference_params, search_params
from .reference_targets import reference_targets
from .timeutil import DateParseError, parse_range

DEFAULT_COUNT = 20
MAX_COUNT = 100

DATE_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")
_PREFIX_RE = re.compile(r"^(eq|ne|lt|gt|le|ge|sa|eb|ap)(?=[0-9\-+.])")

# Parameters that shape the response rather than select resources; handled by the REST layer or here.
RESULT_PARAMS = {"_count", "_offset", "_sort", "_summary", "_include", "_revinclude", "_total", "_format", "_pretty", "_elements"}

_MODIFIERS = {
    "token": {"not", "missing"},
    "reference": {"missing"},
    "string": {"exact", "contains", "missing"},
    "date": {"missing"},
    "uri": {"below", "missing"},
    "number": {"missing"},
}


@dataclass(frozen=True)
class Criterion:
    """One search parameter occurrence: its values are ORed; several criteria are ANDed."""

    param: SearchParam
    modifier: str | None
    values: tuple[str, ...]


@dataclass(frozen=True)
class ChainedCriterion:
    """`ref.chained=value`: resources whose reference parameter `param` points to a current
    resource of one of the `targets` types matching that type's criterion (targets are ORed)."""

    param: SearchParam  # the reference parameter of the searched type
    targets: tuple[tuple[str, Criterion], ...]  # (target type, criterion on that type)


@dataclass(frozen=True)
class Include:
    source_type: str
    param: str  # a reference parameter name of source_type, or "*"
    target_type: str | None = None

    def text(self) -> str:
        return ":".join(x for x in (self.source_type, self.param, self.target_type) if x)


@dataclass
class SearchQuery:
    resource_type: str
    criteria: list[Criterion | ChainedCriterion] = field(default_factory=list)
    sort: list[tuple[SearchParam, bool]] = field(default_factory=list)  # (param, descending)
    count: int = DEFAULT_COUNT
    offset: int = 0
    summary: str | None = None  # "count" | "true" | "false" | "data" | "text"
    elements: list[str] | None = None  # _elements names, applied by the REST layer
    include: list[Include] = field(default_factory=list)
    revinclude: list[Include] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    # the accepted parameters, echoed in the Bundle's self link (spec: only those actually used)
    used: list[tuple[str, str]] = field(default_factory=list)


def split_values(raw: str) -> list[str]:
    """Comma-separated OR values; `\\,` is a literal comma."""
    values, current, escaped = [], [], False
    for ch in raw:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ",":
            values.append("".join(current))
            current = []
        else:
            current.append(ch)
    values.append("".join(current))
    return values


def split_prefix(value: str) -> tuple[str, str]:
    match = _PREFIX_RE.match(value)
    if match:
        return match.group(1), value[2:]
    return "eq", value


def _check_value(param: SearchParam, modifier: str | None, value: str) -> None:
    if value == "":
        raise InvalidSearch(f"empty value for search parameter {param.name!r}")
    if modifier == "missing":
        if value not in ("true", "false"):
            raise InvalidSearch(f"{param.name}:missing takes true or false, not {value!r}")
        return
    if param.type == "date":
        _, text = split_prefix(value)
        try:
            parse_range(text)
        except DateParseError as exc:
            raise InvalidSearch(f"invalid date for {param.name!r}: {exc}") from exc
    elif param.type == "number":
        _, text = split_prefix(value)
        try:
            float(text)
        except ValueError as exc:
            raise InvalidSearch(f"invalid number for {param.name!r}: {text!r}") from exc


def _criterion(param: SearchParam, modifier: str, raw: str) -> Criterion:
    """A known parameter's criterion, its modifier and every value checked (400 when malformed)."""
    mod = modifier or None
    if mod is not None:
        allowed = _MODIFIERS.get(param.type, set())
        if param.type == "reference" and mod in SUPPORTED_TYPES:
            pass  # subject:Patient=123
        elif mod not in allowed:
            raise InvalidSearch(f"modifier :{mod} is not supported on {param.type} parameter {param.name!r}")
    values = split_values(raw)
    for value in values:
        _check_value(param, mod, value)
    return Criterion(param, mod, tuple(values))


def _unsupported(problem: str, name: str, *, strict: bool, ignored: list[str]) -> None:
    """An unknown or unsupported parameter: 400 under handling=strict, else reported as ignored."""
    if strict:
        raise InvalidSearch(problem)
    ignored.append(name)


def _chain_types(resource_type: str, ref: SearchParam, type_modifier: str) -> tuple[str, ...]:
    """The stored types `ref` may be chained through: the `:Type` given, else all its targets."""
    possible = reference_targets(resource_type, ref.name)
    if not type_modifier:
        return possible
    if type_modifier not in SUPPORTED_TYPES:
        raise InvalidSearch(f"modifier :{type_modifier} is not supported on reference parameter {ref.name!r} (not a resource type of this server)")
    if type_modifier not in possible:
        raise InvalidSearch(f"{resource_type}.{ref.name} cannot refer to a {type_modifier} (it may refer to {', '.join(possible) or 'no stored type'})")
    return (type_modifier,)


def _parse_chain(resource_type: str, name: str, raw: str, *, strict: bool, ignored: list[str]) -> ChainedCriterion | None:
    """`ref[:Type].param[:modifier]` -> a ChainedCriterion; None when ignored (lenient)."""
    head, _, chained = name.partition(".")
    ref_name, _, type_modifier = head.partition(":")
    ref = reference_params(resource_type).get(ref_name)
    if ref is None:
        kind = "not a reference search parameter" if ref_name in search_params(resource_type) else "an unknown search parameter"
        _unsupported(f"cannot chain {name!r}: {ref_name!r} is {kind} of {resource_type}", name, strict=strict, ignored=ignored)
        return None
    if "." in chained:
        _unsupported(f"chained search parameter {name!r}: only one level of chaining is supported", name, strict=strict, ignored=ignored)
        return None
    types = _chain_types(resource_type, ref, type_modifier)
    chained_name, _, modifier = chained.partition(":")
    targets = tuple(
        (target, _criterion(search_params(target)[chained_name], modifier, raw))
        for target in types
        if chained_name in search_params(target)
    )
    if not targets:
        problem = f"unknown chained search parameter {chained_name!r} in {name!r}: not defined on {' or '.join(types) or 'any stored type'}"
        _unsupported(problem, name, strict=strict, ignored=ignored)
        return None
    return ChainedCriterion(ref, targets)


def _parse_int(name: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError as exc:
        raise InvalidSearch(f"{name} must be an integer, not {value!r}") from exc
    if number < minimum:
        raise InvalidSearch(f"{name} must be >= {minimum}")
    return number


def _parse_include(resource_type: str, value: str, *, reverse: bool, strict: bool, ignored: list[str], name: str) -> Include | None:
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise InvalidSearch(f"{name} must look like Type:param[:targetType], not {value!r}")
    source, param = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    problem = None
    if source not in SUPPORTED_TYPES:
        problem = f"unknown resource type {source!r} in {name}={value}"
    elif reverse and source in READ_ONLY_TYPES:
        problem = f"{name}={value}: {source} cannot be reverse-included (read it through its own search)"
    elif not reverse and source != resource_type:
        problem = f"{name}={value}: source type must be {resource_type}"
    elif param != "*" and param not in reference_params(source):
        problem = f"{name}={value}: {source} has no reference search parameter {param!r}"
    elif target is not None and target not in SUPPORTED_TYPES:
        problem = f"{name}={value}: unknown target type {target!r}"
    if problem:
        if strict:
            raise InvalidSearch(problem)
        ignored.append(f"{name}={value}")
        return None
    return Include(source, param, target)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def parse_search(
    resource_type: str,
    items: Iterable[tuple[str, str]],
    *,
    strict: bool = False,
    max_count: int = MAX_COUNT,
    default_count: int = DEFAULT_COUNT,
) -> SearchQuery:
    if resource_type not in SUPPORTED_TYPES:
        raise UnsupportedResourceType(f"resource type {resource_type!r} is not supported")
    known = search_params(resource_type)
    query = SearchQuery(resource_type, count=default_count)
    for name, raw in items:
        if _CONTROL.search(name) or _CONTROL.search(raw):
            # never meaningful in a search, and PostgreSQL cannot compare text holding U+0000
            raise InvalidSearch(f"search parameter {name!r} contains a control character")
        base, _, modifier = name.partition(":")
        if base in ("_format", "_pretty"):
            continue  # presentation, handled by the REST layer
        if base == "_count":
            query.count = min(_parse_int("_count", raw, 0), max_count)
        elif base == "_offset":
            query.offset = _parse_int("_offset", raw, 0)
        elif base == "_summary":
            if raw not in ("count", "true", "false", "data", "text"):
                raise InvalidSearch(f"_summary must be one of count, true, false, data, text; not {raw!r}")
            query.summary = raw
        elif base == "_elements":
            # names only: which exist for the type is the REST layer's business (unknown ones are ignored)
            query.elements = (query.elements or []) + [n.strip() for n in raw.split(",") if n.strip()]
        elif base == "_total":
            if raw not in ("none", "estimate", "accurate"):
                raise InvalidSearch(f"_total must be none, estimate or accurate; not {raw!r}")
        elif base == "_sort":
            for key in split_values(raw):
                desc = key.startswith("-")
                pname = key[1:] if desc else key
                param = known.get(pname)
                if param is None or param.type == "reference":
                    problem = f"cannot sort {resource_type} by {pname!r}"
                    if strict:
                        raise InvalidSearch(problem)
                    query.ignored.append(f"_sort={key}")
                    continue
                query.sort.append((param, desc))
        elif base in ("_include", "_revinclude"):
            if modifier not in ("", "iterate", "recurse"):
                raise InvalidSearch(f"unknown modifier {name}")
            for value in split_values(raw) if "," in raw else [raw]:
                inc = _parse_include(resource_type, value, reverse=base == "_revinclude", strict=strict, ignored=query.ignored, name=base)
                if inc is not None:
                    (query.revinclude if base == "_revinclude" else query.include).append(inc)
        elif "." in name:  # no parameter name has a dot: this is a chain
            chain = _parse_chain(resource_type, name, raw, strict=strict, ignored=query.ignored)
            if chain is None:
                continue
            query.criteria.append(chain)
        else:
            param = known.get(base)
            if param is None:
                _unsupported(f"unknown search parameter {base!r} for {resource_type}", name, strict=strict, ignored=query.ignored)
                continue
            query.criteria.append(_criterion(param, modifier, raw))
        query.used.append((name, raw))
    return query
