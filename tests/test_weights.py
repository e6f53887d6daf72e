"""`cxr models` end to end against a loopback HTTP server (Range supported): pull, resume, refusals,
weights_only, bundles, verify, and a prediction served from the pulled weights. Never the internet."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import threading
from pathlib import Path

import pytest
import torch

from ml.weights import catalog as cat
from ml.weights.store import WeightsRejected, paths, read_manifest

ALL = "densenet121-res224-all"


class _Files(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.folder = folder
        self.cut_after: int | None = None  # close the next full response after this many bytes
        self.requests: list[str | None] = []  # Range header of each GET


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Files

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.server.folder / self.path.rsplit("/", 1)[-1]
        self.server.requests.append(self.headers.get("Range"))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_after is not None:
            cut, self.server.cut_after = self.server.cut_after, None
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    srv = _Files(tmp_path / "served")
    srv.folder.mkdir()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def release_bytes(tmp_path_factory) -> bytes:
    """A small-weights, xrv-shaped DenseNet state dict saved with torch.save, as a release file."""
    import torchxrayvision as xrv

    torch.manual_seed(1)
    net = xrv.models.DenseNet(weights=None).eval()
    with torch.no_grad():
        net.classifier.weight.mul_(0.01)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue()


def _pin(monkeypatch, name: str, data: bytes | None, *, sha: str | None = "data") -> cat.CatalogEntry:
    """Point the catalog entry at fixture bytes: size and sha256 of `data` (or unknown)."""
    real = cat.load_catalog()
    entry = real.get(name)
    pinned = dataclasses.replace(
        entry,
        size=len(data) if data is not None and sha is not None else None,
        sha256=(hashlib.sha256(data).hexdigest() if sha == "data" else sha) if data is not None else None,
    )
    fake = dataclasses.replace(real, entries=tuple(pinned if e.name == name else e for e in real.entries))
    monkeypatch.setattr(cat, "load_catalog", lambda *a, **k: fake)
    import ml.weights.pull as pull_mod
    import ml.weights.store as store_mod

    monkeypatch.setattr(store_mod, "load_catalog", lambda *a, **k: fake)
    monkeypatch.setattr(pull_mod, "load_catalog", lambda *a, **k: fake)
    return pinned


def _cli(*argv: str) -> int:
    from fhir_server.cli import main

    return main(list(argv))


def _base(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/mirror"


def _serve(server, entry, data: bytes) -> None:
    (server.folder / entry.file).write_bytes(data)


def _leftovers(folder: Path) -> list[str]:
    """Everything in the weights dir except an (empty) partial-download folder."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_pull_installs_a_good_file_and_it_serves_a_prediction(server, release_bytes, tmp_path, monkeypatch, capsys):
    entry = _pin(monkeypatch, ALL, release_bytes)
    _serve(server, entry, release_bytes)
    weights = tmp_path / "weights"
    assert _cli("models", "pull", ALL, "--weights-dir", str(weights), "--base-url", _base(server), "--quiet") == 0
    manifest = read_manifest(weights, ALL)
    assert manifest is not None and manifest.sha256 == entry.sha256 and manifest.sha256_source == "catalog"
    assert _leftovers(weights) == sorted([f"{ALL}.manifest.json", f"{ALL}.safetensors"])  # no pickle kept
    assert "installed" in capsys.readouterr().out

    # the server loads the safetensors (never torch.load) and names the release sha256 in Device + Provenance
    from fastapi.testclient import TestClient

    from fhir_server.app import create_app
    from fhir_server.settings import Settings
    from model_fixtures import png_bytes, quadrant_pixels

    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was read at serve time"))
    settings = Settings(model=f"xrv:{ALL}", weights_dir=weights, data_dir=tmp_path / "data", ood_gate=False,
                        engine="torch", auth_enabled=False)
    with TestClient(create_app(settings)) as client:
        r = client.post("/api/v1/predict", files={"image": ("a.png", png_bytes(quadrant_pixels(256, 256)), "image/png")})
        assert r.status_code == 200, r.text
        assert len(r.json()["prediction"]["diagnoses"]) == 18
        media = {"resourceType": "Media", "status": "completed", "content": {
            "contentType": "image/png", "data": __import__("base64").b64encode(png_bytes(quadrant_pixels(256, 256))).decode()}}
        r = client.post("/fhir/Media/$analyze", json={"resourceType": "Parameters", "parameter": [
            {"name": "media", "resource": media}]}, headers={"Content-Type": "application/fhir+json"})
        assert r.status_code in (200, 201), r.text[:300]
        resources = [e["resource"] for e in r.json()["entry"]]
    device = next(x for x in resources if x["resourceType"] == "Device")
    assert {"type": {"text": "weights-sha256"}, "value": entry.sha256} in device["version"]
    provenance = next(x for x in resources if x["resourceType"] == "Provenance")
    assert any(e["what"].get("identifier", {}).get("value") == entry.sha256 for e in provenance["entity"])


def test_truncated_transfer_resumes_with_range(server, release_bytes, tmp_path, monkeypatch):
    entry = _pin(monkeypatch, ALL, release_bytes)
    _serve(server, entry, release_bytes)
    server.cut_after = len(release_bytes) // 3
    from ml.weights.pull import pull

    manifest, fetched = pull(ALL, tmp_path / "w", base_url=_base(server), progress=False)
    assert fetched and manifest.sha256 == entry.sha256
    assert server.requests[0] is None and len(server.requests) == 2
    resumed_at = int(server.requests[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(release_bytes) // 3  # what arrived before the cut, not from zero
    assert not (tmp_path / "w" / ".partial" / entry.file).exists()


def test_an_interrupted_pull_resumes_in_the_next_command(server, release_bytes, tmp_path, monkeypatch):
    entry = _pin(monkeypatch, ALL, release_bytes)
    weights = tmp_path / "w"
    partial = weights / ".partial" / entry.file
    partial.parent.mkdir(parents=True)
    partial.write_bytes(release_bytes[:1000])  # what an earlier, killed pull left
    _serve(server, entry, release_bytes)
    assert _cli("models", "pull", ALL, "--weights-dir", str(weights), "--base-url", _base(server), "--quiet") == 0
    assert server.requests == ["bytes=1000-"]
    assert read_manifest(weights, ALL).sha256 == entry.sha256


def test_wrong_hash_is_refused_and_nothing_half_installed(server, release_bytes, tmp_path, monkeypatch, capsys):
    entry = _pin(monkeypatch, ALL, release_bytes, sha="0" * 64)
    _serve(server, entry, release_bytes)
    weights = tmp_path / "w"
    read = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: read.append(a) or pytest.fail("read before the hash check"))
    assert _cli("models", "pull", ALL, "--weights-dir", str(weights), "--base-url", _base(server), "--quiet") == 1
    assert "sha256" in capsys.readouterr().err and not read
    assert _leftovers(weights) == []
    from ml.errors import ModelUnavailable
    from ml.models.registry import load_model

    with pytest.raises(ModelUnavailable, match="cxr models pull"):
        load_model(f"xrv:{ALL}", weights_dir=weights)


def test_wrong_size_is_refused_while_downloading(server, release_bytes, tmp_path, monkeypatch):
    entry = _pin(monkeypatch, ALL, release_bytes)
    _serve(server, entry, release_bytes + b"trailing junk")
    assert _cli("models", "pull", ALL, "--weights-dir", str(tmp_path / "w"), "--base-url", _base(server), "--quiet") == 1
    assert read_manifest(tmp_path / "w", ALL) is None


def test_unpublished_hash_needs_trust_on_first_use_which_records_it(server, release_bytes, tmp_path, monkeypatch, capsys):
    entry = _pin(monkeypatch, "densenet121-res224-nih", release_bytes, sha=None)
    assert entry.sha256 is None and entry.size is None
    _serve(server, entry, release_bytes)
    weights = tmp_path / "w"
    args = ("models", "pull", "densenet121-res224-nih", "--weights-dir", str(weights), "--base-url", _base(server), "--quiet")
    assert _cli(*args) == 1
    assert "--trust-on-first-use" in capsys.readouterr().err
    assert read_manifest(weights, "densenet121-res224-nih") is None
    assert _cli(*args, "--trust-on-first-use") == 0
    manifest = read_manifest(weights, "densenet121-res224-nih")
    assert manifest.sha256 == hashlib.sha256(release_bytes).hexdigest()
    assert manifest.sha256_source == "trust-on-first-use"
    # a different file later is refused: the recorded hash is now the pin
    other = release_bytes[:-8] + b"\x00" * 8
    from ml.weights.store import check_release

    with pytest.raises(WeightsRejected, match="trusted on first use"):
        check_release(entry, len(other), hashlib.sha256(other).hexdigest(), trust_on_first_use=True, weights_dir=weights)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cxr-weights-pwned",))


class Custom:
    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("extra", [Evil(), Custom()], ids=["os-system-reduce", "custom-class"])
def test_a_pickle_with_extra_objects_is_refused_by_weights_only(extra, release_bytes, tmp_path, monkeypatch):
    state = torch.load(io.BytesIO(release_bytes), weights_only=True)
    buf = io.BytesIO()
    torch.save({**state, "extra": extra}, buf)
    data = buf.getvalue()
    entry = _pin(monkeypatch, ALL, data)
    path = tmp_path / entry.file
    path.write_bytes(data)
    Path("/tmp/cxr-weights-pwned").unlink(missing_ok=True)
    assert _cli("models", "import", str(path), "--weights-dir", str(tmp_path / "w")) == 1
    assert not Path("/tmp/cxr-weights-pwned").exists()
    assert _leftovers(tmp_path / "w") == []


def test_a_whole_pickled_torchxrayvision_model_is_read_with_an_allowlist(tmp_path, monkeypatch):
    """Release DenseNet files pickle the whole xrv model: weights_only reads them with exactly its classes."""
    import torchxrayvision as xrv

    from ml.weights.store import read_release_state

    torch.manual_seed(2)
    net = xrv.models.DenseNet(weights=None).eval()
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    state = read_release_state(path)
    assert set(state) == set(net.state_dict()) and torch.equal(state["classifier.weight"], net.classifier.weight)


def test_wrong_architecture_is_refused(tmp_path, monkeypatch):
    buf = io.BytesIO()
    torch.save({"classifier.weight": torch.zeros(18, 7)}, buf)
    entry = _pin(monkeypatch, ALL, buf.getvalue())
    (tmp_path / entry.file).write_bytes(buf.getvalue())
    assert _cli("models", "import", str(tmp_path / entry.file), "--weights-dir", str(tmp_path / "w")) == 1
    assert _leftovers(tmp_path / "w") == []


def test_export_bundle_then_import_round_trip(release_bytes, tmp_path, monkeypatch, capsys):
    entry = _pin(monkeypatch, ALL, release_bytes)
    src = tmp_path / entry.file
    src.write_bytes(release_bytes)
    online, offline = tmp_path / "online", tmp_path / "offline"
    assert _cli("models", "import", str(src), "--weights-dir", str(online)) == 0
    bundle = tmp_path / "carry" / "xrv.tar"
    assert _cli("models", "export-bundle", ALL, str(bundle), "--weights-dir", str(online)) == 0
    assert _cli("models", "import", str(bundle), "--weights-dir", str(offline)) == 0
    a, b = read_manifest(online, ALL), read_manifest(offline, ALL)
    assert b.sha256 == a.sha256 == entry.sha256 and b.safetensors_sha256 == a.safetensors_sha256
    assert paths(offline, ALL)[0].read_bytes() == paths(online, ALL)[0].read_bytes()
    assert _cli("models", "verify", "--weights-dir", str(offline)) == 0


def test_a_tampered_bundle_is_refused(release_bytes, tmp_path, monkeypatch):
    import tarfile

    entry = _pin(monkeypatch, ALL, release_bytes)
    (tmp_path / entry.file).write_bytes(release_bytes)
    online = tmp_path / "online"
    assert _cli("models", "import", str(tmp_path / entry.file), "--weights-dir", str(online)) == 0
    bundle = tmp_path / "b.tar"
    assert _cli("models", "export-bundle", ALL, str(bundle), "--weights-dir", str(online)) == 0
    tampered = tmp_path / "t.tar"
    with tarfile.open(bundle) as src, tarfile.open(tampered, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith(".safetensors"):
                data = data[:-4] + b"\x01\x02\x03\x04"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    assert _cli("models", "import", str(tampered), "--weights-dir", str(tmp_path / "off")) == 1
    assert _leftovers(tmp_path / "off") == []


def test_verify_detects_a_corrupted_installed_file(release_bytes, tmp_path, monkeypatch, capsys):
    entry = _pin(monkeypatch, ALL, release_bytes)
    (tmp_path / entry.file).write_bytes(release_bytes)
    weights = tmp_path / "w"
    assert _cli("models", "import", str(tmp_path / entry.file), "--weights-dir", str(weights)) == 0
    assert _cli("models", "verify", "--weights-dir", str(weights)) == 0
    st = paths(weights, ALL)[0]
    data = bytearray(st.read_bytes())
    data[len(data) // 2] ^= 0x01
    st.write_bytes(bytes(data))
    capsys.readouterr()
    assert _cli("models", "verify", "--weights-dir", str(weights)) == 1
    assert f"FAIL {ALL}" in capsys.readouterr().out


def test_list_shows_catalog_fields_and_installed_state(tmp_path, capsys):
    assert _cli("models", "list", "--weights-dir", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "xrv:densenet121-res224-all  [not installed]" in out
    assert "56524913dd16a906422e8d8b66a7a5c46be1d82eb7ac012d8103776f1aa68899" in out and "28,382,008 bytes" in out
    assert "UNKNOWN (pull needs --trust-on-first-use)" in out and "Apache-2.0" in out and "Pneumonia" in out


def test_catalog_never_holds_an_unpublished_value():
    """Every entry is either pinned with a sha256 and the evidence for it, or marked unknown."""
    catalog = cat.load_catalog()
    assert catalog.get(ALL).sha256 == "56524913dd16a906422e8d8b66a7a5c46be1d82eb7ac012d8103776f1aa68899"
    assert catalog.get(ALL).size == 28_382_008
    import torchxrayvision as xrv

    for entry in catalog.entries:
        assert os.path.basename(xrv.models.model_urls[entry.name]["weights_url"]) == entry.file
        assert entry.sha256 is None or (len(entry.sha256) == 64 and "public" in entry.evidence)


def test_models_base_url_setting_is_the_mirror(server, release_bytes, tmp_path, monkeypatch):
    entry = _pin(monkeypatch, ALL, release_bytes)
    _serve(server, entry, release_bytes)
    monkeypatch.setenv("CXR_MODELS_BASE_URL", _base(server))
    assert _cli("models", "pull", ALL, "--weights-dir", str(tmp_path / "w"), "--quiet") == 0
    assert read_manifest(tmp_path / "w", ALL) is not None


def test_resnet_weights_load_from_safetensors_without_torchxrayvision_fetching(tmp_path, monkeypatch):
    """xrv.models.ResNet's constructor always fetches its file: build_network assembles the same model."""
    import torchvision
    import torchxrayvision as xrv

    from ml.models.registry import load_model
    from ml.weights.store import install_fixture

    monkeypatch.setattr(xrv.utils, "download", lambda *a, **k: pytest.fail("tried to download"))
    torch.manual_seed(3)
    net = torchvision.models.resnet50(num_classes=18, weights=None)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    install_fixture("resnet50-res512-all", net.state_dict(), tmp_path)
    loaded = load_model("xrv:resnet50-res512-all", weights_dir=tmp_path)
    assert loaded.input_size == 512 and len(loaded.labels) == 16  # two outputs have no operating point
    with torch.no_grad():
        out = loaded.network(torch.zeros(1, 1, 512, 512))
    assert out.shape == (1, 16) and bool(((out >= 0) & (out <= 1)).all())
