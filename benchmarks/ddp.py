"""DDP overhead on CPU: training throughput of 2 gloo processes against 1 process.

    python benchmarks/ddp.py                                          # SimCLR demo recipe, batch 64/process
    python benchmarks/ddp.py --recipe recipes/demo/mae.yaml --batch-size 64
    python benchmarks/ddp.py --steps 2 --batch-size 8                 # tiny smoke run

The model and views come from a recipe (so every method is covered). Both settings run the same
number of training steps (``training_loss`` -> backward -> AdamW) on real batches from the recipe's
data, with the same total number of CPU threads: 1 process with all of them, or 2 processes (gloo,
``DistributedDataParallel``; SyncBatchNorm with ``--sync-batchnorm``) with half each. The overhead
figure is ``efficiency = images/s with 2 processes / images/s with 1 process`` at equal per-process
batch: 1.0 means the all-reduce cost nothing; on 2 cores the ideal is also 1.0 (same total compute).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402


def load_recipe(recipe: str, batch_size: int, image_size: int | None):
    """``(method, one training batch)`` from a recipe, instantiated by the selfsup CLI."""
    from selfsup.cli import SelfSupCLI, trainer_defaults
    from selfsup.data.datamodule import SSLDataModule
    from selfsup.methods.base import SSLMethod

    args = ["--config", recipe, "--data.batch_size", str(batch_size), "--data.num_workers", "0",
            "--trainer.logger", "false", "--trainer.default_root_dir", "/tmp/selfsup-benchmark-ddp"]
    if image_size:
        args += ["--data.image_size", str(image_size)]
    cli = SelfSupCLI(SSLMethod, SSLDataModule, subclass_mode_model=True, trainer_defaults=trainer_defaults(),
                     run=False, auto_configure_optimizers=False, args=args)
    cli.datamodule.setup("fit")
    return cli.model, cli.datamodule.prepare_batch(next(iter(cli.datamodule.train_dataloader())))


class TrainingLoss(nn.Module):
    """``forward(batch) = method.training_loss(batch)["loss"]``, so DDP sees a normal forward."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, batch):
        return self.method.training_loss(batch)["loss"]


def run(rank: int, world_size: int, port: int, args, out: str) -> None:
    torch.set_num_threads(max(1, args.threads // world_size))
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    method, batch = load_recipe(args.recipe, args.batch_size, args.image_size)
    model: nn.Module = TrainingLoss(method)
    if world_size > 1:
        if args.sync_batchnorm:
            from selfsup.models.sync_batchnorm import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.find_unused_parameters)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(batch).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    seconds = torch.tensor(sum(times[args.warmup:]) / args.steps)
    if world_size > 1:
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds_per_step": float(seconds)}))


def measure(world_size: int, args) -> float:
    """Seconds per step with ``world_size`` processes."""
    out = f"/tmp/selfsup-benchmark-ddp-{os.getpid()}-{world_size}.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if world_size == 1:
        run(0, 1, port, args, out)
    else:
        mp.spawn(run, args=(world_size, port, args, out), nprocs=world_size, join=True)
    return json.loads(Path(out).read_text())["seconds_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/demo/simclr.yaml")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="total over all processes")
    parser.add_argument("--sync-batchnorm", action="store_true")
    parser.add_argument("--find-unused-parameters", action="store_true")
    args = parser.parse_args()

    one = measure(1, args)
    two = measure(2, args)
    row = {"name": f"ddp {Path(args.recipe).stem}", "batch_per_process": args.batch_size,
           "images_per_s_1_process": round(args.batch_size / one, 2),
           "images_per_s_2_processes": round(2 * args.batch_size / two, 2),
           "efficiency": round((2 * args.batch_size / two) / (args.batch_size / one), 3),
           "sync_batchnorm": args.sync_batchnorm, "threads": args.threads}
    print(f"{row['name']}: 1 process {row['images_per_s_1_process']} img/s, 2 gloo processes "
          f"{row['images_per_s_2_processes']} img/s, efficiency {row['efficiency']}", flush=True)
    record(row)


if __name__ == "__main__":
    main()
