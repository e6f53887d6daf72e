"""ONNX Runtime engine: export + cache, equivalence with torch, numpy CAM == Grad-CAM, fallbacks."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ml import engine as eng
from ml.explain import CamCapture, grad_cam
from ml.models.untrained import load_untrained
from ml.pipeline import Analyzer
from model_fixtures import png_bytes, quadrant_pixels, tiny_model

ALL = "xrv:densenet121-res224-all"
ALL_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"


@pytest.fixture(scope="module")
def xrv_weights(tmp_path_factory) -> Path:
    """xrv DenseNet-121 with random weights, saved under the file name torchxrayvision expects."""
    import torchxrayvision as xrv

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("xrv-weights")
    net = xrv.models.DenseNet(weights=None).eval()
    with torch.no_grad():
        # Random features are large: a small head keeps outputs off 0/1 saturation, and biases at the
        # logits of the operating points put each film's outputs on different sides of them (what
        # real weights do, and what an export that bakes in op_norm's boolean masks gets wrong).
        net.classifier.weight.mul_(0.02)
        mean_logit = net.classifier(net.features2(torch.from_numpy(eng.check_images(224, 4)))).mean(0)
        op_threshs = torch.tensor(xrv.models.model_urls["densenet121-res224-all"]["op_threshs"])
        net.classifier.bias.add_(torch.logit(op_threshs) - mean_logit)
    from ml.weights.store import install_fixture

    install_fixture("densenet121-res224-all", net.state_dict(), folder)  # what the server loads
    torch.save(net, folder / ALL_FILE)  # the same weights for torchxrayvision's own loader (the reference)
    return folder / ALL_FILE


@pytest.fixture(scope="module")
def xrv_model(xrv_weights):
    from ml.models.registry import load_model

    return load_model(ALL, weights_dir=xrv_weights.parent)


def _analyzer(model, engine: str, cache: Path, **kw) -> Analyzer:
    return Analyzer(model, ood_gate=None, max_bytes=10**9, max_pixels=10**9, engine=engine, engine_cache_dir=cache, **kw)


def _torch_grad_cams(model, batch: np.ndarray) -> list[list[np.ndarray | None]]:
    """Grad-CAM of every label of every image, with the torch autograd path the pipeline uses."""
    capture = CamCapture(model.cam_layer)
    try:
        with capture.capture():
            probs = model.network(torch.from_numpy(batch))
            act = capture.activation()
        return [
            [grad_cam(probs[r, c], act, model.input_size, retain_graph=True, row=r) for c in range(probs.shape[1])]
            for r in range(batch.shape[0])
        ]
    finally:
        capture.release()
        capture.close()


def _correlations(model, cache: Path, batch: np.ndarray) -> list[float]:
    analyzer = _analyzer(model, "onnx", cache)
    assert analyzer.engine == "onnx" and analyzer.numpy_cam
    head = eng.linear_cam_head(model)
    probs, feats = analyzer._engine.forward(batch)
    torch_maps = _torch_grad_cams(model, batch)
    out = []
    for r in range(batch.shape[0]):
        for c in range(probs.shape[1]):
            mine = head.cam(feats[r], c, model.input_size, float(probs[r, c]))
            ref = torch_maps[r][c]
            assert (mine is None) == (ref is None), (r, c)
            if mine is not None and ref.std() > 0:
                out.append(float(np.corrcoef(mine.ravel(), ref.ravel())[0, 1]))
    analyzer.close()
    return out


def test_untrained_model_onnx_matches_torch_and_is_cached(tmp_path, caplog):
    model = load_untrained()
    batch = eng.check_images(model.input_size, 3)
    with caplog.at_level(logging.INFO, logger="ml.engine"):
        first = eng.build_engine(model, "onnx", cache_dir=tmp_path)
    assert isinstance(first, eng.OnnxEngine)
    files = list(tmp_path.glob("*.onnx"))
    assert len(files) == 1 and eng.weights_digest(model)[:32] in files[0].name
    probs, feats = first.forward(batch)
    assert np.abs(probs - eng.torch_forward(model, batch)).max() <= eng.EQUIVALENCE_TOL
    assert feats.shape[:2] == (3, model.network.head.in_features)
    # second load: no new export, the cached file is used
    stamp = files[0].stat().st_mtime_ns
    eng.build_engine(model, "onnx", cache_dir=tmp_path)
    assert [f.stat().st_mtime_ns for f in tmp_path.glob("*.onnx")] == [stamp]


def test_changed_weights_get_a_new_cache_entry(tmp_path):
    model = load_untrained()
    eng.build_engine(model, "onnx", cache_dir=tmp_path)
    with torch.no_grad():
        model.network.head.bias.add_(0.5)
    eng.build_engine(model, "onnx", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.onnx"))) == 2


def test_failed_equivalence_falls_back_to_torch_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(eng, "EQUIVALENCE_TOL", -1.0)  # nothing can pass
    with caplog.at_level(logging.WARNING, logger="ml.engine"):
        analyzer = _analyzer(load_untrained(), "onnx", tmp_path)
    assert analyzer.engine == "torch" and not analyzer.numpy_cam
    assert any("serving with torch" in r.message for r in caplog.records)
    assert analyzer.analyze_bytes(png_bytes(quadrant_pixels(96, 96))).findings


def test_export_failure_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    def broken(model, path):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(eng, "export_onnx", broken)
    with caplog.at_level(logging.WARNING, logger="ml.engine"):
        analyzer = _analyzer(load_untrained(), "onnx", tmp_path / "cache")
    assert analyzer.engine == "torch"
    assert any("exporter exploded" in r.message for r in caplog.records)


def test_unknown_head_keeps_torch_grad_cam_for_heatmaps(tmp_path):
    """The tiny test model is exported, but its head is not one linear_cam_head knows: torch maps."""
    model = tiny_model()
    assert eng.linear_cam_head(model) is None
    onnx = _analyzer(model, "onnx", tmp_path)
    ref = _analyzer(tiny_model(), "torch", tmp_path)
    assert onnx.engine == "onnx" and not onnx.numpy_cam
    data = png_bytes(quadrant_pixels(128, 128, quadrant="top_left"))
    a, b = onnx.analyze_bytes(data, heatmaps=True), ref.analyze_bytes(data, heatmaps=True)
    assert [(f.label, f.regions, f.heatmap_png is not None) for f in a.findings] == [
        (f.label, f.regions, f.heatmap_png is not None) for f in b.findings
    ]
    assert any(f.regions for f in a.findings)


def test_untrained_numpy_cam_equals_grad_cam(tmp_path):
    model = load_untrained()
    corr = _correlations(model, tmp_path, eng.check_images(model.input_size, 4))
    assert corr and min(corr) >= 0.99, corr


def test_op_norm_matches_torchxrayvision():
    import torchxrayvision as xrv

    from ml.models.xrv import op_norm

    g = torch.Generator().manual_seed(0)
    threshs = torch.rand(7, generator=g) * 0.6 + 0.001
    probs = torch.rand(64, 7, generator=g)
    probs[0] = threshs  # exactly at the operating point: 0.5 in both
    probs[1], probs[2] = 0.0, 1.0
    expected = xrv.models.op_norm(probs, threshs)
    assert torch.allclose(op_norm(probs, threshs), expected, atol=1e-7)
    assert torch.allclose(op_norm(probs[:1], threshs), torch.full((1, 7), 0.5))


def test_xrv_outputs_are_torchxrayvisions_own(xrv_model, xrv_weights, shared_data):
    """Our wrapper (sigmoid from xrv, op_norm by torch.where) gives what xrv's own forward gives."""
    import torchxrayvision as xrv

    reference = xrv.models.DenseNet(weights="densenet121-res224-all", cache_dir=str(xrv_weights.parent)).eval()
    assert reference.op_threshs is not None  # xrv's own op_norm path
    batch = eng.check_images(xrv_model.input_size, 3)
    with torch.no_grad():
        expected = reference(torch.from_numpy(batch)).index_select(1, xrv_model.network.keep).numpy()
    assert np.abs(eng.torch_forward(xrv_model, batch) - expected).max() <= 1e-6


def test_xrv_densenet_onnx_equivalence_and_cam(tmp_path, xrv_model, shared_data):
    """Random-weight DenseNet-121 on real radiographs: probabilities and CAM (ReLU-before-pool head)."""
    batch = eng.check_images(xrv_model.input_size, 4)
    reference = eng.torch_forward(xrv_model, batch)
    sides = reference >= 0.5
    assert sides.any() and not sides.all() and len({row.tobytes() for row in sides}) > 1  # films differ
    # The export traces one all-zero film: with the head biased far below every operating point, all
    # its outputs sit on one side, which is where a traced boolean-mask op_norm broke.
    one_sided = copy.deepcopy(xrv_model)
    with torch.no_grad():
        one_sided.network.model.classifier.bias.fill_(-5.0)
    for model in (xrv_model, one_sided):
        engine = eng.build_engine(model, "onnx", cache_dir=tmp_path)
        assert isinstance(engine, eng.OnnxEngine)
        for part in (batch, batch[:1], batch[1:]):  # every batch size, not just the export's
            expected = eng.torch_forward(model, part)
            assert np.abs(engine.forward(part)[0] - expected).max() <= eng.EQUIVALENCE_TOL
    assert eng.linear_cam_head(xrv_model).relu_before_pool
    corr = _correlations(xrv_model, tmp_path, batch)
    assert corr and min(corr) >= 0.99, corr


def test_bundled_model_onnx_matches_torch_on_real_films(tmp_path, bundled_model, shared_data):
    batch = eng.check_images(bundled_model.input_size, 8)
    corr = _correlations(bundled_model, tmp_path, batch)
    assert corr and min(corr) >= 0.99, corr
    onnx = _analyzer(bundled_model, "onnx", tmp_path)
    torch_an = _analyzer(bundled_model, "torch", tmp_path)
    folder = shared_data / "nih_cxr14_fullres" / "images"
    files = sorted(folder.glob("*.png"))[:4]
    if not files:
        pytest.skip("no real films")
    for file in files:
        data = file.read_bytes()
        a = onnx.analyze_bytes(data, heatmaps=True, filename=file.name)
        b = torch_an.analyze_bytes(data, heatmaps=True, filename=file.name)
        for fa, fb in zip(a.findings, b.findings, strict=True):
            assert fa.label == fb.label and abs(fa.probability - fb.probability) <= 1e-4
            assert fa.detected == fb.detected
            assert (fa.heatmap_png is None) == (fb.heatmap_png is None)


# ---- the OOD gate on the same ONNX forward pass -----------------------------------------------------


def _gate_files(shared_data):
    cat = shared_data / "dicom" / "feline_dx_chest_ap_deid_data.dcm"
    films = sorted((shared_data / "nih_cxr14_fullres" / "images").glob("*.png"))[:3]
    kermany = sorted((shared_data / "kermany_fullres").rglob("*.jpeg"))[:2]
    files = [p for p in [cat, *films, *kermany] if p.exists()]
    if not cat.exists() or not films:
        pytest.skip("real films / the cat DICOM not present")
    return files


def _outcome(analyzer, path):
    from ml.errors import NotChestXRay

    try:
        a = analyzer.analyze_bytes(path.read_bytes(), filename=path.name)
    except NotChestXRay as exc:
        return ("refused", exc.detail)
    return ("passed", a.ood.score, [round(f.probability, 4) for f in a.findings])


def test_bundled_gate_shares_the_onnx_forward_pass_with_the_same_decisions(tmp_path, bundled_model, shared_data):
    onnx = _analyzer(bundled_model, "onnx", tmp_path)
    ref = _analyzer(bundled_model, "torch", tmp_path)
    assert onnx._shared_gate and not ref._shared_gate
    results = []
    for path in _gate_files(shared_data):
        got, want = _outcome(onnx, path), _outcome(ref, path)
        assert got[0] == want[0], path
        if got[0] == "passed":
            assert abs(got[1] - want[1]) <= 1e-3 and np.allclose(got[2], want[2], atol=2e-4)
        results.append(got[0])
    assert results[0] == "refused" and "passed" in results  # the cat is refused, chest films pass


def test_onnx_default_gate_decides_like_the_torch_gate(tmp_path, bundled_model, xrv_model, shared_data):
    from ml.ood import load_default_gate

    fast = eng.onnx_default_gate(tmp_path)
    assert isinstance(fast, eng.OnnxFeatureGate)
    slow = load_default_gate()
    onnx = Analyzer(xrv_model, ood_gate=fast, max_bytes=10**9, max_pixels=10**9, engine="onnx", engine_cache_dir=tmp_path)
    ref = Analyzer(xrv_model, ood_gate=slow, max_bytes=10**9, max_pixels=10**9, engine="torch")
    for path in _gate_files(shared_data):
        got, want = _outcome(onnx, path), _outcome(ref, path)
        assert got[0] == want[0], path
        if got[0] == "passed":
            assert abs(got[1] - want[1]) <= 1e-3
