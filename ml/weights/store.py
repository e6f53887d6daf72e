"""Installed TorchXRayVision weights: `<name>.safetensors` + `<name>.manifest.json` in the weights dir.

Install (from a downloaded release file or an imported one):
1. size and sha256 of the release file are checked against the catalog BEFORE anything reads it;
   an entry whose hash is unpublished needs trust_on_first_use, and the hash seen is recorded;
2. the pickle is read once with torch.load(weights_only=True). Release DenseNet files pickle a whole
   torchxrayvision model, so exactly the classes such a file needs (torch.nn modules, the
   torchxrayvision / torchvision model classes, OrderedDict) are allow-listed, after listing the
   file's globals without running it; anything else (os.system, a foreign class) is refused;
3. the tensors are loaded into the architecture (strict: every name and shape must match), written as
   safetensors, then the manifest: both through temporary files + rename, the manifest last, so a
   failure leaves no half-installed model (a model is installed iff its manifest exists).

The server loads only safetensors (load_installed), after checking their sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import pickle
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from ml.weights.catalog import CatalogEntry, load_catalog

MANIFEST_FORMAT = "cxr-weights-1"
BUNDLE_FORMAT = "cxr-weights-bundle-1"
BUNDLE_INDEX = "bundle.json"
PARTIAL_DIR = ".partial"

# Globals a release file may reference (listed from the file before it is read, never executed).
_ALLOWED_PREFIXES = ("torch.nn.modules.", "torchxrayvision.models.", "torchvision.models.")
_ALLOWED_EXACT = {"collections.OrderedDict", "builtins.set", "torch._utils._rebuild_parameter",
                  "torch._utils._rebuild_tensor_v2", "torch.nn.parameter.Parameter"}


class WeightsRejected(Exception):
    """A file that must not be installed (wrong size/hash, unsafe pickle, wrong architecture)."""


@dataclass(frozen=True)
class Manifest:
    format: str
    name: str  # weights key
    registry_name: str
    architecture: str
    release_file: str
    size: int  # bytes of the release file
    sha256: str  # sha256 of the release file (the identity published in FHIR Device / Provenance)
    sha256_source: str  # "catalog" | "trust-on-first-use" | "fixture"
    safetensors_sha256: str
    source: str  # URL or file it came from
    installed_at: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def paths(weights_dir: Path, name: str) -> tuple[Path, Path]:
    folder = Path(weights_dir).expanduser()
    return folder / f"{name}.safetensors", folder / f"{name}.manifest.json"


def read_manifest(weights_dir: Path, name: str) -> Manifest | None:
    _, manifest_path = paths(weights_dir, name)
    if not manifest_path.is_file():
        return None
    try:
        return Manifest.from_json(manifest_path.read_text())
    except (ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------- checks


def check_release(entry: CatalogEntry, size: int, sha256: str, *, trust_on_first_use: bool,
                  weights_dir: Path | None = None) -> str:
    """Raise WeightsRejected unless (size, sha256) is what the catalog (or an earlier TOFU) pinned.
    Returns how the hash is trusted: "catalog" or "trust-on-first-use"."""
    if entry.size is not None and size != entry.size:
        raise WeightsRejected(f"{entry.file}: {size} bytes, the catalog says {entry.size}; refused")
    if entry.sha256 is not None:
        if sha256 != entry.sha256:
            raise WeightsRejected(f"{entry.file}: sha256 {sha256}, the catalog says {entry.sha256}; refused")
        return "catalog"
    earlier = read_manifest(weights_dir, entry.name) if weights_dir is not None else None
    if earlier is not None and earlier.sha256_source == "trust-on-first-use" and earlier.sha256 != sha256:
        raise WeightsRejected(
            f"{entry.file}: sha256 {sha256} differs from {earlier.sha256}, the hash trusted on first use here; refused"
        )
    if not trust_on_first_use:
        raise WeightsRejected(
            f"{entry.file}: no published sha256 is known for {entry.name}, so this file cannot be checked. "
            f"Its sha256 is {sha256}; if you trust it, rerun with --trust-on-first-use to record it."
        )
    return "trust-on-first-use"


# ------------------------------------------------------------------------- reading a release pickle


def _resolve(qualified: str) -> object:
    module, _, attr = qualified.rpartition(".")
    obj: object = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _allowed_globals(path: Path) -> list[object]:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - not a torch checkpoint at all
        raise WeightsRejected(f"{path.name}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    refused = [n for n in names if n not in _ALLOWED_EXACT and not n.startswith(_ALLOWED_PREFIXES)]
    if refused:
        raise WeightsRejected(f"{path.name}: the pickle references {', '.join(sorted(refused))}; refused (weights_only)")
    allowed = []
    for name in names:
        try:
            obj = _resolve(name)
        except (ImportError, AttributeError) as exc:
            raise WeightsRejected(f"{path.name}: references {name}, which does not exist here; refused") from exc
        if name.startswith(_ALLOWED_PREFIXES) and not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise WeightsRejected(f"{path.name}: references {name}, which is not a network module; refused")
        allowed.append(obj)
    return allowed


def read_release_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a release file, read once with torch.load(weights_only=True)."""
    allowed = _allowed_globals(path)
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        raise WeightsRejected(f"{path.name}: refused by torch.load(weights_only=True): {exc}") from exc
    if isinstance(obj, nn.Module):
        for mod in obj.modules():  # modules pickled by old torch lack this (torchxrayvision's own patch)
            if not hasattr(mod, "_non_persistent_buffers_set"):
                mod._non_persistent_buffers_set = set()
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsRejected(f"{path.name}: not a model or a state dict of tensors")
    return {str(k): v.detach().contiguous() for k, v in obj.items()}


# ------------------------------------------------------------------------- building the network


def build_network(entry: CatalogEntry, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """The torchxrayvision model for `entry` with `state` loaded strictly (no file, no download)."""
    import torchxrayvision as xrv

    spec = xrv.models.model_urls[entry.name]
    if entry.architecture == "densenet121":
        model = xrv.models.DenseNet(weights=None, num_classes=len(spec["labels"]))
        _load_strict(model, state, entry)
        model.weights = entry.name
        model.targets = model.pathologies = spec["labels"]
        if "op_threshs" in spec:
            model.op_threshs = torch.tensor(spec["op_threshs"])
    elif entry.architecture == "resnet50":
        import torchvision

        # xrv.models.ResNet's constructor always fetches its file; build the same object around our state
        model = xrv.models.ResNet.__new__(xrv.models.ResNet)
        nn.Module.__init__(model)
        model.weights, model.apply_sigmoid, model.weights_dict = entry.name, False, spec
        model.targets = model.pathologies = spec["labels"]
        model.model = torchvision.models.resnet50(num_classes=len(spec["labels"]), weights=None)
        model.model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        _load_strict(model.model, state, entry)
        if "op_threshs" in spec:
            model.register_buffer("op_threshs", torch.tensor(spec["op_threshs"]))
    else:
        raise WeightsRejected(f"unknown architecture {entry.architecture!r}")
    if "input_resolution" in spec:
        model.input_resolution = spec["input_resolution"]
    return model.eval()


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], entry: CatalogEntry) -> None:
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        raise WeightsRejected(f"{entry.file}: tensors do not fit {entry.architecture}: {str(exc)[:400]}") from exc


# ------------------------------------------------------------------------------------ install


@contextmanager
def _tmp_in(folder: Path, suffix: str) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".install-", suffix=suffix, dir=folder)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _commit(weights_dir: Path, manifest: Manifest, safetensors_tmp: Path) -> Manifest:
    st_path, manifest_path = paths(weights_dir, manifest.name)
    with _tmp_in(st_path.parent, ".json") as manifest_tmp:
        manifest_tmp.write_text(manifest.to_json())
        manifest_path.unlink(missing_ok=True)  # from here until the last rename: not installed
        os.replace(safetensors_tmp, st_path)
        os.replace(manifest_tmp, manifest_path)
    return manifest


def install_state(entry: CatalogEntry, state: Mapping[str, torch.Tensor], weights_dir: Path, *, size: int,
                  sha256: str, sha256_source: str, source: str) -> Manifest:
    """Check `state` against the architecture and install it as safetensors + manifest."""
    from safetensors.torch import save_file

    build_network(entry, state)  # strict names and shapes
    with _tmp_in(Path(weights_dir).expanduser(), ".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"release_file": entry.file, "release_sha256": sha256})
        manifest = Manifest(
            format=MANIFEST_FORMAT, name=entry.name, registry_name=entry.registry_name,
            architecture=entry.architecture, release_file=entry.file, size=size, sha256=sha256,
            sha256_source=sha256_source, safetensors_sha256=sha256_file(tmp), source=source,
            installed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        return _commit(weights_dir, manifest, tmp)


def install_release_file(entry: CatalogEntry, path: Path, weights_dir: Path, *, trust_on_first_use: bool = False,
                         source: str | None = None) -> Manifest:
    """Check a release file (size, sha256) and only then read it (weights_only) and install it."""
    path = Path(path)
    size, sha = path.stat().st_size, sha256_file(path)
    how = check_release(entry, size, sha, trust_on_first_use=trust_on_first_use, weights_dir=weights_dir)
    state = read_release_state(path)
    return install_state(entry, state, weights_dir, size=size, sha256=sha, sha256_source=how,
                         source=source or str(path))


# ------------------------------------------------------------------------------------- loading


def load_installed(entry: CatalogEntry, weights_dir: Path) -> tuple[nn.Module, Manifest]:
    """The installed model (safetensors only, checked against its manifest). Raises FileNotFoundError
    when not installed, WeightsRejected when the installed files do not match their manifest."""
    from safetensors.torch import load_file

    st_path, _ = paths(weights_dir, entry.name)
    manifest = read_manifest(weights_dir, entry.name)
    if manifest is None or not st_path.is_file():
        raise FileNotFoundError(str(st_path))
    problem = verify_manifest(entry, manifest, st_path)
    if problem:
        raise WeightsRejected(problem)
    return build_network(entry, load_file(str(st_path))), manifest


def verify_manifest(entry: CatalogEntry, manifest: Manifest, st_path: Path) -> str | None:
    """None when the installed files are intact and still match the catalog, else what is wrong."""
    if not st_path.is_file():
        return f"{st_path.name} is missing"
    actual = sha256_file(st_path)
    if actual != manifest.safetensors_sha256:
        return f"{st_path} has sha256 {actual}, its manifest says {manifest.safetensors_sha256} (corrupted or replaced)"
    if entry.sha256 is not None and manifest.sha256 != entry.sha256 and manifest.sha256_source != "fixture":
        return f"{entry.name}: installed from sha256 {manifest.sha256}, the catalog pins {entry.sha256}"
    return None


@dataclass(frozen=True)
class VerifyResult:
    name: str
    ok: bool
    message: str


def verify_all(weights_dir: Path) -> list[VerifyResult]:
    catalog = load_catalog()
    out: list[VerifyResult] = []
    for entry in catalog.entries:
        st_path, manifest_path = paths(weights_dir, entry.name)
        manifest = read_manifest(weights_dir, entry.name)
        if manifest is None:
            if manifest_path.exists():
                out.append(VerifyResult(entry.name, False, f"{manifest_path} is unreadable"))
            elif (Path(weights_dir).expanduser() / entry.file).is_file():
                out.append(VerifyResult(entry.name, False, f"only the release pickle {entry.file} is present; run "
                                        f"`cxr models import {Path(weights_dir).expanduser() / entry.file}`"))
            continue
        problem = verify_manifest(entry, manifest, st_path)
        out.append(VerifyResult(entry.name, problem is None,
                                problem or f"ok (release sha256 {manifest.sha256}, {manifest.sha256_source})"))
    return out


# ------------------------------------------------------------------------------------- bundles


def export_bundle(names: list[str], weights_dir: Path, out: Path) -> Path:
    """One tar with, per model, its safetensors and manifest (no pickle crosses into the air gap)."""
    catalog = load_catalog()
    entries = [catalog.get(n) for n in names]
    manifests = []
    for entry in entries:
        manifest = read_manifest(weights_dir, entry.name)
        st_path, _ = paths(weights_dir, entry.name)
        if manifest is None:
            raise WeightsRejected(f"{entry.name} is not installed in {weights_dir}; pull or import it first")
        problem = verify_manifest(entry, manifest, st_path)
        if problem:
            raise WeightsRejected(problem)
        manifests.append(manifest)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _tmp_in(out.parent, ".tar") as tmp:
        with tarfile.open(tmp, "w") as tar:
            index = {"format": BUNDLE_FORMAT, "models": [asdict(m) for m in manifests]}
            _add_bytes(tar, BUNDLE_INDEX, json.dumps(index, indent=2).encode())
            for m in manifests:
                st_path, _ = paths(weights_dir, m.name)
                tar.add(st_path, arcname=f"{m.name}.safetensors")
        os.replace(tmp, out)
    return out


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def is_bundle(path: Path) -> bool:
    try:
        with tarfile.open(path) as tar:
            return BUNDLE_INDEX in tar.getnames()
    except (tarfile.TarError, OSError):
        return False


def import_bundle(path: Path, weights_dir: Path, *, trust_on_first_use: bool = False) -> list[Manifest]:
    """Install every model of a bundle after the same checks as a pull: the release sha256 its manifest
    names must be the catalog's (or trusted on first use), and the safetensors must hash to its manifest."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    catalog = load_catalog()
    installed = []
    with tarfile.open(path) as tar:
        index = json.loads(_member(tar, BUNDLE_INDEX))
        if index.get("format") != BUNDLE_FORMAT:
            raise WeightsRejected(f"{path}: not a {BUNDLE_FORMAT} bundle")
        for raw in index["models"]:
            shipped = Manifest(**{k: raw[k] for k in Manifest.__dataclass_fields__})
            entry = catalog.get(shipped.name)
            how = check_release(entry, shipped.size, shipped.sha256, trust_on_first_use=trust_on_first_use,
                                weights_dir=weights_dir)
            if shipped.sha256_source == "fixture":
                raise WeightsRejected(f"{shipped.name}: the bundle holds fixture weights; refused")
            with _tmp_in(Path(weights_dir).expanduser(), ".safetensors") as tmp:
                tmp.write_bytes(_member(tar, f"{entry.name}.safetensors"))
                if sha256_file(tmp) != shipped.safetensors_sha256:
                    raise WeightsRejected(f"{path}: {entry.name}.safetensors does not match its manifest; refused")
                try:
                    build_network(entry, load_file(str(tmp)))
                except SafetensorError as exc:
                    raise WeightsRejected(f"{path}: {entry.name}.safetensors unreadable: {exc}") from exc
                manifest = Manifest(**{**asdict(shipped), "sha256_source": how, "source": f"bundle {Path(path).name}",
                                       "installed_at": datetime.now(UTC).isoformat(timespec="seconds")})
                installed.append(_commit(weights_dir, manifest, tmp))
    return installed


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        member = tar.getmember(name)
    except KeyError as exc:
        raise WeightsRejected(f"the bundle has no {name}") from exc
    handle = tar.extractfile(member) if member.isfile() else None
    if handle is None:
        raise WeightsRejected(f"the bundle's {name} is not a regular file")
    return handle.read()


def install_fixture(name: str, state: Mapping[str, torch.Tensor], weights_dir: Path) -> Manifest:
    """Install random/test weights for a catalog model, marked sha256_source="fixture": for tests and
    `cxr bench` timings only (never exported in a bundle, replaced by a real pull)."""
    entry = load_catalog().get(name)
    with _tmp_in(Path(weights_dir).expanduser(), ".safetensors") as tmp:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        digest, size = sha256_file(tmp), tmp.stat().st_size
    return install_state(entry, state, weights_dir, size=size, sha256=digest, sha256_source="fixture",
                         source="fixture")
