"""The job table: one row per durable job, in the same database as the FHIR resources.

Because the row lives next to the resources, a job can be enqueued in the SAME transaction as the
resources it is about (the outbox pattern): a delivery is queued if and only if the result it
delivers was committed.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, DateTime, Index, Text
from sqlmodel import Field, SQLModel


class QueueJob(SQLModel, table=True):
    __tablename__ = "queue_job"
    __table_args__ = (
        Index("ix_qj_ready", "status", "run_after"),
        Index("ix_qj_task_status", "task", "status"),
        Index("ix_qj_dedupe", "dedupe_key", unique=True),
    )

    id: str = Field(primary_key=True, max_length=64)
    task: str = Field(max_length=64)
    payload: str = Field(sa_column=Column(Text, nullable=False))  # JSON object
    # queued -> running -> done | failed | cancelled   (running -> queued again on a retry)
    status: str = Field(max_length=16)
    attempts: int = 0
    max_attempts: int = 5
    # a unique business key: enqueueing the same key again returns the existing job
    dedupe_key: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    run_after: datetime = Field(sa_column=Column(DateTime(timezone=False), nullable=False))
    # who runs it and until when; a running job whose lease expired (its worker died) is taken over
    locked_by: str | None = Field(default=None, max_length=128)
    lease_until: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=False), nullable=True))
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    result: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # JSON, set when done
    created: datetime = Field(sa_column=Column(DateTime(timezone=False), nullable=False))
    updated: datetime = Field(sa_column=Column(DateTime(timezone=False), nullable=False))
