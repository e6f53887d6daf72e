"""`cxr bench --replicas`: real `cxr serve` processes behind a real nginx share the traffic."""

from __future__ import annotations

import pytest

from fhir_server import bench_replicas
from fhir_server.bench_http import _throughput
from model_fixtures import png_bytes, quadrant_pixels

pytestmark = pytest.mark.skipif(bench_replicas.nginx_binary() is None, reason="nginx is not installed")


def test_two_replicas_behind_nginx_both_serve(tmp_path):
    env = {"CXR_OOD_GATE": "false", "CXR_ENGINE": "torch"}
    data = png_bytes(quadrant_pixels(256, 256))
    with bench_replicas.replicas(2, "cxr:untrained-demo", tmp_path, env) as started:
        with bench_replicas.nginx([p for p, _ in started], tmp_path) as root:
            rate, errors = _throughput(f"{root}/api/v1/predict", "x.png", data, clients=4, seconds=2.0)
            spread = [bench_replicas.served_by(r) for _, r in started]
    assert errors == 0
    assert rate > 0
    assert all(n > 0 for n in spread), spread  # nginx spread the load over both processes
