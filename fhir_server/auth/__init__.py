"""Authentication and authorization: SMART Backend Services tokens, scopes, the request boundary.

    from fhir_server.auth import require_auth, authorize, add_cors, Principal

Modules (one job each): scopes (SMART scopes -> permissions), boundary (the FastAPI dependency),
token_endpoint (POST /auth/token), assertion (client assertion checks), keys (server signing key
and access tokens), registry + tables (clients and seen jtis in the database), context (per-app
state), cli (`cxr clients`).
"""

from .boundary import OPEN_PATHS, add_cors, authenticate, authorize, client_id_of, require_auth
from .context import lifespan_hook
from .scopes import Grant, Principal, parse_scope, principal_for, required_permissions
from .token_endpoint import router

__all__ = [
    "OPEN_PATHS",
    "Grant",
    "Principal",
    "add_cors",
    "authenticate",
    "authorize",
    "client_id_of",
    "lifespan_hook",
    "parse_scope",
    "principal_for",
    "require_auth",
    "required_permissions",
    "router",
]
