"""The `orthanc` pytest fixture: one real Orthanc per test module (orthanc_support.start_orthanc).

    from orthanc_fixture import orthanc  # noqa: F401

    def test_x(orthanc):
        orthanc.upload(dicom_bytes)        # REST POST /instances
        orthanc.dicomweb                   # http://127.0.0.1:PORT/dicom-web
        orthanc.destination                # ORTHANC@127.0.0.1:PORT (its C-STORE side)
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from orthanc_support import OrthancServer, start_orthanc, stop_process

__all__ = ["orthanc", "stop_process"]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    workdir = tmp_path_factory.mktemp("orthanc")
    server = start_orthanc(workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
