"""A real Orthanc (Debian `orthanc` + `orthanc-dicomweb`) for tests -- the one implementation shared
by the DICOM-in, DICOM-out, DICOMweb and end-to-end tests (the `orthanc` pytest fixture lives in
orthanc_fixture.py): started with a temp JSON config on free loopback ports, stopped (by its own
pid) afterwards. Tests that need it skip cleanly where /usr/sbin/Orthanc or the DICOMweb plugin is
not installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from proc_server import free_port, stop_process

ORTHANC = os.environ.get("CXR_TEST_ORTHANC") or shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/lib/orthanc",
               "/usr/lib/x86_64-linux-gnu/orthanc")
AE_TITLE = "ORTHANC"


def dicomweb_plugin() -> str | None:
    for folder in map(Path, PLUGIN_DIRS):
        for candidate in sorted(folder.glob("libOrthancDicomWeb.so*")) if folder.is_dir() else []:
            if candidate.is_file():
                return str(candidate)
    return None


def require_orthanc() -> str:
    if not Path(ORTHANC).is_file():
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    plugin = dicomweb_plugin()
    if plugin is None:
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    return plugin


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def destination(self) -> str:
        return f"{AE_TITLE}@127.0.0.1:{self.dicom_port}"

    @property
    def aet(self) -> str:
        return AE_TITLE

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def upload(self, data: bytes) -> dict:
        r = httpx.post(f"{self.url}/instances", content=data, headers={"Content-Type": "application/dicom"}, timeout=30)
        r.raise_for_status()
        return r.json()

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10.0, **kwargs)

    def lookup(self, uid: str) -> list[dict]:
        return httpx.post(f"{self.url}/tools/lookup", content=uid, timeout=10.0).json()

    def instance_file(self, sop_uid: str) -> bytes:
        found = [x for x in self.lookup(sop_uid) if x["Type"] == "Instance"]
        assert found, f"Orthanc has no instance {sop_uid}"
        return self.get(f"/instances/{found[0]['ID']}/file").content

    def stop(self) -> None:
        stop_process(self.process)


def start_orthanc(
    workdir: Path, *, dicom_port: int | None = None, http_port: int | None = None, extra: dict | None = None
) -> OrthancServer:
    plugin = require_orthanc()
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = http_port or free_port()
    dicom_port = dicom_port or free_port()
    config = {
        "Name": "cxr-delivery-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "DicomServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckModalityHost": False,
        "HttpServerEnabled": True,
        "SslEnabled": False,
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "ConcurrentJobs": 1,
        "StableAge": 1,
        "UnknownSopClassAccepted": True,
        "SaveJobs": False,
    }
    config.update(extra or {})
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = workdir / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen([ORTHANC, str(cfg)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = OrthancServer(http_port, dicom_port, process, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if server.get("/system").status_code == 200 and server.get("/dicom-web/studies").status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not start: {log.read_text(errors='replace')[-2000:]}")
