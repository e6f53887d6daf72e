"""The `cxr` command: serve, predict, bench (+ train / evaluate from ml.training.cli)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fhir_server.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    for key in ("host", "port", "model", "weights_dir"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return Settings(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fhir_server.app import create_app

    from fhir_server.observability import configure_logging

    settings = _settings(args)
    # issue 10: JSON logs with request ids; uvicorn's access log (it prints query strings = PHI) is
    # off and replaced by fhir_server.observability's; log_config=None keeps our handlers.
    configure_logging(settings.log_format, args.log_level)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                log_config=None, access_log=False)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from fhir_server.worker_main import main as worker_main

    return worker_main(_settings(args))


def _print_table(name: str, analysis) -> None:  # analysis: ml.analysis.Analysis
    info = analysis.model
    print(f"== {name}")
    if info.untrained:
        from ml.findings import UNTRAINED_WARNING

        print(f"!! {UNTRAINED_WARNING}")
    for warning in analysis.warnings:  # gate in warn mode, outside the validated population (issue 11)
        print(f"!! {warning}")
    print(f"   model {info.name} ({info.version}); {analysis.image.width}x{analysis.image.height} "
          f"{analysis.image.source_format}; {analysis.processing_time_ms:.0f} ms")
    print(f"   {'finding':<28} {'prob':>6} {'thresh':>6}  {'detected':<8} {'severity':<9} regions")
    for f in analysis.findings:
        regions = " ".join("[" + ",".join(str(v) for v in box) + "]" for box in f.regions)
        print(f"   {f.display:<28} {f.probability:6.3f} {f.threshold:6.3f}  {'YES' if f.detected else 'no':<8} "
              f"{f.severity:<9} {regions}")
    print(f"   triage: {analysis.triage}   confidence: {analysis.confidence_score:.2f}")
    print(f"   impression: {analysis.impression}")
    from ml.findings import DISCLAIMER

    print(f"   {DISCLAIMER}")


def cmd_predict(args: argparse.Namespace) -> int:
    from fhir_server.app import load_analyzer
    from fhir_server.legacy import legacy_response
    from ml.errors import CXRError

    settings = _settings(args)
    try:
        analyzer = load_analyzer(settings)
    except CXRError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    heatmap_dir: Path | None = args.heatmap_dir
    if heatmap_dir is not None:
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    results = []
    for path in args.files:
        try:
            data = path.read_bytes()
            analysis = analyzer.analyze_bytes(data, heatmaps=heatmap_dir is not None, filename=path.name)
        except CXRError as exc:
            failed += 1
            results.append({"file": str(path), "status": "error", "error": {"code": exc.code, "message": exc.message}})
            if not args.json:
                print(f"== {path}\n   error ({exc.code}): {exc.message}", file=sys.stderr)
            continue
        except OSError as exc:
            failed += 1
            results.append({"file": str(path), "status": "error", "error": {"code": "io_error", "message": str(exc)}})
            if not args.json:
                print(f"== {path}\n   error: {exc}", file=sys.stderr)
            continue
        if heatmap_dir is not None:
            for f in analysis.findings:
                if f.heatmap_png:
                    (heatmap_dir / f"{path.stem}.{f.label}.png").write_bytes(f.heatmap_png)
        if args.json:
            results.append({"file": str(path), **legacy_response(analysis, heatmaps=False)})
        else:
            _print_table(str(path), analysis)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    return 1 if failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.replicas:
        from fhir_server.bench_replicas import run_replicas_bench

        extra_env = {"CXR_ENGINE": args.engine} if args.engine else {}
        return run_replicas_bench(_settings(args), max_replicas=args.replicas, seconds=args.seconds,
                                  data_dir=args.data, extra_env=extra_env)
    if args.soak:
        from fhir_server.bench_soak import run_soak

        settings = _settings(args)
        return run_soak(settings, model=settings.model, requests=args.soak, data_dir=args.data)
    if args.http:
        from fhir_server.bench_http import XRV_DENSENET, run_http_bench

        settings = _settings(args)
        sep = ";" if args.models and ";" in args.models else ","  # ';' when an ensemble name is listed
        models = args.models.split(sep) if args.models else [settings.model, XRV_DENSENET]
        if args.ensemble:  # latency / throughput per member count: 1, 2, ... members (issue 11)
            members = args.ensemble.split(",")
            models = [members[0], *(f"ensemble:{','.join(members[:k])}" for k in range(2, len(members) + 1))]
        extra_env = {"CXR_ENGINE": args.engine} if args.engine else {}
        return run_http_bench(settings, models=models, iterations=args.iterations, seconds=args.seconds,
                              data_dir=args.data, naive=not args.no_naive, extra_env=extra_env)
    from fhir_server.bench import run_bench

    return run_bench(_settings(args), iterations=args.iterations, data_dir=args.data)


def cmd_quantize(args: argparse.Namespace) -> int:
    from fhir_server.bench import DEFAULT_DATA
    from ml.errors import CXRError
    from ml.models.registry import load_model
    from ml.quantize import quantize

    settings = _settings(args)
    data_dir = args.data or Path(os.environ.get("CXR_SHARED_DATA", DEFAULT_DATA))
    try:
        model = load_model(settings.model, weights_dir=settings.weights_dir)
    except CXRError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    report = quantize(model, cache_dir=settings.onnx_cache_dir, data_dir=data_dir, calibration=args.calibration,
                      validation_limit=args.validation_limit)
    print(f"{report['model']} ({report['model_version']}): int8 {'ACCEPTED' if report['accepted'] else 'REJECTED'} "
          f"- {report['reason']}; calibrated on {report['calibration_images']} training images")
    print(f"   {'finding':<28} {'n':>5} {'pos':>5} {'AUROC fp32':>10} {'AUROC int8':>10} {'drop':>8} "
          f"{'agree':>7} {'max|dp|':>8}")
    for label, f in report["findings"].items():
        if f["validated"]:
            print(f"   {label:<28} {f['n']:>5} {f['positives']:>5} {f['auroc_fp32']:>10.4f} {f['auroc_int8']:>10.4f} "
                  f"{f['drop']:>8.4f} {f['decision_agreement']:>7.3f} {f['max_abs_prob_diff']:>8.3f}")
        else:
            print(f"   {label:<28} {f['n']:>5} {f['positives']:>5} {'not validated (too few labels)':>30}")
    return 0 if report["accepted"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr", description="Chest X-ray AI (decision support, not a diagnosis)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Run the HTTP server (FHIR + /api/v1/predict + upload page)")
    serve.add_argument("--host", help="default: CXR_HOST or 127.0.0.1")
    serve.add_argument("--port", type=int, help="default: CXR_PORT or 8000")
    serve.add_argument("--model", help="registry name (default: CXR_MODEL)")
    serve.add_argument("--weights-dir", type=Path, dest="weights_dir")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="Run only the durable job queue (async $analyze, deliveries): no HTTP")
    worker.add_argument("--model", help="registry name (default: CXR_MODEL)")
    worker.add_argument("--weights-dir", type=Path, dest="weights_dir")
    worker.set_defaults(func=cmd_worker)

    predict = sub.add_parser("predict", help="Analyse image files (DICOM, PNG, JPEG)")
    predict.add_argument("files", nargs="+", type=Path, metavar="FILE")
    predict.add_argument("--json", action="store_true", help="print the /api/v1/predict JSON instead of a table")
    predict.add_argument("--heatmap-dir", type=Path, help="write Grad-CAM overlays FILE.<finding>.png here")
    predict.add_argument("--model", help="registry name (default: CXR_MODEL)")
    predict.add_argument("--weights-dir", type=Path, dest="weights_dir")
    predict.set_defaults(func=cmd_predict)

    bench = sub.add_parser("bench", help="Latency of the whole predict path (decode included)")
    bench.add_argument("--model", help="registry name (default: CXR_MODEL)")
    bench.add_argument("--weights-dir", type=Path, dest="weights_dir")
    bench.add_argument("--iterations", type=int, default=20)
    bench.add_argument("--data", type=Path, help="shared data dir to take a real image from (default ../shared/data)")
    bench.add_argument("--http", action="store_true",
                       help="over HTTP: the real server per model, latency, throughput at 1/4/8 clients, health "
                            "p99 under saturation, peak RSS, and the naive Flask baseline")
    bench.add_argument("--models", help="--http: comma-separated registry names, or ';'-separated when one is an "
                                        "ensemble:a,b (default: CXR_MODEL and xrv:densenet121-res224-all)")
    bench.add_argument("--ensemble", metavar="M1,M2,...",
                       help="--http: bench M1 alone, then ensemble:M1,M2, ensemble:M1,M2,M3, ... (per member count)")
    bench.add_argument("--seconds", type=float, default=10.0, help="--http: duration of each throughput cell")
    bench.add_argument("--engine", choices=["torch", "onnx"], help="--http: CXR_ENGINE for our server")
    bench.add_argument("--soak", type=int, metavar="N",
                       help="send N mixed requests (legacy, FHIR $analyze, reads, a refusal) to a served "
                            "--model and print its memory (VmRSS) over them")
    bench.add_argument("--no-naive", action="store_true", help="--http: skip the naive baseline")
    bench.add_argument("--replicas", type=int, metavar="N",
                       help="throughput of 1..N `cxr serve` processes behind nginx (needs the nginx binary)")
    bench.set_defaults(func=cmd_bench)

    quant = sub.add_parser("quantize", help="int8 ONNX model: calibrate, validate AUROC vs fp32, keep if harmless")
    quant.add_argument("--model", help="registry name (default: CXR_MODEL)")
    quant.add_argument("--weights-dir", type=Path, dest="weights_dir")
    quant.add_argument("--data", type=Path, help="shared data dir (default ../shared/data or CXR_SHARED_DATA)")
    quant.add_argument("--calibration", type=int, default=300, help="training images to calibrate on")
    quant.add_argument("--validation-limit", type=int, default=600, help="held-out images per finding, at most")
    quant.set_defaults(func=cmd_quantize)

    from fhir_server.openapi_export import add_subcommand as add_openapi
    from ml.training.cli import add_subcommands as add_training

    add_training(sub)  # train, evaluate
    add_openapi(sub)  # openapi
    from fhir_server.migrations.cli import add_subcommand as add_db

    add_db(sub)  # db upgrade | status
    from fhir_server.auth.cli import add_subcommand as add_clients

    add_clients(sub)  # clients add|list|remove (issue 10)
    from fhir_server.dicom.cli import add_subcommand as add_dicom

    add_dicom(sub)  # dicom echo / send (issue 12)
    from fhir_server.cli_models import add_subcommand as add_models

    add_models(sub)  # models list|pull|import|export-bundle|verify (issue 11)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    # Must happen before torch is imported: OpenMP threads that spin while waiting turn a shared,
    # busy CPU into a several-fold slowdown (measured 3x on DenseNet-121 with 2 threads on a loaded
    # 2-core machine); sleeping waits cost little when the machine is idle. Operators may override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
