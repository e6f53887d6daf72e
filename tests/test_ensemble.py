"""Ensembles: per-finding means over the members that output it, thresholds the same way, CAMs
averaged, every member on ONNX Runtime with one pass per member per batch, Device naming members."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.errors import ModelUnavailable
from ml.models.registry import load_model
from ml.pipeline import Analyzer
from model_fixtures import png_bytes, quadrant_pixels

ALL, CHEX = "xrv:densenet121-res224-all", "xrv:densenet121-res224-chex"
ENS = f"ensemble:{ALL},{CHEX}"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import torchxrayvision as xrv

    from ml.weights.store import install_fixture

    folder = tmp_path_factory.mktemp("ens-weights")
    for seed, name in enumerate(["densenet121-res224-all", "densenet121-res224-chex"]):
        torch.manual_seed(seed)
        net = xrv.models.DenseNet(weights=None)
        with torch.no_grad():
            net.classifier.weight.mul_(0.01)  # keep outputs off 0/1 so CAMs exist
        install_fixture(name, net.state_dict(), folder)
    return folder


def test_probability_is_the_mean_over_the_members_that_output_the_finding(weights):
    ens = load_model(ENS, weights_dir=weights)
    a, c = load_model(ALL, weights_dir=weights), load_model(CHEX, weights_dir=weights)
    assert ens.labels == a.labels  # chex's findings are a subset of all's
    x = torch.rand(3, 1, 224, 224) * 2048 - 1024
    with torch.no_grad():
        pe, pa, pc = ens.network(x), a.network(x), c.network(x)
    for j, label in enumerate(ens.labels):
        if label in c.labels:
            want = (pa[:, a.labels.index(label)] + pc[:, c.labels.index(label)]) / 2
        else:
            want = pa[:, a.labels.index(label)]
        assert torch.allclose(pe[:, j], want, atol=1e-6), label


def test_operating_point_is_the_mean_of_the_members_thresholds(weights):
    bundled = load_model("cxr:pneumonia-v1", weights_dir=weights)
    ens = load_model(f"ensemble:{ALL},cxr:pneumonia-v1", weights_dir=weights)
    t_bundled = bundled.thresholds[bundled.labels.index("pneumonia")]
    assert ens.thresholds[ens.labels.index("pneumonia")] == pytest.approx((0.5 + t_bundled) / 2)
    assert ens.thresholds[ens.labels.index("effusion")] == 0.5  # only the DenseNet outputs it
    assert ens.input_size == 224 and bundled.input_size < 224  # the smaller member sees a resized input


def test_served_on_onnx_one_pass_per_member_per_batch_and_same_answers_as_torch(weights, tmp_path):
    from ml.engine import OnnxEngine
    from ml.engine_ensemble import EnsembleEngine

    ens = load_model(ENS, weights_dir=weights)
    onnx = Analyzer(ens, ood_gate=None, max_bytes=10**8, max_pixels=10**8, engine="onnx", engine_cache_dir=tmp_path)
    assert isinstance(onnx._engine, EnsembleEngine) and onnx._engine.member_count == 2 and onnx.engine == "onnx"
    calls: list[int] = []
    for member in onnx._engine._members:
        assert type(member.engine) is OnnxEngine
        forward = member.engine.forward
        member.engine.forward = lambda b, f=forward: calls.append(len(b)) or f(b)
    requests = [(png_bytes(quadrant_pixels(256, 256, quadrant=q)), True, f"{q}.png")
                for q in ("top_left", "bottom_right", "all")]
    batch = onnx.analyze_many(requests)
    assert calls == [3, 3]  # every member once, on the whole batch
    torch_an = Analyzer(ens, ood_gate=None, max_bytes=10**8, max_pixels=10**8, engine="torch")
    for (data, _, name), got in zip(requests, batch, strict=True):
        ref = torch_an.analyze_bytes(data, filename=name)
        for f in got.findings:
            g = next(r for r in ref.findings if r.label == f.label)
            assert abs(f.probability - g.probability) <= 1e-4 and f.detected == g.detected
        assert any(f.heatmap_png for f in got.findings) and any(f.regions for f in got.findings if f.detected)


def test_heatmap_is_the_mean_of_the_members_normalised_cams(weights, tmp_path):
    from ml.engine_ensemble import EnsembleCamHead, EnsembleEngine

    ens = load_model(ENS, weights_dir=weights)
    engine = EnsembleEngine(ens, cache_dir=tmp_path)
    head = EnsembleCamHead(engine)
    from ml.engine import check_images

    probs, rows = engine.forward(check_images(224, 1))
    def member_maps(label):
        out = []
        for member, (feats, p) in zip(engine._members, rows[0], strict=True):
            k = member.model.labels.index(label)
            out.append(member.head.cam(feats, k, 224, float(p[k])))
        return out

    shared = [lb for lb in ens.labels if all(lb in m.model.labels for m in engine._members)]
    label = next(lb for lb in shared if all(m is not None for m in member_maps(lb)))  # output by both
    j, maps = ens.labels.index(label), member_maps(label)
    want = np.mean(maps, axis=0)
    want = want / want.max()
    got = head.cam(rows[0], j, 224, float(probs[0, j]))
    assert got is not None and np.allclose(got, want, atol=1e-6)
    assert not np.allclose(maps[0], maps[1], atol=1e-3)  # the members really differ


def test_device_and_provenance_name_the_ensemble_and_every_member_with_its_hash(weights):
    from fhir_server.resources import build_device, weights_entities

    ens = load_model(ENS, weights_dir=weights)
    device = build_device(ens.info)
    assert device["deviceName"][0]["name"] == ENS
    members = [v for v in device["version"] if v["type"]["text"] == "ensemble member weights-sha256"]
    assert [v["component"]["value"].split("@")[0] for v in members] == [ALL, CHEX]
    assert [v["value"] for v in members] == [m.weights_sha256 for m in ens.info.members]
    assert [e["what"]["identifier"]["value"] for e in weights_entities(ens.info)] == [
        m.weights_sha256 for m in ens.info.members]


@pytest.mark.parametrize("name", [f"ensemble:{ALL}", f"ensemble:{ALL},{ALL}", f"ensemble:{ALL},ensemble:{CHEX}",
                                  f"ensemble:{ALL},cxr:untrained-demo", f"ensemble:{ALL},xrv:nope"])
def test_bad_ensembles_are_refused_with_a_reason(weights, name):
    with pytest.raises(ModelUnavailable):
        load_model(name, weights_dir=weights)


def test_a_member_without_weights_names_the_pull_command(tmp_path):
    with pytest.raises(ModelUnavailable, match="cxr models pull densenet121-res224-chex"):
        load_model(f"ensemble:cxr:pneumonia-v1,{CHEX}", weights_dir=tmp_path)


def test_cxr_evaluate_scores_an_ensemble(weights, tmp_path):
    from ml.training.evaluate import evaluate, load_model_for_eval

    model = load_model_for_eval(ENS, str(weights))
    assert len(model.members) == 2
    rows = []
    for i, q in enumerate(["top_left", "bottom_right", "all", None]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png_bytes(quadrant_pixels(128, 128, quadrant=q)))
        rows.append((path, i % 2))
    report = evaluate(rows, model, "effusion")
    assert report["model"] == ENS and report["n_scored"] == 4 and report["n_ingest_errors"] == 0
