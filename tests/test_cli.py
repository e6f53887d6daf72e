"""The `cxr` command line (fhir_server/cli.py)."""

from __future__ import annotations

import json

import pytest

from fhir_server import cli
from model_fixtures import png_bytes, quadrant_pixels


@pytest.fixture(autouse=True)
def _no_gate(monkeypatch, tmp_path):
    # the synthetic test films are not chest X-rays: keep the OOD gate out of these CLI tests
    monkeypatch.setenv("CXR_OOD_GATE", "false")
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def film(tmp_path):
    path = tmp_path / "film.png"
    path.write_bytes(png_bytes(quadrant_pixels(300, 240)))
    return path


def test_predict_table(film, capsys):
    assert cli.main(["predict", str(film), "--model", "cxr:untrained-demo"]) == 0
    out = capsys.readouterr().out
    assert str(film) in out and "UNTRAINED" in out
    assert "Pneumonia" in out and "triage:" in out and "not a diagnosis" in out


def test_predict_json_and_heatmaps(film, tmp_path, capsys):
    maps = tmp_path / "maps"
    assert cli.main(["predict", str(film), "--json", "--heatmap-dir", str(maps), "--model", "cxr:untrained-demo"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 1 and results[0]["status"] == "success" and results[0]["file"] == str(film)
    assert results[0]["metadata"]["untrained"] is True
    written = sorted(p.name for p in maps.iterdir())
    assert written and all(name.startswith("film.") and name.endswith(".png") for name in written)


def test_predict_reports_each_failure_and_exits_1(film, tmp_path, capsys):
    bad = tmp_path / "notes.dcm"
    bad.write_text("not an image")
    missing = tmp_path / "missing.png"
    assert cli.main(["predict", str(bad), str(film), str(missing), "--model", "cxr:untrained-demo"]) == 1
    captured = capsys.readouterr()
    assert "unsupported_format" in captured.err and "missing.png" in captured.err
    assert str(film) in captured.out  # the good file is still analysed


def test_predict_unknown_model_exits_2(film, capsys):
    assert cli.main(["predict", str(film), "--model", "xrv:nope"]) == 2
    assert "Known models" in capsys.readouterr().err


def test_subcommands_registered():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    assert {"serve", "predict", "bench"} <= set(commands)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
