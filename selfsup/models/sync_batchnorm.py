"""BatchNorm whose batch statistics span every rank, on CPU (gloo) as well as GPU (NCCL).

``torch.nn.SyncBatchNorm`` refuses CPU input, and DDP refuses CPU modules holding one. This module
is deliberately not a ``torch.nn.SyncBatchNorm`` subclass: on accelerators it runs torch's fused
SyncBatchNorm forward; on CPU it all-reduces per-channel ``(sum, sum of squares, count)`` through an
autograd function, so the statistics and the gradients are those of one batch made of every
rank's samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from selfsup.distributed import is_distributed


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the batch of every rank, for any input rank >= 2, on CPU and GPU.

    Statistics are reduced over the default process group (or ``process_group``); outside a process
    group, or in eval mode, it is plain BatchNorm.
    """

    # torch's accelerator path, reused as is (it reads only these attributes)
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return nn.SyncBatchNorm.forward(self, x)
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return self._local_batch_norm(x)
        return self._synced_batch_norm(x)

    def _local_batch_norm(self, x: Tensor) -> Tensor:
        return nn.modules.batchnorm._BatchNorm.forward(self, x)

    def _momentum(self) -> float:
        if self.momentum is not None:
            return self.momentum
        return 1.0 / float(self.num_batches_tracked) if self.track_running_stats else 0.0

    def _synced_batch_norm(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        reduce_dims = [0, *range(2, x.dim())]
        x64 = x.double()  # sums of squares in float64: exact enough to match single-process BN to 1e-7
        count = torch.full((1,), x.numel() / channels, dtype=torch.float64)
        local = torch.cat([x64.sum(reduce_dims), (x64 * x64).sum(reduce_dims), count])
        total = _AllReduceSum.apply(local, self.process_group)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self._momentum()
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x64 - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.double().view(shape) + self.bias.double().view(shape)
        return y.to(x.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group`` (``None``: all); the gradient of a sum is the sum of every
    rank's upstream gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: plain BatchNorm with the same parameters and statistics."""
    converted = module
    if isinstance(module, SyncBatchNorm):
        converted = _PlainBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
    for name, child in module.named_children():
        converted.add_module(name, revert_sync_batchnorm(child))
    return converted


class _PlainBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for any input rank (what a reverted :class:`SyncBatchNorm` becomes)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d, and torch's SyncBatchNorm) with :class:`SyncBatchNorm`,
    keeping parameters, buffers and train/eval mode."""
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, process_group))
    del module
    return converted
