"""SwAV training-step throughput, end to end including data, with and without multi-crop.

Reference configuration (issue 4): timm resnet18 with the CIFAR stem, 32 px Fashion-MNIST, 2x32 + 4x16
crops (multi-crop) against 2x32 (without), 512 prototypes, batch 256, fp32, 2 threads, 2 loader
workers. Target: at least 34 images/s with multi-crop (1.2x the 28.7 images/s of a SwAV built from
another library's blocks on the same machine kind). Images/s counts images; crops/s is printed too,
since one multi-crop image is 6 crops (about 10 GFLOP per image for a training step, forward and backward).

    python benchmarks/swav.py                                            # the reference configuration
    python benchmarks/swav.py --batch-size 16 --steps 2 --threads 1 --workers 0 --model test_resnet   # smoke

Each step is what training does: prototypes back on the unit sphere, ``training_loss`` (encoder once
per resolution, Sinkhorn, swapped prediction), backward, SGD step. MFU divides the model FLOP/s
(torch's FlopCounterMode over one step) by the dense-matmul peak measured in the same process.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_step_arguments, count_flops, endless_batches,  # noqa: E402
                    matmul_peak_gflops, report, time_steps, training_step, variant_label)

from selfsup.data.datamodule import SSLDataModule  # noqa: E402
from selfsup.data.transforms import Crops, MultiCropViews  # noqa: E402
from selfsup.methods.swav import SwAV  # noqa: E402
from selfsup.optim import create_optimizer  # noqa: E402
from selfsup.models.encoder import Encoder  # noqa: E402

SETTINGS = {"multi-crop": Crops(4, 16, (0.05, 0.14)), "2-crop": Crops(0, 16, (0.05, 0.14))}


def build(args: argparse.Namespace) -> tuple[SwAV, torch.optim.Optimizer]:
    torch.manual_seed(0)
    cifar_stem = args.model.startswith("resnet")
    model = SwAV(Encoder(args.model, cifar_stem=cifar_stem), proj_hidden_dim=args.proj_hidden_dim, proj_dim=128,
                 num_prototypes=args.prototypes, freeze_prototypes_steps=0, channels_last=args.channels_last,
                 micro_batch_size=args.micro_batch_size)
    return model.train(), create_optimizer(model, "sgd", lr=0.01, weight_decay=0.0, momentum=0.9)


def loader_batches(args: argparse.Namespace, local_crops: Crops):
    views = MultiCropViews(Crops(2, 32, (0.14, 1.0)), local_crops, blur_p=args.blur_p)
    data = SSLDataModule(views=views, image_size=32, batch_size=args.batch_size, num_workers=args.workers)
    data.setup("fit")
    return endless_batches(data.train_dataloader(), data.prepare_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="timm name; ResNets get the CIFAR stem")
    add_step_arguments(parser)
    parser.add_argument("--prototypes", type=int, default=512)
    parser.add_argument("--proj-hidden-dim", type=int, default=2048)
    parser.add_argument("--blur-p", type=float, default=0.5, help="the paper blurs every crop")
    parser.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16 (CPU autocast)")
    parser.add_argument("--settings", default="multi-crop,2-crop", help=f"comma list of {list(SETTINGS)}")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for setting, precision in itertools.product(args.settings.split(","), args.precisions.split(",")):
        batches, fixed = loader_batches(args, SETTINGS[setting])
        model, optimizer = build(args)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32

        step = training_step(model, optimizer, precision, before=model.prototypes.normalize_)

        flops = count_flops(lambda: step(fixed))
        peak = matmul_peak_gflops(dtype)
        seconds = time_steps(step, batches, args.steps)
        crops_per_s = round(args.batch_size * len(fixed.views) / seconds, 2)
        chunks = variant_label(args)
        report(f"swav {args.model} {setting} {precision}{chunks} with data", args.batch_size, seconds, flops, peak,
               batch_size=args.batch_size, threads=args.threads, workers=args.workers, crops=len(fixed.views),
               crops_per_s=crops_per_s, gflop_per_image=round(flops / args.batch_size / 1e9, 2),
               prototypes=args.prototypes, precision=precision, micro_batch_size=args.micro_batch_size)
        print(f"{'':<40} {crops_per_s:8.1f} crops/s, {flops / args.batch_size / 1e9:.2f} GFLOP per image", flush=True)


if __name__ == "__main__":
    main()
