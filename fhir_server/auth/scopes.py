"""SMART scopes (v1 and v2 syntax) -> what a principal may do, and what an HTTP request needs.

Scopes: `system/*.read`, `system/Observation.write`, `user/*.*`, `system/DiagnosticReport.rs`,
`system/*.cruds`. `.read` = r+s, `.write` = c+u+d, `.*` = cruds. `system/` and `user/` scopes
grant; `patient/` scopes grant nothing because this server does not restrict results to one
patient's compartment, and scopes with `?` conditions (v2 granular scopes) grant nothing for the
same reason: refusing is safer than over-sharing.

Interactions: read/vread/history -> r, search -> s, create -> c, update -> u, delete -> d;
`$analyze` on T -> r on T and c on DiagnosticReport (an analysis reads its input and writes a
report); other `$operation`s -> r; system history -> r on `*`. Transaction/batch entries are
checked one by one by the bundle processor with `authorize`.
"""

from __future__ import annotations

from dataclasses import dataclass

FHIR_PREFIX = "/fhir"
PERMISSIONS = "cruds"
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


@dataclass(frozen=True)
class Grant:
    resource_type: str  # a type or "*"
    permissions: frozenset[str]  # subset of c r u d s


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do; `request.state.principal` on every authenticated route.

    `client_id` is the registered SMART client (None when authentication is disabled, on open
    paths, and for nobody else); static development tokens get a `dev-token-...` id.
    """

    scopes: tuple[str, ...]
    grants: tuple[Grant, ...]
    client_id: str | None = None

    def allows(self, resource_type: str, permission: str) -> bool:
        for grant in self.grants:
            if permission in grant.permissions and grant.resource_type in ("*", resource_type):
                return True
        return False


# Authentication disabled (the embedded default on 127.0.0.1): everything is allowed.
OPEN_PRINCIPAL = Principal(("system/*.cruds",), (Grant("*", frozenset(PERMISSIONS)),), None)
# Authentication enabled, but the path needs no token (/metadata, /healthz, OPTIONS): nothing is granted.
ANONYMOUS = Principal((), (), None)


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
    elif perms and set(perms) <= set(PERMISSIONS) and len(set(perms)) == len(perms):
        letters = perms
    else:
        return None
    return Grant(rtype, frozenset(letters))


def principal_for(scopes_text: str, client_id: str | None = None) -> Principal:
    scopes = tuple(scopes_text.split())
    return Principal(scopes, tuple(g for g in (parse_scope(s) for s in scopes) if g is not None), client_id)


def granted_scopes(requested: str, registered: str) -> list[str]:
    """requested ∩ registered: a requested scope is granted when it is registered verbatim, or
    when every permission it names is covered by the registered scopes for its resource type
    (registered `system/*.rs` covers a request for `system/Patient.read`; a request for
    `system/*.rs` needs a registered wildcard). Scopes that grant nothing here are only granted
    verbatim. Order and spelling of the request are kept."""
    allowed = set(registered.split())
    holder = principal_for(registered)
    out: list[str] = []
    for scope in requested.split():
        if scope in out:
            continue
        grant = parse_scope(scope)
        if scope in allowed or (
            grant is not None and all(holder.allows(grant.resource_type, p) for p in grant.permissions)
        ):
            out.append(scope)
    return out


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


def denied_message(rtype: str, permission: str) -> str:
    what = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}[permission]
    target = "all resource types" if rtype == "*" else rtype
    return f"the token's scopes do not allow {what} on {target} (needs e.g. system/{rtype}.{permission})"
