"""What one audited interaction did: the AuditRecord, and how a request's method and path map to
the FHIR restful interaction it asks for (the record a refusal is written with, since a refused
request never reaches the code that would say more)."""

from __future__ import annotations

from dataclasses import dataclass, field

# restful-interaction code -> AuditEvent.action (BALP: searches and operations are E "Execute")
ACTIONS = {
    "read": "R", "vread": "R", "history-instance": "R", "history-type": "R", "history-system": "R",
    "search-type": "E", "search-system": "E", "create": "C", "update": "U", "patch": "U", "delete": "D",
    "transaction": "E", "batch": "E", "operation": "E",
}

_BY_METHOD = {"GET": "read", "HEAD": "read", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}
# paths under /fhir that hold no patient data and are not audited (BALP audits data access)
_UNAUDITED = {"metadata"}
LEGACY_PREDICT = "/api/v1/predict"


@dataclass
class AuditRecord:
    """One AuditEvent to be written. `status` None = not failed (yet); `written` once committed."""

    subtype: str
    target: str | None = None  # "Type/id" the URL names (also for refusals: what was asked for)
    query: bytes | None = None  # search parameters, stored base64 in entity.query
    operation: str | None = None  # "$analyze", "predict" ...
    entities: dict[str, str] = field(default_factory=dict)  # "Type/id" -> "Type/id/_history/v"
    patients: list[str] = field(default_factory=list)  # "Patient/id", in order of appearance
    status: int | None = None
    written: bool = False
    pending: bool = False  # appended to a write transaction that has not committed yet
    entry: bool = False  # one entry of a batch/transaction Bundle

    @property
    def action(self) -> str:
        return ACTIONS.get(self.subtype, "E")

    def add_patient(self, reference: str) -> None:
        if reference not in self.patients:
            self.patients.append(reference)

    def touch(self, reference: str, versioned: str | None = None) -> None:
        self.entities[reference] = versioned or self.entities.get(reference) or reference


def _is_type(part: str) -> bool:
    return part[:1].isupper() and part.isalnum()


def classify(method: str, path: str, query_string: bytes = b"") -> AuditRecord | None:
    """The record of a request to `path` (None: not audited). FHIR paths start with /fhir."""
    method = method.upper()
    if method == "OPTIONS":
        return None
    if path == LEGACY_PREDICT and method == "POST":
        return AuditRecord("operation", operation="predict (legacy /api/v1)")
    if not (path == "/fhir" or path.startswith("/fhir/")):
        return None
    parts = [p for p in path[len("/fhir"):].split("/") if p]
    query = query_string or None
    if not parts:
        return AuditRecord("search-system" if method in ("GET", "HEAD") else "transaction", query=query if method in ("GET", "HEAD") else None)
    head = parts[0]
    if head in _UNAUDITED and len(parts) == 1:
        return None
    if head == "_history":
        return AuditRecord("history-system")
    if head == "_async":  # poll / cancel an asynchronous $analyze: its Task has the job's id
        target = f"Task/{parts[1]}" if len(parts) > 1 else None
        return AuditRecord("delete" if method == "DELETE" else "read", target=target)
    if head.startswith("$"):
        return AuditRecord("operation", operation=head)
    if not _is_type(head):
        return AuditRecord(_BY_METHOD.get(method, "read"))
    rtype = head
    if len(parts) == 1:
        if method in ("GET", "HEAD"):
            return AuditRecord("search-type", target=rtype, query=query)
        return AuditRecord(_BY_METHOD.get(method, "create"), target=rtype)
    second = parts[1]
    if second == "_search":
        return AuditRecord("search-type", target=rtype, query=query)
    if second == "_history" and len(parts) == 2:
        return AuditRecord("history-type", target=rtype)
    if second.startswith("$"):
        return AuditRecord("operation", target=rtype, operation=second)
    target = f"{rtype}/{second}"
    if len(parts) == 2:
        return AuditRecord(_BY_METHOD.get(method, "read"), target=target)
    if parts[2] == "_history":
        return AuditRecord("vread" if len(parts) > 3 else "history-instance", target=target)
    if parts[2].startswith("$"):
        return AuditRecord("operation", target=target, operation=parts[2])
    return AuditRecord(_BY_METHOD.get(method, "read"), target=target)


def entry_record(method: str, resource_type: str | None, resource_id: str | None, version_id: str | None,
                 history: bool, query: str | None) -> AuditRecord:
    """The record of one Bundle entry (its request method and parsed url)."""
    method = method.upper()
    target = f"{resource_type}/{resource_id}" if resource_type and resource_id else resource_type
    if method in ("GET", "HEAD"):
        if history:
            subtype = "history-instance" if resource_id else "history-type"
        elif resource_id is None:
            return AuditRecord("search-type", target=resource_type, query=(query or "").encode("utf-8"), entry=True)
        else:
            subtype = "vread" if version_id else "read"
    else:
        subtype = _BY_METHOD.get(method, "operation")
    return AuditRecord(subtype, target=target, entry=True)
