"""AuditTrail: the audit records of one request, and the storage hooks that fill and write them.

A trail is attached to the request (request.state.audit) by the middleware; `get_store(request)`
hands routes the store bound to it (Repository.with_hooks), so:
- every resource read or written in a transaction becomes an entity of the current record, with
  the patient it belongs to;
- a WRITE transaction appends the records not yet written just before it commits: a write and
  its AuditEvent commit together or not at all;
- whatever is still unwritten when the response starts (reads, refusals, failed writes whose
  transaction rolled back) is written by the middleware in its own transaction, with the
  response's status as outcome.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from fhir_server.storage import Repository, StoredResource, Transaction
from fhir_server.storage.params import READ_ONLY_TYPES
from fhir_server.storage.repository import SearchResult
from fhir_server.storage.timeutil import format_instant, utcnow

from .event import build_event, patient_of
from .record import AuditRecord, entry_record


class AuditTrail:
    def __init__(self, first: AuditRecord, *, client_address: str | None, server: str, state: dict[str, Any] | None = None):
        self.records: list[AuditRecord] = [first]
        self.current = first
        self.client_address = client_address
        self.server = server
        self._state = state if state is not None else {}  # the request's state: auth puts the principal there
        self._lock = threading.Lock()  # routes hand work to threads; one request is still sequential

    # ---- what routes say ----------------------------------------------------------------
    @property
    def first(self) -> AuditRecord:
        return self.records[0]

    def begin_entry(self, method: str, resource_type: str | None, resource_id: str | None = None,
                    version_id: str | None = None, history: bool = False, query: str | None = None) -> AuditRecord:
        """A Bundle entry: it gets its own AuditEvent; the Bundle's own record is then written
        only if no entry record survives (a rolled-back transaction)."""
        record = entry_record(method, resource_type, resource_id, version_id, history, query)
        with self._lock:
            self.records.append(record)
        self.current = record
        return record

    def for_background(self, operation: str) -> "AuditTrail":
        """A trail for work this request started and the server finishes later (the results of an
        asynchronous $analyze): same client and address, its own record, written with that work."""
        return AuditTrail(AuditRecord("operation", operation=operation), client_address=self.client_address,
                          server=self.server, state=self._state)

    def use(self, record: AuditRecord | None) -> None:
        self.current = record or self.first

    def discard_entries(self) -> None:
        """A transaction Bundle rolled back: none of its entries happened."""
        with self._lock:
            self.records = [r for r in self.records if not r.entry or r.written]
            self.current = self.first

    def set_query(self, query: str) -> None:
        self.current.query = query.encode("utf-8")

    @property
    def client_id(self) -> str | None:
        """The authenticated client (request.state.principal.client_id); None = anonymous."""
        client_id = getattr(self._state.get("principal"), "client_id", None)
        return client_id if isinstance(client_id, str) and client_id else None

    # ---- TransactionHooks -----------------------------------------------------------------
    def touched(self, stored: StoredResource, previous: dict[str, Any] | None) -> None:
        self.current.touch(stored.reference, f"{stored.reference}/_history/{stored.version_id}")
        if stored.resource_type in READ_ONLY_TYPES:  # reading the audit log names no patient
            return
        patient = patient_of(stored.resource or previous, stored.reference)
        if patient:
            self.current.add_patient(patient)

    def searched(self, result: SearchResult) -> None:
        """A search names the patients whose data it returned (who saw whose data)."""
        for stored in [*result.matches, *result.included]:
            if stored.resource_type in READ_ONLY_TYPES:
                continue
            patient = patient_of(stored.resource, stored.reference)
            if patient:
                self.current.add_patient(patient)

    def before_commit(self, tx: Transaction) -> None:
        for record in self._unwritten():
            tx.append(self.event(record))
            record.pending = True

    def after_commit(self) -> None:
        for record in self.records:
            if record.pending:
                record.pending, record.written = False, True

    def after_rollback(self) -> None:
        for record in self.records:
            record.pending = False

    # ---- writing ------------------------------------------------------------------------
    def _unwritten(self) -> Iterator[AuditRecord]:
        with self._lock:
            records = list(self.records)
        has_entries = any(r.entry for r in records)
        for record in records:
            if record.written or record.pending or (has_entries and record is records[0]):
                continue
            yield record

    def event(self, record: AuditRecord) -> dict[str, Any]:
        return build_event(record, recorded=format_instant(utcnow()), client_id=self.client_id,
                           address=self.client_address, server=self.server)

    def finish(self, store: Repository, status: int) -> int:
        """Write every record still unwritten, with `status` where none failed on its own, in
        ONE transaction; returns how many were written."""
        pending = list(self._unwritten())
        if not pending:
            return 0
        for record in pending:
            if record.status is None:
                record.status = status
        with store.transaction() as tx:
            for record in pending:
                tx.append(self.event(record))
        for record in pending:
            record.written = True
        return len(pending)


def audit_context(request: Any) -> dict[str, Any] | None:
    """Who made this request, as JSON: a job queued now is audited under the same client and
    address when it finishes, on whichever replica runs it."""
    trail: AuditTrail | None = getattr(request.state, "audit", None)
    if trail is None:
        return None
    return {"client_id": trail.client_id, "address": trail.client_address, "server": trail.server}


def background_trail(context: dict[str, Any] | None, operation: str) -> AuditTrail:
    """The trail of work a request started and a job finishes later (see audit_context)."""
    from types import SimpleNamespace

    context = context or {}
    principal = SimpleNamespace(client_id=context.get("client_id"))
    return AuditTrail(AuditRecord("operation", operation=operation), client_address=context.get("address"),
                      server=context.get("server") or "cxr-fhir", state={"principal": principal})
