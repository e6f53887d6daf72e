"""Repository: versioned resource storage with atomic multi-resource transactions."""

from __future__ import annotations

import copy
import hashlib
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import parse_qsl

from sqlalchemy import delete, false, func, insert, select, text, true, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session

from fhir_server import fhirjson

from .engine import WRITE_OPTION, create_tables, make_engine
from .errors import (
    InvalidResource,
    InvalidSearch,
    PreconditionFailed,
    ReadOnlyType,
    ResourceExists,
    ResourceGone,
    ResourceNotFound,
    StorageBusy,
    UnsupportedResourceType,
    VersionConflict,
)
from .indexing import index_rows
from .params import READ_ONLY_TYPES, SUPPORTED_TYPES
from .query import RESULT_PARAMS, SearchQuery, parse_search
from .search import order_by, where_clauses
from .tables import ResourceVersion as RV
from .tables import SearchIndex as SI
from .timeutil import format_instant, http_date, to_naive_utc, utcnow

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ETAG_RE = re.compile(r'^\s*(?:W/)?"?([0-9]+)"?\s*$')

_ONE_MS = timedelta(milliseconds=1)
# presentation parameters may ride along on a conditional request's URL; they select nothing
_PRESENTATION = ("_format", "_pretty")
# _include/_revinclude of one page never returns more than this (a popular target would otherwise
# drag thousands of Provenances into a 20-entry page)
MAX_INCLUDED = 1000

_COLS = (RV.pk, RV.resource_type, RV.resource_id, RV.version_id, RV.last_updated, RV.deleted, RV.method, RV.content)


def new_id() -> str:
    """A server-assigned logical id (32 hex characters, valid FHIR id)."""
    return uuid.uuid4().hex


def parse_etag(value: str | int) -> int:
    """'W/"3"', '"3"', '3' or 3 -> 3; anything else -> PreconditionFailed."""
    if isinstance(value, int):
        return value
    match = _ETAG_RE.match(value)
    if not match:
        raise PreconditionFailed(f"If-Match must be a version ETag like W/\"1\", not {value!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class StoredResource:
    """One stored version. `resource` is the JSON dict with id and meta filled (None if deleted)."""

    resource_type: str
    id: str
    version_id: int
    last_updated: datetime  # naive UTC
    deleted: bool
    method: str  # create | update | delete
    resource: dict[str, Any] | None
    # True when this call created the resource (create, update-as-create); False for an
    # update or a conditional create that found an existing match.
    created: bool = False

    @property
    def version(self) -> str:
        return str(self.version_id)

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"

    @property
    def last_modified(self) -> str:
        """HTTP date for the Last-Modified header."""
        return http_date(self.last_updated)

    @property
    def last_updated_instant(self) -> str:
        return format_instant(self.last_updated)

    def location(self, base: str) -> str:
        return f"{base.rstrip('/')}/{self.resource_type}/{self.id}/_history/{self.version_id}"


@dataclass
class SearchResult:
    total: int
    matches: list[StoredResource] = field(default_factory=list)
    included: list[StoredResource] = field(default_factory=list)


@dataclass
class HistoryPage:
    total: int
    entries: list[StoredResource] = field(default_factory=list)


def _as_dict(resource: Any) -> dict[str, Any]:
    if isinstance(resource, dict):
        return dict(resource)
    dump = getattr(resource, "model_dump", None)  # a fhir.resources model
    if dump is None:
        raise InvalidResource(f"expected a resource dict or fhir.resources model, got {type(resource).__name__}")
    return dump(mode="json")


def _check_type(resource_type: str) -> None:
    if resource_type not in SUPPORTED_TYPES:
        raise UnsupportedResourceType(f"resource type {resource_type!r} is not supported by this server")


def _check_writable(resource_type: str) -> None:
    if resource_type in READ_ONLY_TYPES:
        raise ReadOnlyType(f"{resource_type} resources are written by the server only; they cannot be created, updated or deleted")


class TransactionHooks(Protocol):
    """Observer of one Repository's transactions (the audit trail of one request, see
    fhir_server.audit). Storage knows nothing about auditing: it only reports what it touched
    and lets the observer append records before a write transaction commits."""

    def touched(self, stored: "StoredResource", previous: dict[str, Any] | None) -> None:
        """A resource version was read or written (`previous`: the content a write replaced)."""

    def searched(self, result: "SearchResult") -> None:
        """A search ran and found `result`."""

    def before_commit(self, tx: "Transaction") -> None:
        """The write transaction is about to commit: append what must commit with it."""

    def after_commit(self) -> None:
        """It committed."""

    def after_rollback(self) -> None:
        """It rolled back (nothing appended in before_commit exists)."""


def _check_id(resource_id: str) -> None:
    if not isinstance(resource_id, str) or not ID_RE.match(resource_id):
        raise InvalidResource(f"invalid resource id {resource_id!r} (1-64 of A-Z a-z 0-9 - .)", expression=["id"])


def _stored(row, *, created: bool = False) -> StoredResource:
    return StoredResource(
        resource_type=row.resource_type,
        id=row.resource_id,
        version_id=row.version_id,
        last_updated=row.last_updated,
        deleted=row.deleted,
        method=row.method,
        resource=fhirjson.loads(row.content) if row.content is not None else None,
        created=created,
    )


def _with_meta(resource: dict[str, Any], resource_id: str, version_id: int, now: datetime) -> dict[str, Any]:
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(version_id)
    meta["lastUpdated"] = format_instant(now)
    rest = {k: v for k, v in resource.items() if k not in ("resourceType", "id", "meta")}
    return {"resourceType": resource["resourceType"], "id": resource_id, "meta": meta, **rest}


class Transaction:
    """All reads and writes through one Transaction share one database transaction: they commit
    together when the `with repo.transaction()` block ends, or none of them does."""

    def __init__(self, session: Session, hooks: TransactionHooks | None = None):
        self.session = session
        self.hooks = hooks

    # ---- reads -------------------------------------------------------------------------
    def _current(self, resource_type: str, resource_id: str):
        stmt = select(*_COLS).where(
            RV.resource_type == resource_type, RV.resource_id == resource_id, RV.is_current == true()
        )
        return self.session.execute(stmt).first()

    def read(self, resource_type: str, resource_id: str) -> StoredResource:
        """The current version; ResourceNotFound / ResourceGone (deleted)."""
        _check_type(resource_type)
        row = self._current(resource_type, resource_id)
        if row is None:
            raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
        if row.deleted:
            raise ResourceGone(f"{resource_type}/{resource_id} was deleted", version_id=row.version_id)
        return self._seen(_stored(row))

    def _seen(self, stored: StoredResource) -> StoredResource:
        if self.hooks is not None:
            self.hooks.touched(stored, None)
        return stored

    def read_or_none(self, resource_type: str, resource_id: str) -> StoredResource | None:
        """The current version, or None when unknown or deleted."""
        try:
            return self.read(resource_type, resource_id)
        except (ResourceNotFound, ResourceGone):
            return None

    def vread(self, resource_type: str, resource_id: str, version_id: int | str) -> StoredResource:
        """One version. A deleted version raises ResourceGone."""
        _check_type(resource_type)
        try:
            vid = int(version_id)
        except (TypeError, ValueError):
            raise ResourceNotFound(f"{resource_type}/{resource_id} has no version {version_id!r}") from None
        stmt = select(*_COLS).where(
            RV.resource_type == resource_type, RV.resource_id == resource_id, RV.version_id == vid
        )
        row = self.session.execute(stmt).first()
        if row is None:
            if self._current(resource_type, resource_id) is None:
                raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
            raise ResourceNotFound(f"{resource_type}/{resource_id} has no version {vid}")
        if row.deleted:
            raise ResourceGone(f"{resource_type}/{resource_id} version {vid} is a deletion", version_id=vid)
        return self._seen(_stored(row))

    def history(
        self,
        resource_type: str | None = None,
        resource_id: str | None = None,
        *,
        since: datetime | None = None,
        count: int = 20,
        offset: int = 0,
    ) -> HistoryPage:
        """Versions newest first: of one resource, of one type, or of everything."""
        conds = []
        if resource_type is not None:
            _check_type(resource_type)
            conds.append(RV.resource_type == resource_type)
        if resource_id is not None:
            conds.append(RV.resource_id == resource_id)
            if self._current(resource_type, resource_id) is None:
                raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
        else:  # system history: the audit log is read through its own type, not mixed into every change
            conds.append(RV.resource_type.not_in(sorted(READ_ONLY_TYPES)))
        if since is not None:
            conds.append(RV.last_updated >= to_naive_utc(since))
        total = self.session.execute(select(func.count()).select_from(RV).where(*conds)).scalar_one()
        stmt = select(*_COLS).where(*conds).order_by(RV.last_updated.desc(), RV.pk.desc()).offset(offset).limit(count)
        return HistoryPage(total, [_stored(r) for r in self.session.execute(stmt)])

    def search(self, query: SearchQuery) -> SearchResult:
        """Run a parsed query: total, one page of matches, and the _include/_revinclude resources."""
        clauses = where_clauses(query)
        total = self.session.execute(select(func.count()).select_from(RV).where(*clauses)).scalar_one()
        if query.summary == "count" or query.count == 0:
            return SearchResult(total)
        stmt = select(*_COLS).where(*clauses).order_by(*order_by(query)).offset(query.offset).limit(query.count)
        matches = [_stored(r) for r in self.session.execute(stmt)]
        result = SearchResult(total, matches, self._included(query, matches))
        if self.hooks is not None:
            self.hooks.searched(result)
        return result

    def search_params(self, resource_type: str, items: Iterable[tuple[str, str]], *, strict: bool = False) -> SearchResult:
        """Parse and run a search given as name/value pairs (e.g. [("patient", "Patient/1")])."""
        return self.search(parse_search(resource_type, items, strict=strict))

    def _included(self, query: SearchQuery, matches: list[StoredResource]) -> list[StoredResource]:
        if not matches or not (query.include or query.revinclude):
            return []
        ids = [m.id for m in matches]
        wanted: set[tuple[str, str]] = set()
        for inc in query.include:
            stmt = select(SI.ref_type, SI.ref_id).where(
                SI.resource_type == inc.source_type, SI.resource_id.in_(ids), SI.ref_type.is_not(None)
            )
            if inc.param != "*":
                stmt = stmt.where(SI.param == inc.param)
            if inc.target_type:
                stmt = stmt.where(SI.ref_type == inc.target_type)
            wanted.update((t, i) for t, i in self.session.execute(stmt) if t in SUPPORTED_TYPES)
        for rev in query.revinclude:
            stmt = select(SI.resource_id).where(
                SI.resource_type == rev.source_type, SI.ref_type == query.resource_type, SI.ref_id.in_(ids)
            )
            if rev.param != "*":
                stmt = stmt.where(SI.param == rev.param)
            wanted.update((rev.source_type, i) for (i,) in self.session.execute(stmt))
        wanted -= {(m.resource_type, m.id) for m in matches}
        by_type: dict[str, list[str]] = {}
        for rtype, rid in wanted:
            by_type.setdefault(rtype, []).append(rid)
        included: list[StoredResource] = []
        for rtype, rids in sorted(by_type.items()):
            stmt = (
                select(*_COLS)
                .where(RV.resource_type == rtype, RV.resource_id.in_(rids), RV.is_current == true(), RV.deleted == false())
                .order_by(RV.pk)
                .limit(MAX_INCLUDED - len(included))
            )
            if len(included) >= MAX_INCLUDED:
                break
            included.extend(_stored(r) for r in self.session.execute(stmt))
        return included

    def find(self, resource_type: str, criteria: str, *, limit: int = 2) -> list[StoredResource]:
        """Matches of a search query string ('identifier=sys|val&status=final'), strict: the
        form of every conditional interaction, where an ignored parameter would silently match
        too much. Criteria must select (at least one search parameter) and may not shape the
        result (_count, _sort, _summary=count ... would change what "a match" means)."""
        items = [(k, v) for k, v in parse_qsl(criteria.lstrip("?"), keep_blank_values=True) if k not in _PRESENTATION]
        shaping = sorted({k for k, _ in items if k.partition(":")[0] in RESULT_PARAMS})
        if shaping:
            raise InvalidSearch(f"conditional criteria cannot use the result parameter(s) {', '.join(shaping)}")
        query = parse_search(resource_type, items, strict=True)
        if not query.criteria:
            raise InvalidSearch(f"conditional criteria for {resource_type} name no search parameter (they would match every resource)")
        query.count, query.offset, query.include, query.revinclude = limit, 0, [], []
        return self.search(query).matches

    def match_one(self, resource_type: str, criteria: str, *, label: str = "conditional criteria") -> StoredResource | None:
        """The single current match of `criteria` (None when none), holding the criteria lock
        until this transaction ends so that the caller's write cannot race a twin request;
        more than one match -> PreconditionFailed (R4: criteria not selective enough)."""
        self.lock_criteria(resource_type, criteria)
        found = self.find(resource_type, criteria)
        if len(found) > 1:
            raise PreconditionFailed(f"{label} '{criteria}' matched more than one {resource_type}; make the criteria more selective")
        return found[0] if found else None

    def conditional_update_id(self, resource_type: str, criteria: str, resource: Any) -> str:
        """The id a conditional update (R4 http.html#cond-update) writes to: the single match
        (the body id, if any, must be it), else the body id (update-as-create, as plain PUT
        does here) when no other resource holds it, else a new id. Locks the criteria."""
        body_id = _as_dict(resource).get("id")
        match = self.match_one(resource_type, criteria, label="conditional update criteria")
        if match is not None:
            if body_id not in (None, match.id):
                raise InvalidResource(
                    f"the body id {body_id!r} is not the id of the resource the criteria matched ({match.reference})", expression=["id"]
                )
            return match.id
        if body_id is None:
            return new_id()
        _check_id(body_id)
        if self.read_or_none(resource_type, body_id) is not None:
            # updating it would change a resource the client's criteria say is not the one meant
            raise InvalidResource(
                f"the criteria matched no {resource_type}, but the body id names {resource_type}/{body_id}, which does not match them",
                expression=["id"],
            )
        return body_id

    # ---- writes ------------------------------------------------------------------------
    def lock_criteria(self, resource_type: str, criteria: str) -> None:
        """Serialise conditional creates with the same criteria until this transaction ends, so
        two concurrent If-None-Exist requests cannot both create. SQLite writers are already
        serialised (BEGIN IMMEDIATE); PostgreSQL gets a transaction-scoped advisory lock."""
        if self.session.get_bind().dialect.name != "postgresql":
            return
        key = resource_type + "?" + "&".join(f"{k}={v}" for k, v in sorted(parse_qsl(criteria.lstrip("?"), keep_blank_values=True)))
        # Hashed here, not by hashtextextended(): PostgreSQL text cannot hold U+0000, and criteria
        # are client input that is validated only after the lock is taken.
        lock_id = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big", signed=True)
        self.session.execute(text("SELECT pg_advisory_xact_lock(:lock_id)"), {"lock_id": lock_id})

    def _write(self, resource_type: str, resource_id: str, resource: dict | None, method: str, previous) -> StoredResource:
        now = utcnow()
        version_id = 1
        if previous is not None:
            version_id = previous.version_id + 1
            if now <= previous.last_updated:  # keep lastUpdated strictly increasing per resource
                now = previous.last_updated + _ONE_MS
            result = self.session.execute(
                update(RV).where(RV.pk == previous.pk, RV.is_current == true()).values(is_current=False)
            )
            if result.rowcount != 1:
                raise VersionConflict(f"{resource_type}/{resource_id} was changed by another request; retry")
        content = None
        if resource is not None:
            resource = _with_meta(resource, resource_id, version_id, now)
            content = fhirjson.dumps(resource)  # decimals keep their text (R4 precision)
        try:
            self.session.execute(
                insert(RV).values(
                    resource_type=resource_type,
                    resource_id=resource_id,
                    version_id=version_id,
                    last_updated=now,
                    deleted=resource is None,
                    is_current=True,
                    method=method,
                    content=content,
                )
            )
        except IntegrityError as exc:
            raise VersionConflict(f"{resource_type}/{resource_id} was changed by another request; retry") from exc
        self.session.execute(delete(SI).where(SI.resource_type == resource_type, SI.resource_id == resource_id))
        if resource is not None:
            rows = index_rows(resource_type, resource_id, resource)
            if rows:
                self.session.execute(insert(SI), rows)
        stored = StoredResource(
            resource_type, resource_id, version_id, now, resource is None, method, resource, created=method == "create"
        )
        if self.hooks is not None:
            self.hooks.touched(stored, fhirjson.loads(previous.content) if previous is not None and previous.content else None)
        return stored

    def append(self, resource: dict[str, Any]) -> StoredResource:
        """Append an immutable, server-written resource (an AuditEvent) with a fresh id: exactly
        two statements (the version row and its index rows), no read, no lock on other rows, so
        auditing costs one insert per request on the hot path."""
        resource_type = resource["resourceType"]
        _check_type(resource_type)
        rid, now = new_id(), utcnow()
        body = _with_meta(resource, rid, 1, now)
        self.session.execute(
            insert(RV).values(
                resource_type=resource_type, resource_id=rid, version_id=1, last_updated=now, deleted=False,
                is_current=True, method="create", content=fhirjson.dumps(body),
            )
        )
        rows = index_rows(resource_type, rid, body)
        if rows:
            self.session.execute(insert(SI), rows)
        return StoredResource(resource_type, rid, 1, now, False, "create", body, created=True)

    def create(self, resource: Any, *, resource_id: str | None = None, if_none_exist: str | None = None) -> StoredResource:
        """Create version 1. `resource_id` lets the server pre-assign ids (e.g. to link resources
        written in one transaction); any id in the body is ignored as FHIR create requires.
        `if_none_exist` (a search query string): 0 matches -> create, 1 -> return it
        (created=False), more -> PreconditionFailed."""
        body = _as_dict(resource)
        resource_type = body.get("resourceType")
        if not isinstance(resource_type, str):
            raise InvalidResource("resource has no resourceType", expression=["resourceType"])
        _check_type(resource_type)
        _check_writable(resource_type)
        if if_none_exist:
            found = self.match_one(resource_type, if_none_exist, label="If-None-Exist")
            if found is not None:
                return found
        rid = resource_id or new_id()
        _check_id(rid)
        previous = self._current(resource_type, rid)
        if previous is not None:
            raise ResourceExists(f"{resource_type}/{rid} already exists")
        return self._write(resource_type, rid, body, "create", None)

    def update(self, resource_type: str, resource_id: str, resource: Any, *, if_match: str | int | None = None) -> StoredResource:
        """New version of (type, id); creates it when unknown or deleted (created=True).
        `if_match`: the expected current version (ETag or number) -> PreconditionFailed."""
        _check_type(resource_type)
        _check_writable(resource_type)
        _check_id(resource_id)
        body = _as_dict(resource)
        if body.get("resourceType") != resource_type:
            raise InvalidResource(
                f"resourceType {body.get('resourceType')!r} does not match {resource_type}", expression=["resourceType"]
            )
        if body.get("id") not in (None, resource_id):
            raise InvalidResource(f"resource id {body.get('id')!r} does not match {resource_id!r}", expression=["id"])
        previous = self._current(resource_type, resource_id)
        if if_match is not None:
            expected = parse_etag(if_match)
            if previous is None or previous.deleted or previous.version_id != expected:
                have = "none" if previous is None or previous.deleted else previous.version_id
                raise PreconditionFailed(
                    f"If-Match version {expected} does not match the current version ({have}) of {resource_type}/{resource_id}"
                )
        created = previous is None or previous.deleted
        stored = self._write(resource_type, resource_id, body, "create" if previous is None else "update", previous)
        return StoredResource(**{**stored.__dict__, "created": created})

    def delete(self, resource_type: str, resource_id: str, *, if_match: str | int | None = None) -> StoredResource | None:
        """Write a deletion version; None when there was nothing (unknown or already deleted)."""
        _check_type(resource_type)
        _check_writable(resource_type)
        previous = self._current(resource_type, resource_id)
        if if_match is not None:
            expected = parse_etag(if_match)
            if previous is None or previous.deleted or previous.version_id != expected:
                raise PreconditionFailed(f"If-Match version {expected} does not match {resource_type}/{resource_id}")
        if previous is None or previous.deleted:
            return None
        return self._write(resource_type, resource_id, None, "delete", previous)

    def conditional_update(self, resource_type: str, criteria: str, resource: Any, *, if_match: str | int | None = None) -> StoredResource:
        """R4 conditional update `PUT [type]?criteria`: 0 matches -> create (created=True; the
        body id is used if free), 1 -> new version of it, more -> PreconditionFailed. Match and
        write share this transaction and the criteria lock: twins cannot both create."""
        _check_type(resource_type)
        target = self.conditional_update_id(resource_type, criteria, resource)
        return self.update(resource_type, target, {**_as_dict(resource), "id": target}, if_match=if_match)

    def conditional_delete(self, resource_type: str, criteria: str, *, if_match: str | int | None = None) -> StoredResource | None:
        """R4 conditional delete `DELETE [type]?criteria` ("single"): 0 matches -> None (nothing
        to do), 1 -> its deletion version, more -> PreconditionFailed."""
        _check_type(resource_type)
        _check_writable(resource_type)
        target = self.conditional_delete_id(resource_type, criteria, if_match=if_match)
        return None if target is None else self.delete(resource_type, target, if_match=if_match)

    def conditional_delete_id(self, resource_type: str, criteria: str, *, if_match: str | int | None = None) -> str | None:
        """The id a conditional delete removes (None: nothing matched, a successful no-op). An
        If-Match with no match is PreconditionFailed: there is no version to compare it with.
        Locks the criteria."""
        match = self.match_one(resource_type, criteria, label="conditional delete criteria")
        if match is None and if_match is not None:
            raise PreconditionFailed(f"If-Match {if_match} given, but the criteria '{criteria}' matched no {resource_type}")
        return match.id if match is not None else None




class Repository:
    """The storage entry point. One per application (app.state.store); thread-safe."""

    def __init__(self, engine: Engine, hooks: TransactionHooks | None = None):
        self.engine = engine
        self._write_engine = engine.execution_options(**{WRITE_OPTION: True})
        self.hooks = hooks

    def with_hooks(self, hooks: TransactionHooks | None) -> "Repository":
        """The same store (engine and pool shared) whose transactions report to `hooks`."""
        bound = copy.copy(self)
        bound.hooks = hooks
        return bound

    @classmethod
    def from_url(cls, url: str, *, create: bool = True, echo: bool = False) -> "Repository":
        repo = cls(make_engine(url, echo=echo))
        if create:
            repo.create_tables()
        return repo

    def create_tables(self) -> None:
        create_tables(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Transaction]:
        """`with repo.transaction() as tx:` - everything inside commits together on normal exit;
        any exception rolls all of it back and propagates."""
        hooks = self.hooks
        with Session(self._write_engine if write else self.engine, expire_on_commit=False) as session:
            try:
                try:
                    with session.begin():
                        tx = Transaction(session, hooks)
                        yield tx
                        if write and hooks is not None:
                            hooks.before_commit(tx)
                except BaseException:
                    if write and hooks is not None:
                        hooks.after_rollback()
                    raise
                if write and hooks is not None:
                    hooks.after_commit()
            except IntegrityError as exc:  # a unique key raced at commit time
                raise VersionConflict("a concurrent request changed the same resource; retry") from exc
            except OperationalError as exc:
                if "locked" in str(exc.orig).lower():
                    raise StorageBusy("the database is busy; retry shortly") from exc
                raise

    # One-shot helpers, each its own transaction.
    def create(self, resource: Any, **kwargs: Any) -> StoredResource:
        with self.transaction() as tx:
            return tx.create(resource, **kwargs)

    def update(self, resource_type: str, resource_id: str, resource: Any, **kwargs: Any) -> StoredResource:
        with self.transaction() as tx:
            return tx.update(resource_type, resource_id, resource, **kwargs)

    def delete(self, resource_type: str, resource_id: str, **kwargs: Any) -> StoredResource | None:
        with self.transaction() as tx:
            return tx.delete(resource_type, resource_id, **kwargs)

    def conditional_update(self, resource_type: str, criteria: str, resource: Any, **kwargs: Any) -> StoredResource:
        with self.transaction() as tx:
            return tx.conditional_update(resource_type, criteria, resource, **kwargs)

    def conditional_delete(self, resource_type: str, criteria: str, **kwargs: Any) -> StoredResource | None:
        with self.transaction() as tx:
            return tx.conditional_delete(resource_type, criteria, **kwargs)

    def read(self, resource_type: str, resource_id: str) -> StoredResource:
        with self.transaction(write=False) as tx:
            return tx.read(resource_type, resource_id)

    def vread(self, resource_type: str, resource_id: str, version_id: int | str) -> StoredResource:
        with self.transaction(write=False) as tx:
            return tx.vread(resource_type, resource_id, version_id)

    def history(self, resource_type: str | None = None, resource_id: str | None = None, **kwargs: Any) -> HistoryPage:
        with self.transaction(write=False) as tx:
            return tx.history(resource_type, resource_id, **kwargs)

    def search(self, query: SearchQuery) -> SearchResult:
        with self.transaction(write=False) as tx:
            return tx.search(query)

    def search_params(self, resource_type: str, items: Iterable[tuple[str, str]], *, strict: bool = False) -> SearchResult:
        with self.transaction(write=False) as tx:
            return tx.search_params(resource_type, items, strict=strict)
