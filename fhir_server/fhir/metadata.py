"""GET [base]/metadata (CapabilityStatement) and GET /.well-known/smart-configuration."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from fhir_server.storage import SUPPORTED_TYPES
from fhir_server.storage.params import COMMON, READ_ONLY_TYPES, SEARCH_PARAMS
from fhir_server.storage.reference_targets import search_includes, search_rev_includes

from fhir_server.auth.token_endpoint import token_url

from .common import base_url
from .negotiation import fhir_json_response

router = APIRouter()
smart_router = APIRouter()

FHIR_VERSION = "4.0.1"
OPERATION_TYPES = ("Media", "ImagingStudy")  # $analyze, published as OperationDefinition/<Type>-analyze
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
INTERACTIONS = ("read", "vread", "update", "delete", "history-instance", "history-type", "create", "search-type")
# R4 has no SearchParameter resources for the result parameters, so they can only be told in prose
RESULT_PARAMETERS = (
    "Search, read, vread and history honour _summary (true, text, data, false; count on search and history) "
    "and _elements (top-level names; _include'd resources stay whole); reduced resources carry the "
    "v3-ObservationValue SUBSETTED tag. _summary other than false/count cannot be combined with _elements (400)."
)


# R4 CapabilityStatement has no element for chaining (searchParam.chain is R5): say it in prose
CHAINING = (
    " Reference search parameters can be chained one level deep (R4 search.html#chaining): "
    "ref.param=value or ref:Type.param=value, e.g. DiagnosticReport?patient.identifier=urn:mrn|123; "
    "without :Type every stored target type defining the parameter is searched."
)


def operation_definition_url(base: str, resource_type: str) -> str:
    """The canonical of the $analyze OperationDefinition of a type: the `url` the operations
    module publishes (one source of truth), else [base]/OperationDefinition/<Type>-analyze."""
    try:
        from .operations import OPERATION_DEFINITIONS
    except ImportError:
        OPERATION_DEFINITIONS = {}
    definition = OPERATION_DEFINITIONS.get(f"{resource_type}-analyze")
    if definition and definition.get("url"):
        return definition["url"]
    return f"{base}/OperationDefinition/{resource_type}-analyze"


def _search_params(rtype: str) -> list[dict[str, Any]]:
    params = list(COMMON.values()) + list(SEARCH_PARAMS.get(rtype, {}).values())
    out = []
    for p in params:
        entry = {"name": p.name, "definition": p.definition, "type": p.type}
        if p.documentation:
            entry["documentation"] = p.documentation
        out.append(entry)
    return out


def _resource(base: str, rtype: str) -> dict[str, Any]:
    res: dict[str, Any] = {
        "type": rtype,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
        "interaction": [{"code": code} for code in INTERACTIONS],
        "versioning": "versioned",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "not-supported",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "local"],
    }
    if rtype in READ_ONLY_TYPES:  # AuditEvent: written by the server only (fhir_server.audit)
        res["interaction"] = [{"code": c} for c in INTERACTIONS if c in ("read", "vread", "search-type", "history-instance", "history-type")]
        res["documentation"] = (
            "The audit trail (IHE BALP): one AuditEvent per FHIR interaction and legacy prediction, refusals "
            "included, written by the server; create, update and delete answer 405."
        )
        for flag in ("updateCreate", "conditionalCreate", "conditionalUpdate", "conditionalDelete"):
            res.pop(flag)
    # R4: searchInclude = rtype's own reference parameters; searchRevInclude = Source:param whose
    # targets include rtype (both limited to stored types, see storage/reference_targets.py)
    includes = search_includes(rtype)
    if includes:
        res["searchInclude"] = includes
    rev = search_rev_includes(rtype)
    if rev:
        res["searchRevInclude"] = rev
    res["searchParam"] = _search_params(rtype)
    if rtype in OPERATION_TYPES:
        res["operation"] = [{"name": "analyze", "definition": operation_definition_url(base, rtype)}]
    return res


def _code_system_resource() -> dict[str, Any]:
    """CodeSystem: our own terminology (cxr-findings, cxr-operations, cxr-result-parts), served read-only by
    codesystems.py from the tables the resources are coded from; not a stored type."""
    from .codesystems import SEARCH_PARAMS

    return {
        "type": "CodeSystem",
        "profile": "http://hl7.org/fhir/StructureDefinition/CodeSystem",
        "documentation": (
            "Read-only: the server's own CodeSystems (" + ", ".join(published_code_system_urls()) + "), "
            "generated from its terminology tables; write interactions answer 405. "
            "GET CodeSystem/$lookup?system=&code= (R4 CodeSystem-lookup) returns name, version and display."
        ),
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "versioning": "no-version",
        "readHistory": False,
        "updateCreate": False,
        "conditionalCreate": False,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchParam": [
            {"name": name, "definition": definition, "type": type_, "documentation": doc}
            for name, (type_, definition, doc) in SEARCH_PARAMS.items()
        ],
    }


def published_code_system_urls() -> list[str]:
    from .codesystems import published

    return [cs["url"] for cs in published().values()]


def capability_statement(request: Request) -> dict[str, Any]:
    base = base_url(request)
    settings = request.app.state.settings
    version = getattr(request.app, "version", "0.0.0")
    security: dict[str, Any] = {
        "cors": True,
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                        "display": "SMART-on-FHIR",
                    }
                ],
                "text": "SMART Backend Services (client-confidential-asymmetric): client_credentials with a "
                "private_key_jwt assertion (RS384/ES384) at the token endpoint; bearer tokens with system/ scopes",
            }
        ],
        "description": (
            "Bearer tokens with SMART scopes are required when authentication is enabled"
            if settings.auth_enabled
            else "Authentication is disabled on this deployment (CXR_AUTH_ENABLED=false)"
        ),
    }
    # issue 10: this server is its own SMART Backend Services authorization server (POST /auth/token)
    security["extension"] = [{"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": token_url(request)}]}]
    return {
        "resourceType": "CapabilityStatement",
        "id": "cxr-fhir",
        "url": f"{base}/metadata",
        "name": "CXRFHIRServer",
        "title": "CXR-FHIR server capability statement",
        "status": "active",
        "experimental": False,
        "date": "2026-11-25",
        "publisher": "CXR-FHIR",
        "description": "FHIR R4 server for AI analysis of chest radiographs (decision support, not a diagnosis)",
        "kind": "instance",
        "software": {"name": "CXR-FHIR", "version": version},
        "implementation": {"description": "CXR-FHIR", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json", "application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Chest X-ray AI: POST Media or ImagingStudy to $analyze for a DiagnosticReport with Observations. "
                    + RESULT_PARAMETERS
                    + CHAINING
                ),
                "security": security,
                "resource": [*(_resource(base, rtype) for rtype in SUPPORTED_TYPES), _code_system_resource()],
                "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}],
                "searchParam": _search_params(""),
            }
        ],
    }


@router.get("/metadata", summary="capabilities")
async def metadata(request: Request) -> Response:
    return fhir_json_response(request, capability_statement(request))


def smart_configuration(request: Request) -> dict[str, Any]:
    scopes = ["system/*.rs", "system/*.cruds", "system/*.read", "system/*.write"]
    scopes += [f"system/{t}.rs" for t in SUPPORTED_TYPES] + [f"system/{t}.cruds" for t in SUPPORTED_TYPES if t not in READ_ONLY_TYPES]
    scopes.append("system/CodeSystem.rs")  # read-only: no .cruds (writes answer 405)
    config: dict[str, Any] = {
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": scopes,
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }
    config["token_endpoint"] = token_url(request)
    return config


@smart_router.get("/.well-known/smart-configuration", summary="SMART configuration")
async def smart_config(request: Request) -> JSONResponse:
    return JSONResponse(smart_configuration(request))
