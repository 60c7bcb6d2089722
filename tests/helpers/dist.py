"""Run a function in N gloo processes on CPU and collect what each rank returns."""

from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int = 2, *args, timeout: float = 240.0) -> list:
    """``fn(rank, world_size, *args)`` in ``world_size`` processes; returns each rank's result.

    The processes are forked, not spawned: they inherit the imported torch, Lightning and test module
    instead of importing them again, which took most of a 2-process test's time.
    Nothing distributed exists in the parent when it forks (each child makes its own gloo group).

    A run still going after ``timeout`` seconds is a hang: its processes are killed and ``TimeoutError``
    fails the test, instead of stalling the suite."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world_size, _free_port(), fn, args, out_dir),
                                     nprocs=world_size, join=False, start_method="fork")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} processes did not finish "
                                   f"within {timeout:.0f} s: a hang")
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def sharded_rand(rank: int, world_size: int):
    """``torch.rand`` that draws the whole global batch's numbers and keeps this rank's rows, so a
    method's random masks on 2 ranks are those of 1 process on the whole batch (install it as ``torch.rand``
    inside a rank function)."""
    real = torch.rand

    def rand(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        return real(shape[0] * world_size, *shape[1:], **kwargs)[rank * shape[0]:(rank + 1) * shape[0]]

    return rand
