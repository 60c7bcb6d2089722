"""Benchmark of `selfsup eval`: feature extraction images/s, and scoring time with cached features.

    python benchmarks/eval.py                                   # the issue's setting: 10k train / 10k test
    python benchmarks/eval.py --ckpt runs/demo-simclr/checkpoints/last.ckpt
    python benchmarks/eval.py --train-size 500 --test-size 500 --extract-images 256   # tiny smoke run

1. Extraction: the encoder (a checkpoint's, or a randomly initialised ``--model``) over
   ``--extract-images`` images of the embedded Fashion-MNIST train split at the checkpoint's
   preprocessing, in eval mode; reports images/s.
2. Scoring: ``--train-size``/``--test-size`` feature rows are written to a :class:`FeatureCache`, then
   timed end to end: cache read + ``knn`` + ``linear`` protocols (the registered functions). The
   embedded set has 10k train / 2k test images, so rows beyond the extracted ones are the extracted
   features tiled with small noise (scoring cost depends on the sizes, not on which images they are).
Target on 2 CPU cores: scoring 10k / 10k in at most 15 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, peak_memory_mb  # noqa: E402

from selfsup.data.datamodule import SSLDataModule  # noqa: E402
from selfsup.data.transforms import Preprocessing  # noqa: E402
from selfsup.eval.cache import FeatureCache  # noqa: E402
from selfsup.checkpoint import encoder_from_checkpoint, load_checkpoint, selfsup_metadata  # noqa: E402
from selfsup.eval.features import extract_features  # noqa: E402
from selfsup.eval.protocols import EvalContext, EvalData, FeatureSet, run_protocols  # noqa: E402
from selfsup.models.encoder import Encoder  # noqa: E402


def build_encoder(args: argparse.Namespace) -> tuple[torch.nn.Module, Preprocessing]:
    if args.ckpt:
        checkpoint = load_checkpoint(args.ckpt)
        preprocessing = selfsup_metadata(checkpoint, args.ckpt).get("preprocessing") or {}
        return encoder_from_checkpoint(checkpoint, args.ckpt), Preprocessing(**preprocessing)
    return Encoder(args.model).eval(), Preprocessing(image_size=args.image_size, mean=(0.286,), std=(0.353,))


def measure_extraction(encoder: torch.nn.Module, preprocessing: Preprocessing, args: argparse.Namespace
                       ) -> tuple[FeatureSet, float]:
    datamodule = SSLDataModule(image_size=preprocessing.image_size, mean=preprocessing.mean,
                               std=preprocessing.std, num_workers=args.workers, eval_batch_size=args.batch_size)
    data = EvalData.from_datamodule(datamodule, args.extract_images, min(args.extract_images, 2000),
                                    preprocessing=preprocessing)
    extract_features(encoder, data.loader("test"), args.device)  # warm-up (and the test rows)
    start = time.perf_counter()
    train = extract_features(encoder, data.loader("train"), args.device)
    seconds = time.perf_counter() - start
    test = extract_features(encoder, data.loader("test"), args.device)
    return FeatureSet(*train, *test), len(train[0]) / seconds


def tile(features: torch.Tensor, labels: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` rows: the given ones repeated, plus 1% Gaussian noise relative to the feature scale."""
    repeats = -(-size // len(features))
    generator = torch.Generator().manual_seed(seed)
    tiled = features.repeat(repeats, 1)[:size]
    noise = 0.01 * features.std() * torch.randn(tiled.shape, generator=generator)
    return tiled + noise, labels.repeat(repeats)[:size]


def measure_scoring(features: FeatureSet, args: argparse.Namespace) -> dict[str, float]:
    train = tile(features.train_features, features.train_labels, args.train_size, 0)
    test = tile(features.test_features, features.test_labels, args.test_size, 1)
    with tempfile.TemporaryDirectory() as folder:
        cache = FeatureCache(folder)
        for key, (x, y) in (("train", train), ("test", test)):
            cache.get_or_extract(key, [str(c) for c in range(10)], {}, lambda x=x, y=y: (x, y))
        start = time.perf_counter()
        parts = [t for key in ("train", "test") for t in cache.get_or_extract(key, [str(c) for c in range(10)], {},
                                                                                  lambda: None)]
        loaded = time.perf_counter()
        context = EvalContext(FeatureSet(*parts))
        knn_rows = run_protocols(["knn"], context)
        knn_done = time.perf_counter()
        linear_rows = run_protocols(["linear"], context)
        done = time.perf_counter()
    return {"cache_read_s": loaded - start, "knn_s": knn_done - loaded, "linear_s": done - knn_done,
            "total_s": done - start, "knn_top1": knn_rows[0]["value"], "linear_top1": linear_rows[0]["value"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a selfsup checkpoint (default: a randomly initialised --model)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--test-size", type=int, default=10_000)
    parser.add_argument("--extract-images", type=int, default=10_000, help="train images to extract (timed)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-record", action="store_true", help=f"do not append the result to {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    encoder, preprocessing = build_encoder(args)
    encoder.to(args.device)
    features, images_per_second = measure_extraction(encoder, preprocessing, args)
    scoring = measure_scoring(features, args)
    result = {"extraction_images_per_s": round(images_per_second, 1), "feature_dim": features.train_features.shape[1],
              "train_size": args.train_size, "test_size": args.test_size, "threads": args.threads,
              **{k: round(v, 3) for k, v in scoring.items()}}
    print(f"feature extraction: {images_per_second:.0f} images/s ({args.model if not args.ckpt else args.ckpt}, "
          f"{preprocessing.image_size}px, {args.threads} threads)")
    print(f"scoring {args.train_size} train / {args.test_size} test with cached features: "
          f"{scoring['total_s']:.2f} s (cache read {scoring['cache_read_s']:.2f}, kNN {scoring['knn_s']:.2f}, "
          f"linear {scoring['linear_s']:.2f}); target <= 15 s")
    print(json.dumps(result))
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write(json.dumps({"name": "eval: extraction + cached kNN/linear scoring", **result,
                                "peak_memory_mb": round(peak_memory_mb(), 1), "command": " ".join(sys.argv),
                                "machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


if __name__ == "__main__":
    main()
