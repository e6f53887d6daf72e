"""Serving under load: micro-batching equivalence, backpressure (503 + Retry-After while health and
FHIR reads still answer), oversize bodies refused while streaming. No timed assertions."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest

from analyze_support import make_client, media
from fhir_server.inference import InferencePool, ServerBusy
from live_server import make_test_app, run_live_server
from ml.models.untrained import load_untrained
from ml.pipeline import Analyzer
from model_fixtures import png_bytes, quadrant_pixels, tiny_model


def _requests() -> list[tuple[bytes, bool, str | None]]:
    return [
        (png_bytes(quadrant_pixels(96, 96, quadrant="top_left")), True, "a.png"),
        (png_bytes(quadrant_pixels(200, 120, quadrant="bottom_right")), False, "b.png"),
        (b"this is not an image", False, "c.png"),
        (png_bytes(quadrant_pixels(80, 80, quadrant="all")), True, "d.png"),
        (png_bytes(quadrant_pixels(64, 64, quadrant=None)), False, None),
    ]


# What the server guarantees between a request served alone and the same request inside a batch
# (docs/performance.md, "Batched = single"): CPU kernels pick different code paths for different batch
# sizes, so the last bits of a float may differ; answers may not.
PROB_TOL = 1e-5  # absolute, on every probability and the confidence score
HEATMAP_TOL = 2  # max abs difference per 8-bit channel of the heatmap overlay PNG
REGION_TOL = 2  # pixels, per box coordinate


def _png_pixels(data: bytes):
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def assert_same_answer(got, want) -> None:
    """Identical decisions (labels, order, detected, severity, triage, image), probabilities within
    PROB_TOL, regions and heatmaps within their tolerances. A decision is only allowed to differ when
    its probability lies within PROB_TOL of the edge it decides on (never the case in these tests)."""
    import re

    import numpy as np

    assert got.image == want.image and got.triage == want.triage
    assert [f.label for f in got.findings] == [f.label for f in want.findings]
    assert abs(got.confidence_score - want.confidence_score) <= PROB_TOL
    for a, b in zip(got.findings, want.findings, strict=True):
        assert abs(a.probability - b.probability) <= PROB_TOL, (a.label, a.probability, b.probability)
        assert abs(b.probability - b.threshold) > PROB_TOL, "fixture sits on a threshold: pick another"
        assert (a.detected, a.severity, a.threshold) == (b.detected, b.severity, b.threshold), a.label
        assert len(a.regions) == len(b.regions), a.label
        for ra, rb in zip(a.regions, b.regions, strict=True):
            assert max(abs(x - y) for x, y in zip(ra, rb, strict=True)) <= REGION_TOL, (a.label, ra, rb)
        assert (a.heatmap_png is None) == (b.heatmap_png is None), a.label
        if a.heatmap_png is not None:
            pa, pb = _png_pixels(a.heatmap_png), _png_pixels(b.heatmap_png)
            assert pa.shape == pb.shape and int(np.abs(pa - pb).max()) <= HEATMAP_TOL, a.label
    # the report says the same thing; its 2-decimal numbers may differ in the last digit only
    number = re.compile(r"\d+\.\d+")
    assert number.sub("#", got.report_text) == number.sub("#", want.report_text)
    for x, y in zip(number.findall(got.report_text), number.findall(want.report_text), strict=True):
        assert abs(float(x) - float(y)) <= 0.01 + 1e-9


@pytest.mark.parametrize("engine", ["torch", "onnx"])
@pytest.mark.parametrize("make_model", [tiny_model, load_untrained], ids=["tiny", "untrained"])
def test_a_batch_returns_exactly_what_single_requests_return(tmp_path, engine, make_model):
    analyzer = Analyzer(make_model(), ood_gate=None, max_bytes=10**8, max_pixels=10**8, engine=engine,
                        engine_cache_dir=tmp_path)
    requests = _requests()
    batch = analyzer.analyze_many(requests)
    assert len(batch) == len(requests)
    for (data, heatmaps, filename), got in zip(requests, batch, strict=True):
        try:
            single = analyzer.analyze_bytes(data, heatmaps=heatmaps, filename=filename)
        except Exception as exc:  # noqa: BLE001
            assert type(got) is type(exc) and str(got) == str(exc)
            continue
        assert not isinstance(got, BaseException), got
        assert_same_answer(got, single)
    assert isinstance(batch[2], Exception)  # the bad one failed alone, in its place
    assert any(f.heatmap_png for f in batch[0].findings)


class _Recording(Analyzer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[int] = []

    def analyze_many(self, requests):
        self.batches.append(len(requests))
        return super().analyze_many(requests)


def test_pool_groups_concurrent_requests_into_one_forward_pass_in_order():
    analyzer = _Recording(tiny_model(), ood_gate=None, max_bytes=10**8, max_pixels=10**8)
    requests = [r for r in _requests() if r[2] != "c.png"]
    expected = [analyzer.analyze_bytes(d, heatmaps=h, filename=f) for d, h, f in requests]
    analyzer.batches.clear()

    async def scenario():
        # a long wait: the batch is sent when it is full, not when the wait ends
        pool = InferencePool(1, batch_max_size=len(requests), batch_max_wait_ms=60_000)
        try:
            return await asyncio.gather(
                *(pool.analyze(analyzer, d, heatmaps=h, filename=f) for d, h, f in requests)
            )
        finally:
            pool.shutdown()

    results = asyncio.run(scenario())
    assert analyzer.batches == [len(requests)]
    assert len(results) == len(expected)
    for got, want in zip(results, expected, strict=True):  # in order: each answer is its own request's
        assert_same_answer(got, want)


class _RecordingBlocking(_Recording):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def analyze_many(self, requests):
        self.batches.append(len(requests))
        assert self.release.wait(60), "test never released the analysis"
        return Analyzer.analyze_many(self, requests)


def test_pool_spreads_a_burst_over_idle_workers():
    """4 requests at once with 2 idle workers: two batches of 2, not one batch of 4 on one core."""
    analyzer = _RecordingBlocking(tiny_model(), ood_gate=None, max_bytes=10**8, max_pixels=10**8)
    requests = [r for r in _requests() if r[2] != "c.png"][:4]

    async def scenario():
        pool = InferencePool(2, batch_max_size=4, batch_max_wait_ms=50)
        try:
            pending = asyncio.gather(*(pool.analyze(analyzer, d, heatmaps=h, filename=f) for d, h, f in requests))
            while len(analyzer.batches) < 2:  # both workers hold a batch (no analysis finishes before)
                await asyncio.sleep(0.01)
            analyzer.release.set()
            return await pending
        finally:
            analyzer.release.set()
            pool.shutdown()

    results = asyncio.run(scenario())
    assert analyzer.batches == [2, 2]
    for got, (d, h, f) in zip(results, requests, strict=True):
        assert_same_answer(got, analyzer.analyze_bytes(d, heatmaps=h, filename=f))


def test_pool_delivers_each_requests_own_error():
    analyzer = tiny_model()
    an = Analyzer(analyzer, ood_gate=None, max_bytes=10**8, max_pixels=10**8)

    async def scenario():
        pool = InferencePool(1, batch_max_size=2, batch_max_wait_ms=60_000)
        try:
            return await asyncio.gather(
                pool.analyze(an, b"garbage", filename="x.png"),
                pool.analyze(an, png_bytes(quadrant_pixels(64, 64))),
                return_exceptions=True,
            )
        finally:
            pool.shutdown()

    bad, good = asyncio.run(scenario())
    assert isinstance(bad, Exception) and not isinstance(good, Exception)
    assert good.findings


class _Blocking(Analyzer):
    """Holds every analysis until released, so the pool can be filled deterministically."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.started = threading.Event()
        self.release = threading.Event()

    def analyze_many(self, requests):
        self.started.set()
        assert self.release.wait(60), "test never released the analysis"
        return super().analyze_many(requests)


@contextmanager
def _only_slot_taken(c, analyzer: _Blocking, image: bytes):
    """Fills the pool's only slot with a predict that is held until the block exits."""
    first: dict = {}
    worker = threading.Thread(
        target=lambda: first.setdefault("r", c.post("/api/v1/predict", files={"image": ("a.png", image, "image/png")}))
    )
    worker.start()
    try:
        assert analyzer.started.wait(30)
        yield worker
    finally:
        analyzer.release.set()
        worker.join(60)
    assert first["r"].status_code == 200


def _blocked_client(tmp_path):
    analyzer = _Blocking(tiny_model(), ood_gate=None, max_bytes=10**8, max_pixels=10**8)
    client = make_client(tmp_path, analyzer=analyzer, inference_workers=1, inference_queue=0, batch_max_size=1)
    return client, analyzer, png_bytes(quadrant_pixels(64, 64))


def test_full_queue_gives_503_with_retry_after_while_health_and_fhir_reads_answer(tmp_path):
    client, analyzer, image = _blocked_client(tmp_path)
    with client as c:
        with _only_slot_taken(c, analyzer, image) as worker:
            # the pool is full: legacy JSON error with Retry-After
            r = c.post("/api/v1/predict", files={"image": ("b.png", image, "image/png")})
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "server_busy"
            assert int(r.headers["retry-after"]) >= 1
            # FHIR: an OperationOutcome with Retry-After
            r = c.post("/fhir/Media/$analyze", json={"resourceType": "Parameters", "parameter": [{"name": "media", "resource": media()}]},
                       headers={"Content-Type": "application/fhir+json"})
            assert r.status_code == 503, r.text
            assert r.json()["resourceType"] == "OperationOutcome"
            assert r.json()["issue"][0]["code"] == "transient"
            assert int(r.headers["retry-after"]) >= 1
            # everything that is not image analysis still answers
            assert c.get("/healthz").status_code == 200
            assert c.get("/readyz").status_code == 200
            assert c.get("/fhir/metadata").status_code == 200
            created = c.post("/fhir/Patient", json={"resourceType": "Patient", "name": [{"family": "Busy"}]},
                             headers={"Content-Type": "application/fhir+json"})
            assert created.status_code == 201, created.text
            read = c.get(f"/fhir/Patient/{created.json()['id']}")
            assert read.status_code == 200 and read.json()["name"][0]["family"] == "Busy"
            assert worker.is_alive()  # the first analysis is still being held
        # capacity is released: the next request is served
        assert c.post("/api/v1/predict", files={"image": ("c.png", image, "image/png")}).status_code == 200


def test_server_busy_carries_retry_after():
    async def scenario():
        pool = InferencePool(1, queue=0)
        try:
            gate = threading.Event()
            first = asyncio.ensure_future(pool.run(gate.wait, 30))
            while pool.admitted == 0:
                await asyncio.sleep(0.01)
            with pytest.raises(ServerBusy) as info:
                await pool.analyze(Analyzer(tiny_model(), ood_gate=None, max_bytes=10**6, max_pixels=10**6), b"x")
            gate.set()
            await first
            return info.value
        finally:
            pool.shutdown()

    busy = asyncio.run(scenario())
    assert busy.http_status == 503 and busy.retry_after >= 1


# ---- oversize bodies over real HTTP (uvicorn): refused while streaming ---------------------------

LIMIT = 200_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = make_test_app(tmp_path_factory.mktemp("serving"), max_upload_bytes=LIMIT)
    with run_live_server(app) as live:
        yield live


def _raw_request(root: str, head: str, chunks, *, max_send: int) -> tuple[int, int]:
    """Send `head`, then chunked body pieces until the server answers; (status, bytes sent)."""
    url = urlsplit(root)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sent = 0
    try:
        sock.sendall(head.encode("latin-1"))
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered before the body was complete
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
            if sent > max_send:
                break
        response = b""
        while b"\r\n" not in response:
            part = sock.recv(4096)
            if not part:
                break
            response += part
        return int(response.split(b" ", 2)[1]), sent
    finally:
        sock.close()


def _pieces(n: int, size: int = 16_384):
    for _ in range(n):
        yield b"\0" * size


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/api/v1/predict", "multipart/form-data; boundary=XyZ"), ("/fhir/Media/$analyze", "application/fhir+json")],
)
def test_chunked_oversize_body_is_refused_while_streaming(server, path, content_type):
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    if path.startswith("/api"):
        prefix = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        chunks = [prefix, *_pieces(400)]  # 6.5 MB offered, 200 kB allowed
    else:
        chunks = [b'{"resourceType":"Parameters","parameter":[{"name":"media","resource":{"resourceType":"Media","content":{"data":"',
                  *(b"A" * 16_384 for _ in range(400))]
    status, sent = _raw_request(server.root, head, chunks, max_send=6_000_000)
    assert status == 413
    assert sent < 6_000_000  # the server stopped us long before the whole body was sent


@pytest.mark.parametrize("path", ["/api/v1/predict", "/fhir/Media/$analyze"])
def test_declared_oversize_content_length_is_refused_before_reading(server, path):
    url = urlsplit(server.root)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        ctype = "multipart/form-data; boundary=XyZ" if path.startswith("/api") else "application/fhir+json"
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                      f"Content-Length: {10**12}\r\n\r\n").encode())
        # no body at all: a server that waited for it would time out this recv instead of answering
        response = sock.recv(4096)
    assert int(response.split(b" ", 2)[1]) == 413


def test_accepted_async_job_waits_for_room_instead_of_failing(tmp_path):
    """A 202-accepted $analyze job that meets a full queue waits (Retry-After) and then completes."""
    from test_async import ASYNC, poll_until_done

    client, analyzer, image = _blocked_client(tmp_path)
    with client as c:
        with _only_slot_taken(c, analyzer, image):
            r = c.post("/fhir/Media/$analyze", headers={**ASYNC, "Content-Type": "application/fhir+json"},
                       json={"resourceType": "Parameters", "parameter": [{"name": "media", "resource": media()}]})
            assert r.status_code == 202, r.text
            location = r.headers["content-location"]
            assert c.get(location).status_code == 202  # still waiting for room, not failed
        done = poll_until_done(c, location)
        assert done.status_code == 200, done.text


def test_the_equivalence_check_catches_a_different_answer():
    """assert_same_answer is strict where it must be: a probability off by more than the tolerance, a
    flipped decision, or another request's answer all fail it."""
    import dataclasses

    analyzer = Analyzer(tiny_model(), ood_gate=None, max_bytes=10**8, max_pixels=10**8)
    a, b = (analyzer.analyze_bytes(d, heatmaps=h, filename=f) for d, h, f in [_requests()[0], _requests()[3]])
    assert_same_answer(a, a)
    f0 = a.findings[0]
    nudged = dataclasses.replace(a, findings=[dataclasses.replace(f0, probability=f0.probability + 10 * PROB_TOL),
                                              *a.findings[1:]])
    flipped = dataclasses.replace(a, findings=[dataclasses.replace(f0, detected=not f0.detected), *a.findings[1:]])
    for wrong in (nudged, flipped, b):
        with pytest.raises(AssertionError):
            assert_same_answer(wrong, a)


class _ThreadRecording(_Recording):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threads: list[int | None] = []

    def analyze_many(self, requests):
        from ml import engine as eng

        self.threads.append(getattr(eng._CALL, "threads", None))
        return super().analyze_many(requests)


@pytest.mark.skipif(__import__("fhir_server.inference", fromlist=["x"]).available_cores() < 2, reason="needs 2 cores")
def test_a_lone_batch_runs_on_every_core_and_concurrent_batches_share_them():
    analyzer = _ThreadRecording(tiny_model(), ood_gate=None, max_bytes=10**8, max_pixels=10**8)
    requests = [r for r in _requests() if r[2] != "c.png"][:4]

    async def scenario(reqs, lone):
        pool = InferencePool(2, batch_max_size=4, batch_max_wait_ms=50, lone_batch_all_cores=lone)
        try:
            return pool, await asyncio.gather(*(pool.analyze(analyzer, d, heatmaps=h, filename=f) for d, h, f in reqs))
        finally:
            pool.shutdown()

    pool, _ = asyncio.run(scenario(requests[:1], True))
    assert analyzer.threads == [pool.lone_threads] and pool.lone_threads >= 2
    analyzer.threads.clear()
    asyncio.run(scenario(requests, True))  # a burst: spread over both workers, each on its share
    assert analyzer.threads[:2] == [None, None]  # (a straggler arriving after both finished runs lone)
    analyzer.threads.clear()
    asyncio.run(scenario(requests[:1], False))
    assert analyzer.threads == [None]


@pytest.mark.parametrize("make_model", [tiny_model, load_untrained], ids=["tiny", "untrained"])
def test_more_intra_op_threads_give_the_same_answers(tmp_path, make_model):
    from ml.engine import intra_op_threads

    analyzer = Analyzer(make_model(), ood_gate=None, max_bytes=10**8, max_pixels=10**8, engine="onnx",
                        engine_cache_dir=tmp_path)
    for data, heatmaps, filename in [r for r in _requests() if r[2] != "c.png"]:
        narrow = analyzer.analyze_bytes(data, heatmaps=heatmaps, filename=filename)
        with intra_op_threads(2):
            wide = analyzer.analyze_bytes(data, heatmaps=heatmaps, filename=filename)
        assert_same_answer(wide, narrow)
