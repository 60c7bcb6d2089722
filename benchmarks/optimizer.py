"""Optimizer step alone: torch's per-tensor loop, foreach and fused implementations of AdamW and SGD.

selfsup builds AdamW and SGD fused (``SSLMethod.configure_optimizers``); this measures why, on the
parameters of the issues' reference models, with random gradients and no forward or backward.

    python benchmarks/optimizer.py                     # MAE's ViT + decoder (issue 3) and SimCLR's ResNet-18
    python benchmarks/optimizer.py --steps 50 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

from selfsup.methods.mae import MAE  # noqa: E402
from selfsup.methods.simclr import SimCLR  # noqa: E402
from selfsup.models.encoder import Encoder  # noqa: E402

IMPLEMENTATIONS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def models() -> dict[str, torch.nn.Module]:
    vit = Encoder("vit_tiny_patch16_224", image_size=32, patch_size=4, in_chans=1,
                  model_kwargs={"embed_dim": 192, "depth": 6, "num_heads": 3})
    return {"mae vit d192 x6 + decoder": MAE(vit, decoder_width=128, decoder_depth=4, decoder_heads=4),
            "simclr resnet18 cifar stem": SimCLR(Encoder("resnet18", cifar_stem=True), proj_hidden_dim=512)}


def time_optimizer(params: list[torch.Tensor], name: str, implementation: str, steps: int) -> float:
    """Milliseconds per ``step()`` after 3 warm-up steps."""
    options = IMPLEMENTATIONS[implementation]
    optimizer = (torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **options) if name == "adamw"
                 else torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=1e-4, **options))
    for _ in range(3):
        optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for model_name, model in models().items():
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        count = sum(p.numel() for p in params)
        for optimizer in ("adamw", "sgd"):
            times = {impl: time_optimizer(params, optimizer, impl, args.steps) for impl in IMPLEMENTATIONS}
            print(f"{model_name:<28} {count / 1e6:5.1f} M params  {optimizer:<5} "
                  + "  ".join(f"{impl} {ms:6.2f} ms" for impl, ms in times.items()), flush=True)
            record({"name": f"optimizer step {optimizer} {model_name}", "parameters": count,
                    "ms_per_step": {impl: round(ms, 3) for impl, ms in times.items()}, "threads": args.threads})


if __name__ == "__main__":
    main()
