"""Model registry, TorchXRayVision loading from a local weights dir, the untrained placeholder."""

from __future__ import annotations

import time

import pytest
import torch

from ml.errors import ModelUnavailable
from ml.models import registry
from ml.models.xrv import snake_label, weights_file

ALL = "xrv:densenet121-res224-all"
ALL_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"


@pytest.fixture
def no_download(monkeypatch):
    import torchxrayvision as xrv

    def refuse(*args, **kwargs):
        raise AssertionError("torchxrayvision tried to download weights")

    monkeypatch.setattr(xrv.utils, "download", refuse)


@pytest.fixture(scope="module")
def xrv_weights_dir(tmp_path_factory):
    """A random-weight xrv DenseNet installed as `cxr models pull` installs weights (safetensors + manifest)."""
    import torchxrayvision as xrv

    from ml.weights.store import install_fixture

    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()  # 18 outputs, like the released weights
    folder = tmp_path_factory.mktemp("weights")
    install_fixture("densenet121-res224-all", model.state_dict(), folder)
    return folder, model


def test_expected_file_name_is_xrv_release_basename():
    name, url = weights_file(ALL)
    assert name == ALL_FILE
    assert url.endswith("/" + ALL_FILE) and url.startswith("https://github.com/mlmed/torchxrayvision/")


@pytest.mark.parametrize(
    ("xrv_name", "snake"),
    [
        ("Lung Opacity", "lung_opacity"),
        ("Enlarged Cardiomediastinum", "enlarged_cardiomediastinum"),
        ("Pleural_Thickening", "pleural_thickening"),
        ("Effusion", "effusion"),
        ("Lung Lesion", "lung_lesion"),
    ],
)
def test_label_names_snake_case(xrv_name, snake):
    assert snake_label(xrv_name) == snake


def test_missing_weights_fail_fast_naming_the_pull_command_and_dir(tmp_path, no_download):
    target = tmp_path / "weights-here"
    start = time.perf_counter()
    with pytest.raises(ModelUnavailable) as err:
        registry.load_model(ALL, weights_dir=target)
    assert time.perf_counter() - start < 5
    message = err.value.message
    assert "cxr models pull densenet121-res224-all" in message and str(target) in message
    assert not target.exists()  # nothing created, no 0-byte leftovers
    assert list(tmp_path.iterdir()) == []


def test_a_release_pickle_alone_is_never_unpickled_at_load(tmp_path, no_download, monkeypatch):
    """A release file dropped in the folder (the old way) is not read by the server: it says how to import it."""
    (tmp_path / ALL_FILE).write_bytes(b"whatever is in here is never unpickled")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called at serve time"))
    with pytest.raises(ModelUnavailable) as err:
        registry.load_model(ALL, weights_dir=tmp_path)
    assert f"cxr models import {tmp_path / ALL_FILE}" in err.value.message


def test_corrupted_installed_weights_refused_with_what_to_do(xrv_weights_dir, tmp_path, no_download):
    import shutil

    folder, _ = xrv_weights_dir
    copy = tmp_path / "w"
    shutil.copytree(folder, copy)
    st = copy / "densenet121-res224-all.safetensors"
    data = bytearray(st.read_bytes())
    data[-10] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(ModelUnavailable) as err:
        registry.load_model(ALL, weights_dir=copy)
    assert "cxr models verify" in err.value.message and "sha256" in err.value.message


def test_loads_local_xrv_densenet_through_torchxrayvision(xrv_weights_dir, no_download):
    folder, reference = xrv_weights_dir
    loaded = registry.load_model(ALL, weights_dir=folder)
    assert len(loaded.labels) == 18
    assert loaded.labels[:3] == ("atelectasis", "consolidation", "infiltration")
    assert {"lung_opacity", "enlarged_cardiomediastinum", "pleural_thickening", "effusion"} <= set(loaded.labels)
    assert loaded.thresholds == (0.5,) * 18
    assert loaded.input_size == 224
    assert loaded.cam_layer is loaded.network.model.features.norm5
    assert loaded.info.name == ALL and "sha256:" in loaded.info.version and not loaded.info.untrained
    assert loaded.info.weights_sha256 and loaded.info.version.endswith(loaded.info.weights_sha256[:12])
    x = torch.rand(2, 1, 224, 224) * 2048 - 1024
    with torch.no_grad():
        out = loaded.network(x)
        # same numbers as torchxrayvision's own forward with its calibrated op_norm
        import torchxrayvision as xrv

        expected = xrv.models.op_norm(torch.sigmoid(reference(x)), torch.tensor(
            xrv.models.model_urls["densenet121-res224-all"]["op_threshs"]))
    assert out.shape == (2, 18)
    assert torch.allclose(out, expected, atol=1e-5)
    assert ((out >= 0) & (out <= 1)).all()


def test_partial_label_model_drops_empty_outputs(xrv_weights_dir, no_download, tmp_path):
    from ml.weights.store import install_fixture

    _, reference = xrv_weights_dir
    install_fixture("densenet121-res224-chex", reference.state_dict(), tmp_path)
    loaded = registry.load_model("xrv:densenet121-res224-chex", weights_dir=tmp_path)
    assert "" not in loaded.labels and len(loaded.labels) == 11
    assert "infiltration" not in loaded.labels and "lung_opacity" in loaded.labels
    with torch.no_grad():
        assert loaded.network(torch.zeros(1, 1, 224, 224)).shape == (1, 11)


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelUnavailable) as err:
        registry.load_model("xrv:nope", weights_dir=".")
    for name in ("cxr:pneumonia-v1", ALL, "cxr:untrained-demo"):
        assert name in err.value.message
        assert name in registry.available_models()


def test_untrained_model_is_loudly_labelled_and_deterministic():
    a = registry.load_model("cxr:untrained-demo", weights_dir=".")
    b = registry.load_model("cxr:untrained-demo", weights_dir=".")
    assert a.info.untrained and "untrained" in a.info.version
    assert "pneumonia" in a.labels and len(a.labels) == len(a.displays) == len(a.thresholds)
    x = torch.rand(1, 1, a.input_size, a.input_size) * 2048 - 1024
    with torch.no_grad():
        out_a, out_b = a.network(x), b.network(x)
    assert torch.equal(out_a, out_b)
    assert out_a.shape == (1, len(a.labels))
