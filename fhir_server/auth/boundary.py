"""The one authentication boundary: a FastAPI dependency that every FHIR and legacy route uses.

When `settings.auth_enabled`, a request needs `Authorization: Bearer <access token>` where the
token was issued by this server's POST /auth/token (SMART Backend Services) and has not expired.
With CXR_AUTH_DEV_STATIC_TOKENS=true (development only) the keys of CXR_AUTH_TOKENS
(token -> space-separated SMART scopes) are accepted too. No or an invalid token -> 401 with
`WWW-Authenticate: Bearer` (error="invalid_token" for a bad or expired one); a valid token without
a scope for the FHIR interaction -> 403. Errors are rendered by fhir_server.errors
(OperationOutcome under /fhir, JSON error elsewhere). Legacy (non-FHIR) routes need a valid token only.

`request.state.principal` is ALWAYS set by `require_auth` (the audit trail reads its client_id):
- auth disabled: OPEN_PRINCIPAL (all access, client_id None);
- auth enabled, open path (/metadata, /.well-known/smart-configuration, health) or CORS preflight:
  ANONYMOUS (no access, client_id None);
- otherwise the token's Principal (client_id = the SMART client, or `dev-token-<hash>` in dev mode).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException

from .context import auth_context
from .keys import InvalidAccessToken
from .scopes import (
    ANONYMOUS,
    FHIR_PREFIX,
    OPEN_PRINCIPAL,
    Principal,
    denied_message,
    principal_for,
    required_permissions,
)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/fhir/metadata", "/.well-known/smart-configuration", "/auth/token"})
REALM = 'Bearer realm="cxr-fhir"'
CORS_EXPOSE = ["Location", "ETag", "Content-Location", "Last-Modified", "X-Request-ID", "Retry-After"]
_CACHE_KEY = "cxr.authentication"  # in the ASGI scope: the rate limiter and the dependency verify once


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = REALM
    if error:
        challenge += f', error="{error}", error_description="{message}"'
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": challenge})


def _forbidden(message: str) -> HTTPException:
    return HTTPException(status_code=403, detail=message)


def _lookup(tokens: dict[str, str], presented: str) -> str | None:
    found = None
    for token, scopes in tokens.items():  # compare against every token: no timing hint
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = scopes
    return found


def _authenticate(request: Request) -> Principal:
    settings = request.app.state.settings
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("Authorization: Bearer <token> is required")
    if settings.auth_dev_static_tokens and settings.auth_tokens:
        scopes = _lookup(settings.auth_tokens, token)
        if scopes is not None:
            return principal_for(scopes, "dev-token-" + hashlib.sha256(token.encode()).hexdigest()[:8])
    try:
        claims = auth_context(request.app).signer.verify(token)
    except InvalidAccessToken as exc:
        raise _unauthorized(str(exc), "invalid_token") from exc
    return principal_for(claims["scope"], claims["sub"])


def authenticate(request: Request) -> Principal:
    """The caller's Principal (verified once per request), or HTTPException(401)."""
    if not request.app.state.settings.auth_enabled:
        return OPEN_PRINCIPAL
    cached = request.scope.get(_CACHE_KEY)
    if cached is None:
        try:
            cached = _authenticate(request)
        except HTTPException as exc:
            cached = exc
        request.scope[_CACHE_KEY] = cached
    if isinstance(cached, HTTPException):
        raise cached
    return cached


def client_id_of(request: Request) -> str | None:
    """The authenticated client id, or None (no/invalid token, auth disabled); never raises."""
    try:
        return authenticate(request).client_id
    except HTTPException:
        return None


async def require_auth(request: Request) -> Principal:
    """The dependency: authenticates, checks the FHIR interaction's scopes, sets request.state.principal."""
    settings = request.app.state.settings
    if not settings.auth_enabled:
        request.state.principal = OPEN_PRINCIPAL
        return OPEN_PRINCIPAL
    if request.url.path in OPEN_PATHS or request.method == "OPTIONS":
        request.state.principal = ANONYMOUS
        return ANONYMOUS
    principal = authenticate(request)
    request.state.principal = principal
    path = request.url.path
    if path == FHIR_PREFIX or path.startswith(FHIR_PREFIX + "/"):
        for rtype, permission in required_permissions(request.method, path):
            if not principal.allows(rtype, permission):
                # RFC 6750 section 3.1: say which scope would do
                challenge = f'{REALM}, error="insufficient_scope", scope="system/{rtype}.{permission}"'
                raise HTTPException(403, denied_message(rtype, permission), headers={"WWW-Authenticate": challenge})
    return principal


def authorize(request: Request, resource_type: str, permission: str) -> None:
    """Check one more interaction for the current request (transaction/batch entries)."""
    settings = request.app.state.settings
    if not settings.auth_enabled:
        return
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or not principal.allows(resource_type, permission):
        raise _forbidden(denied_message(resource_type, permission))


def add_cors(app: FastAPI) -> None:
    """Browsers may call the API from any origin (bearer tokens, no cookies) and read our headers."""
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=CORS_EXPOSE,
    )
