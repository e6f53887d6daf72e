"""SearchQuery -> SQL over resource_version (current rows) and search_index.

Each criterion becomes an EXISTS over the index (values ORed inside it), criteria are ANDed;
`_id` and `_lastUpdated` are answered from the version table directly.

A chained criterion (`subject:Patient.identifier=...`) is an EXISTS over the reference parameter's
index rows whose (ref_type, ref_id) is IN a subquery selecting the ids of the current target
resources that match the chained criterion, built by the same criterion_clause as a direct
search (so value semantics are identical). The subquery ranges over an alias of resource_version:
the nested EXISTS then correlates to the target row, not to the outer searched row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, and_, exists, false, func, not_, or_, select, true
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from .indexing import normalise_string, split_reference
from .query import ChainedCriterion, Criterion, SearchQuery, split_prefix
from .tables import ResourceVersion as RV
from .tables import SearchIndex as SI
from .timeutil import parse_range


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def date_condition(prefix: str, value: str, low_col, high_col) -> ColumnElement:
    """FHIR date prefixes on the range [low_col, high_col] (both inclusive), R4 search.html 3.1.1.4.2."""
    s_low, s_high = parse_range(value)
    eq = and_(low_col >= s_low, high_col <= s_high)
    if prefix == "eq":
        return eq
    if prefix == "ne":
        return not_(eq)
    if prefix == "gt":
        return high_col > s_high
    if prefix == "lt":
        return low_col < s_low
    if prefix == "ge":
        return or_(high_col > s_high, eq)
    if prefix == "le":
        return or_(low_col < s_low, eq)
    if prefix == "sa":
        return low_col > s_high
    if prefix == "eb":
        return high_col < s_low
    # ap: the ranges overlap (a pragmatic reading of "approximately")
    return and_(low_col <= s_high, high_col >= s_low)


def _number_condition(prefix: str, text: str) -> ColumnElement:
    value = float(text)
    decimals = len(text.split(".", 1)[1]) if "." in text else 0
    half = 0.5 * 10 ** (-decimals)  # implicit precision: 0.5 means [0.45, 0.55)
    col = SI.number
    if prefix == "eq":
        return and_(col >= value - half, col < value + half)
    if prefix == "ne":
        return or_(col < value - half, col >= value + half)
    if prefix in ("gt", "sa"):
        return col > value
    if prefix in ("lt", "eb"):
        return col < value
    if prefix == "ge":
        return col >= value
    if prefix == "le":
        return col <= value
    margin = abs(value) * 0.1
    return and_(col >= value - margin, col <= value + margin)


def _token_condition(value: str) -> ColumnElement:
    if "|" in value:
        system, _, code = value.partition("|")
        if system == "":
            return and_(SI.system.is_(None), SI.code == code)
        if code == "":
            return SI.system == system
        return and_(SI.system == system, SI.code == code)
    return SI.code == value


def _reference_condition(value: str, type_modifier: str | None) -> ColumnElement:
    if "/" not in value:
        cond = SI.ref_id == value
        return and_(cond, SI.ref_type == type_modifier) if type_modifier else cond
    ref_type, ref_id = split_reference(value)
    conds = []
    if ref_type is not None:
        conds.append(and_(SI.ref_type == ref_type, SI.ref_id == ref_id))
    conds.append(SI.code == value)  # non-local or unparseable references match literally
    return or_(*conds)


def _value_condition(crit: Criterion, value: str) -> ColumnElement:
    param, mod = crit.param, crit.modifier
    if param.type == "token":
        return _token_condition(value)
    if param.type == "reference":
        return _reference_condition(value, mod)
    if param.type == "string":
        if mod == "exact":
            return SI.code == value
        needle = _like_escape(normalise_string(value))
        pattern = f"%{needle}%" if mod == "contains" else f"{needle}%"
        return SI.value_str.like(pattern, escape="\\")
    if param.type == "date":
        prefix, text = split_prefix(value)
        return date_condition(prefix, text, SI.date_low, SI.date_high)
    if param.type == "number":
        prefix, text = split_prefix(value)
        return _number_condition(prefix, text)
    if param.type == "uri":
        if mod == "below":
            return SI.code.like(_like_escape(value) + "%", escape="\\")
        return SI.code == value
    raise AssertionError(f"unhandled parameter type {param.type}")


# The resource_version entity a clause correlates to: RV itself, or an aliased(RV) in a chain subquery.
VersionTable = Any


def _index_exists(resource_type: str, param_name: str, condition: ColumnElement | None, rv: VersionTable = RV) -> ColumnElement:
    conds = [SI.resource_type == resource_type, SI.resource_id == rv.resource_id, SI.param == param_name]
    if condition is not None:
        conds.append(condition)
    return exists(select(SI.pk).where(*conds))


def criterion_clause(resource_type: str, crit: Criterion | ChainedCriterion, rv: VersionTable = RV) -> ColumnElement:
    """The condition on `rv` (a current row of `resource_type`) that `crit` selects."""
    if isinstance(crit, ChainedCriterion):
        return chain_clause(resource_type, crit, rv)
    name = crit.param.name
    if crit.modifier == "missing":
        missing = crit.values[0] == "true"
        if name in ("_id", "_lastUpdated"):
            return false() if missing else true()
        has = _index_exists(resource_type, name, None, rv)
        return not_(has) if missing else has
    if name == "_id":
        clause = rv.resource_id.in_(crit.values)
        return not_(clause) if crit.modifier == "not" else clause
    if name == "_lastUpdated":
        parts = []
        for value in crit.values:
            prefix, text = split_prefix(value)
            parts.append(date_condition(prefix, text, rv.last_updated, rv.last_updated))
        return or_(*parts)
    match = _index_exists(resource_type, name, or_(*(_value_condition(crit, v) for v in crit.values)), rv)
    return not_(match) if crit.modifier == "not" else match


def _matching_ids(resource_type: str, crit: Criterion) -> Select:
    """Ids of the current, non-deleted `resource_type` resources that `crit` selects."""
    target = aliased(RV)
    return select(target.resource_id).where(current_rows(resource_type, target), criterion_clause(resource_type, crit, target))


def chain_clause(resource_type: str, chain: ChainedCriterion, rv: VersionTable = RV) -> ColumnElement:
    """`ref.param=value`: some `ref` index row of `rv` points to a matching target resource.
    Comparing (ref_type, ref_id) rather than the literal reference text keeps the ix_si_ref index
    usable and treats relative, absolute and versioned references to a resource alike."""
    ref = aliased(SI)  # distinct from the SI of the nested EXISTS inside criterion_clause
    points_to = [
        and_(ref.ref_type == target, ref.ref_id.in_(_matching_ids(target, crit))) for target, crit in chain.targets
    ]
    return exists(
        select(ref.pk).where(
            ref.resource_type == resource_type, ref.resource_id == rv.resource_id, ref.param == chain.param.name, or_(*points_to)
        )
    )


def current_rows(resource_type: str, rv: VersionTable = RV) -> ColumnElement:
    return and_(rv.resource_type == resource_type, rv.is_current == true(), rv.deleted == false())


def where_clauses(query: SearchQuery) -> list[ColumnElement]:
    return [current_rows(query.resource_type)] + [criterion_clause(query.resource_type, c) for c in query.criteria]


def order_by(query: SearchQuery) -> list:
    """Sort keys, then the row key so paging through equal sort values is stable."""
    keys = []
    for param, desc in query.sort:
        if param.name == "_id":
            col = RV.resource_id
        elif param.name == "_lastUpdated":
            col = RV.last_updated
        else:
            column = {
                "date": SI.date_high if desc else SI.date_low,
                "string": SI.value_str,
                "token": SI.code,
                "uri": SI.code,
                "number": SI.number,
            }[param.type]
            agg = func.max(column) if desc else func.min(column)
            col = (
                select(agg)
                .where(SI.resource_type == query.resource_type, SI.resource_id == RV.resource_id, SI.param == param.name)
                .scalar_subquery()
            )
        # resources without a value sort last in both directions
        keys.append(col.is_(None))
        keys.append(col.desc() if desc else col.asc())
    keys.append(RV.pk.asc())
    return keys


__all__ = ["chain_clause", "criterion_clause", "date_condition", "order_by", "where_clauses", "current_rows"]
