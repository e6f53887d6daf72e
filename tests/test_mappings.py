"""mappings/: every label of every registered model is coded; the table matches the FHIR spec notes."""

from __future__ import annotations

import json

import pytest

import mappings
from ml.models import registry

SCT = "http://snomed.info/sct"

XRV_LABEL_COUNT = 18


def _model_labels(name: str) -> tuple[str, ...]:
    """Label names of a registered model, read without loading any weights."""
    if name.startswith("xrv:"):
        import torchxrayvision as xrv

        from ml.models.xrv import XRV_MODELS, snake_label

        labels = xrv.models.model_urls[XRV_MODELS[name]]["labels"]
        return tuple(snake_label(lb) for lb in labels if lb)
    if name == registry.UNTRAINED:
        from ml.models.untrained import LABELS

        return tuple(LABELS)
    if name == registry.BUNDLED:
        from ml.models.bundled import MANIFEST_FILE, WEIGHTS_DIR

        path = WEIGHTS_DIR / MANIFEST_FILE
        if not path.is_file():
            pytest.skip(f"{path} not shipped yet: the bundled model's labels are unknown")
        return tuple(json.loads(path.read_text())["labels"])
    raise AssertionError(f"test does not know how to list labels of {name}: extend _model_labels")


@pytest.mark.parametrize("name", registry.available_models())
def test_every_label_of_every_registered_model_is_mapped(name: str) -> None:
    labels = _model_labels(name)
    assert labels, name
    missing = [lb for lb in labels if lb not in mappings.all_findings()]
    assert not missing, f"{name}: add {missing} to mappings/findings.json"


def test_all_18_torchxrayvision_labels_are_mapped() -> None:
    import torchxrayvision as xrv

    from ml.models.xrv import snake_label

    labels = {snake_label(p) for p in xrv.datasets.default_pathologies}
    assert len(labels) == XRV_LABEL_COUNT
    assert labels <= set(mappings.all_findings())


def test_tiny_test_model_labels_are_mapped() -> None:
    from model_fixtures import TINY_LABELS

    assert set(TINY_LABELS) <= set(mappings.all_findings())


def test_every_finding_has_local_code_body_site_and_display() -> None:
    url = mappings.code_system_url()
    for label, m in mappings.all_findings().items():
        assert label == label.lower() and " " not in label
        assert m.local.system == url and m.local.code == label
        assert m.display and m.body_site is not None and m.body_site.system == SCT
        for c in m.codings:
            assert c.code and c.display and c.system.startswith("http")


@pytest.mark.parametrize(
    ("label", "snomed", "site"),
    [
        ("atelectasis", "46621007", "39607008"),
        ("pneumothorax", "36118008", "3120008"),
        ("effusion", "60046008", "3120008"),
        ("cardiomegaly", "8186001", "80891009"),
        ("hernia", "84089009", "5798000"),
        ("fracture", "125605004", "113197003"),
        ("mass", "309529002", "39607008"),
    ],
)
def test_codes_match_the_spec_table(label: str, snomed: str, site: str) -> None:
    m = mappings.finding(label)
    assert m.snomed is not None and m.snomed.code == snomed and m.snomed.verified
    assert m.body_site is not None and m.body_site.code == site


def test_unverified_codes_are_marked_and_never_emitted() -> None:
    table = mappings.all_findings()
    # FHIR.md: none verified for these four
    for label in ("lung_opacity", "lung_lesion", "pleural_thickening", "enlarged_cardiomediastinum"):
        m = table[label]
        assert all(not c.verified for c in m.codings), label
        assert m.verified_codings == ()
    assert table["lung_lesion"].snomed is not None and table["lung_lesion"].snomed.code == "52988006"
    assert table["hernia"].snomed.code != "414403008"


def test_report_codes_and_views() -> None:
    assert mappings.report_code().code == "36554-4"
    assert mappings.report_code("two_views").code == "36643-5"
    assert mappings.report_code("portable").code == "30746-2"
    cats = {(c.system, c.code) for c in mappings.report_categories()}
    assert ("http://loinc.org", "LP29684-5") in cats
    assert ("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD") in cats
    assert mappings.view_code("PA").code == "272479007"
    assert mappings.view_code("ap").code == "399348003"
    assert mappings.view_code("LL").code == "399067008"
    assert mappings.is_frontal("PA") is True and mappings.is_frontal("LAT") is False
    assert mappings.is_frontal(None) is None and mappings.is_frontal("XYZ") is None


def test_unknown_label_still_gets_a_local_code() -> None:
    m = mappings.finding("brand_new_finding", "Brand new finding")
    assert m.local.code == "brand_new_finding" and m.verified_codings == ()


def test_code_system_resource_validates_and_lists_every_label() -> None:
    from fhir.resources.R4B.codesystem import CodeSystem

    cs = CodeSystem.model_validate(mappings.code_system_resource())
    assert {c.code for c in cs.concept} == set(mappings.all_findings())
