"""MAE and SimMIM training-step throughput, end to end including data, with peak memory and MFU.

Reports, in one run:
  * MAE (visible tokens only) images/s, and the same ViT + decoder with the encoder running on all
    tokens (masked ones replaced by a mask token, as in the paper's "encoder w/ [M]" ablation):
    the ratio is MAE's encoder speed-up;
  * SimMIM images/s;
  * peak memory and model FLOPs utilisation against a matmul peak measured in the same process.

Reference configuration (issue 3): fp32, batch 256, 2 threads, 2 loader workers, 32 px Fashion-MNIST
(embedded), timm ViT img 32 / patch 4 / embed 192 / depth 6 / heads 3; MAE mask 0.75 with a
128-wide, 4-deep, 4-head decoder and norm-pix loss; SimMIM mask blocks of 8 px at ratio 0.6. Crop scales
as in the recipes: (0.2, 1) for MAE, (0.67, 1) for SimMIM.

    python benchmarks/mim.py                                     # the reference configuration
    python benchmarks/mim.py --steps 2 --batch-size 16 --workers 0   # a quick smoke run
    python benchmarks/mim.py --image-size 224 --patch-size 16 --embed-dim 384 --depth 12 --heads 6 \\
        --in-chans 3 --decoder-width 512 --decoder-depth 8 --decoder-heads 16 --batch-size 32  # ViT-S/16
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
from pathlib import Path
from queue import Empty

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (count_flops, endless_batches, matmul_peak_gflops,  # noqa: E402
                    report, time_steps)

from selfsup.data.datamodule import SSLDataModule  # noqa: E402
from selfsup.data.transforms import MaskedImageView  # noqa: E402
from selfsup.methods.base import SSLMethod  # noqa: E402
from selfsup.optim import create_optimizer  # noqa: E402
from selfsup.methods.mae import MAE  # noqa: E402
from selfsup.methods.simmim import SimMIM  # noqa: E402
from selfsup.models.encoder import Encoder  # noqa: E402
from selfsup.models.masking import TokenMask, random_token_mask  # noqa: E402


class MAEAllTokens(MAE):
    """The comparison point: the same model, but the encoder runs on every token, masked ones replaced
    by a learned mask token, and the decoder receives all of them (no mask tokens added there)."""

    def __init__(self, encoder: Encoder, **kwargs):
        super().__init__(encoder, **kwargs)
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))

    def predict(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, TokenMask]:
        patches = self.encoder.embed_patches(images)
        mask = random_token_mask(len(images), patches.shape[1], self.mask_ratio, images.device, generator)
        weight = mask.mask[..., None].to(patches.dtype)
        tokens = self.encoder.encode_patches(patches * (1 - weight) + self.encoder_mask_token * weight)
        identity = torch.arange(patches.shape[1], device=images.device).expand(len(images), -1)
        return self.decoder(tokens, identity), mask


def encoder(args: argparse.Namespace) -> Encoder:
    return Encoder(args.encoder, image_size=args.image_size, patch_size=args.patch_size, in_chans=args.in_chans,
                   model_kwargs={"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.heads})


def build(name: str, args: argparse.Namespace) -> SSLMethod:
    torch.manual_seed(0)
    decoder = dict(mask_ratio=args.mask_ratio, decoder_width=args.decoder_width, decoder_depth=args.decoder_depth,
                   decoder_heads=args.decoder_heads, norm_pix_loss=True)
    if name == "mae":
        return MAE(encoder(args), **decoder)
    if name == "mae_all_tokens":
        return MAEAllTokens(encoder(args), **decoder)
    if name == "simmim":
        return SimMIM(encoder(args), mask_ratio=args.simmim_mask_ratio, mask_patch_size=args.simmim_mask_patch_size)
    raise ValueError(f"unknown method {name!r}: choose from mae, mae_all_tokens, simmim")


def make_step(model: SSLMethod, precision: str, clip: float | None):
    optimizer = create_optimizer(model, "adamw", lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))

    def step(batch) -> None:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            loss = model.training_loss(batch)["loss"]
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--methods", default="mae,mae_all_tokens,simmim")
    add("--steps", type=int, default=8, help="timed steps per method (after 2 warm-up steps)")
    add("--batch-size", type=int, default=256)
    add("--threads", type=int, default=2)
    add("--workers", type=int, default=2)
    add("--precision", choices=("fp32", "bf16"), default="fp32")
    add("--encoder", default="vit_tiny_patch16_224", help="a timm ViT name; the sizes below override it")
    add("--image-size", type=int, default=32)
    add("--patch-size", type=int, default=4)
    add("--in-chans", type=int, default=1, help="1: grey Fashion-MNIST pixels are the targets")
    add("--embed-dim", type=int, default=192)
    add("--depth", type=int, default=6)
    add("--heads", type=int, default=3)
    add("--mask-ratio", type=float, default=0.75)
    add("--decoder-width", type=int, default=128)
    add("--decoder-depth", type=int, default=4)
    add("--decoder-heads", type=int, default=4)
    add("--simmim-mask-ratio", type=float, default=0.6)
    add("--simmim-mask-patch-size", type=int, default=8)
    return parser.parse_args()


def measure(name: str, args: argparse.Namespace) -> tuple[float, int]:
    """Images/s and FLOPs per step of one method, end to end from the loader; prints and records its row."""
    torch.set_num_threads(args.threads)
    crop_scale = (0.67, 1.0) if name == "simmim" else (0.2, 1.0)  # as the recipes (the papers' settings)
    data = SSLDataModule(image_size=args.image_size, batch_size=args.batch_size, num_workers=args.workers,
                         views=MaskedImageView(crop_scale=crop_scale))
    batches, fixed = endless_batches(data.train_dataloader(), data.prepare_batch)
    peak = matmul_peak_gflops(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    model = build(name, args).train()
    step = make_step(model, args.precision, clip=5.0 if name == "simmim" else None)
    flops = count_flops(lambda: step(fixed))
    seconds = time_steps(step, batches, args.steps)
    row = report(f"{name} vit d{args.embed_dim} x{args.depth} {args.image_size}px/{args.patch_size} {args.precision}",
                 args.batch_size, seconds, flops, peak, batch_size=args.batch_size, threads=args.threads,
                 workers=args.workers, precision=args.precision)
    return row["images_per_s"], flops


def _measure_into(queue, name: str, args: argparse.Namespace) -> None:
    queue.put(measure(name, args))


def main() -> None:
    """Each method runs in a fresh process, so its peak memory is its own."""
    args = parse()
    context = multiprocessing.get_context("spawn")
    rates: dict[str, tuple[float, int]] = {}
    for name in args.methods.split(","):
        queue = context.Queue()
        process = context.Process(target=_measure_into, args=(queue, name, args))
        process.start()
        while True:  # a child that dies (e.g. out of memory) must not leave us waiting forever
            try:
                rates[name] = queue.get(timeout=5)
                break
            except Empty:
                if not process.is_alive():
                    raise RuntimeError(f"the {name} benchmark process died (exit code {process.exitcode})")
        process.join()
    if "mae" in rates and "mae_all_tokens" in rates:
        (mae, mae_flops), (full, full_flops) = rates["mae"], rates["mae_all_tokens"]
        print(f"MAE speed-up over encoding all tokens at mask {args.mask_ratio}: {mae / full:.2f}x measured, "
              f"{full_flops / mae_flops:.2f}x in FLOPs (the decoder, run on all tokens by both, bounds it)",
              flush=True)


if __name__ == "__main__":
    main()
