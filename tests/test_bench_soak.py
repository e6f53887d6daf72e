"""`cxr bench --soak`: the mixed traffic really gets its expected answers and memory is sampled.
Small request counts against the live test server; no timed or memory-size assertions."""

from __future__ import annotations

import os

from fhir_server import bench_soak
from fhir_server.bench import bench_inputs
from live_server import live_server  # noqa: F401 - fixture


def test_soak_sends_every_kind_of_request_and_samples_memory(live_server):  # noqa: F811
    inputs, _ = bench_inputs(None)
    result = bench_soak.soak(live_server.root, os.getpid(), inputs, requests=24, clients=2)
    assert result.errors_5xx == 0 and result.unexpected == []
    done = [n for n, _ in result.rss_mb]
    assert done[0] == 0 and done[-1] == 24 and len(done) >= 3
    assert all(mb > 0 for _, mb in result.rss_mb)


def test_soak_counts_an_unexpected_answer(live_server, monkeypatch):  # noqa: F811
    real = bench_soak._traffic

    def wrong_expectation(*args):
        kind, target, kwargs, _ = real(*args)[4]  # the FHIR read, now "expected" to be 404
        return [(kind, target, kwargs, 404)]

    monkeypatch.setattr(bench_soak, "_traffic", wrong_expectation)
    result = bench_soak.soak(live_server.root, os.getpid(), bench_inputs(None)[0], requests=3, clients=1)
    assert result.unexpected == ["FHIR read: 200"] * 3


def test_growth_after_warmup_is_the_rise_and_slope_past_the_first_fifth():
    result = bench_soak.SoakResult("m", "onnx fp32", requests=1000)
    result.rss_mb = [(0, 100.0), (100, 400.0)] + [(n, 500.0 + 0.01 * (n - 200)) for n in range(200, 1001, 100)]
    grown, slope = result.growth_after_warmup()
    assert abs(grown - 8.0) < 1e-9 and abs(slope - 10.0) < 1e-6  # warm-up jump from 100 to 400 MB excluded


def test_print_soak_reports_samples_and_errors(capsys):
    result = bench_soak.SoakResult("m", "onnx fp32", requests=10, errors_5xx=1, unexpected=["x: 503"])
    result.rss_mb = [(0, 1.0), (2, 1.5), (5, 2.0), (10, 2.0)]
    bench_soak.print_soak(result)
    out = capsys.readouterr().out
    assert "5xx responses 1" in out and "x: 503" in out and "slope" in out
