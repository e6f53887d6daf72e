"""Helpers for the SMART Backend Services tests: client keys, JWKS files, signed assertions."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_URL = "http://testserver/auth/token"  # TestClient's origin


def new_key(alg: str, kid: str) -> ECKey | RSAKey:
    if alg == "ES384":
        return ECKey.generate_key("P-384", parameters={"kid": kid}, private=True)
    return RSAKey.generate_key(2048, parameters={"kid": kid}, private=True)


def jwks_of(*keys: ECKey | RSAKey) -> dict[str, Any]:
    return {"keys": [k.as_dict(private=False) for k in keys]}


def write_jwks(path: Path, *keys: ECKey | RSAKey) -> Path:
    path.write_text(json.dumps(jwks_of(*keys)))
    return path


def assertion(
    key: ECKey | RSAKey,
    client_id: str,
    *,
    alg: str | None = None,
    aud: str = TOKEN_URL,
    exp_in: float = 240,
    jti: str | None = None,
    sub: str | None = None,
    header: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> str:
    alg = alg or ("ES384" if isinstance(key, ECKey) else "RS384")
    claims = {"iss": client_id, "sub": sub or client_id, "aud": aud, "exp": int(time.time() + exp_in),
              "jti": jti or uuid.uuid4().hex}
    for name in drop:
        claims.pop(name, None)
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT", **(header or {})}, claims, key, algorithms=[alg])


def token_form(client_assertion: str, scope: str = "system/*.rs", **extra: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": client_assertion,
        **extra,
    }
