"""Versioned FHIR resource storage (SQLite embedded default, PostgreSQL in production).

API (everything the REST layer and `$analyze` need):

    from fhir_server.storage import Repository, new_id

    repo = Repository.from_url(settings.sqlalchemy_url)   # creates tables; app.state.store = repo
    repo.dispose()                                          # on shutdown

    # Several writes in ONE database transaction: all commit on normal exit of the block, an
    # exception anywhere inside rolls every one of them back (nothing half-written) and propagates.
    with repo.transaction() as tx:
        device = tx.create({"resourceType": "Device", ...})                     # -> StoredResource
        report_id = new_id()                                                    # pre-assign ids to
        obs = tx.create({"resourceType": "Observation", ...}, resource_id=new_id())  # cross-link
        rep = tx.create({... "result": [{"reference": obs.reference}]}, resource_id=report_id)
        tx.update("DiagnosticReport", report_id, {...}, if_match='W/"1"')      # new version
        tx.delete("Media", "abc")                                               # tombstone / None
        tx.read("ImagingStudy", "x"); tx.read_or_none(...); tx.vread(t, id, 2)
        tx.find("ImagingStudy", "identifier=urn:dicom:uid|urn:oid:1.2.3")       # list (max 2)
        tx.create(study, if_none_exist="identifier=urn:dicom:uid|urn:oid:1.2.3") # conditional
                                       # (race-free: concurrent identical conditions serialise)
        tx.conditional_update("ImagingStudy", "identifier=...", study, if_match=None)  # 0 -> create,
        tx.conditional_delete("Media", "identifier=...")        # 1 -> update/delete, more -> 412
        tx.match_one("Media", "identifier=...")                  # the single match or None (locks)
        tx.search_params("Observation", [("patient", "Patient/1"), ("code", "sys|c")])
        tx.history("DiagnosticReport", report_id)
        tx.append({"resourceType": "AuditEvent", ...})   # server-written, immutable: 2 inserts

    `repo.with_hooks(hooks)`: the same store whose transactions report what they read, searched
    and wrote to `hooks` (repository.TransactionHooks) and let it append records just before a
    write transaction commits (fhir_server.audit: a write and its AuditEvent commit together).
    READ_ONLY_TYPES (AuditEvent) refuse create/update/delete with ReadOnlyType (405).

    `repo.transaction(write=False)`: a read-only transaction (on SQLite it does not take the
    write lock; a write transaction takes it at BEGIN, so keep slow work such as inference
    OUTSIDE write transactions).

    The same create/update/delete/read/vread/history/search/search_params exist on `repo`
    itself, each in its own transaction. Resources go in as JSON dicts or fhir.resources
    models (dumped with model_dump(mode="json")); they come out as dicts in StoredResource:

    StoredResource: resource_type, id, version_id (int), last_updated (naive UTC datetime),
        deleted, method ("create"|"update"|"delete"), resource (dict with id + meta.versionId +
        meta.lastUpdated filled; None for a deletion), created (bool: this call created it);
        .etag 'W/"2"', .version "2", .reference "Type/id", .last_modified (HTTP date),
        .last_updated_instant (FHIR instant), .location(base) -> base/Type/id/_history/vid

    Search: `parse_search(type, items, strict=...) -> SearchQuery` then `tx.search(query) ->
    SearchResult(total, matches, included)`; history -> HistoryPage(total, entries).

Errors (fhir_server.storage.errors; each has .http_status, .issue_code, .message):
    UnsupportedResourceType 404, InvalidResource 400, ResourceNotFound 404, ResourceGone 410,
    ResourceExists 409, VersionConflict 409 (concurrent write), PreconditionFailed 412
    (If-Match mismatch, conditional create/update/delete with >1 match), InvalidSearch 400
    (also conditional criteria that are empty, unknown or only shape the result),
    StorageBusy 503 (SQLite still locked after the 30 s busy timeout).

Storage does not validate resource content: validate at the edge (fhir_server.fhir.validation).
Re-analysis should write NEW resources or new versions (tx.update), never edit rows in place.
"""

from .errors import (
    InvalidResource,
    InvalidSearch,
    PreconditionFailed,
    ResourceExists,
    ResourceGone,
    ResourceNotFound,
    StorageBusy,
    StorageError,
    UnsupportedResourceType,
    VersionConflict,
)
from .params import SEARCH_PARAMS, SUPPORTED_TYPES, SearchParam, search_params
from .query import SearchQuery, parse_search
from .repository import HistoryPage, Repository, SearchResult, StoredResource, Transaction, new_id, parse_etag

__all__ = [
    "HistoryPage",
    "InvalidResource",
    "InvalidSearch",
    "PreconditionFailed",
    "Repository",
    "ResourceExists",
    "ResourceGone",
    "ResourceNotFound",
    "SEARCH_PARAMS",
    "SUPPORTED_TYPES",
    "SearchParam",
    "SearchQuery",
    "SearchResult",
    "StorageBusy",
    "StorageError",
    "StoredResource",
    "Transaction",
    "UnsupportedResourceType",
    "VersionConflict",
    "new_id",
    "parse_etag",
    "parse_search",
    "search_params",
]
