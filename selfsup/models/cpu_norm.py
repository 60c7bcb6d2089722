"""BatchNorm fused with the ReLU and the residual add after it, for CPU training in float32.

On CPU, a ResNet step spends much of its time outside the convolutions, streaming activations through
memory: torch runs a BatchNorm, a ReLU (and, at the end of a residual block, an add) as separate passes,
forward and backward. :class:`FusedBatchNorm2d` runs them as one: in training mode on a float32,
channels-last CPU tensor it calls the C kernels in ``csrc/batchnorm.c``, which touch each activation 5 to 8
times per step instead of 13 (numbers in ``benchmarks/README.md``, round 7). Statistics, running averages
and gradients are BatchNorm's, up to float32 rounding; sums are accumulated in double.

Everything else falls back to torch's own operators with the same result: eval mode, GPUs, other dtypes,
autocast, contiguous (not channels-last) tensors, and any machine where the kernels cannot be built. The
kernels are compiled on first use with the system C compiler (``cc``, or ``$CC``) and OpenMP, for the CPU
they run on, and cached under ``$SELFSUP_CACHE`` (default ``~/.cache/selfsup``); about a second.

:func:`use_fused_batchnorm` applies it in place to timm ResNets (stem, basic and bottleneck blocks): the
modules keep their parameters, buffers, hooks and state-dict keys; only their classes change. It is what
``SSLMethod(cpu_batchnorm=True)`` calls when a single-process fit sets up on a CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import Tensor, nn

_SOURCE = Path(__file__).with_name("csrc") / "batchnorm.c"
_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC")
_library: ctypes.CDLL | None | bool = False  # False: not tried yet; None: tried and unavailable


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("SELFSUP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selfsup"
    return Path(root) / "kernels"


def _compile() -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(_FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"batchnorm-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".batchnorm-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: processes building at once each install a complete library
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.bn_stats.argtypes = [p, i64, i64, p, p, i32]
    lib.bn_stats.restype = i32
    lib.bn_forward.argtypes = [p, p, p, p, p, i64, i64, i32, i32]
    lib.bn_forward.restype = None
    lib.bn_backward_reduce.argtypes = [p, p, p, p, p, p, i64, i64, i32, p, p, i32]
    lib.bn_backward_reduce.restype = i32
    lib.bn_backward_input.argtypes = [p, p, p, p, p, p, p, p, p, i64, i64, i32, i32]
    lib.bn_backward_input.restype = None
    return lib


def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; ``None`` (with one warning) where they cannot be built."""
    global _library
    if _library is False:
        try:
            _library = _declare(ctypes.CDLL(str(_compile())))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            warnings.warn(f"selfsup: fused CPU BatchNorm unavailable, using torch's operators ({error})",
                          RuntimeWarning, stacklevel=2)
            _library = None
    return _library


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
        _check(lib.bn_stats(_ptr(x), m, c, _ptr(total), _ptr(squares), threads))
        mean = total / m
        var = (squares / m - mean * mean).clamp_(min=0)
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
        ctx.mean, ctx.invstd, ctx.relu, ctx.has_residual = mean, invstd, relu, residual is not None
        ctx.affine = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, gamma, scale, shift = ctx.saved_tensors
        lib, threads = kernels(), torch.get_num_threads()
        dy = grad.contiguous(memory_format=torch.channels_last)
        c = x.shape[1]
        m = x.numel() // c
        sum_g, sum_gx = x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64)
        residual_grad = ctx.has_residual and ctx.needs_input_grad[1]
        grad_residual = torch.empty_like(x) if residual_grad and ctx.relu else None  # the masked dy
        _check(lib.bn_backward_reduce(_ptr(dy), _ptr(x), _ptr(y), _ptr(scale), _ptr(shift), _ptr(grad_residual),
                                      m, c, int(ctx.relu), _ptr(sum_g), _ptr(sum_gx), threads))
        if residual_grad and not ctx.relu:
            grad_residual = dy
        sum_gxhat = (sum_gx - ctx.mean * sum_g) * ctx.invstd  # sum of g * (x - mean) / std
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = gamma / std * (g - mean(g) - xhat * mean(g * xhat)) = a * g + b * x + k
            a = gamma * ctx.invstd
            b = -a * ctx.invstd * sum_gxhat / m
            k = -a * sum_g / m - b * ctx.mean
            a, b, k = a.float(), b.float(), k.float()  # held: the kernel reads them through raw pointers
            grad_x = torch.empty_like(x)
            if grad_residual is not None:  # it holds the masked gradient: read it instead of dy and y
                lib.bn_backward_input(_ptr(grad_residual), _ptr(x), None, _ptr(scale), _ptr(shift), _ptr(a), _ptr(b),
                                      _ptr(k), _ptr(grad_x), m, c, 0, threads)
            else:
                lib.bn_backward_input(_ptr(dy), _ptr(x), _ptr(y), _ptr(scale), _ptr(shift), _ptr(a), _ptr(b),
                                      _ptr(k), _ptr(grad_x), m, c, int(ctx.relu), threads)
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

    def __init__(self, num_features: int, relu: bool = False, **kwargs):
        super().__init__(num_features, **kwargs)
        self.relu = relu

    def _fused(self, x: Tensor, residual: Tensor | None) -> bool:
        return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.shape[1] > 0
                and x.numel() > x.shape[1] and x.is_contiguous(memory_format=torch.channels_last)
                and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))
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

