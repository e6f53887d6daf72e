"""Checking a SMART Backend Services client assertion (RFC 7523 client authentication).

The assertion is a JWT signed RS384 or ES384 by a key of the client's registered JWKS: inline, or
fetched from the client's registered `jku` URL (the `jku` header, when present, must be that URL,
and its host must be on CXR_AUTH_JKU_ALLOWED_HOSTS, checked before any connection by the same
SSRF-safe fetcher that $analyze uses). Claims: iss = sub = client id, aud = this token endpoint's
URL, exp in the future but at most 5 minutes ahead, jti never used before (kept in the database
until the assertion expires, so a replay to any worker is refused).

Every failure is `invalid_client` (401), as RFC 7523 section 3.2 and SMART App Launch 2.x
(backend services) require for a client assertion that does not authenticate the client.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet
from starlette.concurrency import run_in_threadpool

from fhir_server.imaging.fetch import FetchPolicy, ImagingError, fetch

from .keys import CLOCK_LEEWAY_S
from .registry import Client, ClientRegistry

CLIENT_ALGS = ("RS384", "ES384")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME_S = 300
MAX_ASSERTION_CHARS = 16_384
JWKS_MAX_BYTES = 256 * 1024
JWKS_CACHE_S = 300


class OAuthError(Exception):
    """An RFC 6749 section 5.2 error: `error` code, description, HTTP status."""

    def __init__(self, error: str, description: str, status_code: int = 400):
        super().__init__(description)
        self.error = error
        self.description = description
        self.status_code = status_code


def invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)


@dataclass
class JwksCache:
    """Fetched client JWKS by URL, for JWKS_CACHE_S; refetched at once when a kid is unknown (rotation)."""

    entries: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)

    async def get(self, url: str, policy: FetchPolicy, *, refresh: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        hit = self.entries.get(url)
        if hit and not refresh and now - hit[0] < JWKS_CACHE_S:
            return hit[1]
        try:
            fetched = await fetch(url, policy, expression=None, headers={"Accept": "application/json"})
        except ImagingError as exc:
            raise invalid_client(f"the client's JWKS could not be used: {exc.diagnostics}") from exc
        try:
            document = json.loads(fetched.content)
        except ValueError as exc:
            raise invalid_client(f"the client's JWKS at {url} is not JSON") from exc
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise invalid_client(f"the client's JWKS at {url} has no 'keys' list")
        self.entries[url] = (now, document)
        return document


@dataclass
class AssertionChecker:
    registry: ClientRegistry
    jku_policy: FetchPolicy
    jwks_cache: JwksCache = field(default_factory=JwksCache)

    async def authenticate(self, assertion: str, token_url: str) -> Client:
        """The client the assertion authenticates, or OAuthError(invalid_client)."""
        if len(assertion) > MAX_ASSERTION_CHARS:
            raise invalid_client("the client assertion is too long")
        try:  # only to learn which client's keys to verify with; nothing is trusted before verification
            compact = jws.extract_compact(assertion.encode())
            header = compact.headers()
            unverified = json.loads(compact.payload)
        except (JoseError, ValueError, TypeError, UnicodeError) as exc:
            raise invalid_client("the client assertion is not a compact JWS") from exc
        alg = header.get("alg")
        if alg not in CLIENT_ALGS:
            raise invalid_client(f"the client assertion must be signed with RS384 or ES384, not {alg!r}")
        if not isinstance(header.get("kid"), str):
            raise invalid_client("the client assertion's header needs a 'kid'")
        client_id = unverified.get("iss") if isinstance(unverified, dict) else None
        if not isinstance(client_id, str) or not client_id:
            raise invalid_client("the client assertion needs 'iss' (the client id)")
        client = await run_in_threadpool(self.registry.get, client_id)
        if client is None:
            raise invalid_client("unknown client")
        claims = await self._verified_claims(assertion, header, client)
        self._check_claims(claims, client.client_id, token_url)
        fresh = await run_in_threadpool(
            self.registry.remember_jti, client.client_id, claims["jti"], int(claims["exp"]) + CLOCK_LEEWAY_S
        )
        if not fresh:
            raise invalid_client("the client assertion's jti was already used (replay)")
        return client

    async def _keyset(self, header: dict[str, Any], client: Client, *, refresh: bool = False) -> KeySet:
        jku = header.get("jku")
        if jku is not None and jku != client.jwks_url:
            raise invalid_client("the assertion's 'jku' is not the JWKS URL registered for this client")
        if client.jwks_url:
            document = await self.jwks_cache.get(client.jwks_url, self.jku_policy, refresh=refresh)
        else:
            document = client.jwks or {"keys": []}
        try:
            return KeySet.import_key_set(document)
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            raise invalid_client("the client's JWKS cannot be loaded") from exc

    async def _verified_claims(self, assertion: str, header: dict[str, Any], client: Client) -> dict[str, Any]:
        keyset = await self._keyset(header, client)
        try:
            try:
                return jwt.decode(assertion, keyset, algorithms=list(CLIENT_ALGS)).claims
            except InvalidKeyIdError:
                if not client.jwks_url:
                    raise
                keyset = await self._keyset(header, client, refresh=True)  # the client may have rotated keys
                return jwt.decode(assertion, keyset, algorithms=list(CLIENT_ALGS)).claims
        except InvalidKeyIdError as exc:
            raise invalid_client("no key with the assertion's kid is registered for this client") from exc
        except BadSignatureError as exc:
            raise invalid_client("the client assertion's signature does not verify") from exc
        except (JoseError, ValueError, TypeError) as exc:
            raise invalid_client(f"the client assertion cannot be verified ({exc})") from exc

    @staticmethod
    def _check_claims(claims: dict[str, Any], client_id: str, token_url: str) -> None:
        registry = jwt.JWTClaimsRegistry(
            leeway=CLOCK_LEEWAY_S,
            iss={"essential": True, "value": client_id},
            sub={"essential": True, "value": client_id},
            aud={"essential": True, "value": token_url},
            exp={"essential": True},
            jti={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError as exc:
            raise invalid_client("the client assertion has expired (exp)") from exc
        except MissingClaimError as exc:
            raise invalid_client(f"the client assertion lacks a required claim ({exc.description})") from exc
        except InvalidClaimError as exc:
            if exc.claim == "aud":
                raise invalid_client(f"the client assertion's aud must be this token endpoint: {token_url}") from exc
            if exc.claim in ("iss", "sub"):
                raise invalid_client("the client assertion's iss and sub must both be the client id") from exc
            raise invalid_client(f"the client assertion has an invalid claim ({exc.description})") from exc
        except JoseError as exc:  # nbf/iat in the future and the like
            raise invalid_client(f"the client assertion is not valid yet or malformed ({exc.description})") from exc
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise invalid_client("the client assertion's exp must be a number")
        if exp > time.time() + MAX_ASSERTION_LIFETIME_S + CLOCK_LEEWAY_S:
            raise invalid_client("the client assertion's exp is more than 5 minutes in the future")
        if not claims["jti"] or len(claims["jti"]) > 255:
            raise invalid_client("the client assertion's jti must be 1-255 characters")
