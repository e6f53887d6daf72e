"""Two small tables beside the FHIR resources: what the DICOM listener received, per study.

They live in the FHIR database so that receiving an instance, scheduling its study's analysis
(a queue_job row) and, later, recording which revision of the study was analysed (in the same
transaction as the report) are each one atomic commit.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, DateTime, Index, Text
from sqlalchemy.engine import Engine
from sqlmodel import Field, SQLModel

from fhir_server.storage.engine import create_tables


class DicomInstance(SQLModel, table=True):
    __tablename__ = "dicom_instance"
    __table_args__ = (Index("ix_dicom_instance_study", "study_uid"),)

    sop_uid: str = Field(primary_key=True, max_length=64)
    study_uid: str = Field(max_length=64)
    series_uid: str = Field(max_length=64)
    sop_class_uid: str = Field(max_length=64)
    transfer_syntax: str = Field(max_length=64)
    path: str = Field(sa_column=Column(Text, nullable=False))  # absolute path of the fsync'd Part 10 file
    sha256: str = Field(max_length=64)
    size: int = 0
    calling_ae: str = Field(default="", max_length=16)
    received: datetime = Field(sa_column=Column(DateTime(timezone=False), nullable=False))
    times_received: int = 1
    # an SR / SC this server made, routed back by the PACS: kept, but not part of what is analysed
    own_output: bool = False


class DicomStudy(SQLModel, table=True):
    __tablename__ = "dicom_study"

    study_uid: str = Field(primary_key=True, max_length=64)
    # bumped whenever the study's content changes (a new instance, or a SOP instance re-sent with
    # different bytes); an identical re-send changes nothing, so it can never make a new report
    revision: int = 0
    last_received: datetime = Field(sa_column=Column(DateTime(timezone=False), nullable=False))
    # the settle job chain: dedupe key "dicom.analyze_study:<uid>:<jobs>" names the newest job
    jobs: int = 0
    analysed_revision: int = 0  # written in the same transaction as the report (or the refusal)
    state: str = Field(default="receiving", max_length=16)  # receiving | analysed | refused
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    imaging_study_id: str | None = Field(default=None, max_length=64)
    report_id: str | None = Field(default=None, max_length=64)


def create_dicom_tables(engine: Engine) -> None:
    create_tables(engine, tables=[DicomInstance.__table__, DicomStudy.__table__])
