"""Thresholds, severity bands, triage, ranking, confidence and the report text (ml/findings.py)."""

from __future__ import annotations

import pytest

from ml import findings as fnd
from ml.analysis import ModelInfo

INFO = ModelInfo(name="test:m", version="v1", software_version="t")


@pytest.mark.parametrize(
    ("p", "t", "expected"),
    [
        (0.0, 0.5, "none"),
        (0.4999, 0.5, "none"),
        (0.5, 0.5, "low"),  # detected at exactly the threshold
        (0.66, 0.5, "low"),
        (0.67, 0.5, "moderate"),  # 0.5 + 0.5/3 = 0.6667
        (0.83, 0.5, "moderate"),
        (0.84, 0.5, "high"),
        (1.0, 0.5, "high"),
        (0.19, 0.2, "none"),
        (0.2, 0.2, "low"),
        (0.47, 0.2, "moderate"),  # thirds of [0.2, 1]: 0.4667, 0.7333
        (0.74, 0.2, "high"),
    ],
)
def test_severity_bands_split_the_detected_range_in_thirds(p, t, expected):
    assert fnd.severity(p, t) == expected


def test_findings_detected_flag_threshold_and_critical():
    out = fnd.make_findings(["pneumonia", "cardiomegaly"], ["Pneumonia", "Cardiomegaly"], [0.7, 0.2], [0.6, 0.3])
    by = {f.label: f for f in out}
    assert by["pneumonia"].detected and by["pneumonia"].critical and by["pneumonia"].threshold == 0.6
    assert not by["cardiomegaly"].detected and not by["cardiomegaly"].critical
    assert by["cardiomegaly"].severity == "none"


def test_critical_set_is_documented_set():
    assert fnd.CRITICAL_FINDINGS == {"pneumothorax", "pneumonia", "effusion", "edema", "consolidation"}


def test_triage_urgent_only_for_detected_critical():
    labels = ["effusion", "cardiomegaly", "nodule"]
    names = ["Effusion", "Cardiomegaly", "Nodule"]
    assert fnd.triage(fnd.make_findings(labels, names, [0.9, 0.1, 0.1], [0.5] * 3)) == "urgent"
    assert fnd.triage(fnd.make_findings(labels, names, [0.4, 0.9, 0.9], [0.5] * 3)) == "routine"
    assert fnd.triage(fnd.make_findings(labels, names, [0.1, 0.1, 0.1], [0.5] * 3)) == "routine"


def test_ranking_by_severity_then_probability():
    # a: p .55 t .5 -> low; b: p .95 t .9 -> low (but higher p); c: p .95 t .3 -> high; d: p .45 -> none
    out = fnd.make_findings(
        ["a", "b", "c", "d"], ["A", "B", "C", "D"], [0.55, 0.95, 0.95, 0.45], [0.5, 0.9, 0.3, 0.5]
    )
    assert [f.label for f in out] == ["c", "b", "a", "d"]
    # among undetected, higher probability first
    out = fnd.make_findings(["x", "y"], ["X", "Y"], [0.1, 0.3], [0.5, 0.9])
    assert [f.label for f in out] == ["y", "x"]


def test_confidence_is_lowest_at_threshold_and_grows_away_from_it():
    t = 0.3
    at = fnd.call_confidence(0.3, t)
    assert at == pytest.approx(0.5)
    near_above, far_above = fnd.call_confidence(0.35, t), fnd.call_confidence(0.9, t)
    near_below, far_below = fnd.call_confidence(0.25, t), fnd.call_confidence(0.01, t)
    assert at < near_above < far_above < 1.0
    assert at < near_below < far_below < 1.0
    # with t = 0.5 it is exactly max(p, 1 - p)
    for p in (0.02, 0.3, 0.5, 0.8, 0.999):
        assert fnd.call_confidence(p, 0.5) == pytest.approx(max(p, 1 - p), abs=1e-6)


def test_study_confidence_is_the_weakest_call():
    out = fnd.make_findings(["a", "b"], ["A", "B"], [0.99, 0.52], [0.5, 0.5])
    assert fnd.study_confidence(out) == pytest.approx(0.52, abs=1e-6)
    clear = fnd.make_findings(["a", "b"], ["A", "B"], [0.99, 0.01], [0.5, 0.5])
    assert fnd.study_confidence(clear) > fnd.study_confidence(out)


def test_report_lists_detected_findings_impression_and_disclaimer():
    out = fnd.make_findings(["pneumonia", "effusion"], ["Pneumonia", "Effusion"], [0.95, 0.1], [0.5, 0.5])
    text = fnd.report_text(out, model=INFO, confidence=fnd.study_confidence(out), view_position="PA")
    assert "Pneumonia: probability 0.95" in text
    assert "Effusion" not in text.split("Impression")[0]  # undetected not listed as a finding
    assert "Impression: " in text and "urgent" in text
    assert text.rstrip().endswith(fnd.DISCLAIMER)
    assert "UNTRAINED" not in text


def test_report_without_findings_and_untrained_warning():
    out = fnd.make_findings(["pneumonia"], ["Pneumonia"], [0.1], [0.5])
    untrained = ModelInfo(name="cxr:untrained-demo", version="x", software_version="t", untrained=True)
    text = fnd.report_text(out, model=untrained, confidence=0.9)
    assert fnd.NO_FINDING in text
    assert text.startswith("*** UNTRAINED DEMO MODEL")
    assert fnd.impression(out, untrained=True).startswith("UNTRAINED DEMO MODEL")
    assert text.rstrip().endswith(fnd.DISCLAIMER)


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError):
        fnd.make_findings(["a"], ["A"], [0.1, 0.2], [0.5])
