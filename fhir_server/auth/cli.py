"""`cxr clients add|list|remove`: the registered SMART Backend Services clients, in the database
the server uses (CXR_DATABASE_URL, else the SQLite file in CXR_DATA_DIR)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import httpx

from fhir_server.settings import Settings

from .registry import ClientRegistry, RegistrationError


def _registry() -> tuple[ClientRegistry, object]:
    from fhir_server.storage import Repository

    store = Repository.from_url(Settings().sqlalchemy_url)  # creates every table, ours included
    return ClientRegistry(store.engine), store


def cmd_add(args: argparse.Namespace) -> int:
    jwks = None
    if args.jwks is not None:
        try:
            jwks = json.loads(Path(args.jwks).read_text())
        except (OSError, ValueError) as exc:
            print(f"error: cannot read the JWKS file {args.jwks}: {exc}", file=sys.stderr)
            return 2
    if args.jwks_url is not None:
        url = httpx.URL(args.jwks_url)
        if url.scheme not in ("https", "http") or not url.host:
            print("error: --jwks-url must be an http(s) URL", file=sys.stderr)
            return 2
        allowed = {h.lower() for h in Settings().auth_jku_allowed_hosts}
        if url.host.lower() not in allowed:
            print(f"warning: {url.host} is not in CXR_AUTH_JKU_ALLOWED_HOSTS; the server will refuse this "
                  "client's tokens until it is", file=sys.stderr)
    from .scopes import parse_scope

    idle = [s for s in args.scopes.split() if parse_scope(s) is None]
    if idle:
        print(f"warning: these scopes grant nothing on this server (system/ or user/ resource scopes only, "
              f"no ?conditions): {' '.join(idle)}", file=sys.stderr)
    registry, store = _registry()
    try:
        client = registry.add(args.client_id, args.scopes, jwks=jwks, jwks_url=args.jwks_url, replace=args.replace)
    except RegistrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.dispose()
    keys = f"{len(client.jwks['keys'])} key(s) inline" if client.jwks else f"keys from {client.jwks_url}"
    print(f"registered client {client.client_id}: {keys}; scopes: {client.scopes}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry, store = _registry()
    try:
        clients = registry.list()
    finally:
        store.dispose()
    if args.json:
        print(json.dumps([{"client_id": c.client_id, "scopes": c.scopes, "jwks_url": c.jwks_url,
                           "kids": [k.get("kid") for k in (c.jwks or {}).get("keys", [])],
                           "created": c.created} for c in clients], indent=2))
        return 0
    if not clients:
        print("no clients registered")
    for c in clients:
        created = datetime.fromtimestamp(c.created, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        keys = c.jwks_url or "kids " + ",".join(str(k.get("kid")) for k in (c.jwks or {}).get("keys", []))
        print(f"{c.client_id}\t{created}\t{keys}\t{c.scopes}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    registry, store = _registry()
    try:
        removed = registry.remove(args.client_id)
    finally:
        store.dispose()
    if not removed:
        print(f"error: no client {args.client_id!r}", file=sys.stderr)
        return 1
    print(f"removed client {args.client_id} (its access tokens expire within 5 minutes)")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """A client key pair for onboarding and tests: the private JWK stays with the client, the public
    JWKS is what `cxr clients add --jwks` registers (or what the client serves at its jku)."""
    from joserfc.jwk import ECKey, RSAKey

    if args.alg == "ES384":
        key = ECKey.generate_key("P-384", private=True)
    else:
        key = RSAKey.generate_key(3072, private=True)
    kid = args.kid or key.thumbprint()
    private = {**key.as_dict(private=True), "kid": kid, "alg": args.alg}
    public = {"keys": [{**key.as_dict(private=False), "kid": kid, "alg": args.alg, "use": "sig"}]}
    for path in (args.private, args.jwks):
        if Path(path).exists():
            print(f"error: {path} exists; not overwriting a key", file=sys.stderr)
            return 2
    private_path = Path(args.private)
    private_path.touch(mode=0o600)
    private_path.write_text(json.dumps(private, indent=2))
    Path(args.jwks).write_text(json.dumps(public, indent=2))
    print(f"private key (keep it with the client): {args.private}\npublic JWKS (register it): {args.jwks}\nkid: {kid}")
    return 0


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    clients = sub.add_parser("clients", help="SMART Backend Services clients allowed to get access tokens")
    csub = clients.add_subparsers(dest="clients_command", required=True)
    add = csub.add_parser("add", help="register a client with its public keys and the scopes it may get")
    add.add_argument("client_id", metavar="ID")
    keys = add.add_mutually_exclusive_group(required=True)
    keys.add_argument("--jwks", metavar="FILE", help="JSON Web Key Set with the client's PUBLIC keys (RS384/ES384, each with a kid)")
    keys.add_argument("--jwks-url", metavar="URL", help="the client's JWKS URL (its jku); host must be in CXR_AUTH_JKU_ALLOWED_HOSTS")
    add.add_argument("--scopes", required=True, help='e.g. "system/*.rs system/Media.c system/DiagnosticReport.c"')
    add.add_argument("--replace", action="store_true", help="overwrite an existing registration of ID")
    add.set_defaults(func=cmd_add)
    lst = csub.add_parser("list", help="registered clients")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)
    rm = csub.add_parser("remove", help="unregister a client (it can get no new tokens)")
    rm.add_argument("client_id", metavar="ID")
    rm.set_defaults(func=cmd_remove)
    gen = csub.add_parser("keygen", help="make a client key pair: private JWK + public JWKS (for onboarding and tests)")
    gen.add_argument("--alg", choices=["ES384", "RS384"], default="ES384")
    gen.add_argument("--kid", help="key id (default: the key's RFC 7638 thumbprint)")
    gen.add_argument("--private", required=True, metavar="FILE", help="where the private JWK goes (mode 0600)")
    gen.add_argument("--jwks", required=True, metavar="FILE", help="where the public JWKS goes")
    gen.set_defaults(func=cmd_keygen)
