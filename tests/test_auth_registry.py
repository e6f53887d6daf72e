"""The client registry and replay memory on SQLite and PostgreSQL, and JWKS registration rules."""

from __future__ import annotations

import time

import pytest
from auth_support import jwks_of, new_key
from fhir_support import BACKENDS, _pg_repo
from joserfc.jwk import ECKey, OctKey
from sqlalchemy import text

from fhir_server.auth.registry import ClientRegistry, RegistrationError, public_jwks
from fhir_server.storage import Repository


@pytest.fixture(params=BACKENDS)
def registry(request, tmp_path):
    if request.param == "sqlite":
        store = Repository.from_url(f"sqlite:///{tmp_path / 'db.sqlite3'}")
        yield ClientRegistry(store.engine)
        store.dispose()
        return
    store = _pg_repo("cxr_auth_test")
    reg = ClientRegistry(store.engine)
    with store.engine.begin() as conn:
        conn.execute(text("TRUNCATE oauth_client, oauth_seen_jti"))
    yield reg


def test_add_get_list_remove(registry):
    key = new_key("ES384", "k1")
    client = registry.add("ehr", "system/*.rs  system/Media.c", jwks=jwks_of(key))
    assert client.scopes == "system/*.rs system/Media.c"
    assert registry.get("ehr").jwks["keys"][0]["kid"] == "k1"
    registry.add("pacs", "system/Media.r", jwks_url="https://keys.example.test/pacs.json")
    assert [c.client_id for c in registry.list()] == ["ehr", "pacs"]
    with pytest.raises(RegistrationError, match="already registered"):
        registry.add("ehr", "system/*.rs", jwks=jwks_of(key))
    registry.add("ehr", "system/Patient.r", jwks=jwks_of(key), replace=True)
    assert registry.get("ehr").scopes == "system/Patient.r"
    assert registry.remove("ehr") and not registry.remove("ehr")
    assert registry.get("ehr") is None and registry.get("x" * 1000) is None


def test_replay_memory_is_shared_and_pruned(registry):
    later = int(time.time()) + 300
    assert registry.remember_jti("ehr", "j1", later)
    assert not registry.remember_jti("ehr", "j1", later)
    assert registry.remember_jti("other-client", "j1", later)  # per client
    second = ClientRegistry(registry.engine)  # another process's registry on the same database
    assert not second.remember_jti("ehr", "j1", later)
    assert registry.remember_jti("ehr", "old", int(time.time()) - 5)
    assert registry.remember_jti("ehr", "new", later)  # prunes the expired one
    with registry.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM oauth_seen_jti")).scalar() == 3


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({}, "keys"),
        ({"keys": []}, "keys"),
        ({"keys": [{"kty": "EC"}]}, "kid"),
        ({"keys": [{"kty": "EC", "kid": "a", "crv": "P-384"}]}, "cannot be loaded"),
        ("not a dict", "keys"),
    ],
)
def test_bad_jwks_documents(document, message):
    with pytest.raises(RegistrationError, match=message):
        public_jwks(document)


def test_jwks_rules():
    rsa = new_key("RS384", "r1")
    assert public_jwks(jwks_of(rsa))["keys"][0]["kid"] == "r1"
    with pytest.raises(RegistrationError, match="private"):
        public_jwks({"keys": [rsa.as_dict(private=True)]})
    with pytest.raises(RegistrationError, match="kid"):
        public_jwks({"keys": [ECKey.generate_key("P-384").as_dict(private=False)]})
    with pytest.raises(RegistrationError, match="P-384"):
        public_jwks({"keys": [ECKey.generate_key("P-256", parameters={"kid": "p"}).as_dict(private=False)]})
    with pytest.raises(RegistrationError, match="RSA"):
        public_jwks({"keys": [OctKey.generate_key(256, parameters={"kid": "o"}).as_dict(private=True)]})


def test_registration_needs_one_key_source_and_scopes(registry):
    key = new_key("ES384", "k1")
    with pytest.raises(RegistrationError):
        registry.add("a", "system/*.rs")
    with pytest.raises(RegistrationError):
        registry.add("a", "system/*.rs", jwks=jwks_of(key), jwks_url="https://x.example/j")
    with pytest.raises(RegistrationError, match="scope"):
        registry.add("a", "  ", jwks=jwks_of(key))
    with pytest.raises(RegistrationError, match="client id"):
        registry.add(" a", "system/*.rs", jwks=jwks_of(key))
