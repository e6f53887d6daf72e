"""GET /fhir/metadata and /.well-known/smart-configuration, checked against our own routes and
against two independent R4 models (fhir.resources R4B and fhirclient, generated from 4.0.1)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from fhir_support import make_app

from fhir_server.storage import SUPPORTED_TYPES, Repository

pytest_plugins = ["fhir_support"]  # the repo / client fixtures (SQLite + PostgreSQL)


def test_capability_statement(client):
    r = client.get("/fhir/metadata")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
    cs = r.json()
    assert cs["resourceType"] == "CapabilityStatement"
    assert (cs["status"], cs["kind"], cs["fhirVersion"]) == ("active", "instance", "4.0.1")
    assert "json" in cs["format"]
    rest = cs["rest"][0]
    assert rest["mode"] == "server"
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch", "history-system"}
    by_type = {res["type"]: res for res in rest["resource"]}
    # the stored types, plus CodeSystem: our own terminology, read-only (tests/test_fhir_codesystems.py)
    assert set(by_type) == set(SUPPORTED_TYPES) | {"CodeSystem"}
    assert {i["code"] for i in by_type["CodeSystem"]["interaction"]} == {"read", "search-type"}
    # AuditEvent is read-only (the audit trail, tests/test_audit.py)
    assert {i["code"] for i in by_type["AuditEvent"]["interaction"]} == {"read", "vread", "search-type", "history-instance", "history-type"}
    assert {"patient", "agent", "date", "entity", "subtype", "outcome"} <= {p["name"] for p in by_type["AuditEvent"]["searchParam"]}
    for res in (by_type[t] for t in SUPPORTED_TYPES if t != "AuditEvent"):
        assert {i["code"] for i in res["interaction"]} >= {"read", "vread", "create", "update", "delete", "search-type", "history-instance", "history-type"}
        assert res["versioning"] == "versioned" and res["readHistory"] is True
        assert res["conditionalCreate"] is True and res["conditionalUpdate"] is True
        assert res["conditionalDelete"] == "single"
        names = {p["name"] for p in res["searchParam"]}
        assert {"_id", "_lastUpdated"} <= names
        assert all(p["definition"].startswith("http://hl7.org/fhir/SearchParameter/") for p in res["searchParam"])
    assert {"subject", "patient", "status", "code", "category", "date", "identifier", "derived-from", "device"} <= {p["name"] for p in by_type["Observation"]["searchParam"]}
    assert {"patient", "identifier", "started", "modality", "series", "instance"} <= {p["name"] for p in by_type["ImagingStudy"]["searchParam"]}
    assert {"patient", "created", "modality", "view"} <= {p["name"] for p in by_type["Media"]["searchParam"]}
    assert "DiagnosticReport:result" in by_type["DiagnosticReport"]["searchInclude"]
    assert "Provenance:target" in by_type["DiagnosticReport"]["searchRevInclude"]
    for rtype in ("Media", "ImagingStudy"):
        (operation,) = by_type[rtype]["operation"]
        assert operation["name"] == "analyze"
        # the canonical is the url of the OperationDefinition the server serves under its id
        definition = client.get(f"/fhir/OperationDefinition/{rtype}-analyze")
        assert definition.status_code == 200, definition.text
        assert definition.json()["url"] == operation["definition"]
        assert definition.json()["code"] == "analyze" and definition.json()["resource"] == [rtype]
    service = rest["security"]["service"][0]["coding"][0]
    assert service == {"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}


def test_every_advertised_search_parameter_is_accepted(client):
    cs = client.get("/fhir/metadata").json()
    for res in cs["rest"][0]["resource"]:
        for param in res["searchParam"]:
            value = {"date": "ge2020-01-01", "number": "1", "reference": "Patient/x", "string": "a", "token": "a", "uri": "http://x"}[param["type"]]
            r = client.get(f"/fhir/{res['type']}", params={param["name"]: value}, headers={"Prefer": "handling=strict"})
            assert r.status_code == 200, (res["type"], param["name"], r.text)


def test_capability_statement_is_valid_r4(client):
    from fhir.resources.R4B import get_fhir_model_class
    from fhirclient.models.capabilitystatement import CapabilityStatement

    cs = client.get("/fhir/metadata").json()
    get_fhir_model_class("CapabilityStatement").model_validate(cs)
    CapabilityStatement(cs, strict=True)  # raises FHIRValidationError on any R4 problem


def test_oauth_uris_and_smart_configuration(tmp_path):
    store = Repository.from_url(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    app = make_app(store, auth_enabled=True, auth_tokens={"t": "system/*.rs"}, oauth_token_url="https://auth.example/token")
    with TestClient(app) as c:
        cs = c.get("/fhir/metadata")  # open even with authentication on
        assert cs.status_code == 200
        ext = cs.json()["rest"][0]["security"]["extension"][0]
        assert ext["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
        assert ext["extension"] == [{"url": "token", "valueUri": "https://auth.example/token"}]
        smart = c.get("/.well-known/smart-configuration")
        assert smart.status_code == 200 and smart.headers["content-type"].startswith("application/json")
        config = smart.json()
        assert config["token_endpoint"] == "https://auth.example/token"
        assert config["grant_types_supported"] == ["client_credentials"]
        assert "system/*.rs" in config["scopes_supported"]
        assert "client-confidential-asymmetric" in config["capabilities"]
    store.dispose()


@pytest.mark.parametrize("accept", ["application/fhir+xml", "application/xml"])
def test_metadata_in_xml_is_406(client, accept):
    assert client.get("/fhir/metadata", headers={"Accept": accept}).status_code == 406
