"""Alembic environment: runs on the connection handed over by fhir_server.migrations.runner."""

from __future__ import annotations

from alembic import context

from fhir_server.migrations.metadata import target_metadata

config = context.config


def run_migrations_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=target_metadata(),
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things in place
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
