"""The authorization server's per-application state, built on first use and kept on app.state.

Lazily, so every way of assembling the app (create_app, the test helpers that mount only the FHIR
routers) gets the same behaviour without a lifespan hook: the signing key is loaded or generated,
the client registry is bound to app.state.store's engine, and the development mode is logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI

from fhir_server.imaging.fetch import FetchPolicy

from .assertion import JWKS_MAX_BYTES, AssertionChecker
from .keys import TokenSigner, load_or_create_key
from .registry import ClientRegistry

log = logging.getLogger("fhir_server.auth")
_lock = threading.Lock()


@dataclass
class AuthContext:
    signer: TokenSigner
    registry: ClientRegistry
    assertions: AssertionChecker


def auth_context(app: FastAPI) -> AuthContext:
    ctx: AuthContext | None = getattr(app.state, "auth", None)
    if ctx is not None:
        return ctx
    with _lock:
        ctx = getattr(app.state, "auth", None)
        if ctx is None:
            ctx = _build(app)
            app.state.auth = ctx
    return ctx


def _build(app: FastAPI) -> AuthContext:
    settings = app.state.settings
    signer = TokenSigner(load_or_create_key(settings.signing_key_path), settings.auth_token_lifetime_s)
    registry = ClientRegistry(app.state.store.engine)
    policy = FetchPolicy(
        allowed_hosts=list(settings.auth_jku_allowed_hosts),
        timeout_s=float(settings.fetch_timeout_s),
        max_bytes=JWKS_MAX_BYTES,
        **getattr(app.state, "fetch_policy_overrides", {}),  # tests inject a resolver that never touches DNS
    )
    return AuthContext(signer, registry, AssertionChecker(registry, policy))


@asynccontextmanager
async def lifespan_hook(app: FastAPI) -> AsyncIterator[None]:
    """Say which authentication mode runs, and load the key and registry before the first request."""
    settings = app.state.settings
    log_mode(settings)
    if settings.auth_enabled:
        auth_context(app)
    yield


def log_mode(settings) -> None:  # settings: fhir_server.settings.Settings
    if not settings.auth_enabled:
        if settings.host in ("127.0.0.1", "localhost", "::1"):
            log.info("authentication is disabled (CXR_AUTH_ENABLED=false): every local caller has full access")
        else:
            log.warning(
                "authentication is DISABLED while listening on %s: anyone who reaches this port can read and "
                "write everything; set CXR_AUTH_ENABLED=true (see README, Security)", settings.host,
            )
    elif settings.auth_dev_static_tokens:
        log.warning(
            "DEVELOPMENT MODE: static bearer tokens from CXR_AUTH_TOKENS are accepted "
            "(CXR_AUTH_DEV_STATIC_TOKENS=true); do not run this in production"
        )
    else:
        log.info("authentication enabled: SMART Backend Services access tokens from POST /auth/token")
        if settings.auth_tokens:
            log.warning("CXR_AUTH_TOKENS is set but ignored: static tokens need CXR_AUTH_DEV_STATIC_TOKENS=true")
