"""`cxr dicom echo` / `cxr dicom send` against the listener of a live server (and against nothing)."""

from __future__ import annotations

import argparse

import pytest
from dicom_support import dicom_server, free_port, make_file, scp_port, wait_done
from live_server import tiny_test_analyzer

from fhir_server.cli import main
from fhir_server.dicom.cli import parse_destination


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with dicom_server(tmp_path_factory.mktemp("cxr-dicom-cli"), analyzer=tiny_test_analyzer()) as srv:
        yield srv


def test_parse_destination():
    assert parse_destination("CXR@pacs.local:11112") == parse_destination(" CXR@pacs.local:11112 ")
    d = parse_destination("ORTHANC@[::1]:4242")
    assert (d.ae_title, d.host, d.port) == ("ORTHANC", "::1", 4242)
    for bad in ("CXR@host", "host:104", "@host:104", "A" * 17 + "@h:104", "CXR@h:0", "CXR@h:70000"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_destination(bad)


def test_echo_ok_and_failures(server, capsys):
    assert main(["dicom", "echo", f"CXR@127.0.0.1:{scp_port(server)}"]) == 0
    assert "OK (0x0000)" in capsys.readouterr().out
    assert main(["dicom", "echo", f"WRONG@127.0.0.1:{scp_port(server)}"]) == 2
    assert "rejected" in capsys.readouterr().out
    assert main(["dicom", "echo", f"CXR@127.0.0.1:{free_port()}", "--timeout", "3"]) == 2
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["dicom", "echo", "not-a-destination"])
    assert exc.value.code == 2


def test_send_prints_one_status_per_file(server, tmp_path, capsys):
    study = "1.2.826.0.1.3680043.10.544.1"
    good = make_file(tmp_path, study, f"{study}.1", f"{study}.1.1")
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    rc = main(["dicom", "send", str(good), str(junk), "--to", f"CXR@127.0.0.1:{scp_port(server)}",
               "--calling-ae", "MOD1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert f"OK       {good} (0x0000) {study}.1.1" in out
    assert f"SKIPPED  {junk}" in out
    assert "1 stored, 1 not stored" in out
    assert wait_done(server, study).state == "analysed"
    assert main(["dicom", "send", str(good), "--to", f"CXR@127.0.0.1:{scp_port(server)}"]) == 0
