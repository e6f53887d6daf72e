"""SMART Backend Services end to end: `cxr clients add`, POST /auth/token, bearer access to FHIR and legacy."""

from __future__ import annotations

import base64
import json
import os
import time

import httpx
import pytest
import respx
from analyze_support import make_client, png_bytes, quadrant_pixels
from auth_support import TOKEN_URL, assertion, jwks_of, new_key, token_form, write_jwks
from fastapi import Depends, Request
from fastapi.testclient import TestClient
from fhir_support import make_app
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey

from fhir_server.auth import require_auth
from fhir_server.cli import main as cxr
from fhir_server.storage import Repository

REGISTERED = "system/*.rs system/Media.r system/DiagnosticReport.c"


@pytest.fixture
def keys():
    return {"ES384": new_key("ES384", "ec-1"), "RS384": new_key("RS384", "rsa-1")}


@pytest.fixture
def data_dir(tmp_path, monkeypatch, keys):
    """A temp data dir whose SQLite database holds client `ehr`, registered through the CLI."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CXR_DATABASE_URL", raising=False)
    jwks = write_jwks(tmp_path / "ehr.jwks.json", keys["ES384"], keys["RS384"])
    assert cxr(["clients", "add", "ehr", "--jwks", str(jwks), "--scopes", REGISTERED]) == 0
    return tmp_path


@pytest.fixture
def api(data_dir):
    with make_client(data_dir, auth_enabled=True) as c:
        yield c


def get_token(client, key, scope="system/*.rs", **kwargs):
    return client.post("/auth/token", data=token_form(assertion(key, "ehr", **kwargs), scope))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("alg", ["RS384", "ES384"])
def test_registered_client_gets_a_token_and_reads(api, keys, alg):
    r = get_token(api, keys[alg], "system/Patient.rs system/Observation.read system/Patient.c launch/patient")
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["cache-control"] == "no-store"
    assert body["token_type"] == "bearer" and 0 < body["expires_in"] <= 300
    assert body["scope"] == "system/Patient.rs system/Observation.read"  # requested ∩ registered
    header = json.loads(base64.urlsafe_b64decode(body["access_token"].split(".")[0] + "=="))
    assert header["alg"] == "ES384" and header["typ"] == "at+jwt"
    token = body["access_token"]
    assert api.get("/fhir/Patient", headers=bearer(token)).status_code == 200
    assert api.get("/fhir/Observation/nope", headers=bearer(token)).status_code == 404  # allowed, just absent
    denied = api.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=bearer(token))
    assert denied.status_code == 403 and denied.json()["issue"][0]["code"] == "forbidden"
    assert 'error="insufficient_scope", scope="system/Patient.c"' in denied.headers["www-authenticate"]
    assert api.get("/fhir/DiagnosticReport", headers=bearer(token)).status_code == 403  # not granted
    assert api.get("/fhir/Patient").status_code == 401


def test_analyze_and_legacy_accept_the_same_token(api, keys):
    png = png_bytes(quadrant_pixels(96, 96, quadrant="top_left"))
    reader = get_token(api, keys["ES384"], "system/Media.r").json()["access_token"]
    analyst = get_token(api, keys["ES384"], "system/Media.r system/DiagnosticReport.c").json()["access_token"]
    media = {"resourceType": "Media", "status": "completed",
             "content": {"contentType": "image/png", "data": base64.b64encode(png).decode()}}
    r = api.post("/fhir/Media/$analyze", json=media, headers=bearer(reader))
    assert r.status_code == 403 and "DiagnosticReport" in r.json()["issue"][0]["diagnostics"]
    assert api.post("/fhir/Media/$analyze", json=media, headers=bearer(analyst)).status_code in (200, 201)
    files = {"image": ("x.png", png, "image/png")}
    r = api.post("/api/v1/predict", files=files)
    assert r.status_code == 401 and r.json()["status"] == "error" and r.headers["www-authenticate"].startswith("Bearer")
    r = api.post("/api/v1/predict", files=files, headers=bearer(reader))
    assert r.status_code == 200 and r.json()["status"] == "success"


def _expired_claims(data_dir):
    """An access token signed by this server's own key, expired 10 minutes ago."""
    key = ECKey.import_key(json.loads((data_dir / "auth" / "signing-key.jwk").read_text()))
    now = int(time.time())
    claims = {"iss": "cxr-fhir", "aud": "cxr-fhir", "sub": "ehr", "client_id": "ehr", "scope": "system/*.rs",
              "iat": now - 900, "exp": now - 600, "jti": "x"}
    return jwt.encode({"alg": "ES384", "typ": "at+jwt", "kid": key.kid}, claims, key, algorithms=["ES384"])


def test_expired_or_foreign_access_token_is_401(api, data_dir, keys):
    assert get_token(api, keys["ES384"]).status_code == 200  # the server key now exists in the data dir
    r = api.get("/fhir/Patient", headers=bearer(_expired_claims(data_dir)))
    assert r.status_code == 401
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer") and 'error="invalid_token"' in challenge and "expired" in challenge
    assert r.json()["issue"][0]["code"] == "login"
    other = ECKey.generate_key("P-384", private=True)
    forged = jwt.encode({"alg": "ES384", "typ": "at+jwt"}, {"iss": "cxr-fhir", "aud": "cxr-fhir", "sub": "ehr",
                        "scope": "system/*.cruds", "exp": int(time.time()) + 60}, other, algorithms=["ES384"])
    assert api.get("/fhir/Patient", headers=bearer(forged)).status_code == 401
    # a client assertion is not an access token, even though it is signed by a registered key
    assert api.get("/fhir/Patient", headers=bearer(assertion(keys["ES384"], "ehr"))).status_code == 401
    # static tokens are refused unless the development mode is switched on
    with make_client(data_dir, auth_enabled=True, auth_tokens={"devtoken": "system/*.rs"}) as c:
        assert c.get("/fhir/Patient", headers=bearer("devtoken")).status_code == 401
    with make_client(data_dir, auth_enabled=True, auth_dev_static_tokens=True, auth_tokens={"devtoken": "system/*.rs"}) as c:
        assert c.get("/fhir/Patient", headers=bearer("devtoken")).status_code == 200


def _none_alg(client_id: str) -> str:
    def b64(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    claims = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": "n1"}
    return f"{b64({'alg': 'none', 'kid': 'ec-1', 'typ': 'JWT'})}.{b64(claims)}."


def _hs256(client_id: str) -> str:
    key = OctKey.import_key("a-shared-secret-that-is-long-enough-000", {"kid": "ec-1"})
    claims = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": "h1"}
    return jwt.encode({"alg": "HS256", "kid": "ec-1"}, claims, key)


BAD_ASSERTIONS = {
    "wrong aud": lambda k: assertion(k["ES384"], "ehr", aud="https://elsewhere.example/token"),
    "expired exp": lambda k: assertion(k["ES384"], "ehr", exp_in=-120),
    "exp too far ahead": lambda k: assertion(k["ES384"], "ehr", exp_in=600),
    "no exp": lambda k: assertion(k["ES384"], "ehr", drop=("exp",)),
    "no jti": lambda k: assertion(k["ES384"], "ehr", drop=("jti",)),
    "unknown kid": lambda k: assertion(new_key("ES384", "not-registered"), "ehr"),
    "unregistered key with a registered kid": lambda k: assertion(new_key("ES384", "ec-1"), "ehr"),
    "RS384 header with the EC key's kid": lambda k: assertion(new_key("RS384", "ec-1"), "ehr"),
    "alg none": lambda k: _none_alg("ehr"),
    "HS256": lambda k: _hs256("ehr"),
    "RS256": lambda k: assertion(k["RS384"], "ehr", alg="RS256"),
    "sub is not iss": lambda k: assertion(k["ES384"], "ehr", sub="someone-else"),
    "unknown client": lambda k: assertion(k["ES384"], "mallory"),
    "jku not registered": lambda k: assertion(k["ES384"], "ehr", header={"jku": "https://keys.example.test/jwks.json"}),
    "not a JWT": lambda k: "not.a.jwt",
}


@pytest.mark.parametrize("case", list(BAD_ASSERTIONS))
def test_bad_assertions_are_invalid_client(api, keys, case):
    r = api.post("/auth/token", data=token_form(BAD_ASSERTIONS[case](keys)))
    assert r.status_code == 401, (case, r.text)
    assert r.json()["error"] == "invalid_client" and r.json()["error_description"]
    assert r.headers["cache-control"] == "no-store"


def test_replayed_jti_is_refused_also_by_another_server_process(api, data_dir, keys):
    signed = assertion(keys["ES384"], "ehr", jti="once-only")
    assert api.post("/auth/token", data=token_form(signed)).status_code == 200
    r = api.post("/auth/token", data=token_form(signed))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client" and "replay" in r.json()["error_description"]
    # a second application on the same database (another worker) remembers it too; another
    # assertion with the same jti is a replay as well, a new jti is not
    with make_client(data_dir, auth_enabled=True) as other:
        assert other.post("/auth/token", data=token_form(signed)).status_code == 401
        again = assertion(keys["RS384"], "ehr", jti="once-only")
        assert other.post("/auth/token", data=token_form(again)).status_code == 401
        assert other.post("/auth/token", data=token_form(assertion(keys["RS384"], "ehr"))).status_code == 200


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"grant_type": "authorization_code"}, 400, "unsupported_grant_type"),
        ({"grant_type": None}, 400, "invalid_request"),
        ({"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"}, 401, "invalid_client"),
        ({"client_assertion": None}, 400, "invalid_request"),
        ({"scope": None}, 400, "invalid_request"),
        ({"scope": "system/Patient.cruds"}, 400, "invalid_scope"),  # registered: read/search only
        ({"scope": "patient/*.read openid"}, 400, "invalid_scope"),
    ],
)
def test_request_errors(api, keys, form, status, error):
    data = token_form(assertion(keys["ES384"], "ehr"))
    for name, value in form.items():
        if value is None:
            data.pop(name)
        else:
            data[name] = value
    r = api.post("/auth/token", data=data)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text


def test_token_request_must_be_a_form(api, keys):
    r = api.post("/auth/token", json=token_form(assertion(keys["ES384"], "ehr")))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


JKU_HOST = "keys.example.test"
JKU_URL = f"https://{JKU_HOST}/ehr/jwks.json"


async def _public_dns(host: str) -> list[str]:
    return {"keys.example.test": ["93.184.216.34"], "internal.example.test": ["10.0.0.7"]}.get(host, [])


def _jku_client(data_dir, monkeypatch, keys, url):
    monkeypatch.setenv("CXR_AUTH_JKU_ALLOWED_HOSTS", json.dumps([JKU_HOST, "internal.example.test"]))
    assert cxr(["clients", "add", "jku-client", "--jwks-url", url, "--scopes", "system/*.rs"]) == 0
    client = make_client(data_dir, auth_enabled=True, auth_jku_allowed_hosts=[JKU_HOST, "internal.example.test"])
    client.app.state.fetch_policy_overrides = {"resolver": _public_dns}
    return client


def test_jku_on_the_allowlist_is_fetched(data_dir, monkeypatch, keys):
    with respx.mock(assert_all_called=False) as mock:
        route = mock.get(JKU_URL).mock(return_value=httpx.Response(200, json=jwks_of(keys["RS384"])))
        with _jku_client(data_dir, monkeypatch, keys, JKU_URL) as c:
            signed = assertion(keys["RS384"], "jku-client", header={"jku": JKU_URL})
            assert c.post("/auth/token", data=token_form(signed)).status_code == 200
            # without a jku header the registered URL is used (cached: no second fetch)
            assert c.post("/auth/token", data=token_form(assertion(keys["RS384"], "jku-client"))).status_code == 200
            assert route.call_count == 1
            # a key the JWKS does not have: refetched once (rotation), then refused
            r = c.post("/auth/token", data=token_form(assertion(keys["ES384"], "jku-client")))
            assert r.status_code == 401 and route.call_count == 2
            # a jku other than the registered one is refused before any fetch
            other = assertion(keys["RS384"], "jku-client", header={"jku": "https://keys.example.test/other.json"})
            assert c.post("/auth/token", data=token_form(other)).status_code == 401 and route.call_count == 2


@pytest.mark.parametrize(
    "url", ["https://attacker.example/jwks.json", "https://internal.example.test/jwks.json", "http://169.254.169.254/keys"]
)
def test_jku_off_the_allowlist_is_refused_before_any_connection(data_dir, monkeypatch, keys, url):
    with respx.mock(assert_all_called=False) as mock:
        route = mock.route().mock(return_value=httpx.Response(200, json=jwks_of(keys["RS384"])))
        with _jku_client(data_dir, monkeypatch, keys, url) as c:
            r = c.post("/auth/token", data=token_form(assertion(keys["RS384"], "jku-client", header={"jku": url})))
            assert r.status_code == 401 and r.json()["error"] == "invalid_client"
            assert not route.called  # refused by the allowlist / internal-address check, never connected


def test_smart_configuration_and_capability_statement(api):
    config = api.get("/.well-known/smart-configuration").json()
    assert config["token_endpoint"] == TOKEN_URL
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert config["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert "client-confidential-asymmetric" in config["capabilities"]
    assert {"system/*.rs", "system/DiagnosticReport.cruds"} <= set(config["scopes_supported"])
    cs = api.get("/fhir/metadata").json()
    ext = cs["rest"][0]["security"]["extension"][0]
    assert ext["extension"] == [{"url": "token", "valueUri": TOKEN_URL}]
    # the URL advertised is the aud the endpoint checks
    assert config["token_endpoint"].endswith("/auth/token")


def test_configured_token_url_is_the_audience(data_dir, keys):
    url = "https://fhir.hospital.example/auth/token"
    with make_client(data_dir, auth_enabled=True, oauth_token_url=url) as c:
        assert c.get("/.well-known/smart-configuration").json()["token_endpoint"] == url
        assert get_token(c, keys["ES384"]).status_code == 401  # aud = the TestClient URL: wrong now
        assert get_token(c, keys["ES384"], aud=url).status_code == 200


def test_signing_key_is_generated_once_and_kept(data_dir, keys):
    with make_client(data_dir, auth_enabled=True) as c:
        token = get_token(c, keys["ES384"]).json()["access_token"]
    key_file = data_dir / "auth" / "signing-key.jwk"
    assert key_file.stat().st_mode & 0o077 == 0  # owner only
    with make_client(data_dir, auth_enabled=True) as restarted:  # same key after a restart
        assert restarted.get("/fhir/Patient", headers=bearer(token)).status_code == 200
    elsewhere = data_dir / "elsewhere.jwk"
    with make_client(data_dir, auth_enabled=True, auth_signing_key_file=elsewhere) as rekeyed:
        assert rekeyed.get("/fhir/Patient", headers=bearer(token)).status_code == 401
    assert elsewhere.exists()


@pytest.mark.parametrize("enabled", [False, True])
def test_principal_is_always_on_request_state(tmp_path, enabled):
    """The audit trail reads request.state.principal.client_id on every authenticated route."""
    store = Repository.from_url(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    app = make_app(store, data_dir=tmp_path, auth_enabled=enabled, auth_dev_static_tokens=True,
                   auth_tokens={"t": "system/Patient.rs"})

    @app.get("/api/v1/whoami", dependencies=[Depends(require_auth)])
    async def whoami(request: Request) -> dict:
        principal = request.state.principal
        return {"client_id": principal.client_id, "delete": principal.allows("Patient", "d")}

    with TestClient(app) as c:
        r = c.get("/api/v1/whoami", headers=bearer("t"))
    store.dispose()
    if enabled:
        assert r.json()["client_id"].startswith("dev-token-") and r.json()["delete"] is False
    else:
        assert r.json() == {"client_id": None, "delete": True}


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get("CXR_TEST_POSTGRES_URL"), reason="CXR_TEST_POSTGRES_URL not set")
def test_postgres_client_registration_token_and_replay(tmp_path, monkeypatch, keys):
    from fhir_support import _pg_repo
    from sqlalchemy import text

    store = _pg_repo("cxr_auth_e2e")
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS oauth_client, oauth_seen_jti"))
    url = str(store.engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_DATABASE_URL", url)
    jwks = write_jwks(tmp_path / "ehr.json", keys["RS384"])
    assert cxr(["clients", "add", "ehr", "--jwks", str(jwks), "--scopes", REGISTERED]) == 0
    with make_client(tmp_path, auth_enabled=True, database_url=url) as c:
        signed = assertion(keys["RS384"], "ehr")
        r = c.post("/auth/token", data=token_form(signed))
        assert r.status_code == 200, r.text
        assert c.get("/fhir/Patient", headers=bearer(r.json()["access_token"])).status_code == 200
        assert c.post("/auth/token", data=token_form(signed)).json()["error"] == "invalid_client"
    assert cxr(["clients", "remove", "ehr"]) == 0


def test_clients_cli_add_list_remove_as_a_command(tmp_path, keys):
    """The real `cxr clients` command (python -m fhir_server) against a temp data dir."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "CXR_DATABASE_URL"}
    env.update(CXR_DATA_DIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parent.parent))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "fhir_server", "clients", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    jwks = write_jwks(tmp_path / "k.json", keys["ES384"])
    added = run("add", "lab-system", "--jwks", str(jwks), "--scopes", "system/Observation.rs")
    assert added.returncode == 0, added.stderr
    listed = run("list", "--json")
    assert json.loads(listed.stdout)[0] | {"created": 0} == {
        "client_id": "lab-system", "scopes": "system/Observation.rs", "jwks_url": None, "kids": ["ec-1"], "created": 0}
    private = tmp_path / "private.json"
    private.write_text(json.dumps({"keys": [keys["ES384"].as_dict(private=True)]}))
    refused = run("add", "leaky", "--jwks", str(private), "--scopes", "system/*.rs")
    assert refused.returncode == 2 and "private" in refused.stderr
    assert run("remove", "lab-system").returncode == 0
    assert run("remove", "lab-system").returncode == 1
    assert "no clients registered" in run("list").stdout


def test_access_log_names_the_client(api, keys, caplog):
    token = get_token(api, keys["ES384"]).json()["access_token"]
    with caplog.at_level("INFO", logger="cxr.access"):
        api.get("/fhir/Patient?family=Zzyzx", headers=bearer(token))
        api.get("/fhir/Patient", headers=bearer("garbage"))
        api.post("/auth/token", data=token_form(assertion(keys["ES384"], "ehr")))
    lines = [r for r in caplog.records if r.name == "cxr.access"]
    assert [(r.path, r.status, r.client_id) for r in lines] == [
        ("/fhir/Patient", 200, "ehr"), ("/fhir/Patient", 401, None), ("/auth/token", 200, "ehr")]
    assert all("Zzyzx" not in r.getMessage() for r in lines)


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_keygen_pair_registers_and_gets_a_token(tmp_path, monkeypatch, alg):
    """The README's onboarding path: `cxr clients keygen`, `cxr clients add`, sign with the private JWK."""
    from joserfc.jwk import import_key

    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CXR_DATABASE_URL", raising=False)
    private, public = tmp_path / "c.private.jwk", tmp_path / "c.jwks.json"
    assert cxr(["clients", "keygen", "--alg", alg, "--kid", "k-1", "--private", str(private), "--jwks", str(public)]) == 0
    assert private.stat().st_mode & 0o077 == 0
    assert cxr(["clients", "keygen", "--private", str(private), "--jwks", str(public)]) == 2  # never overwrites
    assert cxr(["clients", "add", "c", "--jwks", str(public), "--scopes", "system/*.rs"]) == 0
    key = import_key(json.loads(private.read_text()))
    with make_client(tmp_path, auth_enabled=True) as c:
        r = c.post("/auth/token", data=token_form(assertion(key, "c", alg=alg)))
        assert r.status_code == 200, r.text


def test_token_request_body_is_bounded_and_parsed_strictly(api, keys):
    huge = token_form(assertion(keys["ES384"], "ehr"), scope="system/*.rs " * 10_000)
    r = api.post("/auth/token", data=huge)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    many = {**token_form(assertion(keys["ES384"], "ehr")), **{f"x{i}": "1" for i in range(50)}}
    assert api.post("/auth/token", data=many).json()["error"] == "invalid_request"
    twice = "&".join(f"{k}={v}" for k, v in token_form(assertion(keys["ES384"], "ehr")).items()) + "&scope=system/*.rs"
    r = api.post("/auth/token", content=twice, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.json()["error"] == "invalid_request" and "more than once" in r.json()["error_description"]
    r = api.post("/auth/token", content=b"\xff\xfe", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400
    spec = api.get("/openapi.json").json()["paths"]["/auth/token"]["post"]
    assert "application/x-www-form-urlencoded" in spec["requestBody"]["content"]


def test_access_token_expires_after_its_lifetime(data_dir, keys, monkeypatch):
    """A token is refused once its exp (+ 5 s for replica clocks) has passed: time moved, not forged."""
    import fhir_server.auth.keys as keys_module

    with make_client(data_dir, auth_enabled=True, auth_token_lifetime_s=60) as c:
        body = get_token(c, keys["ES384"]).json()
        assert body["expires_in"] == 60
        headers = bearer(body["access_token"])
        assert c.get("/fhir/Patient", headers=headers).status_code == 200
        real_time = time.time
        monkeypatch.setattr(keys_module.jwt.JWTClaimsRegistry, "now", property(lambda self: int(real_time()) + 66))
        r = c.get("/fhir/Patient", headers=headers)
        assert r.status_code == 401 and "expired" in r.headers["www-authenticate"]


@pytest.mark.parametrize(
    ("overrides", "level", "words"),
    [
        ({"auth_enabled": False, "host": "127.0.0.1"}, "INFO", "disabled"),
        ({"auth_enabled": False, "host": "0.0.0.0"}, "WARNING", "DISABLED while listening on 0.0.0.0"),
        ({"auth_enabled": True, "auth_dev_static_tokens": True, "auth_tokens": {"t": "system/*.rs"}}, "WARNING",
         "DEVELOPMENT MODE"),
        ({"auth_enabled": True, "auth_tokens": {"t": "system/*.rs"}}, "WARNING", "ignored"),
        ({"auth_enabled": True}, "INFO", "SMART Backend Services"),
    ],
)
def test_start_up_says_which_auth_mode_runs(tmp_path, caplog, overrides, level, words):
    with caplog.at_level("INFO", logger="fhir_server.auth"), make_client(tmp_path, **overrides):
        pass
    assert any(r.levelname == level and words in r.getMessage() for r in caplog.records), caplog.text
