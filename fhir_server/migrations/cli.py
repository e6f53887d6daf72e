"""`cxr db upgrade` and `cxr db status`."""

from __future__ import annotations

import argparse


def _engine():
    from fhir_server.settings import Settings
    from fhir_server.storage.engine import make_engine

    return make_engine(Settings().sqlalchemy_url)


def cmd_db(args: argparse.Namespace) -> int:
    from fhir_server.migrations import runner

    engine = _engine()
    try:
        if args.db_command == "upgrade":
            state = runner.upgrade(engine, args.revision)
            print(f"database schema at {state.current} (newest {state.head})")
            return 0
        state = runner.status(engine)
        print(f"database schema at {state.current or '(none)'}; this server needs {state.head}: "
              f"{'up to date' if state.up_to_date else 'run `cxr db upgrade`'}")
        return 0 if state.up_to_date else 1
    finally:
        engine.dispose()


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser("db", help="Database schema: upgrade (migrations) or status (CXR_DATABASE_URL / CXR_DATA_DIR)")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="apply the migrations (safe to run on every deploy; replicas may run meanwhile)")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    dbsub.add_parser("status", help="the schema's revision; exit 1 when an upgrade is needed")
    db.set_defaults(func=cmd_db)
