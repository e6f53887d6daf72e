"""The models the migrations must match: every table module of the server, imported here so that
SQLModel.metadata holds them all (a table whose module is not listed is not migrated)."""

from __future__ import annotations

import importlib

from sqlalchemy import MetaData
from sqlmodel import SQLModel

TABLE_MODULES = (
    "fhir_server.storage.tables",
    "fhir_server.queue.tables",
    "fhir_server.auth.tables",
    "fhir_server.dicom.tables",
)


def target_metadata() -> MetaData:
    for name in TABLE_MODULES:
        importlib.import_module(name)
    return SQLModel.metadata
