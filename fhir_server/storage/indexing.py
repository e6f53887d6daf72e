"""Resource JSON -> search index rows (normalised values of every supported parameter)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from typing import Any

from .params import SEARCH_PARAMS, SearchParam
from .tables import SearchIndex
from .timeutil import DateParseError, parse_range

# PostgreSQL b-tree entries are limited in size; nobody searches on kilobytes of text.
_MAX_INDEXED = 512

_REF_RE = re.compile(r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


def normalise_string(value: str) -> str:
    """Case- and accent-insensitive form used for string search (the FHIR default)."""
    decomposed = unicodedata.normalize("NFKD", value)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.casefold().split())[:_MAX_INDEXED]


def split_reference(reference: str) -> tuple[str | None, str | None]:
    """'Patient/1', 'Patient/1/_history/2' or 'http://x/fhir/Patient/1' -> ('Patient', '1')."""
    match = _REF_RE.search(reference)
    if not match:
        return None, None
    return match.group("type"), match.group("id")


def walk(node: Any, path: str) -> Iterator[Any]:
    """All values at a dotted path; lists at any level are flattened."""
    parts = path.split(".")

    def _walk(value: Any, depth: int) -> Iterator[Any]:
        if isinstance(value, list):
            for item in value:
                yield from _walk(item, depth)
            return
        if depth == len(parts):
            if value is not None:
                yield value
            return
        if isinstance(value, dict) and parts[depth] in value:
            yield from _walk(value[parts[depth]], depth + 1)

    yield from _walk(node, 0)


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, (str, int, float)):
        yield None, str(value)
    elif isinstance(value, dict):
        if "coding" in value:
            for coding in value.get("coding") or []:
                if isinstance(coding, dict) and coding.get("code") is not None:
                    yield coding.get("system"), str(coding["code"])
        elif "code" in value:  # Coding
            yield value.get("system"), str(value["code"])
        elif "value" in value:  # Identifier / ContactPoint
            yield value.get("system"), str(value["value"])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # HumanName, Address: every string part matches
        for part in value.values():
            if isinstance(part, str):
                yield part
            elif isinstance(part, list):
                yield from (p for p in part if isinstance(p, str))


def _dates(value: Any) -> Iterator[tuple[Any, Any]]:
    from datetime import datetime

    try:
        if isinstance(value, str):
            yield parse_range(value)
        elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
            low = parse_range(value["start"])[0] if value.get("start") else datetime.min
            high = parse_range(value["end"])[1] if value.get("end") else datetime.max
            yield low, high
    except DateParseError:
        return  # validation rejects bad dates before storage; never fail indexing on them


_COLUMNS = tuple(c.name for c in SearchIndex.__table__.columns if c.name != "pk")


def _row(base: dict[str, Any], **values: Any) -> dict[str, Any]:
    """One search_index row as a plain dict with every column (an executemany needs the same keys
    in every row): building ORM objects only to dump them again cost ~0.2 ms a row."""
    row = dict.fromkeys(_COLUMNS)
    row.update(base)
    row.update(values)
    return row


def rows_for_param(resource_type: str, resource_id: str, param: SearchParam, resource: dict) -> Iterator[dict[str, Any]]:
    base = {"resource_type": resource_type, "resource_id": resource_id, "param": param.name}
    seen: set[tuple] = set()
    for path in param.paths:
        for value in walk(resource, path):
            row: dict[str, Any] | None = None
            if param.type == "token":
                for system, code in _tokens(value):
                    key = (system, code)
                    if key not in seen:
                        seen.add(key)
                        yield _row(base, system=system, code=code[:_MAX_INDEXED])
                continue
            if param.type == "reference":
                if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
                    continue
                ref = value["reference"]
                ref_type, ref_id = split_reference(ref)
                if param.targets and ref_type not in param.targets:
                    continue
                row = {"ref_type": ref_type, "ref_id": ref_id, "code": ref[:_MAX_INDEXED]}
            elif param.type == "string":
                for text in _strings(value):
                    key = (text,)
                    if key not in seen:
                        seen.add(key)
                        yield _row(base, value_str=normalise_string(text), code=text[:_MAX_INDEXED])
                continue
            elif param.type == "date":
                for low, high in _dates(value):
                    if (low, high) not in seen:
                        seen.add((low, high))
                        yield _row(base, date_low=low, date_high=high)
                continue
            elif param.type == "uri" and isinstance(value, str):
                row = {"code": value[:_MAX_INDEXED]}
            elif param.type == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
                row = {"number": float(value)}
            if row is not None:
                key = tuple(sorted(row.items()))
                if key not in seen:
                    seen.add(key)
                    yield _row(base, **row)


def index_rows(resource_type: str, resource_id: str, resource: dict) -> list[dict[str, Any]]:
    """Every index row of a resource (the `_id`/`_lastUpdated` columns live in resource_version)."""
    rows: list[dict[str, Any]] = []
    for param in SEARCH_PARAMS.get(resource_type, {}).values():
        rows.extend(rows_for_param(resource_type, resource_id, param, resource))
    return rows
