"""POST [base] with a transaction or batch Bundle.

transaction: all entries in ONE database transaction; any failure -> nothing written and an
OperationOutcome naming the failing entry. Processing order DELETE, POST, PUT, GET (R4
http.html#trules); `urn:uuid:` fullUrls of created/updated entries are resolved to the
server-assigned Type/id in every entry; request.ifNoneExist / ifMatch are honoured.
Conditional update / delete (`PUT|DELETE [type]?criteria`) are resolved to ids inside the same
database transaction before anything is written, so every conditional sees the database as the
Bundle found it, and a resolved identity that another entry also changes fails the transaction
(R4 trules: "including resolved identities from conditional update/delete").
batch: every entry on its own (own transaction) with its own response status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from fhir_server.auth import authorize
from fhir_server.errors import operation_outcome
from fhir_server.storage import StoredResource, new_id
from fhir_server.storage.errors import ResourceGone, StorageError
from fhir_server.storage.repository import ID_RE, Transaction

from .common import base_url, error_from_storage, get_store, new_bundle, parse_prefer
from .crud import check_type, max_body
from .exceptions import FhirError
from .history import history_entry
from .negotiation import body_media_type, fhir_json_response, parse_json_body, shape_limits, read_body
from .search import parse_query, searchset
from .subsetting import subset_from_params
from .validation import required_code_issues, validate_resource

_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
_PERMISSION = {"DELETE": "d", "POST": "c", "PUT": "u"}


@dataclass
class Entry:
    index: int
    method: str
    url: str
    resource_type: str | None = None
    resource_id: str | None = None
    version_id: str | None = None
    history: bool = False
    query: str | None = None  # search / conditional criteria (after '?')
    resource: dict[str, Any] | None = None
    full_url: str | None = None
    if_none_exist: str | None = None
    if_match: str | None = None
    assigned_id: str | None = None
    existing: StoredResource | None = None  # conditional create matched this
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"

    @property
    def conditional(self) -> bool:
        """A conditional update / delete: [type]?criteria, resolved to resource_id in the transaction."""
        return self.method in ("PUT", "DELETE") and self.query is not None


def status_line(code: int) -> str:
    return f"{code} {HTTPStatus(code).phrase}"


def _fail(entry_or_index: Entry | int, status: int, message: str, code: str = "invalid", expression: str | None = None) -> FhirError:
    where = entry_or_index.where if isinstance(entry_or_index, Entry) else f"Bundle.entry[{entry_or_index}]"
    return FhirError(status, f"{where}: {message}", code=code, expression=[expression or where])


def _parse_url(entry: Entry, base: str) -> None:
    url = entry.url
    if url.startswith(base + "/"):
        url = url[len(base) + 1:]
    elif "://" in url:
        raise _fail(entry, 400, f"request.url {entry.url!r} is not on this server", expression=f"{entry.where}.request.url")
    path, _, query = url.lstrip("/").partition("?")
    parts = [p for p in path.split("/") if p]
    entry.query = query if "?" in url else None
    if not parts:
        raise _fail(entry, 400, f"request.url {entry.url!r} names no resource type", expression=f"{entry.where}.request.url")
    entry.resource_type = parts[0]
    rest = parts[1:]
    if rest and rest[0] == "_history":
        entry.history, rest = True, rest[1:]
    elif rest:
        entry.resource_id, rest = rest[0], rest[1:]
        if rest and rest[0] == "_history":
            entry.history = True
            if len(rest) > 1:
                entry.version_id, entry.history = rest[1], False
            rest = rest[2:]
    if rest:
        raise _fail(entry, 400, f"request.url {entry.url!r} is not a supported interaction", expression=f"{entry.where}.request.url")


def _check_write_url(entry: Entry) -> None:
    """POST [type]; PUT and DELETE [type]/[id] or, conditional, [type]?criteria (never both: the
    id would make the criteria meaningless, and no criteria at all would target every resource)."""
    where = f"{entry.where}.request.url"
    method = entry.method
    if method == "POST":
        if entry.query is not None or entry.resource_id:
            raise _fail(entry, 400, f"POST {entry.url}: expected [type] (conditional create uses request.ifNoneExist)", expression=where)
        return
    if entry.history or entry.version_id:
        raise _fail(entry, 400, f"{method} {entry.url}: expected [type]/[id] or [type]?[search parameters]", expression=where)
    if entry.resource_id and entry.query is not None:
        raise _fail(entry, 400, f"{method} {entry.url}: give either [type]/[id] or [type]?[search parameters], not both", expression=where)
    if entry.resource_id:
        if not ID_RE.match(entry.resource_id):
            raise _fail(entry, 400, f"invalid id in {entry.url!r}", expression=where)
        return
    if not entry.query:
        raise _fail(entry, 400, f"{method} {entry.url}: needs [type]/[id] or conditional [type]?[search parameters]", code="required", expression=where)


def parse_entries(bundle: dict[str, Any], base: str) -> list[Entry]:
    entries = []
    for i, raw in enumerate(bundle.get("entry") or []):
        where = f"Bundle.entry[{i}]"
        request = raw.get("request") if isinstance(raw, dict) else None
        if not isinstance(request, dict) or not request.get("method") or not request.get("url"):
            raise _fail(i, 400, "entry.request with method and url is required", code="required", expression=f"{where}.request")
        method = str(request["method"]).upper()
        entry = Entry(
            i,
            method,
            str(request["url"]),
            full_url=raw.get("fullUrl"),
            if_none_exist=request.get("ifNoneExist"),
            if_match=request.get("ifMatch"),
        )
        if method not in _ORDER:
            raise _fail(entry, 422, f"request.method {method} is not one of GET HEAD POST PUT DELETE", code="code-invalid", expression=f"{where}.request.method")
        if method == "PATCH":
            raise _fail(entry, 400, "PATCH is not supported by this server", code="not-supported", expression=f"{where}.request.method")
        _parse_url(entry, base)
        try:
            check_type(entry.resource_type)
        except FhirError as exc:
            raise _fail(entry, exc.status_code, exc.diagnostics, code=exc.code or "not-supported", expression=f"{where}.request.url") from None
        if method in ("POST", "PUT", "DELETE"):
            _check_write_url(entry)
        if method in ("POST", "PUT"):
            resource = raw.get("resource")
            if resource is None:
                raise _fail(entry, 400, f"{method} needs entry.resource", code="required", expression=f"{where}.resource")
            entry.resource = validate_resource(resource, expected_type=entry.resource_type, prefix=f"{where}.resource")
            if method == "PUT" and not entry.conditional:
                if entry.resource.get("id") not in (None, entry.resource_id):
                    raise _fail(entry, 400, f"resource id {entry.resource.get('id')!r} does not match {entry.url}", expression=f"{where}.resource.id")
                entry.resource["id"] = entry.resource_id
        entries.append(entry)
    return entries


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _rewrite(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, mapping) for v in value]
    if isinstance(value, str) and value in mapping:
        return mapping[value]
    return value


def _resource_entry(request: Request, base: str, stored: StoredResource, status: int) -> dict[str, Any]:
    prefer = parse_prefer(request).return_
    entry: dict[str, Any] = {"fullUrl": f"{base}/{stored.resource_type}/{stored.id}"}
    if prefer == "representation" and stored.resource is not None:
        entry["resource"] = stored.resource
    entry["response"] = {
        "status": status_line(status),
        "location": stored.location(base),
        "etag": stored.etag,
        "lastModified": stored.last_updated_instant,
    }
    if prefer == "OperationOutcome":
        entry["response"]["outcome"] = {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "information", "code": "informational", "diagnostics": f"{status_line(status)}: {stored.reference}"}],
        }
    return entry


def _audit_entry(request: Request, entry: Entry) -> Any:
    """Start the AuditEvent record of one entry (fhir_server.audit); None when not audited."""
    trail = getattr(request.state, "audit", None)
    if trail is None:
        return None
    record = trail.begin_entry(entry.method, entry.resource_type, entry.resource_id, entry.version_id, entry.history, entry.query)
    entry.extra["audit"] = record
    return record


def _audit_use(request: Request, entry: Entry | None) -> None:
    trail = getattr(request.state, "audit", None)
    if trail is not None:
        trail.use(entry.extra.get("audit") if entry is not None else None)


def _authorize(request: Request, entry: Entry) -> None:
    if entry.method in _PERMISSION:
        permission = _PERMISSION[entry.method]
    elif entry.resource_id is None and not entry.history:
        permission = "s"
    else:
        permission = "r"
    authorize(request, entry.resource_type, permission)


def execute(request: Request, tx: Transaction, entry: Entry, base: str) -> dict[str, Any]:
    """One entry inside an open transaction -> its response entry (raises on failure)."""
    rtype = entry.resource_type
    if entry.method == "DELETE":
        if entry.resource_id is None:  # a conditional delete that matched nothing (resolve_conditional)
            return {"response": {"status": status_line(204)}}
        tomb = tx.delete(rtype, entry.resource_id, if_match=entry.if_match)
        response: dict[str, Any] = {"status": status_line(204)}
        if tomb is not None:
            response["etag"] = tomb.etag
        return {"response": response}
    if entry.method == "POST":
        if entry.existing is not None:
            return _resource_entry(request, base, entry.existing, 200)
        stored = tx.create(entry.resource, resource_id=entry.assigned_id, if_none_exist=entry.if_none_exist)
        return _resource_entry(request, base, stored, 201 if stored.created else 200)
    if entry.method == "PUT":
        stored = tx.update(rtype, entry.resource_id, entry.resource, if_match=entry.if_match)
        return _resource_entry(request, base, stored, 201 if stored.created else 200)
    # GET / HEAD
    if entry.resource_id is not None and not entry.history:
        subset = subset_from_params(parse_qsl(entry.query or "", keep_blank_values=True))
        stored = tx.vread(rtype, entry.resource_id, entry.version_id) if entry.version_id else tx.read(rtype, entry.resource_id)
        out = _resource_entry(request, base, stored, 200)
        out["resource"] = subset.apply(stored.resource)
        out["response"].pop("location", None)
        return out
    if entry.history:
        page = tx.history(rtype, entry.resource_id)
        bundle = {
            "resourceType": "Bundle",
            "type": "history",
            "total": page.total,
            "entry": [history_entry(base, e) for e in page.entries],
        }
        return {"resource": bundle, "response": {"status": status_line(200)}}
    query = parse_query(request, rtype, parse_qsl(entry.query or "", keep_blank_values=True))
    result = tx.search(query)
    return {"resource": searchset(base, query, result), "response": {"status": status_line(200)}}


def resolve_conditional(tx: Transaction, entry: Entry) -> None:
    """Turn a conditional update / delete into a plain one by resolving its criteria to an id,
    inside `tx` (which holds the criteria lock until it ends, so the match cannot go stale).
    A conditional delete matching nothing keeps resource_id None: a successful no-op."""
    if not entry.conditional or entry.extra.get("resolved"):
        return
    criteria = entry.query or ""
    if entry.method == "DELETE":
        entry.resource_id = tx.conditional_delete_id(entry.resource_type, criteria, if_match=entry.if_match or None)
    else:
        entry.resource_id = tx.conditional_update_id(entry.resource_type, criteria, entry.resource)
        entry.resource = {**(entry.resource or {}), "id": entry.resource_id}
    entry.extra["resolved"] = True


def _check_overlaps(entries: list[Entry]) -> None:
    """R4 trules: a transaction may change each resource once, resolved conditional ids included."""
    touched: dict[tuple[str, str], int] = {}
    for entry in entries:
        if entry.method in ("DELETE", "PUT") and entry.resource_id:
            key = (entry.resource_type, entry.resource_id)
            if key in touched:
                raise _fail(entry, 400, f"{key[0]}/{key[1]} is changed by entry {touched[key]} too; a transaction may touch each resource once")
            touched[key] = entry.index


def _entry_error(entry: Entry, exc: Exception) -> FhirError:
    """Any failure of one entry -> FhirError naming the entry."""
    if isinstance(exc, FhirError):
        if exc.diagnostics.startswith("Bundle.entry["):
            return exc
        return FhirError(exc.status_code, f"{entry.where}: {exc.diagnostics}", code=exc.code, expression=exc.expression or [entry.where])
    if isinstance(exc, StorageError):
        if isinstance(exc, ResourceGone):
            return FhirError(410, f"{entry.where}: {exc.message}", code="deleted", expression=[entry.where])
        base = error_from_storage(exc)
        return FhirError(base.status_code, f"{entry.where}: {exc.message}", code=base.code, expression=[entry.where])
    if isinstance(exc, HTTPException):  # authorization
        return FhirError(exc.status_code, f"{entry.where}: {exc.detail}", code="forbidden" if exc.status_code == 403 else None, expression=[entry.where])
    raise exc


def process_transaction(request: Request, entries: list[Entry], base: str) -> list[dict[str, Any]]:
    for entry in entries:
        try:
            _authorize(request, entry)
        except HTTPException as exc:
            raise _entry_error(entry, exc) from None
    _check_overlaps(entries)  # fail fast on literal ids, before taking the write lock
    results: dict[int, dict[str, Any]] = {}
    ordered = sorted(entries, key=lambda e: (_ORDER[e.method], e.index))
    store = get_store(request)
    current: Entry | None = None
    for entry in entries:
        _audit_entry(request, entry)
    try:
        with store.transaction() as tx:
            for entry in ordered:  # before any write: conditionals see the database as the Bundle found it
                current = entry
                _audit_use(request, entry)
                resolve_conditional(tx, entry)
            current = None
            _check_overlaps(entries)
            mapping: dict[str, str] = {}
            for entry in ordered:
                current = entry
                _audit_use(request, entry)
                if entry.method == "DELETE":
                    results[entry.index] = execute(request, tx, entry, base)
                elif entry.method == "POST":
                    if entry.if_none_exist:
                        tx.lock_criteria(entry.resource_type, entry.if_none_exist)
                        found = tx.find(entry.resource_type, entry.if_none_exist)
                        if len(found) > 1:
                            raise _fail(entry, 412, f"ifNoneExist '{entry.if_none_exist}' matched more than one resource", code="conflict")
                        entry.existing = found[0] if found else None
                    entry.assigned_id = entry.existing.id if entry.existing else new_id()
                    if entry.full_url:
                        mapping[entry.full_url] = f"{entry.resource_type}/{entry.assigned_id}"
                elif entry.method == "PUT" and entry.full_url:
                    mapping[entry.full_url] = f"{entry.resource_type}/{entry.resource_id}"
            for entry in ordered:
                if entry.resource is not None:
                    entry.resource = _rewrite(entry.resource, mapping)
                if entry.query and mapping:
                    for urn, ref in mapping.items():
                        entry.query = entry.query.replace(urn, ref)
            for entry in ordered:
                if entry.method == "DELETE":
                    continue
                current = entry
                _audit_use(request, entry)
                if entry.method == "POST" and entry.existing is None:
                    entry.if_none_exist = None  # already resolved above, inside this transaction
                results[entry.index] = execute(request, tx, entry, base)
            _audit_use(request, None)
    except BaseException as exc:
        trail = getattr(request.state, "audit", None)
        if trail is not None:  # rolled back: no entry happened; the Bundle's own record tells the failure
            trail.discard_entries()
        if current is None or not isinstance(exc, (FhirError, StorageError, HTTPException)):
            raise
        raise _entry_error(current, exc) from None
    return [results[e.index] for e in entries]


def process_batch(request: Request, entries: list[Entry], base: str) -> list[dict[str, Any]]:
    store = get_store(request)
    out = []
    for entry in entries:
        record = _audit_entry(request, entry)
        try:
            _authorize(request, entry)
            with store.transaction() as tx:
                resolve_conditional(tx, entry)
                out.append(execute(request, tx, entry, base))
        except (FhirError, StorageError, HTTPException) as exc:
            err = _entry_error(entry, exc)
            if record is not None:
                record.status = err.status_code
            out.append({"response": {"status": status_line(err.status_code), "outcome": err.outcome()}})
    _audit_use(request, None)
    return out


def _batch_entry_errors(bundle: dict[str, Any], base: str) -> tuple[list[Entry | None], list[dict[str, Any] | None]]:
    """Batch entries parse one by one: a bad entry fails alone."""
    entries: list[Entry | None] = []
    errors: list[dict[str, Any] | None] = []
    for i, raw in enumerate(bundle.get("entry") or []):
        try:
            (entry,) = parse_entries({"entry": [raw]}, base)
            entry.index = i
            entries.append(entry)
            errors.append(None)
        except FhirError as exc:
            fixed = exc.outcome()
            text = exc.diagnostics.replace("Bundle.entry[0]", f"Bundle.entry[{i}]")
            for issue in fixed.get("issue", []):
                issue["diagnostics"] = issue.get("diagnostics", "").replace("Bundle.entry[0]", f"Bundle.entry[{i}]")
                issue["expression"] = [e.replace("Bundle.entry[0]", f"Bundle.entry[{i}]") for e in issue.get("expression", [])]
            entries.append(None)
            errors.append({"response": {"status": status_line(exc.status_code), "outcome": fixed or operation_outcome(exc.status_code, None, text)}})
            errors[-1]["audit"] = raw.get("request", {}).get("method") if isinstance(raw, dict) and isinstance(raw.get("request"), dict) else None
    return entries, errors


def _audit_refused_entries(request: Request, errors: list[dict[str, Any] | None]) -> None:
    """A batch entry refused while parsing is an interaction too: audit it with its status."""
    trail = getattr(request.state, "audit", None)
    for error in errors:
        if error is None:
            continue
        method = error.pop("audit", None)
        if trail is not None:
            record = trail.begin_entry(method if isinstance(method, str) and method.upper() in _ORDER else "POST", None)
            record.status = int(error["response"]["status"].split()[0])
    if trail is not None:
        trail.use(None)


async def transaction_or_batch(request: Request) -> Response:
    raw = await read_body(request, max_bytes=max_body(request))
    bundle = parse_json_body(raw, body_media_type(request), shape_limits(request))
    if bundle.get("resourceType") != "Bundle":
        raise FhirError(400, f"POST [base] takes a Bundle, not {bundle.get('resourceType')!r}", code="invalid", expression=["resourceType"])
    issues = required_code_issues({k: v for k, v in bundle.items() if k in ("resourceType", "type")}, "Bundle")
    if issues:
        raise FhirError(422, issues[0][1], code="code-invalid", expression=[issues[0][2]])
    btype = bundle.get("type")
    trail = getattr(request.state, "audit", None)
    if trail is not None and btype == "batch":
        trail.first.subtype = "batch"
    if btype not in ("transaction", "batch"):
        raise FhirError(400, f"Bundle.type must be transaction or batch, not {btype!r}", code="invalid", expression=["Bundle.type"])
    if not isinstance(bundle.get("entry", []), list):
        raise FhirError(400, "Bundle.entry must be a list", code="structure", expression=["Bundle.entry"])
    base = base_url(request)
    if btype == "transaction":
        entries = await run_in_threadpool(parse_entries, bundle, base)
        responses = await run_in_threadpool(process_transaction, request, entries, base)
        rtype = "transaction-response"
    else:
        entries, errors = await run_in_threadpool(_batch_entry_errors, bundle, base)
        _audit_refused_entries(request, errors)
        good = [e for e in entries if e is not None]
        done = iter(await run_in_threadpool(process_batch, request, good, base))
        responses = [err if err is not None else next(done) for err in errors]
        rtype = "batch-response"
    body = new_bundle(rtype)
    if responses:
        body["entry"] = responses
    return fhir_json_response(request, body)


__all__ = ["transaction_or_batch", "process_transaction", "process_batch", "parse_entries", "ResourceGone"]
