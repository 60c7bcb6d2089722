"""BatchNorm fused with the ReLU and the residual add after it, for CPU training in float32.

On CPU, a ResNet step spends much of its time outside the convolutions, streaming activations through
memory: torch runs a BatchNorm, a ReLU (and, at the end of a residual block, an add) as separate passes,
forward and backward. :class:`FusedBatchNorm2d` runs them as one: in training mode on a float32,
channels-last CPU tensor it calls the C kernels in ``csrc/batchnorm.c``, which touch each activation 5 to 8
times per step instead of 13 (numbers in ``benchmarks/README.md``, round 7). Statistics, running averages
and gradients are BatchNorm's, up to float32 rounding; sums are accumulated in double.

Everything else falls back to torch's own operators with the same result: eval mode, GPUs, other dtypes,
autocast, contiguous (not channels-last) tensors, and any machine where the kernels cannot be built
(:mod:`selfsup.models.cpu_kernels` builds them on first use).

:func:`use_fused_batchnorm` applies it in place to timm ResNets (stem, basic and bottleneck blocks): the
modules keep their parameters, buffers, hooks and state-dict keys; only their classes change. It is what
``SSLMethod(cpu_batchnorm=True)`` calls when a single-process fit sets up on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from selfsup.models.cpu_kernels import kernels
from selfsup.models.cpu_kernels import ptr as _ptr


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("fused BatchNorm: out of memory for per-thread sums")


class _BatchNormAct(torch.autograd.Function):
    """relu(batch_norm(x) [+ residual]) on a channels-last float32 tensor, batch statistics."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None,
                running_mean: Tensor | None, running_var: Tensor | None, momentum: float, eps: float,
                relu: bool) -> Tensor:
        lib, threads = kernels(), torch.get_num_threads()
        c = x.shape[1]
        m = x.numel() // c
        total, squares = x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64)
        pivot = x[0, :, 0, 0].contiguous()  # a sample of each channel: sums of x - pivot do not cancel
        _check(lib.bn_stats(_ptr(x), _ptr(pivot), m, c, _ptr(total), _ptr(squares), threads))
        shifted_mean = total / m
        mean = pivot.double() + shifted_mean
        var = (squares / m - shifted_mean * shifted_mean).clamp_(min=0)
        invstd = (var + eps).rsqrt()
        gamma = weight.double() if weight is not None else torch.ones_like(mean)
        scale = gamma * invstd
        shift = (bias.double() if bias is not None else torch.zeros_like(mean)) - mean * scale
        scale, shift = scale.float(), shift.float()
        y = torch.empty_like(x)
        lib.bn_forward(_ptr(x), _ptr(residual), _ptr(scale), _ptr(shift), _ptr(y), m, c, int(relu), threads)
        if running_mean is not None:
            # through .data, as torch's kernel writes them: without a version bump, which would break the
            # backward of a torch BatchNorm that ran earlier in the graph (it saves the running statistics)
            running_mean.data.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.data.lerp_((var * (m / (m - 1))).to(running_var.dtype), momentum)
        # the ReLU's mask is recomputed from x, unless a residual was added: then it is read from y
        ctx.save_for_backward(x, y if residual is not None and relu else None, gamma, scale, shift)
        ctx.center, ctx.invstd, ctx.relu, ctx.has_residual = mean.float(), invstd, relu, residual is not None
        ctx.affine = weight is not None, bias is not None
        return y

    @staticmethod
    @once_differentiable  # no graph through the kernels: double backward raises instead of dropping terms
    def backward(ctx, grad: Tensor):
        # the kernels read raw channels-last float32 memory; a saved-tensor hook may have changed the layout
        x, y, gamma, scale, shift = (t if t is None or t.dim() != 4 else t.contiguous(memory_format=torch.channels_last)
                                     for t in ctx.saved_tensors)
        lib, threads = kernels(), torch.get_num_threads()
        dy = grad.contiguous(memory_format=torch.channels_last)
        c = x.shape[1]
        m = x.numel() // c
        sum_g, sum_gx = x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64)
        residual_grad = ctx.has_residual and ctx.needs_input_grad[1]
        grad_residual = torch.empty_like(x) if residual_grad and ctx.relu else None  # the masked dy
        _check(lib.bn_backward_reduce(_ptr(dy), _ptr(x), _ptr(y), _ptr(scale), _ptr(shift), _ptr(ctx.center),
                                      _ptr(grad_residual), m, c, int(ctx.relu), _ptr(sum_g), _ptr(sum_gx), threads))
        if residual_grad and not ctx.relu:
            grad_residual = dy
        sum_gxhat = sum_gx * ctx.invstd  # sum of g * (x - mean) / std
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = gamma / std * (g - mean(g) - xhat * mean(g * xhat)) = a * g + b * (x - mean) + k
            a = gamma * ctx.invstd
            b = -a * ctx.invstd * sum_gxhat / m
            k = -a * sum_g / m
            a, b, k = a.float(), b.float(), k.float()  # held: the kernel reads them through raw pointers
            grad_x = torch.empty_like(x)
            if grad_residual is not None:  # it holds the masked gradient: read it instead of dy and y
                lib.bn_backward_input(_ptr(grad_residual), _ptr(x), None, _ptr(scale), _ptr(shift), _ptr(a), _ptr(b),
                                      _ptr(k), _ptr(ctx.center), _ptr(grad_x), m, c, 0, threads)
            else:
                lib.bn_backward_input(_ptr(dy), _ptr(x), _ptr(y), _ptr(scale), _ptr(shift), _ptr(a), _ptr(b),
                                      _ptr(k), _ptr(ctx.center), _ptr(grad_x), m, c, int(ctx.relu), threads)
        grad_weight = sum_gxhat.float() if ctx.affine[0] and ctx.needs_input_grad[2] else None
        grad_bias = sum_g.float() if ctx.affine[1] and ctx.needs_input_grad[3] else None
        return grad_x, grad_residual, grad_weight, grad_bias, None, None, None, None, None


class FusedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d``, optionally followed by a residual add and a ReLU, computed in one pass on CPU.

    ``forward(x, residual=None)`` returns ``relu(bn(x) + residual)`` (``relu`` set) or ``bn(x) + residual``.
    Same parameters, buffers and state dict as ``nn.BatchNorm2d``; the fused kernels run in training mode on
    float32, channels-last CPU tensors of more than one value per channel, outside autocast. Other inputs
    go through ``F.batch_norm``, ``+`` and ``F.relu``, with the same result.
    """

    relu: bool = False

    def __init__(self, num_features: int, *args, relu: bool = False, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.relu = relu

    def extra_repr(self) -> str:
        return super().extra_repr() + (", relu=True" if self.relu else "")

    def _fused(self, x: Tensor, residual: Tensor | None) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] > 0
                and x.numel() > x.shape[1] and x.is_contiguous(memory_format=torch.channels_last)
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype
                                          and residual.device == x.device))
                and (self.weight is None or self.weight.dtype == torch.float32)
                and not torch.is_autocast_enabled("cpu") and kernels() is not None)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        batch_stats = self.training or self.running_mean is None
        if not (batch_stats and self._fused(x, residual)):
            y = super().forward(x)  # a new tensor: the add and the ReLU may work in place, as timm's blocks do
            y = y if residual is None else y.add_(residual)
            return F.relu(y, inplace=True) if self.relu else y
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        update = self.training and self.track_running_stats
        if update:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        return _BatchNormAct.apply(x, residual, self.weight, self.bias, self.running_mean if update else None,
                                   self.running_var if update else None, momentum, self.eps, self.relu)


def _plain(module: nn.Module | None, cls: type[nn.Module]) -> bool:
    """Exactly ``cls`` (not a subclass), with no hooks: fusing would move what a hook sees."""
    return (type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks
                                         or module._backward_hooks or module._backward_pre_hooks))


def _absent(module: nn.Module | None) -> bool:
    return module is None or type(module) is nn.Identity


def _fuse(bn: nn.Module, relu: bool) -> None:
    bn.__class__ = FusedBatchNorm2d  # same object, parameters, buffers and hooks
    bn.relu = relu


class _FusedBasicBlock(BasicBlock):
    """timm's ``BasicBlock`` without drop-block, anti-aliasing, attention or drop-path, its BatchNorms fused."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), shortcut)


class _FusedBottleneck(Bottleneck):
    """timm's ``Bottleneck`` without drop-block, anti-aliasing, attention or drop-path, its BatchNorms fused."""

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.bn3(self.conv3(x), shortcut)


def _fusable_block(block: nn.Module) -> bool:
    norms = ("bn1", "bn2") if type(block) is BasicBlock else ("bn1", "bn2", "bn3")
    acts = ("act1", "act2") if type(block) is BasicBlock else ("act1", "act2", "act3")
    return (type(block) in (BasicBlock, Bottleneck) and not _has_hooks(block)
            and all(_plain(getattr(block, n), nn.BatchNorm2d) for n in norms)
            and all(_plain(getattr(block, a), nn.ReLU) for a in acts)
            and _absent(block.drop_block) and _absent(block.aa) and _absent(block.se) and _absent(block.drop_path))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def use_fused_batchnorm(module: nn.Module) -> int:
    """Fuse, in place, the BatchNorms of the timm ResNets in ``module`` with the ReLU and residual add after
    them; every other plain ``nn.BatchNorm2d`` becomes a :class:`FusedBatchNorm2d` without ReLU. Returns how
    many BatchNorms were changed.

    Fused: the stem's ``bn1`` with ``act1`` (which becomes ``nn.Identity``), and in ``BasicBlock`` and
    ``Bottleneck`` blocks without drop-block, anti-aliasing, attention or drop-path, each BatchNorm with its
    ReLU, the last with the shortcut add too. Modules with hooks, and subclasses, are left alone. The state
    dict keys, parameters and buffers do not change, so checkpoints and exports are unaffected.
    """
    changed = 0
    for sub in list(module.modules()):
        if type(sub) is ResNet and _plain(sub.bn1, nn.BatchNorm2d) and _plain(sub.act1, nn.ReLU):
            _fuse(sub.bn1, relu=True)
            sub.act1 = nn.Identity()
            changed += 1
        elif _fusable_block(sub):
            norms = [sub.bn1, sub.bn2] + ([sub.bn3] if type(sub) is Bottleneck else [])
            for bn in norms:
                _fuse(bn, relu=True)
            sub.__class__ = _FusedBasicBlock if type(sub) is BasicBlock else _FusedBottleneck
            changed += len(norms)
    for sub in module.modules():
        if _plain(sub, nn.BatchNorm2d):
            _fuse(sub, relu=False)
            changed += 1
    return changed

