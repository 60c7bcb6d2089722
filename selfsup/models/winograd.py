"""Winograd convolution for 3x3 stride-1 layers on CPU.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): a 3x3 convolution computed
tile by tile as ``Y = A^T [(G g G^T) * (B^T d B)] A`` needs ``(m + 2)^2`` multiplications per ``m x m``
output tile instead of ``9 m^2``. With ``m = 4`` that is 2.25 multiplications per output instead of 9.
Written as matrices, the ``(m + 2)^2`` elementwise products over channels become as many batched GEMMs, and
the three passes of training (forward, input gradient, weight gradient) all run in the Winograd domain.

GPU libraries pick Winograd themselves (cuDNN does); torch's CPU convolutions (oneDNN) always convolve
directly, and at the small spatial sizes of a ResNet's later stages they run well below the matmul peak.
On the 2-core benchmark host, forward + backward of a ResNet-18 (CIFAR stem, 32 px, 512 images) took
7.2 s directly and 5.1 s with the convolutions of at least 128 channels in Winograd form
(``benchmarks/README.md``, round 5).

The arithmetic differs from direct convolution by rounding only: outputs and gradients agree to about
1e-5 relative to their largest value in float32 (``m = 4``; ``m = 2`` about 3e-6). The transforms are
exact; ``tests/test_winograd.py`` checks them in float64 against ``torch.nn.functional.conv2d``.

:class:`WinogradConv2d` is an ``nn.Conv2d`` with the same parameters and state dict. It falls back to
``nn.Conv2d.forward`` for every input it does not cover: a GPU tensor, half precision, or autocast.
:func:`use_winograd` swaps it into a model in place; ``SSLMethod`` does this when it runs on a CPU
(``winograd: true``, the default).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

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
    bt, g, at = (torch.tensor(a, dtype=torch.float64) for a in _TRANSFORMS[tile])
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
            out[:, :r0].zero_()
            out[:, r1:].zero_()
            out[:, r0:r1, :c0].zero_()
            out[:, r0:r1, c1:].zero_()
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
    bb = _matrices(tile, x.dtype)[0]
    return (bb @ _gather_tiles(x, tile)).view(bb.shape[0], n * th * tw, c)


def _output_transform(m: torch.Tensor, tile: int, n: int, h: int, w: int, channels_last: bool) -> torch.Tensor:
    """``A^T M A`` for every tile, assembled into an (N, K, H, W) tensor."""
    k = m.shape[-1]
    th, tw = _tiles(h, w, tile)
    aa = _matrices(tile, m.dtype)[2]
    y = (aa @ m.view(m.shape[0], -1)).view(tile, tile, n, th, tw, k)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * tile, tw * tile, k)[:, :h, :w].permute(0, 3, 1, 2)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _weight_transform(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """``G g G^T`` for every (output, input) channel pair: shape ``((m+2)^2, C, K)``."""
    k, c = weight.shape[:2]
    gg = _matrices(tile, weight.dtype)[1]
    return (gg @ weight.permute(2, 3, 1, 0).reshape(9, c * k)).view(-1, c, k)


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _conv(x: torch.Tensor, weight: torch.Tensor, tile: int) -> torch.Tensor:
    """3x3 convolution, stride 1, padding 1, without autograd."""
    m = torch.bmm(_input_transform(x, tile), _weight_transform(weight, tile))
    return _output_transform(m, tile, x.shape[0], x.shape[2], x.shape[3], _is_channels_last(x))


class _WinogradConv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, tile: int) -> torch.Tensor:
        v = _input_transform(x, tile)
        m = torch.bmm(v, _weight_transform(weight, tile))
        ctx.save_for_backward(v, weight)
        ctx.tile, ctx.shape, ctx.channels_last = tile, x.shape, _is_channels_last(x)
        return _output_transform(m, tile, x.shape[0], x.shape[2], x.shape[3], ctx.channels_last)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        v, weight = ctx.saved_tensors
        tile, (n, c, h, w) = ctx.tile, ctx.shape
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # the input gradient is the convolution with the flipped, transposed kernel
            grad_x = _conv(grad, weight.flip(2, 3).transpose(0, 1), tile)
            grad_x = grad_x.contiguous(memory_format=torch.channels_last if ctx.channels_last
                                       else torch.contiguous_format)
        if ctx.needs_input_grad[1]:  # adjoints of the output and weight transforms, around dU = V^T dM
            k = grad.shape[1]
            th, tw = _tiles(h, w, tile)
            g = grad.permute(0, 2, 3, 1)
            if (th * tile, tw * tile) != (h, w):
                g = F.pad(g, (0, 0, 0, tw * tile - w, 0, th * tile - h))
            g = g.reshape(n, th, tile, tw, tile, k).permute(2, 4, 0, 1, 3, 5).reshape(tile * tile, -1)
            bb, gg, aa = _matrices(tile, grad.dtype)
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
        if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dtype != self.weight.dtype
                or torch.is_autocast_enabled("cpu") or x.dim() != 4):
            return super().forward(x)
        if x.shape[2:] == (1, 1):  # only the centre tap meets the image: a 1x1 convolution, exactly
            return F.conv2d(x, self.weight[:, :, 1:2, 1:2], self.bias)
        y = _WinogradConv3x3.apply(x, self.weight, 2 if max(x.shape[2:]) <= 2 else 4)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def _eligible(conv: nn.Module, min_channels: int) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) >= min_channels)


def use_winograd(module: nn.Module, min_channels: int = 128) -> int:
    """Replace every plain 3x3 stride-1 ``nn.Conv2d`` in ``module`` with at least ``min_channels`` input
    and output channels by a :class:`WinogradConv2d` holding the same parameter objects (an optimizer built
    before keeps working). Returns how many were replaced.

    ``min_channels=128`` follows the benchmark host: there a 64-channel layer at 32x32 ran faster directly
    (361 ms against 424 for forward + backward of 512 images), 128 channels at 16x16 ran 336 against 251 ms,
    256 at 8x8 336 against 174, 512 at 4x4 493 against 146.
    """
    replaced = 0
    for name, child in list(module.named_children()):
        if _eligible(child, min_channels):
            new = WinogradConv2d(child.in_channels, child.out_channels, bias=child.bias is not None, device="meta")
            new.weight = child.weight
            new.bias = child.bias
            new.train(child.training)
            setattr(module, name, new)
            replaced += 1
        else:
            replaced += use_winograd(child, min_channels)
    return replaced
