"""AuditRecord -> an R4 AuditEvent shaped after IHE Basic Audit Log Patterns (BALP): RESTful
activity (type rest, subtype = the restful-interaction), the client as requesting agent (its
OAuth client id and network address), this server as the second agent, source observer and site,
the resources touched and the patient each belongs to as entities, a search's parameters as the
base64 `entity.query` (never in a log line)."""

from __future__ import annotations

import base64
from typing import Any

from .record import AuditRecord

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"}
INTERACTION = "http://hl7.org/fhir/restful-interaction"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
NETWORK_TYPE_IP = "2"  # audit-event-network-type: IP Address
CLIENT_ID_SYSTEM = "urn:cxr-fhir:oauth-client-id"
ANONYMOUS = "anonymous"
SERVER_NAME = "CXR-FHIR"

_OUTCOME_DISPLAY = {"0": "Success", "4": "Minor failure", "8": "Serious failure", "12": "Major failure"}


def outcome_code(status: int | None) -> str:
    """HTTP status -> AuditEvent.outcome: 0 success, 4 refused/client error, 8 server error
    (12, major failure, is left to events that leave the server unusable)."""
    if status is None or status < 400:
        return "0"
    return "4" if status < 500 else "8"


def patient_of(resource: dict[str, Any] | None, reference: str) -> str | None:
    """The Patient a resource belongs to: the Patient itself, else subject | patient | for."""
    if reference.startswith("Patient/"):
        return reference
    if not resource:
        return None
    for key in ("subject", "patient", "for"):
        value = resource.get(key)
        ref = value.get("reference") if isinstance(value, dict) else None
        if isinstance(ref, str):
            parts = ref.split("/")
            if len(parts) >= 2 and "Patient" in parts[:-1]:
                index = len(parts) - 1 - parts[::-1].index("Patient")
                if index + 1 < len(parts):
                    return f"Patient/{parts[index + 1]}"
    return None


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def build_event(record: AuditRecord, *, recorded: str, client_id: str | None, address: str | None, server: str) -> dict[str, Any]:
    """The AuditEvent JSON of `record`. `server`: this server's base URL (observer and site)."""
    status = record.status
    outcome = outcome_code(status)
    client = client_id or ANONYMOUS
    requestor: dict[str, Any] = {
        "type": {"coding": [_coding(DCM, "110153", "Source Role ID")]},
        "who": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": client}, "display": client},
        "altId": client,
        "name": client,
        "requestor": True,
    }
    if address:
        requestor["network"] = {"address": address, "type": NETWORK_TYPE_IP}
    observer = {"identifier": {"system": "urn:ietf:rfc:3986", "value": server}, "display": SERVER_NAME}
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": EVENT_TYPE,
        "subtype": [_coding(INTERACTION, record.subtype, record.subtype)],
        "action": record.action,
        "recorded": recorded,
        "outcome": outcome,
    }
    if outcome != "0":
        event["outcomeDesc"] = f"HTTP {status}: {_OUTCOME_DISPLAY[outcome].lower()}"
    event["agent"] = [
        requestor,
        {
            "type": {"coding": [_coding(DCM, "110152", "Destination Role ID")]},
            "who": observer,
            "requestor": False,
            "network": {"address": server, "type": "5"},  # 5 = URI
        },
    ]
    event["source"] = {
        "site": server,
        "observer": observer,
        "type": [_coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")],
    }
    entities: list[dict[str, Any]] = []
    if record.query is not None:
        query: dict[str, Any] = {
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "24", "Query"),
        }
        if record.query:  # a search without parameters has none: FHIR forbids an empty base64Binary
            query["query"] = base64.b64encode(record.query).decode("ascii")
        if record.target:
            query["description"] = f"search of {record.target}"
        entities.append(query)
    touched = dict(record.entities)
    if record.target and "/" in record.target and record.target not in touched and not record.entities:
        touched[record.target] = record.target  # refused before anything was read: what was asked for
    for versioned in touched.values():
        entity: dict[str, Any] = {
            "what": {"reference": versioned},
            "type": _coding(ENTITY_TYPE, "2", "System Object"),
            "role": _coding(OBJECT_ROLE, "4", "Domain Resource"),
        }
        if record.operation:
            entity["detail"] = [{"type": "operation", "valueString": record.operation}]
        entities.append(entity)
    if record.operation and not touched:
        entities.append({"type": _coding(ENTITY_TYPE, "2", "System Object"), "detail": [{"type": "operation", "valueString": record.operation}]})
    patients = list(record.patients)
    if record.target and record.target.startswith("Patient/") and record.target not in patients:
        patients.insert(0, record.target.split("/_history")[0])
    for patient in patients:
        entities.append({
            "what": {"reference": patient},
            "type": _coding(ENTITY_TYPE, "1", "Person"),
            "role": _coding(OBJECT_ROLE, "1", "Patient"),
        })
    if entities:
        event["entity"] = entities
    return event
