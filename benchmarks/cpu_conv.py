"""One convolution layer, forward + backward: torch's direct convolution against selfsup's CPU algorithms.

``selfsup.models.cpu_conv`` runs 3x3 stride-1 layers by Winograd's algorithm and 3x3 stride-2 layers onto
small maps as one GEMM; this times each ResNet-18 layer shape of the issues' reference configurations
(32 px with the CIFAR stem; SwAV's local crops at 16 px), channels-last, fp32, on the same weights and input.

    python benchmarks/cpu_conv.py                # every shape, best of 3 after 2 warm-up passes
    python benchmarks/cpu_conv.py --repeats 5 --threads 1
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_ms, layer_arguments, record  # noqa: E402

from selfsup.models.cpu_conv import use_cpu_convolutions  # noqa: E402

# (images, in channels, out channels, input size, stride): ResNet-18 layers at 32 px, and at 16 px for the
# 1024 local crops of SwAV's reference configuration where they differ
SHAPES = [(512, 64, 64, 32, 1), (512, 128, 128, 16, 1), (512, 256, 256, 8, 1), (512, 512, 512, 4, 1),
          (1024, 512, 512, 2, 1), (1024, 256, 512, 4, 2), (512, 256, 512, 8, 2), (1024, 128, 256, 8, 2),
          (512, 128, 256, 16, 2)]


def main() -> None:
    args = layer_arguments(__doc__)
    torch.manual_seed(0)
    for n, c, k, size, stride in SHAPES:
        direct = nn.Conv2d(c, k, 3, stride=stride, padding=1, bias=False)
        ours = nn.Sequential(nn.Conv2d(c, k, 3, stride=stride, padding=1, bias=False))
        ours[0].weight = direct.weight
        use_cpu_convolutions(ours, min_channels=1)
        out = (size - 1) // stride + 1
        x = torch.randn(n, c, size, size).to(memory_format=torch.channels_last).requires_grad_()
        grad = torch.randn(n, k, out, out).to(memory_format=torch.channels_last)
        gflop = 3 * 2 * n * c * k * 9 * out * out / 1e9  # forward, input and weight gradient, direct
        ms = {name: best_ms(lambda m=m: torch.autograd.grad(m(x), (x, direct.weight), grad), args.repeats)
              for name, m in (("direct", direct), ("selfsup", ours))}
        name = f"conv3x3 {c}->{k} stride {stride} {size}px x{n}"
        algorithm = type(ours[0]).__name__
        print(f"{name:<36} direct {ms['direct']:6.0f} ms ({gflop / ms['direct'] * 1e3:4.0f} GFLOP/s)   "
              f"{algorithm:<14} {ms['selfsup']:6.0f} ms ({gflop / ms['selfsup'] * 1e3:4.0f} model GFLOP/s)",
              flush=True)
        record({"name": name, "direct_ms": round(ms["direct"], 1), "selfsup_ms": round(ms["selfsup"], 1),
                "algorithm": algorithm, "threads": args.threads})


if __name__ == "__main__":
    main()
