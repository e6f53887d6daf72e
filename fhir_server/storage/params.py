"""The search parameters the server supports, per resource type: one table, used by indexing,
query parsing and the CapabilityStatement.

Paths are dotted element paths into the resource JSON (lists are walked transparently); a
parameter may have several (choice types such as effectiveDateTime | effectivePeriod).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_TYPES: tuple[str, ...] = (
    "Patient",
    "Media",
    "ImagingStudy",
    "Endpoint",
    "DiagnosticReport",
    "Observation",
    "Device",
    "Provenance",
    "Binary",
    "Task",
    "OperationDefinition",
    "AuditEvent",
)

# Types the REST API may read and search but never write: AuditEvents are appended by the server
# itself (fhir_server.audit, Transaction.append) and are immutable (issue 10).
READ_ONLY_TYPES: frozenset[str] = frozenset({"AuditEvent"})

SP_BASE = "http://hl7.org/fhir/SearchParameter/"


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: str  # token | reference | date | string | uri | number
    paths: tuple[str, ...]
    definition: str
    documentation: str = ""
    # reference parameters: which target types are indexed (empty = any)
    targets: tuple[str, ...] = field(default_factory=tuple)


def _sp(name: str, type_: str, paths: str, definition: str, doc: str = "", targets: tuple[str, ...] = ()) -> SearchParam:
    return SearchParam(name, type_, tuple(p.strip() for p in paths.split("|")), SP_BASE + definition, doc, targets)


# Parameters that every type has; `_id` and `_lastUpdated` are answered from the version table.
COMMON: dict[str, SearchParam] = {
    "_id": _sp("_id", "token", "id", "Resource-id", "Logical id of the resource"),
    "_lastUpdated": _sp("_lastUpdated", "date", "meta.lastUpdated", "Resource-lastUpdated", "When the resource last changed"),
}

_PARAMS: dict[str, list[SearchParam]] = {
    "DiagnosticReport": [
        _sp("subject", "reference", "subject", "DiagnosticReport-subject", "The subject of the report"),
        _sp("patient", "reference", "subject", "clinical-patient", "The subject of the report if a patient", ("Patient",)),
        _sp("status", "token", "status", "DiagnosticReport-status", "The status of the report"),
        _sp("code", "token", "code", "clinical-code", "The code for the report"),
        _sp("category", "token", "category", "DiagnosticReport-category", "Which diagnostic discipline/department created the report"),
        _sp("date", "date", "effectiveDateTime|effectivePeriod", "clinical-date", "The clinically relevant time of the report"),
        _sp("issued", "date", "issued", "DiagnosticReport-issued", "When the report was issued"),
        _sp("identifier", "token", "identifier", "clinical-identifier", "An identifier for the report"),
        _sp("result", "reference", "result", "DiagnosticReport-result", "Link to an atomic result (Observation)"),
        _sp("media", "reference", "media.link", "DiagnosticReport-media", "A reference to the image source"),
        _sp("based-on", "reference", "basedOn", "DiagnosticReport-based-on", "Reference to the service request"),
        # not in R4 core (R5 defines it): how a PACS-driven EHR finds the AI report of a study (issue 12)
        _sp("study", "reference", "imagingStudy", "DiagnosticReport-study", "The ImagingStudy the report is about", ("ImagingStudy",)),
        _sp("conclusion", "token", "conclusionCode", "DiagnosticReport-conclusion", "A coded conclusion on the report"),
    ],
    "Observation": [
        _sp("subject", "reference", "subject", "Observation-subject", "The subject of the observation"),
        _sp("patient", "reference", "subject", "clinical-patient", "The subject if a patient", ("Patient",)),
        _sp("status", "token", "status", "Observation-status", "The status of the observation"),
        _sp("code", "token", "code", "clinical-code", "The code of the observation"),
        _sp("category", "token", "category", "Observation-category", "The classification of the observation"),
        _sp("date", "date", "effectiveDateTime|effectivePeriod|effectiveInstant", "clinical-date", "Obtained date/time"),
        _sp("identifier", "token", "identifier", "clinical-identifier", "The unique id for a particular observation"),
        _sp("derived-from", "reference", "derivedFrom", "Observation-derived-from", "Related measurements the observation is made from"),
        _sp("device", "reference", "device", "Observation-device", "The Device that generated the observation data"),
        _sp("interpretation", "token", "interpretation", "Observation-interpretation", "High, low, normal, positive, negative..."),
        _sp("value-quantity", "number", "valueQuantity.value", "Observation-value-quantity", "The value of the observation (number; prefixes allowed)"),
    ],
    "ImagingStudy": [
        _sp("patient", "reference", "subject", "clinical-patient", "Who the study is about", ("Patient",)),
        _sp("subject", "reference", "subject", "ImagingStudy-subject", "Who the study is about"),
        _sp("identifier", "token", "identifier", "clinical-identifier", "Identifiers for the study (e.g. urn:dicom:uid|urn:oid:<StudyInstanceUID>)"),
        _sp("started", "date", "started", "ImagingStudy-started", "When the study was started"),
        _sp("modality", "token", "series.modality|modality", "ImagingStudy-modality", "The modality of the series"),
        _sp("series", "token", "series.uid", "ImagingStudy-series", "DICOM Series Instance UID for a series"),
        _sp("instance", "token", "series.instance.uid", "ImagingStudy-instance", "SOP Instance UID for an instance"),
        _sp("endpoint", "reference", "endpoint|series.endpoint", "ImagingStudy-endpoint", "The endpoint for the study or series"),
        _sp("status", "token", "status", "ImagingStudy-status", "The status of the study"),
    ],
    "Media": [
        _sp("patient", "reference", "subject", "Media-patient", "Who/What this Media is a record of", ("Patient",)),
        _sp("subject", "reference", "subject", "Media-subject", "Who/What this Media is a record of"),
        _sp("created", "date", "createdDateTime|createdPeriod", "Media-created", "When Media was collected"),
        _sp("modality", "token", "modality", "Media-modality", "The type of acquisition equipment/process"),
        _sp("view", "token", "view", "Media-view", "Imaging view, e.g. Lateral or Antero-posterior"),
        _sp("identifier", "token", "identifier", "Media-identifier", "Identifier(s) for the image"),
        _sp("status", "token", "status", "Media-status", "The status of the Media"),
        _sp("device", "reference", "device", "Media-device", "Observing Device"),
        _sp("based-on", "reference", "basedOn", "Media-based-on", "Procedure that caused this media to be created"),
    ],
    "Patient": [
        _sp("identifier", "token", "identifier", "Patient-identifier", "A patient identifier"),
        _sp("name", "string", "name", "Patient-name", "A portion of either family or given name"),
        _sp("family", "string", "name.family", "individual-family", "A portion of the family name"),
        _sp("given", "string", "name.given", "individual-given", "A portion of the given name"),
        _sp("birthdate", "date", "birthDate", "individual-birthdate", "The patient's date of birth"),
        _sp("gender", "token", "gender", "individual-gender", "Gender of the patient"),
        _sp("active", "token", "active", "Patient-active", "Whether the patient record is active"),
    ],
    "Task": [
        _sp("status", "token", "status", "Task-status", "Search by task status"),
        _sp("focus", "reference", "focus", "Task-focus", "Search by task focus"),
        _sp("owner", "reference", "owner", "Task-owner", "Search by task owner"),
        _sp("code", "token", "code", "Task-code", "Search by task code"),
        _sp("identifier", "token", "identifier", "Task-identifier", "Search for a task instance by its business identifier"),
        _sp("intent", "token", "intent", "Task-intent", "Search by task intent"),
        _sp("subject", "reference", "for", "Task-subject", "Search by subject"),
        _sp("patient", "reference", "for", "Task-patient", "Search by patient", ("Patient",)),
        _sp("authored-on", "date", "authoredOn", "Task-authored-on", "Search by creation date"),
        _sp("modified", "date", "lastModified", "Task-modified", "Search by last modification date"),
    ],
    "Provenance": [
        _sp("target", "reference", "target", "Provenance-target", "Target Reference(s) (usually version specific)"),
        _sp("agent", "reference", "agent.who", "Provenance-agent", "Who participated"),
        _sp("entity", "reference", "entity.what", "Provenance-entity", "Identity of entity"),
        _sp("recorded", "date", "recorded", "Provenance-recorded", "When the activity was recorded / updated"),
        _sp("patient", "reference", "target", "Provenance-patient", "Target Reference(s) that are patients", ("Patient",)),
    ],
    "Endpoint": [
        _sp("identifier", "token", "identifier", "Endpoint-identifier", "Identifies this endpoint across multiple systems"),
        _sp("status", "token", "status", "Endpoint-status", "The current status of the Endpoint"),
        _sp("connection-type", "token", "connectionType", "Endpoint-connection-type", "Protocol/Profile/Standard to be used with this endpoint connection"),
        _sp("name", "string", "name", "Endpoint-name", "A name that this endpoint can be identified by"),
    ],
    "Device": [
        _sp("identifier", "token", "identifier", "Device-identifier", "Instance id from manufacturer, owner, and others"),
        _sp("device-name", "string", "deviceName.name|type.text|type.coding.display", "Device-device-name", "A server defined search that may match any of the string fields in Device.deviceName or Device.type"),
        _sp("type", "token", "type", "Device-type", "The type of the device"),
        _sp("status", "token", "status", "Device-status", "active | inactive | entered-in-error | unknown"),
        _sp("model", "string", "modelNumber", "Device-model", "The model of the device"),
    ],
    "Binary": [],
    "OperationDefinition": [
        _sp("url", "uri", "url", "conformance-url", "The uri that identifies the operation definition"),
        _sp("name", "string", "name", "conformance-name", "Computationally friendly name of the operation definition"),
        _sp("code", "token", "code", "OperationDefinition-code", "Name used to invoke the operation"),
        _sp("status", "token", "status", "conformance-status", "The current status of the operation definition"),
    ],
}

# Every index row is written on every request (each request appends an AuditEvent), so only the
# parameters an audit review needs are indexed: who (agent, address), when (date), what (entity,
# patient) and how (type, subtype, action, outcome). ~10 rows per AuditEvent.
_PARAMS["AuditEvent"] = [
    _sp("date", "date", "recorded", "AuditEvent-date", "Time when the event was recorded"),
    # agent.who carries the OAuth client id as an Identifier (clients are not FHIR resources), so
    # `agent` is a token here (agent=client-id or agent=urn:cxr-fhir:client-id|client-id).
    _sp("agent", "token", "agent.who.identifier", "AuditEvent-agent", "The client id of the requesting agent (token on agent.who.identifier, not a reference)"),
    _sp("address", "string", "agent.network.address", "AuditEvent-address", "Identifier for the network access point of the user device"),
    _sp("entity", "reference", "entity.what", "AuditEvent-entity", "Specific instance of resource (the resource touched)"),
    _sp("patient", "reference", "entity.what", "AuditEvent-patient", "The patient whose data was touched", ("Patient",)),
    _sp("type", "token", "type", "AuditEvent-type", "Type/identifier of event (rest)"),
    _sp("subtype", "token", "subtype", "AuditEvent-subtype", "More specific type/id for the event (the FHIR interaction)"),
    _sp("action", "token", "action", "AuditEvent-action", "Type of action performed during the event (C R U D E)"),
    _sp("outcome", "token", "outcome", "AuditEvent-outcome", "Whether the event succeeded or failed (0 4 8 12)"),
    _sp("source", "reference", "source.observer", "AuditEvent-source", "The identity of source detecting the event"),
]

SEARCH_PARAMS: dict[str, dict[str, SearchParam]] = {
    rtype: {p.name: p for p in params} for rtype, params in _PARAMS.items()
}


def search_params(resource_type: str) -> dict[str, SearchParam]:
    """All parameters of a type, including `_id` and `_lastUpdated`."""
    return {**COMMON, **SEARCH_PARAMS.get(resource_type, {})}


def reference_params(resource_type: str) -> dict[str, SearchParam]:
    """The reference parameters of a type (what `_include` / `_revinclude` may follow)."""
    return {n: p for n, p in SEARCH_PARAMS.get(resource_type, {}).items() if p.type == "reference"}
