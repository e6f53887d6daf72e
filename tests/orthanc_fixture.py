"""A real Orthanc (Debian `orthanc` + `orthanc-dicomweb`) for tests, on free loopback ports.

    from orthanc_fixture import orthanc  # noqa: F401   (module-scoped pytest fixture)

    def test_x(orthanc):
        orthanc.upload(dicom_bytes)                  # REST POST /instances
        orthanc.dicomweb                             # http://127.0.0.1:PORT/dicom-web
        orthanc.aet, orthanc.dicom_port              # its DICOM side (C-STORE / C-ECHO)

Self-contained on purpose (stdlib + httpx + pytest): the DICOM-in and DICOM-out tests each keep an
identical copy. It starts /usr/sbin/Orthanc with a temp JSON config (storage and index in tmp,
RemoteAccessAllowed false, no authentication, the DicomWeb plugin loaded), waits for /system, and
stops it afterwards; the tests that use it skip cleanly when the binary or the plugin is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ORTHANC_BINARY = os.environ.get("CXR_TEST_ORTHANC", "/usr/sbin/Orthanc")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/lib/x86_64-linux-gnu/orthanc")
ORTHANC_AET = "ORTHANC"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        for candidate in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []:
            if candidate.is_file():
                return candidate
    return None


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    workdir: Path
    aet: str = ORTHANC_AET
    modalities: dict[str, list] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def upload(self, data: bytes) -> dict:
        with self.client() as c:
            r = c.post("/instances", content=data, headers={"Content-Type": "application/dicom"})
            r.raise_for_status()
            return r.json()

    def studies(self) -> list[str]:
        with self.client() as c:
            return c.get("/studies").raise_for_status().json()

    def instances(self) -> list[str]:
        with self.client() as c:
            return c.get("/instances").raise_for_status().json()


def start_orthanc(workdir: Path, *, modalities: dict[str, list] | None = None, timeout: float = 60.0):
    """Start Orthanc; returns (Orthanc, Popen). `modalities`: {"CXR": ["CXR", "127.0.0.1", 11112]}."""
    if not Path(ORTHANC_BINARY).exists():
        pytest.skip(f"Orthanc is not installed ({ORTHANC_BINARY})")
    plugin = find_dicomweb_plugin()
    if plugin is None:
        pytest.skip("the Orthanc DICOMweb plugin (orthanc-dicomweb) is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "cxr-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "DicomCheckCalledAet": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "HttpsVerifyPeers": False,
        "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False, "StudiesMetadata": "Full"},
        "DicomModalities": modalities or {},
        "StableAge": 1,
        "ConcurrentJobs": 1,
        "HttpThreadsCount": 4,
        "StorageCompression": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "UnknownSopClassAccepted": True,
        "SaveJobs": False,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = open(workdir / "orthanc.log", "wb")
    proc = subprocess.Popen([ORTHANC_BINARY, str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Orthanc(http_port, dicom_port, workdir, modalities=modalities or {})
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.close()
            raise RuntimeError(f"Orthanc exited ({proc.returncode}): {(workdir / 'orthanc.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/system", timeout=2).status_code == 200:
                if httpx.get(f"{server.dicomweb}/studies", timeout=2).status_code == 200:
                    break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"Orthanc did not answer within {timeout} s")
        time.sleep(0.2)
    log.close()
    return server, proc


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s (Orthanc, or any server a test started)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    workdir = tmp_path_factory.mktemp("orthanc")
    server, proc = start_orthanc(workdir)
    try:
        yield server
    finally:
        stop_process(proc)
        shutil.rmtree(workdir, ignore_errors=True)
