"""Helpers for the DICOM listener tests: generated CR/DX files (pydicom), a live server with the
listener on a free loopback port, dcmtk's storescu/echoscu, and waiting for a study's analysis."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from live_server import LiveServer, make_test_app, run_live_server
from model_fixtures import dicom_bytes, quadrant_pixels
from proc_server import free_port  # noqa: F401 - tests take it from here too

CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROC_SOP = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} (dcmtk) is not installed")
    return path


def make_file(folder: Path, study: str, series: str, sop: str, *, view: str = "PA", modality: str = "DX",
              sop_class: str = DX_SOP, size: int = 96, quadrant: str = "top_left", patient_id: str = "PAT-1",
              issuer: str | None = "HOSP", accession: str = "ACC-1", **tags: Any) -> Path:
    raw = dicom_bytes(quadrant_pixels(size, size, quadrant=quadrant), view=view, modality=modality, sop_class=sop_class)
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientBirthDate = patient_id, "Doe^Jane", "F", "19700102"
    if issuer:
        ds.IssuerOfPatientID = issuer
    ds.AccessionNumber = accession
    ds.StudyDate, ds.StudyTime = "20240501", "101500"
    ds.SeriesNumber, ds.InstanceNumber = 1, int(sop.rsplit(".", 1)[1]) % 1000
    for key, value in tags.items():
        setattr(ds, key, value)
    path = folder / f"{sop}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@contextmanager
def dicom_server(data_dir: Path, *, analyzer: Any = None, **overrides: Any) -> Iterator[LiveServer]:
    values: dict[str, Any] = {"dicom_port": 0, "dicom_study_settle_s": 1.0, "queue_poll_s": 0.2, **overrides}
    app = make_test_app(data_dir, analyzer=analyzer, **values)
    with run_live_server(app) as server:
        yield server


def scp_port(server: LiveServer) -> int:
    return server.app.state.dicom_scp.port


def storescu(server: LiveServer, *files: Path, calling: str = "STORESCU", called: str = "CXR") -> subprocess.CompletedProcess:
    # -xy: also propose JPEG baseline, so compressed samples go as they are
    return subprocess.run(
        [need("storescu"), "-v", "-xy", "-aet", calling, "-aec", called, "127.0.0.1", str(scp_port(server)), *map(str, files)],
        capture_output=True, text=True, timeout=120,
    )


def echoscu(server: LiveServer, *, calling: str = "ECHOSCU", called: str = "CXR") -> subprocess.CompletedProcess:
    return subprocess.run(
        [need("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(scp_port(server))],
        capture_output=True, text=True, timeout=60,
    )


def wait_done(server: LiveServer, study_uid: str, *, revision: int | None = None, timeout: float = 60.0):
    """The study's dicom_study row once its latest (or the given) revision has been analysed or refused."""
    store = server.app.state.dicom_store
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = store.study(study_uid)
        if row is not None and row.analysed_revision and row.analysed_revision >= (revision or row.revision):
            return row
        time.sleep(0.1)
    raise AssertionError(f"study {study_uid} was not analysed in {timeout} s: {store.study(study_uid)}")


def jobs(server: LiveServer, task: str) -> list:
    return server.app.state.queue.list(task=task, limit=1000)
