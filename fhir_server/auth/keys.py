"""The server's own signing key and the access tokens it signs.

The key (EC P-384, ES384) is generated on first use and kept as a private JWK in
`<data_dir>/auth/signing-key.jwk` (or CXR_AUTH_SIGNING_KEY_FILE), readable by its owner only, so
every worker and every restart signs and verifies with the same key. Creation is atomic
(write-to-temp + hard link), so two workers starting together end up with one key. Delete the file
to rotate: tokens signed with the old key stop working at once.

Access tokens are JWTs (RFC 9068 shape, `typ: at+jwt`): iss and aud = this server, sub and
client_id = the client, scope, iat, exp, jti. Only ES384 with this key verifies.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError
from joserfc.jwk import ECKey

SERVER_ALG = "ES384"
ISSUER = "cxr-fhir"  # a stable identifier: the public URL can differ per proxy, the key cannot
TOKEN_TYPE = "at+jwt"
CLOCK_LEEWAY_S = 30  # client assertions: the client's clock is not ours
ACCESS_TOKEN_LEEWAY_S = 5  # our own tokens: only the replicas' clocks differ


class InvalidAccessToken(Exception):
    def __init__(self, message: str, *, expired: bool = False):
        super().__init__(message)
        self.expired = expired


def load_or_create_key(path: Path) -> ECKey:
    path = path.expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = ECKey.generate_key("P-384", private=True)
        document = key.as_dict(private=True)
        document["kid"] = key.thumbprint()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".signing-key.")
        try:
            with os.fdopen(fd, "w") as fh:  # mkstemp: mode 0600 from the start
                json.dump(document, fh)
            try:
                os.link(tmp, path)  # atomic and fails if another worker won the race: keep theirs
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    key = ECKey.import_key(json.loads(path.read_text()))
    if not key.is_private or key.get("crv") != "P-384":
        raise ValueError(f"{path} must hold a private EC P-384 JWK (delete it to have a new one generated)")
    return key


@dataclass
class TokenSigner:
    key: ECKey
    lifetime_s: int = 300

    @property
    def kid(self) -> str:
        return self.key.kid or self.key.thumbprint()

    def issue(self, client_id: str, scopes: list[str]) -> tuple[str, int]:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": ISSUER,
            "sub": client_id,
            "client_id": client_id,
            "scope": " ".join(scopes),
            "iat": now,
            "exp": now + self.lifetime_s,
            "jti": secrets.token_urlsafe(16),
        }
        header = {"alg": SERVER_ALG, "typ": TOKEN_TYPE, "kid": self.kid}
        return jwt.encode(header, claims, self.key, algorithms=[SERVER_ALG]), self.lifetime_s

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a token this server issued; InvalidAccessToken otherwise."""
        try:
            decoded = jwt.decode(token, self.key, algorithms=[SERVER_ALG])
        except (JoseError, ValueError, TypeError) as exc:
            raise InvalidAccessToken("the bearer token is not valid") from exc
        if decoded.header.get("typ") != TOKEN_TYPE:
            raise InvalidAccessToken("the bearer token is not an access token of this server")
        registry = jwt.JWTClaimsRegistry(
            leeway=ACCESS_TOKEN_LEEWAY_S,
            iss={"essential": True, "value": ISSUER},
            aud={"essential": True, "value": ISSUER},
            exp={"essential": True},
            sub={"essential": True},
            scope={"essential": True},
        )
        try:
            registry.validate(decoded.claims)
        except ExpiredTokenError as exc:
            raise InvalidAccessToken("the access token has expired; request a new one", expired=True) from exc
        except JoseError as exc:
            raise InvalidAccessToken("the bearer token is not valid") from exc
        if not isinstance(decoded.claims.get("scope"), str):
            raise InvalidAccessToken("the bearer token is not valid")
        return decoded.claims
