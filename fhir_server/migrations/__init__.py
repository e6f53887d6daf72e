"""Alembic migrations for every table (resources, versions, search index, queue, and the tables of
auth, audit and the DICOM node), plus the runner behind `cxr db upgrade` and start-up upgrades.

Why Alembic: it is SQLAlchemy's own migration tool (sqlmodel tables are SQLAlchemy tables), it
diffs the models against a live database (the test that keeps migrations and models equal), and
it runs the same scripts on SQLite (batch mode) and PostgreSQL.
"""
