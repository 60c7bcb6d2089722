"""Convolution algorithms for CPU training, where torch's own (oneDNN, direct convolution) leave speed behind.

torch's CPU convolutions always convolve directly, and on the small feature maps of a ResNet's later stages
they run well below the matmul peak (on the 2-core benchmark host, 512 images through a 512-channel 3x3
layer at 4x4: 246 GFLOP/s forward against 330 for a large matmul; a stride-2 layer onto 2x2 maps: about 105).
GPU libraries choose their algorithm per layer themselves (cuDNN picks Winograd and GEMM forms); this module
does it for CPUs, for two cases:

- **3x3 stride-1 layers of at least 128 channels: Winograd's algorithm.** Lavin & Gray, "Fast Algorithms for
  Convolutional Neural Networks" (CVPR 2016): computed tile by tile as ``Y = A^T [(G g G^T) * (B^T d B)] A``,
  an ``m x m`` output tile needs ``(m + 2)^2`` multiplications instead of ``9 m^2``: with ``m = 4``, 2.25 per
  output instead of 9. The ``(m + 2)^2`` elementwise products over channels are as many batched GEMMs, and
  forward, input gradient and weight gradient all run in the Winograd domain. Outputs and gradients differ
  from direct convolution by rounding: about 1e-5 relative to their largest value in float32 (``m = 2``:
  3e-6); the transforms are exact, which ``tests/models/test_cpu_conv.py`` checks in float64.
  For float32 channels-last tensors, the F(4x4, 3x3) input transform, output transform and the output's
  adjoint (weight gradient) run as compiled kernels (``csrc/winograd.c``, built by
  :mod:`selfsup.models.cpu_kernels`) that read their input once and write their output once, instead of a
  gather, a 36x36 GEMM and copies: 512 images of 128 channels at 16x16, input transform 33 -> 12 ms. Without a
  C compiler, the torch transforms run, with the same results up to rounding.
- **3x3 stride-2 layers onto maps of at most 4x4: one GEMM** over the unfolded input (im2col), where
  oneDNN's strided kernels are slowest. Same multiplications as direct convolution, float32 rounding only.

On the benchmark host, SimCLR's reference configuration (ResNet-18, CIFAR stem, 32 px, batch 256, end to
end) trains at 50-51 images/s with them against 36-38 without (``benchmarks/README.md``, round 5).

:class:`WinogradConv2d` and :class:`GemmConv2d` are ``nn.Conv2d`` s with the same parameters and state dict.
They fall back to ``nn.Conv2d.forward`` for every input they do not cover: a GPU tensor, half precision,
autocast or an empty batch (and, for :class:`GemmConv2d`, a larger map). :func:`use_cpu_convolutions` swaps
them into a model in place; ``SSLMethod`` does this when it is set up on a CPU (``cpu_conv: true``, the
default). What they cost: memory, since the backward pass keeps the transformed input (Winograd: 2.25x the
layer's input; GEMM: the unfolded input) where direct convolution keeps the input itself (a ResNet-18's saved
activations grow by about 28%); and higher-order gradients (``create_graph=True``, ``torch.func``), which they
do not support: turn them off (``cpu_conv: false``) for gradient penalties or per-sample gradients.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from selfsup.models.cpu_kernels import kernels, ptr

# Lavin & Gray's transforms, F(2x2, 3x3) and F(4x4, 3x3): (B^T, G, A^T) with interpolation points 0, +-1, +-2.
_TRANSFORMS = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


@functools.cache
def _matrices(tile: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D transforms as single matrices on flattened tiles: ``vec(B^T d B) = (B^T (x) B^T) vec(d)``."""
    bt, g, at = (torch.tensor(a, dtype=torch.float64, device="cpu") for a in _TRANSFORMS[tile])
    return tuple(torch.kron(a, a).to(dtype) for a in (bt, g, at))  # (a^2, a^2), (a^2, 9), (m^2, a^2)


def _tiles(h: int, w: int, tile: int) -> tuple[int, int]:
    return -(-h // tile), -(-w // tile)


def _gather_tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """The overlapping ``(m+2) x (m+2)`` tiles of ``x`` (N, C, H, W) padded by 1, as an
    ``((m+2)^2, tiles * C)`` matrix, in one pass: each of the ``(m+2)^2`` tile positions is one strided copy
    of ``x``, with zeros where it falls on the padding."""
    n, c, h, w = x.shape
    a = tile + 2
    th, tw = _tiles(h, w, tile)
    xh = x.permute(0, 2, 3, 1)  # N, H, W, C
    d = x.new_empty(a, a, n, th, tw, c)
    rows = [_valid(i, tile, th, h) for i in range(a)]
    cols = [_valid(j, tile, tw, w) for j in range(a)]
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out = d[i, j]
            if r1 <= r0 or c1 <= c0:
                out.zero_()
                continue
            for part in (out[:, :r0], out[:, r1:], out[:, r0:r1, :c0], out[:, r0:r1, c1:]):
                if part.numel():
                    part.zero_()
            first_row, first_col = r0 * tile + i - 1, c0 * tile + j - 1
            out[:, r0:r1, c0:c1] = xh[:, first_row::tile, first_col::tile][:, :r1 - r0, :c1 - c0]
    return d.view(a * a, -1)


def _valid(offset: int, tile: int, tiles: int, size: int) -> tuple[int, int]:
    """The tiles ``[first, last)`` whose element at ``offset`` (row ``t * tile + offset - 1``) is inside the image."""
    first = 1 if offset == 0 else 0
    last = min(tiles, (size - offset) // tile + 1) if size - offset >= 0 else 0
    return first, last


def _input_transform(x: torch.Tensor, tile: int) -> torch.Tensor:
    """``B^T d B`` for every overlapping ``(m+2) x (m+2)`` tile of ``x`` (N, C, H, W), padded by 1.

    Returns V of shape ``((m+2)^2, tiles, C)``: one GEMM operand per transform element.
    """
    n, c, h, w = x.shape
    th, tw = _tiles(h, w, tile)
    if _compiled(x, tile):
        v = x.new_empty(36, n * th * tw, c)
        kernels().winograd4_input(ptr(x), n, h, w, c, ptr(v), torch.get_num_threads())
        return v
    bb = _matrices(tile, x.dtype)[0]
    return (bb @ _gather_tiles(x, tile)).view(bb.shape[0], n * th * tw, c)


def _output_transform(m: torch.Tensor, tile: int, n: int, h: int, w: int, channels_last: bool) -> torch.Tensor:
    """``A^T M A`` for every tile, assembled into an (N, K, H, W) tensor."""
    k = m.shape[-1]
    th, tw = _tiles(h, w, tile)
    if _compiled(m, tile):
        y = torch.empty(n, k, h, w, dtype=m.dtype, device=m.device, memory_format=torch.channels_last)
        kernels().winograd4_output(ptr(m), n, h, w, k, ptr(y), torch.get_num_threads())
        return _in_format(y, channels_last)
    aa = _matrices(tile, m.dtype)[2]
    y = (aa @ m.view(m.shape[0], -1)).view(tile, tile, n, th, tw, k)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * tile, tw * tile, k)[:, :h, :w].permute(0, 3, 1, 2)
    return _in_format(y, channels_last)


def _weight_transform(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """``G g G^T`` for every (output, input) channel pair: shape ``((m+2)^2, C, K)``."""
    k, c = weight.shape[:2]
    gg = _matrices(tile, weight.dtype)[1]
    return (gg @ weight.permute(2, 3, 1, 0).reshape(9, c * k)).view(-1, c, k)


def _compiled(t: torch.Tensor, tile: int, layout: bool = True) -> bool:
    """Whether the compiled F(4x4, 3x3) transforms (``csrc/winograd.c``) take ``t``: float32 on CPU, channels-last
    for an image tensor (``layout``; a transformed tensor is always contiguous), and the kernels built."""
    laid_out = t.is_contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.is_contiguous()
    return (tile == 4 and t.device.type == "cpu" and t.dtype == torch.float32 and (laid_out or not layout)
            and kernels() is not None)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _in_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _conv(x: torch.Tensor, weight: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3x3 convolution, stride 1, padding 1, without autograd: the output and V, the transformed input."""
    v = _input_transform(x, tile)
    m = torch.bmm(v, _weight_transform(weight, tile))
    return _output_transform(m, tile, x.shape[0], x.shape[2], x.shape[3], _is_channels_last(x)), v


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, tile: int) -> torch.Tensor:
        y, v = _conv(x, weight, tile)
        ctx.save_for_backward(v if ctx.needs_input_grad[1] else None, weight)  # V only for the weight gradient
        ctx.tile, ctx.shape, ctx.channels_last = tile, x.shape, _is_channels_last(x)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        v, weight = ctx.saved_tensors
        tile, (n, c, h, w) = ctx.tile, ctx.shape
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # the input gradient is the convolution with the flipped, transposed kernel
            grad_x = _in_format(_conv(grad, weight.flip(2, 3).transpose(0, 1), tile)[0], ctx.channels_last)
        if ctx.needs_input_grad[1]:  # adjoints of the output and weight transforms, around dU = V^T dM
            k = grad.shape[1]
            th, tw = _tiles(h, w, tile)
            bb, gg, aa = _matrices(tile, grad.dtype)
            g = grad.contiguous(memory_format=torch.channels_last) if _compiled(grad, tile, layout=False) else None
            if g is not None:
                grad_m = grad.new_empty(36, n * th * tw, k)
                kernels().winograd4_output_adjoint(ptr(g), n, h, w, k, ptr(grad_m), torch.get_num_threads())
            else:
                g = grad.permute(0, 2, 3, 1)
                if (th * tile, tw * tile) != (h, w):
                    g = F.pad(g, (0, 0, 0, tw * tile - w, 0, th * tile - h))
                g = g.reshape(n, th, tile, tw, tile, k).permute(2, 4, 0, 1, 3, 5).reshape(tile * tile, -1)
                grad_m = (aa.t() @ g).view(-1, n * th * tw, k)
            grad_u = torch.bmm(v.transpose(1, 2), grad_m)
            grad_w = (gg.t() @ grad_u.reshape(grad_u.shape[0], -1)).view(3, 3, c, k).permute(3, 2, 0, 1)
        return grad_x, grad_w, None


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """``F.conv2d(x, weight, stride=1, padding=1)`` for a 3x3 ``weight``, by Winograd's F(tile x tile, 3x3).

    ``tile`` is 2 or 4: 4 needs fewer multiplications, 2 wastes less on 2x2 feature maps and rounds less.
    """
    if tile not in _TRANSFORMS:
        raise ValueError(f"tile must be one of {sorted(_TRANSFORMS)}, got {tile}")
    if x.dim() != 4 or weight.shape[1:] != (x.shape[1], 3, 3):
        raise ValueError(f"expected an (N, C, H, W) input and a (K, C, 3, 3) weight, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    return _WinogradConv3x3.apply(x, weight, tile)


def _columns(x: torch.Tensor, stride: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The 3x3 neighbourhoods of every output position of a padding-1 convolution, as an
    ``(N * OH * OW, 9 * C)`` matrix (im2col, channels fastest)."""
    n, c, h, w = x.shape
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # N, H+2, W+2, C
    s = xp.stride()
    cols = xp.as_strided((n, oh, ow, 3, 3, c), (s[0], stride * s[1], stride * s[2], s[1], s[2], s[3]),
                         xp.storage_offset())
    return cols.reshape(n * oh * ow, 9 * c), (oh, ow)


def _weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) -> (9 * C, K), rows in the order of :func:`_columns`."""
    return weight.permute(2, 3, 1, 0).reshape(-1, weight.shape[0])


class _GemmConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
        n, k = x.shape[0], weight.shape[0]
        cols, (oh, ow) = _columns(x, stride)
        y = (cols @ _weight_matrix(weight)).view(n, oh, ow, k).permute(0, 3, 1, 2)
        ctx.save_for_backward(cols if ctx.needs_input_grad[1] else None, weight)
        ctx.stride, ctx.shape, ctx.channels_last = stride, x.shape, _is_channels_last(x)
        return _in_format(y, ctx.channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        cols, weight = ctx.saved_tensors
        (n, c, h, w), s, k = ctx.shape, ctx.stride, weight.shape[0]
        oh, ow = grad.shape[2:]
        g = grad.permute(0, 2, 3, 1).reshape(-1, k)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # each column's gradient, summed back onto the pixels it was taken from
            grad_cols = (g @ _weight_matrix(weight).t()).view(n, oh, ow, 3, 3, c)
            padded = grad.new_zeros(n, h + 2, w + 2, c)
            for i in range(3):
                for j in range(3):
                    padded[:, i:i + s * oh:s, j:j + s * ow:s] += grad_cols[:, :, :, i, j]
            grad_x = _in_format(padded[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2), ctx.channels_last)
        if ctx.needs_input_grad[1]:
            grad_w = (cols.t() @ g).view(3, 3, c, k).permute(3, 2, 0, 1)
        return grad_x, grad_w, None


def _covered(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Inputs this module's algorithms handle; everything else goes through ``nn.Conv2d.forward``."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.numel() > 0 and x.dtype in (torch.float32, torch.float64)
            and x.dtype == weight.dtype and not torch.is_autocast_enabled("cpu"))


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 ``nn.Conv2d`` that convolves by Winograd's algorithm on CPU.

    Same parameters and state dict as ``nn.Conv2d``. Inputs off the CPU, in half precision or under autocast
    go through ``nn.Conv2d.forward`` unchanged (GPU libraries choose their own algorithm). The tile is 4
    (F(4x4, 3x3)) except on feature maps of at most 2x2, where F(2x2, 3x3) wastes less padding; a 1x1
    feature map meets only the kernel's centre, and is convolved with it alone.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _covered(x, self.weight):
            return super().forward(x)
        if x.shape[2:] == (1, 1):  # only the centre tap meets the image: a 1x1 convolution, exactly
            return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        y = _WinogradConv3x3.apply(x, self.weight, 2 if max(x.shape[2:]) <= 2 else 4)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class GemmConv2d(nn.Conv2d):
    """A 3x3, stride-2, padding-1 ``nn.Conv2d`` that convolves onto maps of at most ``max_output`` x
    ``max_output`` by one GEMM over the unfolded input on CPU; larger maps, GPUs, half precision and
    autocast go through ``nn.Conv2d.forward``. Same parameters and state dict as ``nn.Conv2d``.

    ``max_output=4`` follows the benchmark host (``benchmarks/cpu_conv.py``, forward + backward, ms, direct
    against GEMM): 256 -> 512 channels onto 2x2 maps (1024 images) 267 against 114, onto 4x4 (512 images)
    268 against 223; 128 -> 256 onto 4x4 (1024 images) 119 against 131, the one case it loses; onto 8x8 and
    larger, direct convolution was faster.
    """

    max_output = 4

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=bias, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _covered(x, self.weight) or max(x.shape[2:]) > 2 * self.max_output:
            return super().forward(x)
        y = _GemmConv3x3.apply(x, self.weight, 2)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def _plain_3x3(conv: nn.Module, stride: int) -> bool:
    """A 3x3 ``nn.Conv2d`` (not a subclass) with padding 1 and nothing attached: no hooks (they would not
    follow the swap) and a plain weight parameter (not one of weight or spectral norm's)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (stride, stride)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and isinstance(conv._parameters.get("weight"), nn.Parameter)
            and not (conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks
                     or conv._backward_pre_hooks))


def _swap(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    new = cls(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta")
    new.weight = conv.weight  # the same parameter objects: an optimizer built before keeps working
    new.bias = conv.bias
    new.train(conv.training)
    return new


def use_cpu_convolutions(module: nn.Module, min_channels: int | None = None) -> int:
    """Swap, in place, every plain 3x3 ``nn.Conv2d`` (padding 1, no groups or dilation) in ``module`` with at
    least ``min_channels`` input and output channels: stride 1 for a :class:`WinogradConv2d`, stride 2 for a
    :class:`GemmConv2d`. Returns how many were swapped.

    The default follows the benchmark host (``benchmarks/cpu_conv.py``, forward + backward, ms, direct against
    Winograd): stride 1 from 64 channels where the compiled transforms are available (64 channels at 32x32, 512
    images: 369 against 267; at 16x16, 1024 images: 174 against 136), from 128 where they are not (with torch's
    transforms, 64 channels at 32x32 ran 369 against 393; 128 at 16x16 350 against 234, 256 at 8x8 339 against
    171, 512 at 4x4 473 against 145); stride 2 from 128 channels. An explicit ``min_channels`` applies to both.
    """
    if min_channels is None:
        return _swap_convolutions(module, 64 if kernels() is not None else 128, 128)
    return _swap_convolutions(module, min_channels, min_channels)


def _swap_convolutions(module: nn.Module, winograd_channels: int, gemm_channels: int) -> int:
    swapped = 0
    for name, child in list(module.named_children()):
        channels = min(child.in_channels, child.out_channels) if isinstance(child, nn.Conv2d) else 0
        if channels >= winograd_channels and _plain_3x3(child, 1):
            setattr(module, name, _swap(child, WinogradConv2d))
            swapped += 1
        elif channels >= gemm_channels and _plain_3x3(child, 2):
            setattr(module, name, _swap(child, GemmConv2d))
            swapped += 1
        else:
            swapped += _swap_convolutions(child, winograd_channels, gemm_channels)
    return swapped
