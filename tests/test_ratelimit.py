"""Per-client rate limits: 429 + Retry-After + throttled OperationOutcome / legacy JSON; probes never limited."""

from __future__ import annotations

import pytest
from analyze_support import make_client
from auth_support import assertion, new_key, token_form, write_jwks

from fhir_server.cli import main as cxr
from fhir_server.ratelimit import Limiter, is_exempt


@pytest.fixture
def limited(tmp_path):
    with make_client(tmp_path, rate_limit_per_minute=6, rate_limit_burst=3) as c:
        yield c


def test_429_past_the_burst_with_retry_after_and_throttled_outcome(limited):
    for _ in range(3):
        assert limited.get("/fhir/Patient").status_code == 200
    r = limited.get("/fhir/Patient")
    assert r.status_code == 429
    assert 1 <= int(r.headers["retry-after"]) <= 30  # burst window = 3 * 60 / 6 = 30 s
    issue = r.json()["issue"][0]
    assert r.json()["resourceType"] == "OperationOutcome" and issue["code"] == "throttled"
    assert r.headers["x-request-id"]
    # the legacy API answers its own JSON error; the same address shares the same budget
    legacy = limited.post("/api/v1/predict", files={"image": ("x.png", b"x", "image/png")})
    assert legacy.status_code == 429 and legacy.json()["status"] == "error"
    assert legacy.json()["error"]["code"] == "too_many_requests" and legacy.headers["retry-after"]


def test_probes_metadata_and_well_known_are_never_limited(limited):
    for _ in range(4):
        limited.get("/fhir/Patient")
    assert limited.get("/fhir/Patient").status_code == 429
    for _ in range(50):
        assert limited.get("/healthz").status_code == 200
        assert limited.get("/fhir/metadata").status_code == 200
        assert limited.get("/.well-known/smart-configuration").status_code == 200
    assert limited.get("/readyz").status_code in (200, 503)  # never 429
    assert limited.options("/fhir/Patient", headers={"Origin": "https://a.example",
                                                     "Access-Control-Request-Method": "GET"}).status_code == 200


def test_throttled_answers_carry_cors_headers(limited):
    for _ in range(3):
        limited.get("/fhir/Patient")
    r = limited.get("/fhir/Patient", headers={"Origin": "https://app.example"})
    assert r.status_code == 429 and r.headers["access-control-allow-origin"] in ("*", "https://app.example")
    assert "retry-after" in r.headers["access-control-expose-headers"].lower()


def test_limits_are_per_client_when_authenticated(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CXR_DATABASE_URL", raising=False)
    keys = {}
    for name in ("a", "b"):
        keys[name] = new_key("ES384", f"{name}-1")
        jwks = write_jwks(tmp_path / f"{name}.json", keys[name])
        assert cxr(["clients", "add", name, "--jwks", str(jwks), "--scopes", "system/*.rs"]) == 0
    with make_client(tmp_path, auth_enabled=True, rate_limit_per_minute=60, rate_limit_burst=4) as c:
        tokens = {}
        for name in ("a", "b"):  # the token endpoint is limited per address: 2 of the 4
            r = c.post("/auth/token", data=token_form(assertion(keys[name], name)))
            tokens[name] = {"Authorization": "Bearer " + r.json()["access_token"]}
        for _ in range(4):
            assert c.get("/fhir/Patient", headers=tokens["a"]).status_code == 200
        assert c.get("/fhir/Patient", headers=tokens["a"]).status_code == 429
        assert c.get("/fhir/Patient", headers=tokens["b"]).status_code == 200  # b has its own budget
        # unauthenticated callers are counted per address: 2 token requests + 2 more, then 429
        assert c.get("/fhir/Patient").status_code == 401
        assert c.get("/fhir/Patient").status_code == 401
        assert c.get("/fhir/Patient").status_code == 429


def test_no_limit_by_default(tmp_path):
    with make_client(tmp_path) as c:
        assert all(c.get("/fhir/Patient").status_code == 200 for _ in range(40))


def test_limiter_windows():
    limiter = Limiter(per_minute=6, burst=3)
    assert [limiter.acquire("k") for _ in range(3)] == [None, None, None]
    wait = limiter.acquire("k")
    assert wait is not None and 25 <= wait <= 30
    assert limiter.acquire("other") is None
    # a large burst cannot exceed the per-minute rate
    big = Limiter(per_minute=5, burst=50)
    assert sum(big.acquire("k") is None for _ in range(20)) == 5


@pytest.mark.parametrize(("method", "path", "exempt"), [
    ("GET", "/healthz", True), ("GET", "/readyz", True), ("GET", "/fhir/metadata", True),
    ("GET", "/.well-known/smart-configuration", True), ("OPTIONS", "/fhir/Patient", True),
    ("GET", "/fhir/Patient", False), ("POST", "/auth/token", False), ("POST", "/api/v1/predict", False),
    ("GET", "/healthz/x", False),
])
def test_exempt_paths(method, path, exempt):
    assert is_exempt(method, path) is exempt


def test_storage_failure_fails_open(limited, monkeypatch, caplog):
    """A shared store (redis) that stops answering must not turn every request into a 500."""
    def broken(self, key):
        raise ConnectionError("storage down")

    monkeypatch.setattr(Limiter, "acquire", broken)
    assert [limited.get("/fhir/Patient").status_code for _ in range(5)] == [200] * 5
    assert "rate limit storage unavailable" in caplog.text


def test_bad_storage_uri_stops_start_up(tmp_path):
    from limits.errors import ConfigurationError

    with pytest.raises((ConfigurationError, ValueError)):
        make_client(tmp_path, rate_limit_per_minute=10, rate_limit_storage_uri="memcached://127.0.0.1:1")
