"""SimCLR training-step throughput, with the data path included and excluded.

Reference configuration (issue 2): timm resnet18 with the CIFAR stem, 32 px Fashion-MNIST, 2 views,
batch 256, projector 512-512-128, SGD, fp32, 2 threads, 2 loader workers.

    python benchmarks/throughput.py                       # fp32 and bf16 autocast, with and without data
    python benchmarks/throughput.py --steps 2 --batch-size 16   # a quick smoke run
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
from selfsup.methods.simclr import SimCLR  # noqa: E402
from selfsup.optim import create_optimizer  # noqa: E402
from selfsup.models.encoder import Encoder  # noqa: E402


def build(args: argparse.Namespace, channels_last: bool) -> tuple[SimCLR, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SimCLR(Encoder(args.model, cifar_stem=True), proj_hidden_dim=512, proj_dim=128,
                   channels_last=channels_last, micro_batch_size=args.micro_batch_size)
    return model.train(), create_optimizer(model, "sgd", lr=0.01, weight_decay=0.0, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    add_step_arguments(parser)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--memory-formats", default="channels_last,contiguous")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = SSLDataModule(batch_size=args.batch_size, num_workers=args.workers, image_size=32)
    data.setup("fit")
    for precision, memory_format in itertools.product(args.precisions.split(","), args.memory_formats.split(",")):
        batches, fixed = endless_batches(data.train_dataloader(), data.prepare_batch)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model, opt = build(args, memory_format == "channels_last")
        step = training_step(model, opt, precision)

        flops = count_flops(lambda: step(fixed))
        peak = matmul_peak_gflops(dtype)
        for with_data in (True, False):
            source = batches if with_data else itertools.repeat(fixed)
            seconds = time_steps(step, source, args.steps)
            chunks = variant_label(args)
            report(f"simclr {args.model} {precision} {memory_format}{chunks} {'with' if with_data else 'without'} data",
                   args.batch_size, seconds, flops, peak, batch_size=args.batch_size, threads=args.threads,
                   workers=args.workers, micro_batch_size=args.micro_batch_size)


if __name__ == "__main__":
    main()
