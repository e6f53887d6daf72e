"""`cxr train` and `cxr evaluate` subcommands (wired into fhir_server/cli.py via add_subcommands)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _log(msg: str) -> None:
    import time

    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from ml.training.train import TrainConfig, run

    cfg = TrainConfig(
        data_dir=Path(args.data),
        out_dir=Path(args.out),
        seed=args.seed,
        size=args.size,
        candidates=tuple(args.candidates.split(",")),
        candidate_steps=args.candidate_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        frozen_layers=args.frozen_layers,
        threads=args.threads,
        max_steps_per_epoch=args.max_steps,
        stage=args.stage,
        val_fraction=args.val_fraction,
        extra={"ood_negatives": args.ood_negatives},
    )
    run(cfg, _log)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ml.training.evaluate import main as evaluate_main

    return evaluate_main(args)


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train, calibrate and export the bundled pneumonia model + OOD gate")
    p.add_argument("--data", required=True, help="shared data directory (kermany_pneumonia/, nih_cxr14/, ...)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, cache, exported weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=160, help="network input side in pixels")
    p.add_argument("--candidates", default="mobilenet_v2,efficientnet_lite0",
                   help="comma-separated architectures compared on the calibration split")
    p.add_argument("--candidate-steps", type=int, default=24, help="equal short budget per candidate (steps)")
    p.add_argument("--epochs", type=int, default=3, help="total (balanced) epochs of the selected candidate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--frozen-layers", type=int, default=7, help="early backbone blocks kept frozen")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke tests)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of Kermany patients held out")
    p.add_argument("--stage", choices=("all", "train"), default="all")
    p.add_argument("--ood-negatives", choices=("full", "small"), default="full",
                   help="size of the generated non-chest set for the OOD gate")
    p.set_defaults(func=_cmd_train)

    e = subparsers.add_parser("evaluate", help="metrics of a model on a labels.csv folder, via the server pipeline")
    e.add_argument("--labels", default=None, help="path to labels.csv (file column relative to its folder)")
    e.add_argument("--held-out", default=None, metavar="DATA_DIR",
                   help="instead of --labels: every shared source's held-out patients (issue 11): gate false "
                        "refusals per source, population head accuracy, adult urgent-triage share")
    e.add_argument("--finding", default="pneumonia")
    e.add_argument("--model", default="cxr:pneumonia-v1")
    e.add_argument("--weights-dir", default=None, help="weights folder (default: the bundled one)")
    e.add_argument("--split", default=None, help="only rows whose split column equals this")
    e.add_argument("--role", choices=("train", "cal", "report"), default=None,
                   help="only images `cxr train` put in this part of its patient split (report = never tuned on)")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--json", action="store_true", help="print JSON instead of text")
    e.set_defaults(func=_cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxr")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
