"""POST /auth/token: SMART Backend Services token endpoint (client_credentials + private_key_jwt).

Form fields: grant_type=client_credentials, scope, client_assertion_type=
urn:ietf:params:oauth:client-assertion-type:jwt-bearer, client_assertion. Success: 200
{"access_token", "token_type": "bearer", "expires_in", "scope"} with scope = requested ∩ registered.
Errors are RFC 6749 section 5.2 JSON: invalid_request / unsupported_grant_type / invalid_scope
(400), invalid_client (401). Both carry Cache-Control: no-store.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .assertion import ASSERTION_TYPE, OAuthError
from .context import auth_context
from .scopes import granted_scopes

log = logging.getLogger("fhir_server.auth")
router = APIRouter(tags=["auth"])
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
MAX_FORM_FIELDS = 16
MAX_BODY_BYTES = 64 * 1024


def token_url(request: Request) -> str:
    """The URL clients must put in their assertion's aud: CXR_OAUTH_TOKEN_URL, else this request's origin."""
    configured = getattr(request.app.state.settings, "oauth_token_url", None)
    return configured or str(request.base_url).rstrip("/") + "/auth/token"


def _oauth_error(exc: OAuthError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description}, status_code=exc.status_code, headers=NO_STORE
    )


async def _form(request: Request) -> dict[str, list[str]]:
    """The urlencoded body, read up to MAX_BODY_BYTES (a token request is a few KB; Starlette's own
    form parser would read any size into memory first)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the token request must be application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise OAuthError("invalid_request", f"the token request is larger than {MAX_BODY_BYTES} bytes")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                          max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError("invalid_request", "the token request body is not a valid form") from exc
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form


def _single(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name, [])
    if len(values) > 1:
        raise OAuthError("invalid_request", f"'{name}' is given more than once")
    return values[0] if values else None


_FORM_FIELD = {"type": "string"}
_OAUTH_ERROR = {
    "description": "OAuth 2.0 error (RFC 6749 section 5.2)",
    "content": {"application/json": {"schema": {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string", "enum": ["invalid_request", "invalid_client", "invalid_scope",
                                             "unsupported_grant_type"]},
        "error_description": {"type": "string"}}}}},
}
OPENAPI = {
    "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
        "type": "object",
        "required": ["grant_type", "scope", "client_assertion_type", "client_assertion"],
        "properties": {
            "grant_type": {"type": "string", "enum": ["client_credentials"]},
            "scope": {**_FORM_FIELD, "example": "system/*.rs"},
            "client_assertion_type": {"type": "string", "enum": [ASSERTION_TYPE]},
            "client_assertion": {**_FORM_FIELD, "description": "JWT signed RS384/ES384 by a registered key"},
        }}}}},
    "responses": {
        "200": {"description": "access token", "content": {"application/json": {"schema": {
            "type": "object", "required": ["access_token", "token_type", "expires_in", "scope"], "properties": {
                "access_token": {"type": "string"}, "token_type": {"type": "string", "enum": ["bearer"]},
                "expires_in": {"type": "integer"}, "scope": {"type": "string"}}}}}},
        "400": _OAUTH_ERROR,
        "401": _OAUTH_ERROR,
    },
}


@router.post(
    "/auth/token",
    summary="SMART Backend Services token endpoint",
    description="client_credentials grant with a private_key_jwt client assertion (RS384 or ES384)",
    openapi_extra=OPENAPI,
    response_class=JSONResponse,
)
async def token(request: Request) -> JSONResponse:
    try:
        form = await _form(request)
        grant_type = _single(form, "grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required (client_credentials)")
        if grant_type != "client_credentials":
            raise OAuthError("unsupported_grant_type", "only grant_type=client_credentials is supported")
        assertion_type = _single(form, "client_assertion_type")
        assertion = _single(form, "client_assertion")
        if not assertion_type or not assertion:
            raise OAuthError("invalid_request", "client_assertion_type and client_assertion are required")
        if assertion_type != ASSERTION_TYPE:
            raise OAuthError("invalid_client", f"client_assertion_type must be {ASSERTION_TYPE}", 401)
        requested = _single(form, "scope")
        if not requested or not requested.split():
            raise OAuthError("invalid_request", "scope is required")
        ctx = auth_context(request.app)
        client = await ctx.assertions.authenticate(assertion, token_url(request))
        scopes = granted_scopes(requested, client.scopes)
        if not scopes:
            raise OAuthError("invalid_scope", "none of the requested scopes is registered for this client")
    except OAuthError as exc:
        log.info("token request refused: %s", exc.error)
        return _oauth_error(exc)
    access_token, lifetime = ctx.signer.issue(client.client_id, scopes)
    request.state.client_id = client.client_id  # the access log names who got a token
    log.info("access token issued to client %s", client.client_id)
    return JSONResponse(
        {"access_token": access_token, "token_type": "bearer", "expires_in": lifetime, "scope": " ".join(scopes)},
        headers=NO_STORE,
    )
