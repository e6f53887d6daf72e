"""Analyzer end to end: bytes -> Analysis (ml/pipeline.py)."""

from __future__ import annotations

import csv

import pytest

from ml.analysis import Analysis
from ml.errors import CorruptImage, InputTooLarge, NotChestXRay, UnsupportedFormat
from ml.findings import DISCLAIMER
from model_fixtures import (
    PassingGate,
    RefusingGate,
    dicom_bytes,
    png_bytes,
    quadrant_pixels,
    tiny_analyzer,
    tiny_model,
)


def _by_label(analysis: Analysis):
    return {f.label: f for f in analysis.findings}


def test_png_end_to_end_detects_the_bright_quadrant():
    analysis = tiny_analyzer().analyze_bytes(png_bytes(quadrant_pixels(320, 240)), filename="a.png")
    found = _by_label(analysis)
    assert found["pneumonia"].detected and found["pneumonia"].severity == "high"
    assert not found["effusion"].detected and not found["cardiomegaly"].detected
    assert analysis.findings[0].label == "pneumonia"  # ranked first
    assert analysis.triage == "urgent"
    assert 0.5 <= analysis.confidence_score < 1.0
    assert analysis.image.width == 320 and analysis.image.height == 240
    assert analysis.image.source_format == "png"
    assert analysis.report_text.rstrip().endswith(DISCLAIMER)
    assert analysis.processing_time_ms > 0
    assert analysis.created.tzinfo is not None
    x1, y1, x2, y2 = found["pneumonia"].regions[0]
    assert 35 <= x1 <= 45 and y1 <= 5 and 155 <= x2 <= 165 and 115 <= y2 <= 125  # crop x0 = 40, half = 120


def test_dark_film_is_routine_with_no_regions():
    analysis = tiny_analyzer().analyze_bytes(png_bytes(quadrant_pixels(200, 200, quadrant=None), bits=16))
    assert analysis.triage == "routine"
    assert not any(f.detected for f in analysis.findings)
    assert all(f.regions == [] and f.heatmap_png is None for f in analysis.findings)
    assert "No finding above threshold" in analysis.report_text


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_end_to_end_keeps_metadata_and_orientation(photometric):
    data = dicom_bytes(quadrant_pixels(500, 400, quadrant="bottom_right"), photometric=photometric)
    analysis = tiny_analyzer().analyze_bytes(data, heatmaps=True, filename="x.dcm")
    found = _by_label(analysis)
    assert found["effusion"].detected and not found["pneumonia"].detected  # inversion handled
    assert analysis.image.source_format == "dicom"
    assert analysis.image.view_position == "PA"
    assert analysis.image.study_instance_uid
    assert found["effusion"].heatmap_png is not None
    x1, y1, x2, y2 = found["effusion"].regions[0]
    assert abs(x1 - 250) <= 5 and abs(y1 - 200) <= 5 and abs(x2 - 450) <= 5 and abs(y2 - 400) <= 5


def test_gate_refusal_raises_not_chest_xray_with_the_reason():
    with pytest.raises(NotChestXRay) as err:
        tiny_analyzer(ood_gate=RefusingGate()).analyze_bytes(png_bytes(quadrant_pixels(64, 64)))
    # the reason, then which check refused with its score (issue 11)
    assert err.value.message.startswith(RefusingGate.reason)
    assert "Refused by the gate check (score 0.100, threshold 0.500)." in err.value.message
    assert err.value.http_status == 422


def test_model_own_gate_used_when_none_given_and_result_recorded():
    gate = PassingGate()
    analysis = tiny_analyzer(tiny_model(ood_gate=gate)).analyze_bytes(png_bytes(quadrant_pixels(64, 64)))
    assert gate.calls == 1
    assert analysis.ood is not None and analysis.ood.passed
    with pytest.raises(NotChestXRay):
        tiny_analyzer(tiny_model(ood_gate=RefusingGate())).analyze_bytes(png_bytes(quadrant_pixels(64, 64)))


def test_input_errors_propagate_typed():
    analyzer = tiny_analyzer(max_bytes=1000)
    with pytest.raises(InputTooLarge):
        analyzer.analyze_bytes(png_bytes(quadrant_pixels(300, 300)) + b"\0" * 2000)
    with pytest.raises(UnsupportedFormat):
        analyzer.analyze_bytes(b"%PDF-1.7\n...")
    with pytest.raises(CorruptImage):
        analyzer.analyze_bytes(png_bytes(quadrant_pixels(64, 64))[:80])


def test_untrained_model_says_so(tiny_analyzer):
    analysis = tiny_analyzer(tiny_model(untrained=True)).analyze_bytes(png_bytes(quadrant_pixels(64, 64)))
    assert analysis.model.untrained
    assert "UNTRAINED" in analysis.report_text and "UNTRAINED" in analysis.impression


def _real_files(shared, folder, limit):
    path = shared / folder
    if not (path / "labels.csv").exists():
        pytest.skip(f"{folder} not in shared data")
    with (path / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return [(path / r["file"], r) for r in rows[:limit]]


@pytest.mark.parametrize("folder", ["kermany_fullres", "nih_cxr14_fullres"])
def test_real_raster_files_end_to_end(shared_data, folder):
    analyzer = tiny_analyzer()
    for path, row in _real_files(shared_data, folder, 3):
        analysis = analyzer.analyze_bytes(path.read_bytes(), heatmaps=True, filename=path.name)
        assert len(analysis.findings) == 3
        assert analysis.image.width > 200 and analysis.image.height > 200
        assert analysis.report_text.endswith(DISCLAIMER)
        for f in analysis.findings:
            for x1, y1, x2, y2 in f.regions:
                assert 0 <= x1 < x2 <= analysis.image.width and 0 <= y1 < y2 <= analysis.image.height


def test_real_dicom_files_end_to_end(shared_data):
    analyzer = tiny_analyzer()
    for path, row in _real_files(shared_data, "dicom", 10):
        analysis = analyzer.analyze_bytes(path.read_bytes(), filename=path.name)
        assert analysis.image.source_format == "dicom"
        assert analysis.image.width == int(row["cols"]) and analysis.image.height == int(row["rows"])


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_large_film_regions_in_original_pixels(fmt):
    # 2400x1800 is box-reduced before preprocessing (and JPEG may decode at a reduced DCT scale):
    # regions must still come back in the original film's pixel grid.
    import io

    from PIL import Image

    pixels = quadrant_pixels(2400, 1800, quadrant="top_left")
    buf = io.BytesIO()
    Image.fromarray((pixels * 255).astype("uint8"), mode="L").save(buf, format=fmt.upper())
    analysis = tiny_analyzer().analyze_bytes(buf.getvalue(), filename=f"big.{fmt}")
    assert (analysis.image.width, analysis.image.height) == (2400, 1800)
    found = _by_label(analysis)
    assert found["pneumonia"].detected
    x1, y1, x2, y2 = found["pneumonia"].regions[0]
    tol = 40  # < 2.5% of the film: reduction factor plus bilinear blur at the quadrant edge
    assert abs(x1 - 300) <= tol and abs(y1 - 0) <= tol and abs(x2 - 1200) <= tol and abs(y2 - 900) <= tol
