"""The one authentication boundary: a FastAPI dependency that every FHIR and legacy route uses.

When `settings.auth_enabled`, a request needs `Authorization: Bearer <token>` where the token is a
key of `settings.auth_tokens` (token -> space-separated SMART scopes). Missing or unknown token ->
401 with `WWW-Authenticate: Bearer`; a valid token without a scope for the FHIR interaction -> 403.
Errors are rendered by fhir_server.errors (OperationOutcome under /fhir, JSON error elsewhere).

Scopes (SMART v1 and v2 syntax): `system/*.read`, `system/Observation.write`, `user/*.*`,
`system/DiagnosticReport.rs`, `system/*.cruds`. `.read` = r+s, `.write` = c+u+d, `.*` = cruds.
`system/` and `user/` scopes grant; `patient/` scopes grant nothing because this server does not
restrict results to one patient's compartment, and scopes with `?` conditions (v2 granular
scopes) grant nothing for the same reason: refusing is safer than over-sharing.

Interactions: read/vread/history -> r, search -> s, create -> c, update -> u, delete -> d;
`$operation` on T -> r on T and c on DiagnosticReport (an analysis reads its input and writes a
report); system history -> r on `*`. Transaction/batch entries are checked one by one in the
bundle processor with `authorize`. Legacy (non-FHIR) routes need a valid token only.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/fhir/metadata", "/.well-known/smart-configuration"})
FHIR_PREFIX = "/fhir"
REALM = 'Bearer realm="cxr-fhir"'
CORS_EXPOSE = ["Location", "ETag", "Content-Location", "Last-Modified"]

_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class Grant:
    resource_type: str  # a type or "*"
    permissions: frozenset[str]  # subset of c r u d s


@dataclass(frozen=True)
class Principal:
    scopes: tuple[str, ...]
    grants: tuple[Grant, ...]

    def allows(self, resource_type: str, permission: str) -> bool:
        for grant in self.grants:
            if permission in grant.permissions and grant.resource_type in ("*", resource_type):
                return True
        return False


def parse_scope(scope: str) -> Grant | None:
    """One SMART scope -> Grant, or None when it grants no resource access here."""
    context, slash, rest = scope.partition("/")
    if not slash or context not in ("system", "user") or "?" in rest:
        return None
    rtype, dot, perms = rest.rpartition(".")
    if not dot or not rtype:
        return None
    if perms in _V1:
        letters = _V1[perms]
    elif perms and set(perms) <= set("cruds") and len(set(perms)) == len(perms):
        letters = perms
    else:
        return None
    return Grant(rtype, frozenset(letters))


def principal_for(scopes_text: str) -> Principal:
    scopes = tuple(scopes_text.split())
    return Principal(scopes, tuple(g for g in (parse_scope(s) for s in scopes) if g is not None))


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = REALM + (f', error="{error}"' if error else "")
    return HTTPException(status_code=401, detail=message, headers={"WWW-Authenticate": challenge})


def _forbidden(message: str) -> HTTPException:
    return HTTPException(status_code=403, detail=message)


def _lookup(tokens: dict[str, str], presented: str) -> str | None:
    found = None
    for token, scopes in tokens.items():  # compare against every token: no timing hint
        if hmac.compare_digest(token.encode(), presented.encode()):
            found = scopes
    return found


def required_permissions(method: str, path: str) -> list[tuple[str, str]]:
    """(resource type, permission) pairs an HTTP request on a FHIR path needs."""
    parts = [p for p in path[len(FHIR_PREFIX):].split("/") if p]
    if not parts:
        return []  # transaction/batch: each entry is authorized by the bundle processor
    head = parts[0]
    if head == "_history":
        return [("*", "r")]
    if not head[:1].isupper():
        return []  # e.g. job polling: a valid token is enough
    rtype, rest = head, parts[1:]
    if "$analyze" in rest:  # writes a DiagnosticReport and its results
        return [(rtype, "r"), ("DiagnosticReport", "c")]
    if any(p.startswith("$") for p in rest):  # e.g. CodeSystem/$lookup: reads only
        return [(rtype, "r")]
    if not rest:  # type level: search, create, or conditional update / delete ([type]?criteria)
        return [(rtype, {"GET": "s", "HEAD": "s", "PUT": "u", "DELETE": "d"}.get(method, "c"))]
    if rest[0] == "_search":
        return [(rtype, "s")]
    if rest[0] == "_history" or method in ("GET", "HEAD"):
        return [(rtype, "r")]
    return [(rtype, {"PUT": "u", "DELETE": "d", "PATCH": "u"}.get(method, "c"))]


async def require_auth(request: Request) -> Principal | None:
    """The dependency. Returns the Principal (None when auth is disabled or the path is open)."""
    settings = request.app.state.settings
    if not settings.auth_enabled or request.url.path in OPEN_PATHS or request.method == "OPTIONS":
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("Authorization: Bearer <token> is required")
    scopes = _lookup(settings.auth_tokens, token.strip())
    if scopes is None:
        raise _unauthorized("the bearer token is not valid", "invalid_token")
    principal = principal_for(scopes)
    request.state.principal = principal
    path = request.url.path
    if path == FHIR_PREFIX or path.startswith(FHIR_PREFIX + "/"):
        for rtype, permission in required_permissions(request.method, path):
            if not principal.allows(rtype, permission):
                raise _forbidden(_denied(rtype, permission))
    return principal


def _denied(rtype: str, permission: str) -> str:
    what = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}[permission]
    target = "all resource types" if rtype == "*" else rtype
    return f"the token's scopes do not allow {what} on {target} (needs e.g. system/{rtype}.{permission})"


def authorize(request: Request, resource_type: str, permission: str) -> None:
    """Check one more interaction for the current request (transaction/batch entries)."""
    settings = request.app.state.settings
    if not settings.auth_enabled:
        return
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or not principal.allows(resource_type, permission):
        raise _forbidden(_denied(resource_type, permission))


def add_cors(app: FastAPI) -> None:
    """Browsers may call the API from any origin (bearer tokens, no cookies) and read our headers."""
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=CORS_EXPOSE,
    )
