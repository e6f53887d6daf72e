"""`cxr bench --http` pieces: the naive Flask baseline, the xrv weights fixture, the load loops and the
ratio table. Tiny request counts; no timed assertions."""

from __future__ import annotations

import io

import pytest

from fhir_server import bench_http
from live_server import live_server  # noqa: F401 - fixture
from model_fixtures import png_bytes, quadrant_pixels


@pytest.fixture(scope="module")
def fixture_weights(tmp_path_factory):
    folder, is_fixture = bench_http.xrv_weights_dir(tmp_path_factory.mktemp("none"), tmp_path_factory.mktemp("scratch"))
    assert is_fixture
    return folder


def test_fixture_is_loadable_by_our_registry(fixture_weights):
    from ml.models.registry import load_model

    model = load_model(bench_http.XRV_DENSENET, weights_dir=fixture_weights)
    assert len(model.labels) > 10


def test_fixture_is_served_by_onnx_runtime_not_a_torch_fallback(fixture_weights, tmp_path):
    """The bench's DenseNet must measure the engine we serve: an export the load check rejects
    would silently time torch instead (it did, when xrv's op_norm was traced)."""
    from ml import engine as eng
    from ml.models.registry import load_model

    model = load_model(bench_http.XRV_DENSENET, weights_dir=fixture_weights)
    assert isinstance(eng.build_engine(model, "onnx", cache_dir=tmp_path), eng.OnnxEngine)


def test_existing_weights_are_used_not_replaced_and_given_to_the_naive_side(fixture_weights, tmp_path):
    from ml.weights.catalog import load_catalog

    folder, is_fixture = bench_http.xrv_weights_dir(fixture_weights, tmp_path)
    assert folder == fixture_weights and is_fixture  # installed fixture weights stay what they are
    assert (tmp_path / "xrv-weights" / load_catalog().get(bench_http.XRV_DENSENET).file).is_file()


def test_naive_baseline_answers_a_png(fixture_weights):
    pytest.importorskip("flask")
    import torchxrayvision as xrv

    from fhir_server import bench_naive

    bench_naive.model = xrv.models.DenseNet(weights="densenet121-res224-all", cache_dir=str(fixture_weights)).eval()
    client = bench_naive.app.test_client()
    data = png_bytes(quadrant_pixels(300, 260, quadrant="top_left"))
    r = client.post("/predict", data={"image": (io.BytesIO(data), "a.png")}, content_type="multipart/form-data")
    assert r.status_code == 200, r.data
    body = r.get_json()
    assert "Pneumonia" in body and all(0.0 <= v <= 1.0 for v in body.values())
    assert client.get("/healthz").status_code == 200


def test_load_loops_against_the_live_server(live_server):  # noqa: F811
    data = png_bytes(quadrant_pixels(128, 128))
    url = f"{live_server.root}/api/v1/predict"
    p50, p95, errors = bench_http._latency(url, "a.png", data, n=3, limit_s=30)
    assert 0 < p50 <= p95 and errors == 0
    health: list[float] = []
    rate, errors = bench_http._throughput(url, "a.png", data, clients=2, seconds=2.0,
                                          probes=[(f"{live_server.root}/healthz", health)])
    assert rate > 0 and errors == 0 and health
    compared, total = bench_http._orientation_comparisons(live_server.root)
    assert total >= 3 and 0 <= compared <= total  # read from the server's own /metrics


def test_ratio_table(capsys):
    ours = bench_http.ModelResult("ours", throughput={1: 10.0, 4: 20.0, 8: 30.0})
    naive = bench_http.ModelResult("naive", throughput={1: 5.0, 4: 5.0, 8: 10.0})
    bench_http.print_results([ours], naive)
    out = capsys.readouterr().out
    assert "1 clients x2.00" in out and "4 clients x4.00" in out and "8 clients x3.00" in out
    ours.compared = (7, 40)
    bench_http.print_results([ours], None)
    assert "orientation comparisons (4 extra backbone passes each): 7 of 40 analyses" in capsys.readouterr().out


def test_ensemble_members_get_fixtures_so_each_member_count_can_be_benched(tmp_path):
    from ml.models.registry import load_model

    folder, is_fixture = bench_http.xrv_weights_dir(tmp_path / "none", tmp_path)
    assert is_fixture
    installed = bench_http.fixture_members(
        ["xrv:densenet121-res224-all", "ensemble:xrv:densenet121-res224-all,xrv:densenet121-res224-chex"], folder)
    assert installed == ["xrv:densenet121-res224-chex"]
    model = load_model("ensemble:xrv:densenet121-res224-all,xrv:densenet121-res224-chex", weights_dir=folder)
    assert len(model.members) == 2
