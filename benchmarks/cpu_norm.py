"""One BatchNorm layer with what follows it, forward + backward: torch's operators against selfsup's fused kernels.

``selfsup.models.cpu_norm`` computes BatchNorm, the ReLU and (at the end of a residual block) the shortcut
add in one pass over memory instead of three, forward and backward. This times each ResNet-18 activation
shape of the issues' reference configurations (32 px with the CIFAR stem, 512 images: two views of 256; SwAV's
1024 local crops at 16 px), channels-last, fp32, in the three forms a ResNet uses: BatchNorm + ReLU (stem and
first convolution of a block), BatchNorm + add + ReLU (end of a block), BatchNorm alone (downsampling shortcut).

    python benchmarks/cpu_norm.py                # every shape, best of 3 after 2 warm-up passes
    python benchmarks/cpu_norm.py --repeats 5 --threads 1
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_ms, layer_arguments, record  # noqa: E402

from selfsup.models.cpu_norm import FusedBatchNorm2d, kernels  # noqa: E402

# (images, channels, size): ResNet-18 activations at 32 px, and at 16 px for SwAV's local crops
SHAPES = [(512, 64, 32), (1024, 64, 16), (512, 128, 16), (1024, 128, 8), (512, 256, 8), (1024, 256, 4),
          (512, 512, 4), (1024, 512, 2)]
FORMS = {"bn+relu": (True, False), "bn+add+relu": (True, True), "bn": (False, False)}


def main() -> None:
    args = layer_arguments(__doc__)
    if kernels() is None:
        sys.exit("the fused kernels could not be built (see the warning above)")
    torch.manual_seed(0)
    total = {"torch": 0.0, "fused": 0.0}
    for n, c, size in SHAPES:
        x = torch.randn(n, c, size, size).to(memory_format=torch.channels_last).requires_grad_()
        residual = torch.randn_like(x).requires_grad_()
        grad = torch.randn_like(x)
        for form, (relu, add) in FORMS.items():
            fused = FusedBatchNorm2d(c, relu=relu)
            inputs = (x, residual, fused.weight, fused.bias) if add else (x, fused.weight, fused.bias)

            def torch_ops():
                y = F.batch_norm(x, None, None, fused.weight, fused.bias, training=True)
                y = y + residual if add else y
                return torch.autograd.grad(F.relu(y) if relu else y, inputs, grad)

            def fused_kernels():
                return torch.autograd.grad(fused(x, residual if add else None), inputs, grad)

            ms = {"torch": best_ms(torch_ops, args.repeats), "fused": best_ms(fused_kernels, args.repeats)}
            for key in total:
                total[key] += ms[key]
            mb = x.numel() * 4 / 2**20
            name = f"{form} {c}ch {size}px x{n}"
            print(f"{name:<28} ({mb:4.0f} MB)  torch {ms['torch']:6.1f} ms   fused {ms['fused']:6.1f} ms   "
                  f"{ms['torch'] / ms['fused']:4.2f}x", flush=True)
            record({"name": f"batchnorm {name}", "torch_ms": round(ms["torch"], 1),
                    "fused_ms": round(ms["fused"], 1), "activation_mb": round(mb, 1), "threads": args.threads})
    print(f"{'all shapes and forms':<40}  torch {total['torch']:6.0f} ms   fused {total['fused']:6.0f} ms   "
          f"{total['torch'] / total['fused']:4.2f}x")


if __name__ == "__main__":
    main()
