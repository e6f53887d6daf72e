"""Registered clients and replay memory, in the database (SQLite or PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, select

from fhir_server.storage.engine import WRITE_OPTION

from .tables import AUTH_TABLES, OAuthClient, SeenAssertion

CLIENT_ID_MAX = 255


class RegistrationError(ValueError):
    """A client registration that cannot be stored (bad id, bad JWKS, private keys, ...)."""


@dataclass(frozen=True)
class Client:
    client_id: str
    scopes: str
    jwks: dict[str, Any] | None
    jwks_url: str | None
    created: int


def public_jwks(document: Any) -> dict[str, Any]:
    """Validate a JWKS for registration: loadable by joserfc, >= 1 RSA or P-384 EC key, every key
    with a `kid`, and no private key material (a client registers only what it may publish)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list) or not document["keys"]:
        raise RegistrationError('the JWKS must be a JSON object {"keys": [...]} with at least one key')
    if not all(isinstance(k, dict) and isinstance(k.get("kid"), str) and k["kid"] for k in document["keys"]):
        # checked on the document: joserfc fills a missing kid with the thumbprint on import
        raise RegistrationError("every key in the JWKS needs a 'kid' (SMART Backend Services requires it)")
    try:
        keyset = KeySet.import_key_set(document)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise RegistrationError(f"the JWKS cannot be loaded: {exc}") from exc
    for key in keyset.keys:
        if key.key_type not in ("RSA", "EC"):
            raise RegistrationError(f"key {key.kid!r}: only RSA (RS384) and EC P-384 (ES384) keys are accepted")
        if key.key_type == "EC" and key.get("crv") != "P-384":
            raise RegistrationError(f"key {key.kid!r}: EC keys must be on curve P-384 (ES384)")
        if key.is_private:
            raise RegistrationError(f"key {key.kid!r} contains private key material: register the PUBLIC keys only")
    return {"keys": [k.as_dict(private=False) for k in keyset.keys]}


def _valid_client_id(client_id: str) -> str:
    if not client_id or len(client_id) > CLIENT_ID_MAX or not client_id.isprintable() or client_id.strip() != client_id:
        raise RegistrationError(f"a client id is 1-{CLIENT_ID_MAX} printable characters without surrounding spaces")
    return client_id


class ClientRegistry:
    """Clients and seen assertion ids on one engine. Creates its tables when missing."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._write = engine.execution_options(**{WRITE_OPTION: True})
        SQLModel.metadata.create_all(engine, tables=AUTH_TABLES)

    def add(self, client_id: str, scopes: str, *, jwks: Any = None, jwks_url: str | None = None,
            replace: bool = False) -> Client:
        _valid_client_id(client_id)
        if (jwks is None) == (jwks_url is None):
            raise RegistrationError("give exactly one of an inline JWKS or a JWKS URL")
        if not scopes.split():
            raise RegistrationError("a client needs at least one scope")
        row = OAuthClient(
            client_id=client_id,
            jwks=json.dumps(public_jwks(jwks)) if jwks is not None else None,
            jwks_url=jwks_url,
            scopes=" ".join(scopes.split()),
            created=int(time.time()),
        )
        with Session(self._write, expire_on_commit=False) as session, session.begin():
            existing = session.get(OAuthClient, client_id)
            if existing is not None:
                if not replace:
                    raise RegistrationError(f"client {client_id!r} is already registered (use --replace)")
                session.delete(existing)
                session.flush()
            session.add(row)
        return _client(row)

    def get(self, client_id: str) -> Client | None:
        if not client_id or len(client_id) > CLIENT_ID_MAX:
            return None
        with Session(self.engine) as session:
            row = session.get(OAuthClient, client_id)
            return _client(row) if row is not None else None

    def list(self) -> list[Client]:
        with Session(self.engine) as session:
            return [_client(r) for r in session.exec(select(OAuthClient).order_by(OAuthClient.client_id))]

    def remove(self, client_id: str) -> bool:
        with Session(self._write, expire_on_commit=False) as session, session.begin():
            row = session.get(OAuthClient, client_id)
            if row is None:
                return False
            session.delete(row)
        return True

    def remember_jti(self, client_id: str, jti: str, expires_at: int) -> bool:
        """Record an assertion id; False when it was already used (a replay). Prunes expired ids."""
        key = hashlib.sha256(f"{client_id}\0{jti}".encode()).hexdigest()
        now = int(time.time())
        try:
            with Session(self._write, expire_on_commit=False) as session, session.begin():
                session.exec(delete(SeenAssertion).where(SeenAssertion.expires_at < now))  # type: ignore[call-overload]
                if session.get(SeenAssertion, key) is not None:
                    return False
                session.add(SeenAssertion(key=key, expires_at=expires_at))
        except IntegrityError:  # another process stored the same jti between our check and insert
            return False
        return True


def _client(row: OAuthClient) -> Client:
    return Client(row.client_id, row.scopes, json.loads(row.jwks) if row.jwks else None, row.jwks_url, row.created)
