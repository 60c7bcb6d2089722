"""Rank helpers and an all-gather that lets gradients flow back to every rank."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient and keeps this rank's slice.

    Uses all_reduce rather than reduce_scatter so it runs on gloo (CPU) as well as NCCL.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """``(B, ...) -> (world_size, B, ...)``; gradients reach the rank that produced each slice.

    Every rank must pass the same shape. Outside a process group this is ``x[None]``.
    """
    return _GatherWithGrad.apply(x) if is_distributed() else x[None]


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradient."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over ranks, in place; identity outside a process group."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    """Maximum over ranks, in place (flags: true on any rank); identity outside a process group."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``(N_r, ...)`` tensors of different lengths from every rank along dim 0 (no gradient).

    Every rank must call it; ranks may hold different ``N_r`` (also 0). One all-gather of the shapes,
    one of the rows padded to the longest. Outside a process group this is ``x``.
    """
    if not is_distributed():
        return x
    shape = torch.tensor([x.shape[0], *x.shape[1:]], device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(world_size())]
    dist.all_gather(shapes, shape)
    longest = int(max(s[0] for s in shapes))
    tail = tuple(int(d) for d in torch.stack(shapes)[:, 1:].max(0).values) if x.ndim > 1 else ()
    padded = x.new_zeros((longest, *tail))
    if x.shape[0]:
        padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(s[0])] for part, s in zip(parts, shapes)])


_inside_rank_zero = False  # True while rank 0 runs an on_rank_zero function


def on_rank_zero(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only, its result broadcast to every rank (every rank must call this).

    Work done once (scoring, writing files) without leaving the other ranks waiting in a different
    collective: they wait here, in the one broadcast. An exception on rank 0 is re-raised on every rank,
    so no rank hangs while another has failed. Called again inside ``fn`` (rank 0 alone is there, the
    others wait in the outer broadcast) it just runs its own ``fn``: a nested broadcast would hang.
    """
    global _inside_rank_zero
    if not is_distributed() or _inside_rank_zero:
        return fn()
    box: list[Any] = [None]
    failure: Exception | None = None
    if rank() == 0:
        _inside_rank_zero = True
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            failure, box[0] = err, ("error", f"{type(err).__name__}: {err}")
        finally:
            _inside_rank_zero = False
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if failure is not None:
        raise failure
    if status == "error":
        raise RuntimeError(f"rank 0 failed, so this rank stops too: {value}")
    return value


def broadcast_tensors(tensors: list[Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (every rank must call this)."""
    if is_distributed():
        for t in tensors:
            dist.broadcast(t, src=src)
