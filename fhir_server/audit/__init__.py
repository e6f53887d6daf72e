"""Audit trail (issue 10): an AuditEvent, shaped after IHE BALP, for every FHIR interaction and
legacy prediction, stored with the FHIR resources and searchable at GET /fhir/AuditEvent.

    AuditMiddleware   attaches an AuditTrail to every audited request (request.state.audit) and
                      writes what is still unwritten when the response starts (reads, refusals)
    AuditTrail        the request's records; also the storage TransactionHooks, so a write and
                      its AuditEvent commit in the same database transaction
    record / event    interaction classification and the AuditEvent JSON
    routes            405 for every write to AuditEvent

Reads of AuditEvents are audited too (BALP does; who reviewed the log is itself security
relevant). That cannot recurse: audit records are appended by the server, never through a
request, and an AuditEvent read names no patient.
"""

from .record import AuditRecord, classify
from .trail import AuditTrail, audit_context, background_trail

__all__ = ["AuditRecord", "AuditTrail", "audit_context", "background_trail", "classify"]
