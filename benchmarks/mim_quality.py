"""Masked image modeling quality at a fixed budget: MAE and SimMIM against the same encoder at random init.

Pretrains each method on the embedded Fashion-MNIST (10k training images, ``SSLDataModule()``'s default
dataset) for ``--images-seen`` images, then scores the frozen encoder with kNN and a linear probe
(``selfsup.eval.callbacks.frozen_scores``), next to the same architecture at random initialisation, and
prints a table. Encoder: timm ViT 192 wide x 6 deep, 3 heads, patch 4, 32 px, one grey channel; MAE: mask
0.75, decoder 128 x 4 x 4 heads, norm-pix loss, AdamW (0.9, 0.95); SimMIM: 8 px mask blocks at 0.6, AdamW
(0.9, 0.999), gradient clipping 5; both weight decay 0.05, cosine learning rate after a short warmup.

A *variant* names the training set-up. ``paper`` is the MAE paper's (He et al. 2022): fixed 2-D sin-cos
positions (``pos``), the MAE initialisation (``init``), bicubic crops (``bicubic``) and no weight decay on
the tokens (``tokens``). ``timm`` is the set-up before these options (timm's learned positions and init,
bilinear crops, tokens decayed). ``paper-pos`` is ``paper`` without its fixed positions, ``timm+init``
``timm`` with the MAE init, and so on, for ablations.

    python benchmarks/mim_quality.py                                   # timm and paper, both methods
    python benchmarks/mim_quality.py --methods mae --variants paper,paper-pos,paper-init --images-seen 20000
    python benchmarks/mim_quality.py --methods mae --variants paper --images-seen 512   # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

from selfsup.data.datamodule import SSLDataModule  # noqa: E402
from selfsup.data.transforms import MaskedImageView  # noqa: E402
from selfsup.eval.callbacks import frozen_scores  # noqa: E402
from selfsup.methods.base import SSLMethod  # noqa: E402
from selfsup.methods.mae import MAE  # noqa: E402
from selfsup.methods.simmim import SimMIM  # noqa: E402
from selfsup.models.encoder import Encoder  # noqa: E402
from selfsup.optim import Cosine, create_optimizer, no_weight_decay_names  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One training set-up: the four choices the MAE paper's set-up makes."""

    pos: bool      # fixed 2-D sin-cos positions (else timm's learned ones)
    init: bool     # the MAE initialisation (else timm's)
    bicubic: bool  # bicubic training crops and eval resize (else bilinear)
    tokens: bool   # no weight decay on the tokens (else only 1-D parameters skip it)


BASES = {"timm": Variant(False, False, False, False), "paper": Variant(True, True, True, True)}
FACTORS = ("pos", "init", "bicubic", "tokens")


def parse_variant(name: str) -> Variant:
    """``paper``, ``timm``, or either followed by ``-factor`` / ``+factor`` (e.g. ``paper-pos``, ``timm+init``)."""
    parts = name.replace("+", " +").replace("-", " -").split()
    if not parts or parts[0] not in BASES:
        raise ValueError(f"variant {name!r} must start with one of {tuple(BASES)} (e.g. paper-pos, timm+init)")
    variant = BASES[parts[0]]
    for part in parts[1:]:
        if part[1:] not in FACTORS:
            raise ValueError(f"variant {name!r}: unknown factor {part[1:]!r}; use one of {FACTORS}")
        variant = replace(variant, **{part[1:]: part[0] == "+"})
    return variant


# The methods' settings, as recipes/demo/{mae,simmim}.yaml; lr is per 256 images.
SETTINGS = {
    "mae": dict(pool="token", crop_scale=(0.2, 1.0), lr=5e-4, betas=(0.9, 0.95), clip=None),
    "simmim": dict(pool="avg", crop_scale=(0.67, 1.0), lr=5e-4, betas=(0.9, 0.999), clip=5.0),
}


POOL: dict[str, str] = {}  # --pool overrides, per method
LAYER_SCALE: dict[str, float] = {}  # --layer-scale: timm's ``init_values`` for every block, per method


def encoder(method: str, variant: Variant) -> Encoder:
    return Encoder("vit_tiny_patch16_224", image_size=32, patch_size=4, in_chans=1,
                   pool=POOL.get(method) or SETTINGS[method]["pool"],
                   model_kwargs={"depth": 6, **({"init_values": LAYER_SCALE[method]} if method in LAYER_SCALE else {})},
                   pos_embed="sincos" if variant.pos else "learned",
                   weight_init="mae" if variant.init else "timm")


def build(method: str, variant: Variant) -> SSLMethod:
    if method == "mae":
        return MAE(encoder(method, variant), mask_ratio=0.75, decoder_width=128, decoder_depth=4, decoder_heads=4,
                   norm_pix_loss=True)
    return SimMIM(encoder(method, variant), mask_ratio=0.6, mask_patch_size=8)


def datamodule(method: str, variant: Variant, args: argparse.Namespace) -> SSLDataModule:
    data = SSLDataModule(views=MaskedImageView(crop_scale=SETTINGS[method]["crop_scale"]), image_size=32,
                         interpolation="bicubic" if variant.bicubic else "bilinear", batch_size=args.batch_size,
                         num_workers=args.workers, seed=args.seed)
    data.setup("fit")
    return data


def pretrain(method: SSLMethod, name: str, variant: Variant, data: SSLDataModule,
             args: argparse.Namespace) -> float:
    """``args.images_seen // batch`` AdamW steps with a cosine schedule; returns the last loss."""
    settings = SETTINGS[name]
    no_decay = (no_weight_decay_names(method) if variant.tokens
                else {n for n, p in method.named_parameters() if p.ndim <= 1})
    lr = (args.base_lr or settings["lr"]) * args.batch_size / 256
    optimizer = create_optimizer(method, "adamw", lr=lr, weight_decay=0.05, no_decay=no_decay,
                                 betas=settings["betas"])
    steps = max(1, args.images_seen // args.batch_size)
    schedule = Cosine(lr, 0.0, warmup_epochs=args.warmup_steps / steps)
    method.train()
    batches = itertools.chain.from_iterable(itertools.repeat(data.train_dataloader()))
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.value(step, steps, steps)
        loss = method.training_loss(data.prepare_batch(next(batches)))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings["clip"]:
            nn.utils.clip_grad_norm_(method.parameters(), settings["clip"])
        optimizer.step()
    return loss.item()


def score(encoder_: Encoder, data: SSLDataModule) -> dict[str, float]:
    encoder_.eval()
    with torch.no_grad():
        scores = frozen_scores(encoder_, data, torch.device("cpu"), protocols=("knn", "linear"))
    return {"knn": scores["knn_top1"], "linear": scores["linear_top1"]}


def run(method_name: str, variant_name: str, args: argparse.Namespace) -> list[dict]:
    """Rows for the random-init encoder and the pretrained one of ``method_name`` under a variant."""
    variant = parse_variant(variant_name)
    data = datamodule(method_name, variant, args)
    torch.manual_seed(args.seed)
    method = build(method_name, variant)
    rows = []
    if not args.skip_random:
        start = time.perf_counter()
        rows.append({"encoder": "random init", **score(encoder_copy(method.encoder), data),
                     "seconds": time.perf_counter() - start})
    start = time.perf_counter()
    loss = pretrain(method, method_name, variant, data, args)
    rows.append({"encoder": f"{method_name} {args.images_seen // 1000}k images", **score(method.encoder, data),
                 "loss": round(loss, 4), "seconds": time.perf_counter() - start})
    for row in rows:
        row.update(method=method_name, variant=variant_name, **{k: getattr(variant, k) for k in FACTORS})
        print(f"{method_name:<7} {variant_name:<16} {row['encoder']:<20} kNN {row['knn']:.4f}  "
              f"linear {row['linear']:.4f}  ({row['seconds']:.0f} s)", flush=True)
        record({"name": f"mim_quality {method_name} {variant_name} {row['encoder']}", **row,
                "images_seen": args.images_seen, "batch_size": args.batch_size, "base_lr": args.base_lr})
    return rows


def encoder_copy(source: Encoder) -> Encoder:
    """The untrained encoder, before pretraining changes it in place."""
    copy = Encoder(**source.config)
    copy.load_state_dict(source.state_dict())
    return copy


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--methods", default="mae,simmim")
    add("--variants", default="timm,paper", help="comma-separated; see the module docstring")
    add("--images-seen", type=int, default=50_000)
    add("--batch-size", type=int, default=256)
    add("--warmup-steps", type=int, default=20)
    add("--base-lr", type=float, default=None, help="per 256 images; default 5e-4 for both, as the demo recipes")
    add("--pool", default=None, help="override the probed feature for every method: token or avg")
    add("--layer-scale", type=float, default=None,
        help="LayerScale init value for every block (timm's init_values; SimMIM's ViT-B uses 0.1)")
    add("--workers", type=int, default=2)
    add("--threads", type=int, default=2)
    add("--seed", type=int, default=0)
    add("--skip-random", action="store_true", help="score only the pretrained encoders")
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    if args.pool:
        POOL.update(dict.fromkeys(args.methods.split(","), args.pool))
    if args.layer_scale is not None:
        LAYER_SCALE.update(dict.fromkeys(args.methods.split(","), args.layer_scale))
    rows = [row for method in args.methods.split(",") for variant in args.variants.split(",")
            for row in run(method, variant, args)]
    print("\n| method | variant | encoder | kNN top-1 | linear top-1 |\n|---|---|---|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['variant']} | {row['encoder']} | {row['knn']:.3f} | {row['linear']:.3f} |")


if __name__ == "__main__":
    main()
