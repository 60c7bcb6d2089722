"""Same-host baselines: each issue's reference configuration built from lightly's blocks.

The issues' targets are "1.2x of an implementation built from another library's building blocks, on this
machine kind". Host speed varies (this 2-core VM measures 150-320 GFLOP/s fp32 from run to run), so this
script measures such implementations on the machine at hand, in the same harness as our benchmarks:
lightly's losses, heads and masked ViT around a timm backbone, written as lightly's examples write them
(views encoded one by one, no chunking). The data path is selfsup's loader with the same views for both, so
the difference measured is the model step.

Needs ``pip install lightly --no-deps`` (lightly is not a selfsup dependency). Run beside our benchmarks:

    python benchmarks/baselines.py --methods simclr,swav,mae,simmim --steps 3
    python benchmarks/throughput.py --steps 3 --precisions fp32 --memory-formats channels_last --micro-batch-size 64
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (count_flops, endless_batches, matmul_peak_gflops,  # noqa: E402
                    report, time_steps)

from selfsup.data.datamodule import SSLDataModule  # noqa: E402
from selfsup.data.transforms import Crops, MaskedImageView, MultiCropViews  # noqa: E402

try:
    from lightly.loss import NTXentLoss, SwaVLoss
    from lightly.models import utils
    from lightly.models.modules import (MAEDecoderTIMM, MaskedVisionTransformerTIMM, SimCLRProjectionHead,
                                        SwaVProjectionHead, SwaVPrototypes)
except ImportError as error:  # pragma: no cover - an optional tool
    raise SystemExit(f"benchmarks/baselines.py needs lightly: pip install lightly --no-deps ({error})") from error


def resnet18_cifar() -> nn.Module:
    model = timm.create_model("resnet18", num_classes=0)
    model.conv1, model.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    return model.to(memory_format=torch.channels_last)


def rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)


def simclr():
    backbone, head, criterion = resnet18_cifar(), SimCLRProjectionHead(512, 512, 128), NTXentLoss(0.1)
    params = [*backbone.parameters(), *head.parameters()]

    def loss(batch):
        return criterion(*(head(backbone(rgb(view))) for view in batch.views))

    return params, loss, SSLDataModule(image_size=32, batch_size=256, num_workers=2)


def swav():
    backbone, head, prototypes = resnet18_cifar(), SwaVProjectionHead(512, 2048, 128), SwaVPrototypes(128, 512)
    criterion = SwaVLoss()
    params = [*backbone.parameters(), *head.parameters(), *prototypes.parameters()]
    views = MultiCropViews(Crops(2, 32, (0.14, 1.0)), Crops(4, 16, (0.05, 0.14)), blur_p=0.5)

    def loss(batch):
        prototypes.normalize()
        outputs = [prototypes(F.normalize(head(backbone(rgb(view))), dim=1)) for view in batch.views]
        return criterion(outputs[:2], outputs[2:])

    return params, loss, SSLDataModule(views=views, image_size=32, batch_size=256, num_workers=2)


def vit() -> MaskedVisionTransformerTIMM:
    return MaskedVisionTransformerTIMM(vit=timm.models.VisionTransformer(
        img_size=32, patch_size=4, in_chans=1, embed_dim=192, depth=6, num_heads=3))


def mae():
    backbone = vit()
    decoder = MAEDecoderTIMM(num_patches=64, patch_size=4, in_chans=1, embed_dim=192, decoder_embed_dim=128,
                             decoder_depth=4, decoder_num_heads=4)
    params = [*backbone.parameters(), *decoder.parameters()]

    def loss(batch):
        images = batch.views[0]
        idx_keep, idx_mask = utils.random_token_mask(size=(len(images), 65), mask_ratio=0.75)
        encoded = decoder.embed(backbone.encode(images=images, idx_keep=idx_keep))
        tokens = utils.set_at_index(utils.repeat_token(decoder.mask_token, (len(images), 65)), idx_keep, encoded)
        predictions = decoder.predict(utils.get_at_index(decoder.decode(tokens), idx_mask))
        target = utils.get_at_index(utils.patchify(images, 4), idx_mask - 1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return F.mse_loss(predictions, target)

    data = SSLDataModule(views=MaskedImageView(), image_size=32, batch_size=256, num_workers=2)
    return params, loss, data


def simmim():
    backbone, head = vit(), nn.Linear(192, 16)
    params = [*backbone.parameters(), *head.parameters()]
    blocks, masked_blocks = 16, math.ceil(0.6 * 16)  # 8 px mask blocks on the 8 x 8 grid of 4 px patches

    def loss(batch):
        images = batch.views[0]
        chosen = torch.rand(len(images), blocks).argsort(1)[:, :masked_blocks]
        mask = torch.zeros(len(images), blocks).scatter_(1, chosen, 1.0).view(-1, 4, 4)
        mask = mask.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1)
        idx_mask = mask.nonzero()[:, 1].view(len(images), -1) + 1
        encoded = backbone.encode(images=images, idx_mask=idx_mask)
        predictions = head(utils.get_at_index(encoded, idx_mask))
        return F.l1_loss(predictions, utils.get_at_index(utils.patchify(images, 4), idx_mask - 1))

    data = SSLDataModule(views=MaskedImageView(crop_scale=(0.67, 1.0)), image_size=32, batch_size=256,
                         num_workers=2)
    return params, loss, data


BASELINES = {"simclr": simclr, "swav": swav, "mae": mae, "simmim": simmim}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(BASELINES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.methods.split(","):
        torch.manual_seed(0)
        params, loss, data = BASELINES[name]()
        optimizer = (torch.optim.SGD(params, lr=0.01, momentum=0.9) if name in ("simclr", "swav") else
                     torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05))

        def step(batch, loss=loss, optimizer=optimizer, clip=name == "simmim"):
            loss(batch).backward()
            if clip:
                nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        data.setup("fit")
        batches, fixed = endless_batches(data.train_dataloader(), data.prepare_batch)
        flops, peak = count_flops(lambda: step(fixed)), matmul_peak_gflops()
        seconds = time_steps(step, batches, args.steps)
        report(f"baseline (lightly blocks) {name} fp32 with data", data.batch_size, seconds, flops, peak,
               batch_size=data.batch_size, threads=args.threads, workers=data.num_workers)


if __name__ == "__main__":
    main()
