"""Shared benchmark helpers: matmul peak, FLOP counting, timing, peak memory, and result records.

Every benchmark prints images/s, peak memory and model FLOPs utilisation (MFU: model FLOP/s divided by
the dense-matmul peak measured in the same process and dtype), and appends a JSON line with the
command and the machine to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


RESULTS = Path(__file__).with_name("results.jsonl")


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every ResNet training-step benchmark takes: batch, steps, micro-batch, threads, workers."""
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=None,
                        help="encoder chunk size (model.micro_batch_size; per-chunk BatchNorm)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)


def variant_label(args: argparse.Namespace) -> str:
    """What result names add for settings off the default: `` micro-batch N``."""
    return f" micro-batch {args.micro_batch_size}" if args.micro_batch_size else ""


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 10) -> float:
    """Dense matmul throughput of this process (GFLOP/s): the denominator of MFU."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (forward and backward), counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_memory_mb() -> float:
    """Peak resident memory of this process (MB); CUDA peak allocation when on a GPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step: Callable[[Any], Any], batches: Iterator[Any], steps: int, warmup: int = 2) -> float:
    """Seconds per step, after ``warmup`` steps, including the time to fetch each batch."""
    for _ in range(warmup):
        step(next(batches))
    start = time.perf_counter()
    for _ in range(steps):
        step(next(batches))
    return (time.perf_counter() - start) / steps


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def endless_batches(loader: Iterable[Any], prepare: Callable[[Any], Any] = lambda batch: batch
                    ) -> tuple[Iterator[Any], Any]:
    """Batches from ``loader`` epoch after epoch, each finished by ``prepare`` (the data module's
    ``prepare_batch``: what the Trainer does after the transfer), and one batch held aside for the data-free
    timing."""
    return map(prepare, itertools.chain.from_iterable(itertools.repeat(loader))), prepare(next(iter(loader)))


def training_step(model: Any, optimizer: torch.optim.Optimizer, precision: str = "fp32",
                  before: Callable[[], Any] | None = None) -> Callable[[Any], None]:
    """One optimisation step as training runs it: ``training_loss`` under CPU autocast for bf16, backward, step."""

    def step(batch: Any) -> None:
        if before is not None:
            before()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            loss = model.training_loss(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def record(row: dict[str, Any]) -> None:
    """Append a result row, with the command, the machine and the time, to results.jsonl."""
    with RESULTS.open("a") as f:
        f.write(json.dumps({**row, "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                            "command": " ".join(sys.argv), "machine": machine(),
                            "time": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")


def report(name: str, images_per_step: int, seconds_per_step: float, flops_per_step: int, peak_gflops: float,
           **extra: Any) -> dict[str, Any]:
    """Print one result line and append it, with the command and machine, to results.jsonl."""
    images_per_s = images_per_step / seconds_per_step
    achieved = flops_per_step / seconds_per_step / 1e9
    row = {"name": name, "images_per_s": round(images_per_s, 2), "peak_memory_mb": round(peak_memory_mb(), 1),
           "model_gflops_per_s": round(achieved, 1), "matmul_peak_gflops": round(peak_gflops, 1),
           "mfu": round(achieved / peak_gflops, 3), **extra}
    print(f"{name:<40} {images_per_s:8.1f} img/s  peak mem {row['peak_memory_mb']:7.0f} MB  "
          f"MFU {100 * row['mfu']:5.1f}% ({achieved:.0f} of {peak_gflops:.0f} GFLOP/s)", flush=True)
    record(row)
    return row
