"""fhir_server.resources: Analysis -> R4 resources that validate (fhir.resources R4B, fhirclient's R4
models, fhirkit-rs) and carry the codes FHIR.md requires."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest
from model_fixtures import png_bytes, quadrant_pixels, tiny_analyzer

import mappings
from fhir_server import resources as fr

SCT = "http://snomed.info/sct"
LOCAL = "http://cxr-fhir.org/fhir/CodeSystem/cxr-findings"


@pytest.fixture(scope="module")
def analysis():
    """A real Analysis from the tiny model: pneumonia detected (white top-left quadrant)."""
    return tiny_analyzer().analyze_bytes(png_bytes(quadrant_pixels(96, 96, quadrant="top_left")), heatmaps=True)


@pytest.fixture(scope="module")
def built(analysis):
    inp = fr.AnalysisInput("Media/m1", {"reference": "Patient/p1"}, "2024-05-01T10:00:00Z")
    return fr.build_results([fr.ImageResult(analysis)], inp)


def _codes(cc: dict) -> set[tuple[str, str]]:
    return {(c["system"], c["code"]) for c in cc.get("coding", [])}


def _all(built: fr.AnalysisResources) -> list[dict]:
    prov = fr.build_provenance([fr.reference(r) for r in built.outputs()], fr.AnalysisInput("Media/m1"),
                               fr.reference(built.device), built_time())
    return [*built.outputs(), built.device, prov]


def built_time():
    from datetime import datetime, timezone

    return datetime(2024, 5, 1, 10, 0, tzinfo=timezone.utc)


def test_every_resource_validates_with_independent_r4_validators(built) -> None:
    import fhirclient.models.fhirelementfactory as factory
    import fhirkit

    for resource in _all(built):
        text = json.dumps(resource)
        assert fhirkit.validate(text) == [], (resource["resourceType"], fhirkit.validate(text))
        # fhirclient's models are generated from the official R4 (4.0.1) definitions; strict raises
        factory.FHIRElementFactory.instantiate(resource["resourceType"], json.loads(text))


def test_report_shape(built, analysis) -> None:
    report = built.report
    assert report["status"] == "preliminary"
    assert ("http://loinc.org", "LP29684-5") in _codes(report["category"][0])
    assert ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD") in _codes(report["category"][0])
    assert _codes(report["code"]) == {("http://loinc.org", "36554-4")}
    assert report["subject"] == {"reference": "Patient/p1"}
    assert report["effectiveDateTime"].startswith("2024-05-01T10:00:00")
    assert [r["reference"] for r in report["result"]] == [fr.reference(o) for o in built.observations]
    assert analysis.impression in report["conclusion"]
    assert fr.disclaimer(analysis) and report["conclusion"].endswith(fr.disclaimer(analysis))
    assert report["meta"]["security"][0]["code"] == "AIAST"
    assert report["media"][0]["link"]["reference"] == "Media/m1"
    assert {m["link"]["reference"] for m in report["media"][1:]} == {fr.reference(m) for m in built.heatmap_media}
    detected = {f.label for f in analysis.findings if f.detected}
    assert detected == {"pneumonia"}
    assert [_codes(c) for c in report["conclusionCode"]] == [{(SCT, "233604007"), (LOCAL, "pneumonia")}]
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert text == analysis.report_text


def test_one_observation_per_finding_with_codes_value_and_interpretation(built, analysis) -> None:
    by_label = {o["code"]["coding"][-1]["code"]: o for o in built.observations}
    assert set(by_label) == {f.label for f in analysis.findings}
    for f in analysis.findings:
        obs = by_label[f.label]
        m = mappings.finding(f.label)
        assert obs["status"] == "preliminary"
        assert obs["category"][0]["coding"][0]["code"] == "imaging"
        assert (LOCAL, f.label) in _codes(obs["code"])
        assert (SCT, m.snomed.code) in _codes(obs["code"])
        assert obs["valueQuantity"] == {"value": round(f.probability, 4), "unit": "1",
                                        "system": "http://unitsofmeasure.org", "code": "1"}
        assert obs["referenceRange"][0]["high"]["value"] == f.threshold
        assert obs["interpretation"][0]["coding"][0]["code"] == fr.interpretation_code(f)
        assert _codes(obs["bodySite"]) == {(SCT, m.body_site.code)}
        assert obs["device"]["reference"] == fr.reference(built.device)
        assert obs["derivedFrom"] == [{"reference": "Media/m1"}]
        assert obs["meta"]["security"][0]["code"] == "AIAST"
        assert obs["extension"][0]["url"] == "http://hl7.org/fhir/uv/aitransparency/StructureDefinition/AIconfidence"
        assert f"Severity: {f.severity}" in obs["note"][0]["text"]
    assert by_label["pneumonia"]["interpretation"][0]["coding"][0]["code"] == "POS"


def test_unverified_codes_are_left_out_of_observation_code(analysis) -> None:
    f = replace(analysis.findings[0], label="lung_opacity", display="Lung Opacity")
    a = replace(analysis, findings=[f])
    obs = fr.build_results([fr.ImageResult(a)], fr.AnalysisInput("Media/x")).observations[0]
    assert _codes(obs["code"]) == {(LOCAL, "lung_opacity")}


@pytest.mark.parametrize(
    ("prob", "thr", "detected", "expected"),
    [(0.9, 0.5, True, "POS"), (0.1, 0.5, False, "NEG"), (0.52, 0.5, True, "IND"), (0.47, 0.5, False, "IND")],
)
def test_interpretation_band(analysis, prob, thr, detected, expected) -> None:
    f = replace(analysis.findings[0], probability=prob, threshold=thr, detected=detected)
    assert fr.interpretation_code(f) == expected


def test_heatmaps_are_media_pointing_at_png_binaries(built, analysis) -> None:
    with_maps = [f for f in analysis.findings if f.heatmap_png]
    assert with_maps and len(built.heatmap_media) == len(with_maps) == len(built.binaries)
    binaries = {b["id"]: b for b in built.binaries}
    for media in built.heatmap_media:
        assert media["content"]["contentType"] == "image/png"
        binary = binaries[media["content"]["url"].split("/", 1)[1]]
        png = base64.b64decode(binary["data"])
        assert png.startswith(b"\x89PNG") and media["content"]["size"] == len(png)
        assert media["width"] > 0 and media["height"] > 0


def test_device_identity_and_ids_are_stable_per_input_and_model(analysis, built) -> None:
    dev = built.device
    assert dev["deviceName"][0]["name"] == analysis.model.name
    assert {v["value"] for v in dev["version"]} == {analysis.model.version, analysis.model.software_version}
    assert dev["type"]["text"] == "AI model"
    again = fr.build_results([fr.ImageResult(analysis)], fr.AnalysisInput("Media/m1"))
    assert again.report["id"] == built.report["id"] and again.device["id"] == dev["id"]
    assert [o["id"] for o in again.observations] == [o["id"] for o in built.observations]
    assert {b["id"] for b in again.binaries}.isdisjoint(b["id"] for b in built.binaries)  # immutable per run
    other = fr.build_results([fr.ImageResult(analysis)], fr.AnalysisInput("Media/m2"))
    assert other.report["id"] != built.report["id"]
    new_model = replace(analysis, model=replace(analysis.model, version="other-weights"))
    assert fr.build_results([fr.ImageResult(new_model)], fr.AnalysisInput("Media/m1")).report["id"] != built.report["id"]


def test_provenance(built) -> None:
    prov = fr.build_provenance(["Observation/a/_history/2"], fr.AnalysisInput("ImagingStudy/s"), "Device/d",
                               built_time(), activity="UPDATE")
    assert prov["target"] == [{"reference": "Observation/a/_history/2"}]
    assert prov["agent"][0]["who"] == {"reference": "Device/d"}
    assert prov["entity"] == [{"role": "source", "what": {"reference": "ImagingStudy/s"}}]
    assert prov["activity"]["coding"][0]["code"] == "UPDATE"


def test_study_level_takes_each_finding_from_its_most_probable_image(analysis) -> None:
    f0 = analysis.findings
    low = replace(analysis, findings=[replace(f, probability=0.01, detected=False, heatmap_png=None) for f in f0])
    images = [fr.ImageResult(low, "1.2.3.1", "AP"), fr.ImageResult(analysis, "1.2.3.2", "PA")]
    inp = fr.AnalysisInput("ImagingStudy/s1", views=("PA", "AP", "LL"))
    res = fr.build_results(images, inp, notes=["Skipped instance 1.2.3.3: LL view is not frontal."])
    assert res.report["imagingStudy"] == [{"reference": "ImagingStudy/s1"}]
    assert _codes(res.report["code"]) == {("http://loinc.org", "36643-5")}  # the exam had a lateral
    assert "LL view is not frontal" in res.report["conclusion"]
    pneu = next(o for o in res.observations if (LOCAL, "pneumonia") in _codes(o["code"]))
    best = next(f for f in f0 if f.label == "pneumonia")
    assert pneu["valueQuantity"]["value"] == round(best.probability, 4)
    assert [c["valueQuantity"]["value"] for c in pneu["component"]] == [0.01, round(best.probability, 4)]
    assert "1.2.3.2" in pneu["component"][1]["code"]["text"]
    assert pneu["derivedFrom"] == [{"reference": "ImagingStudy/s1"}]
    assert len(res.report["presentedForm"]) == 2
