"""`cxr models list|pull|import|export-bundle|verify`: weights a site can trust (ml/weights/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fhir_server.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "weights_dir", None) is not None:
        overrides["weights_dir"] = args.weights_dir
    if getattr(args, "base_url", None):
        overrides["models_base_url"] = args.base_url
    return Settings(**overrides)


def _installed(settings: Settings, name: str):
    from ml.weights.store import paths, read_manifest

    manifest = read_manifest(settings.weights_dir, name)
    return manifest if manifest is not None and paths(settings.weights_dir, name)[0].is_file() else None


def cmd_list(args: argparse.Namespace) -> int:
    from ml.weights.catalog import findings, load_catalog

    settings = _settings(args)
    catalog = load_catalog()
    base = settings.models_base_url or catalog.base_url
    print(f"weights dir {settings.weights_dir}; source {base}")
    print(f"licence: {catalog.licence}")
    for entry in catalog.entries:
        manifest = _installed(settings, entry.name)
        state = "installed" if manifest else "not installed"
        if manifest and manifest.sha256_source != "catalog":
            state += f" ({manifest.sha256_source})"
        size = f"{entry.size:,} bytes" if entry.size else "size unknown"
        sha = entry.sha256 or "UNKNOWN (pull needs --trust-on-first-use)"
        labels = findings(entry)
        print(f"\n{entry.registry_name}  [{state}]")
        print(f"   findings ({len(labels)}): {', '.join(labels)}")
        print(f"   source:  {entry.url(base)}")
        print(f"   size:    {size}")
        print(f"   sha256:  {sha}")
        if manifest and entry.sha256 is None:
            print(f"   sha256 trusted on first use here: {manifest.sha256}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from ml.weights.download import DownloadError
    from ml.weights.pull import pull
    from ml.weights.store import WeightsRejected

    settings = _settings(args)
    status = 0
    for name in args.names:
        try:
            manifest, fetched = pull(name, settings.weights_dir, base_url=settings.models_base_url,
                                     trust_on_first_use=args.trust_on_first_use, progress=not args.quiet)
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            status = 2
            continue
        except (DownloadError, WeightsRejected) as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            status = 1
            continue
        verb = "installed" if fetched else "already installed"
        print(f"{manifest.registry_name}: {verb} (sha256 {manifest.sha256}, {manifest.sha256_source}); "
              f"serve it with CXR_MODEL={manifest.registry_name} cxr serve")
    return status


def cmd_import(args: argparse.Namespace) -> int:
    from ml.weights.pull import import_path
    from ml.weights.store import WeightsRejected

    settings = _settings(args)
    try:
        manifests = import_path(args.file, settings.weights_dir, name=args.name,
                                trust_on_first_use=args.trust_on_first_use)
    except (WeightsRejected, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for m in manifests:
        print(f"{m.registry_name}: installed from {args.file} (sha256 {m.sha256}, {m.sha256_source})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ml.weights.store import WeightsRejected, export_bundle

    settings = _settings(args)
    *names, out = args.items
    if not names:
        print("error: name at least one model, then the output file", file=sys.stderr)
        return 2
    try:
        path = export_bundle(names, settings.weights_dir, Path(out))
    except (WeightsRejected, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size:,} bytes): {', '.join(names)}; on the other side: "
          f"cxr models import {path.name}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ml.weights.store import verify_all

    settings = _settings(args)
    results = verify_all(settings.weights_dir)
    if not results:
        print(f"no TorchXRayVision weights installed in {settings.weights_dir}")
    for r in results:
        print(f"{'OK  ' if r.ok else 'FAIL'} {r.name}: {r.message}")
    return 0 if all(r.ok for r in results) else 1


def add_subcommand(sub) -> None:
    models = sub.add_parser("models", help="TorchXRayVision weights: list, pull, import, export-bundle, verify")
    msub = models.add_subparsers(dest="models_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--weights-dir", type=Path, dest="weights_dir", help="default: CXR_WEIGHTS_DIR")
        return p

    p = common(msub.add_parser("list", help="catalog: findings, source, size, sha256, installed, licence"))
    p.add_argument("--base-url", help="mirror (default: CXR_MODELS_BASE_URL or the catalog's)")
    p.set_defaults(func=cmd_list)

    p = common(msub.add_parser("pull", help="download (resumable), check size + sha256, install as safetensors"))
    p.add_argument("names", nargs="+", metavar="NAME", help="e.g. densenet121-res224-all")
    p.add_argument("--base-url", help="mirror (default: CXR_MODELS_BASE_URL or the catalog's)")
    p.add_argument("--trust-on-first-use", action="store_true",
                   help="for catalog entries without a published sha256: accept and record the hash seen")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pull)

    p = common(msub.add_parser("import", help="install a release file or a bundle (air-gapped sites); same checks"))
    p.add_argument("file", type=Path, metavar="FILE|BUNDLE")
    p.add_argument("--name", help="catalog name when the release file was renamed")
    p.add_argument("--trust-on-first-use", action="store_true")
    p.set_defaults(func=cmd_import)

    p = common(msub.add_parser("export-bundle", help="one archive (safetensors + manifests) of installed models"))
    p.add_argument("items", nargs="+", metavar="NAME... OUT")
    p.set_defaults(func=cmd_export)

    p = common(msub.add_parser("verify", help="re-hash installed weights against their manifests and the catalog"))
    p.set_defaults(func=cmd_verify)
