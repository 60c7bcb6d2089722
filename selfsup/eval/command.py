"""The ``selfsup eval`` subcommand (``selfsup export`` is in :mod:`selfsup.export`).

    selfsup eval --ckpt RUN.ckpt [MORE.ckpt ...] --protocols knn,linear,fewshot,finetune [--data cifar10
                 --data-root DIR] [--out DIR] [--set knn.k=10 --set finetune.epochs=20]

Evaluation uses the checkpoint's own preprocessing; ``--image-size/--mean/--std/--crop-pct/--interpolation``
override it with a warning naming both values. :func:`selfsup.eval.scorecard.score_encoder` is the one
scoring path, shared with :class:`selfsup.eval.scorecard.CheckpointScorer`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from selfsup.data.datamodule import SSLDataModule
from selfsup.data.preprocessing import Preprocessing
from selfsup.eval.cache import CacheMismatchError, FeatureCache
from selfsup.checkpoint import (CheckpointError, encoder_from_checkpoint, file_digest, load_checkpoint,
                                     selfsup_metadata)
from selfsup.eval.protocols import EvalData
from selfsup.eval.scorecard import score_encoder

log = logging.getLogger(__name__)
DEFAULT_PROTOCOLS = "knn,linear,fewshot"
OVERRIDABLE = ("image_size", "mean", "std", "crop_pct", "interpolation")


def resolve_preprocessing(stored: dict[str, Any] | None, overrides: dict[str, Any]) -> Preprocessing:
    """The checkpoint's preprocessing with explicit overrides; each override that differs is warned about."""
    if stored is None:
        warnings.warn("the checkpoint stores no preprocessing; using defaults and the overrides given",
                      stacklevel=2)
        stored = {}
    merged = dict(stored)
    for key, value in overrides.items():
        if value is None:
            continue
        value = tuple(value) if isinstance(value, (list, tuple)) else value
        old = tuple(stored[key]) if isinstance(stored.get(key), (list, tuple)) else stored.get(key)
        if key in stored and value != old:
            warnings.warn(f"preprocessing override: {key}={value} differs from the checkpoint's {key}={old}; "
                          "scores will not reflect the preprocessing the encoder was trained with", stacklevel=2)
        merged[key] = value
    return Preprocessing(**merged)


def build_data(checkpoint: dict[str, Any], preprocessing: Preprocessing, args: argparse.Namespace) -> EvalData:
    """The labelled data to score on: ``--data``, else the checkpoint's data module, else the embedded set."""
    stored = checkpoint.get("datamodule_hyper_parameters") or {}
    trained_on = stored.get("_class_path")  # set by `selfsup fit` when data: named a class_path
    if args.data is None and trained_on is not None and not _is_ssl_datamodule(trained_on):
        raise ValueError(f"the checkpoint was trained with data module {trained_on!r}, which selfsup eval cannot "
                         "rebuild; pass --data (a registered source, e.g. folder) with --data-root/--test-root")
    dataset = args.data or stored.get("dataset") or "fashion_mnist_embedded"
    same_source = args.data is None or args.data == stored.get("dataset")
    root = args.data_root or (stored.get("root") if same_source else None)
    test_root = args.test_root or (stored.get("test_root") if same_source else None)
    probe_train_root = args.probe_train_root or (stored.get("probe_train_root") if same_source else None)
    datamodule = SSLDataModule(dataset=dataset, root=root, test_root=test_root, probe_train_root=probe_train_root,
                               image_size=preprocessing.image_size, mean=preprocessing.mean, std=preprocessing.std,
                               crop_pct=preprocessing.crop_pct, interpolation=preprocessing.interpolation,
                               eval_batch_size=args.batch_size, num_workers=args.num_workers)
    return EvalData.from_datamodule(datamodule, args.train_size, args.test_size, args.seed, preprocessing)


def _is_ssl_datamodule(class_path: str) -> bool:
    """Whether ``class_path`` names :class:`SSLDataModule` or a subclass (whose stored arguments it reads)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, SSLDataModule)


def parse_settings(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["knn.k=10", "fewshot.seeds=[0,1,2,3]"]`` -> ``{"knn": {"k": 10}, "fewshot": {"seeds": [0, 1, 2, 3]}}``."""
    settings: dict[str, dict[str, Any]] = {}
    for item in items:
        name, _, value = item.partition("=")
        protocol, _, key = name.partition(".")
        if not key or not _:
            raise ValueError(f"--set {item!r} must look like PROTOCOL.SETTING=VALUE, e.g. knn.k=10")
        settings.setdefault(protocol, {})[key] = yaml.safe_load(value)
    return settings


def evaluate(args: argparse.Namespace) -> list[dict]:
    """``selfsup eval``: score each checkpoint in turn; returns all rows."""
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    settings = parse_settings(args.set)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = {key: getattr(args, key) for key in OVERRIDABLE}
    all_rows: list[dict] = []
    for ckpt in args.ckpt:
        checkpoint = load_checkpoint(ckpt, args.unsafe_load)
        meta = selfsup_metadata(checkpoint, ckpt)
        preprocessing = resolve_preprocessing(meta.get("preprocessing"), overrides)
        data = build_data(checkpoint, preprocessing, args)
        encoder = encoder_from_checkpoint(checkpoint, ckpt).to(device)
        out_dir = Path(args.out) if args.out else Path(ckpt).resolve().parent.parent / "scorecard"
        cache = None if args.no_cache else FeatureCache(args.cache_dir or out_dir / "feature_cache")
        rows = score_encoder(encoder, data, protocols, out_dir, settings, device, cache, file_digest(ckpt),
                             str(ckpt), checkpoint.get("epoch"), checkpoint.get("global_step"))
        for row in rows:
            print(f"{Path(ckpt).name:>24}  {row['protocol']:>9}  {row['metric']:<28} {100 * row['value']:6.2f}"
                  + (f" ± {100 * row['std']:.2f}" if row["std"] is not None else ""))
        all_rows += rows
        print(f"scorecard: {out_dir / 'scorecard.md'}")
    return all_rows


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfsup eval", description="Score checkpoints with frozen-feature "
                                     "and fine-tuning protocols; write scorecard.json/.md and plots.")
    parser.add_argument("--ckpt", nargs="+", required=True, help="selfsup checkpoint(s); several of one run "
                        "add rows and an accuracy-vs-epoch plot")
    parser.add_argument("--protocols", default=DEFAULT_PROTOCOLS, help="comma-separated: knn, linear, fewshot, "
                        f"finetune, or any registered protocol (default {DEFAULT_PROTOCOLS})")
    parser.add_argument("--data", help="dataset source (default: the checkpoint's, else fashion_mnist_embedded)")
    parser.add_argument("--data-root", help="where the dataset files are")
    parser.add_argument("--test-root", help="for --data folder: the labelled test folder")
    parser.add_argument("--probe-train-root", help="for --data folder: the labelled folder probes fit on "
                        "(default: the checkpoint's, else --data-root when it has class sub-folders)")
    parser.add_argument("--train-size", type=int, help="score on a fixed random subset of the train split")
    parser.add_argument("--test-size", type=int, help="score on a fixed random subset of the test split")
    parser.add_argument("--out", help="output folder (default: <run>/scorecard next to the checkpoints folder)")
    parser.add_argument("--set", action="append", default=[], metavar="PROTOCOL.SETTING=VALUE",
                        help="a protocol setting, e.g. knn.k=10 or finetune.epochs=20 (repeatable)")
    parser.add_argument("--image-size", type=int, help="override the checkpoint's image size (warns)")
    parser.add_argument("--mean", type=float, nargs="+", help="override the checkpoint's mean (warns)")
    parser.add_argument("--std", type=float, nargs="+", help="override the checkpoint's std (warns)")
    parser.add_argument("--crop-pct", type=float, help="override the checkpoint's crop_pct (warns)")
    parser.add_argument("--interpolation", help="override the checkpoint's interpolation (warns)")
    parser.add_argument("--cache-dir", help="feature cache folder (default: <out>/feature_cache)")
    parser.add_argument("--no-cache", action="store_true", help="always re-extract features")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the --train-size/--test-size subsets")
    parser.add_argument("--unsafe-load", action="store_true", help="allow checkpoints that need full "
                        "unpickling (can run arbitrary code: only for files you trust)")
    return parser


KNOWN_ERRORS = (CheckpointError, CacheMismatchError, ValueError, FileNotFoundError)


def run_command(parser: argparse.ArgumentParser, work: Any, argv: list[str]) -> None:
    """Parse ``argv`` and run ``work(args)``; known bad input exits with status 2 and the reason."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        work(args)
    except KNOWN_ERRORS as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


def main(argv: list[str]) -> None:
    """``selfsup eval ARGS`` (``argv`` without the word ``eval``)."""
    run_command(eval_parser(), evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
