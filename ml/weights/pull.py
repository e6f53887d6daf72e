"""`cxr models pull` / `import`: fetch or take a release file, then install it through the store's checks."""

from __future__ import annotations

from pathlib import Path

from ml.weights.catalog import load_catalog
from ml.weights.download import download
from ml.weights.store import (
    PARTIAL_DIR, Manifest, WeightsRejected, import_bundle, install_release_file, is_bundle, read_manifest,
)


def pull(name: str, weights_dir: Path, *, base_url: str | None = None, trust_on_first_use: bool = False,
         progress: bool = True) -> tuple[Manifest, bool]:
    """(manifest, whether anything was downloaded). Already installed and intact: nothing to do."""
    catalog = load_catalog()
    entry = catalog.get(name)
    weights_dir = Path(weights_dir).expanduser()
    current = read_manifest(weights_dir, entry.name)
    if current is not None and (entry.sha256 is None or current.sha256 == entry.sha256):
        from ml.weights.store import paths, verify_manifest

        if verify_manifest(entry, current, paths(weights_dir, entry.name)[0]) is None and current.sha256_source != "fixture":
            return current, False
    url = entry.url(base_url or catalog.base_url)
    partial = weights_dir / PARTIAL_DIR / entry.file
    download(url, partial, expected_size=entry.size, progress=progress)
    try:
        manifest = install_release_file(entry, partial, weights_dir, trust_on_first_use=trust_on_first_use, source=url)
    except WeightsRejected:
        # a complete file that fails its checks is useless for resuming: nothing of it stays
        partial.unlink(missing_ok=True)
        raise
    partial.unlink(missing_ok=True)
    return manifest, True


def import_path(path: Path, weights_dir: Path, *, name: str | None = None,
                trust_on_first_use: bool = False) -> list[Manifest]:
    """A bundle from `cxr models export-bundle`, or a release file (named as released, or given `name`)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsRejected(f"{path}: no such file")
    if is_bundle(path):
        return import_bundle(path, weights_dir, trust_on_first_use=trust_on_first_use)
    catalog = load_catalog()
    entry = catalog.get(name) if name else catalog.by_file(path.name)
    if entry is None:
        raise WeightsRejected(
            f"{path.name} is neither a weights bundle nor a release file the catalog knows; "
            "pass --name MODEL if it was renamed"
        )
    return [install_release_file(entry, path, weights_dir, trust_on_first_use=trust_on_first_use, source=str(path))]
