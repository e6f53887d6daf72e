"""Database tables: one row per resource version, plus a search index of the current versions.

All timestamps are naive UTC datetimes (the same on SQLite and PostgreSQL); `storage.timeutil`
converts at the edges.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, DateTime, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


class ResourceVersion(SQLModel, table=True):
    """One version of one resource. `is_current` marks the newest version of (type, id)."""

    __tablename__ = "resource_version"
    __table_args__ = (
        # Two writers that both read version n and both try to write n+1 collide here: the
        # optimistic-concurrency check that works the same on SQLite and PostgreSQL.
        UniqueConstraint("resource_type", "resource_id", "version_id", name="uq_resource_version"),
        Index("ix_rv_current", "resource_type", "is_current", "deleted", "last_updated"),
        Index("ix_rv_type_id", "resource_type", "resource_id"),
        Index("ix_rv_last_updated", "last_updated"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    version_id: int
    last_updated: datetime = Field(sa_column=Column(DateTime(timezone=False), nullable=False))
    deleted: bool = False
    is_current: bool = True
    # "create" | "update" | "delete": what produced this version (history bundles report it).
    method: str = Field(max_length=8)
    # The resource JSON including meta; NULL for a deletion tombstone.
    content: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class SearchIndex(SQLModel, table=True):
    """Normalised search values of the current, non-deleted version of a resource.

    One row per (resource, parameter, value). Which columns are filled depends on the parameter
    type: token -> system/code, reference -> ref_type/ref_id (+ code holds the literal reference),
    string -> value_str (normalised) and code (exact), date -> date_low/date_high (inclusive),
    uri -> code, number -> number.
    """

    __tablename__ = "search_index"
    __table_args__ = (
        Index("ix_si_resource", "resource_type", "resource_id"),
        Index("ix_si_token", "resource_type", "param", "code"),
        Index("ix_si_ref", "param", "ref_type", "ref_id"),
        Index("ix_si_string", "resource_type", "param", "value_str"),
        Index("ix_si_date", "resource_type", "param", "date_low", "date_high"),
    )

    pk: int | None = Field(default=None, primary_key=True)
    resource_type: str = Field(max_length=64)
    resource_id: str = Field(max_length=64)
    param: str = Field(max_length=64)
    system: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    code: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    value_str: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    ref_type: str | None = Field(default=None, max_length=64)
    ref_id: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    date_low: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=False), nullable=True))
    date_high: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=False), nullable=True))
    number: float | None = None
