"""Frozen-feature extraction: run an encoder once over a labelled loader, on one process or sharded.

Under DDP every rank extracts its own share of the images and the features are gathered, so the
work is done once, not once per rank. Features stay on the device they were computed on (a full
feature matrix reaches the CPU only when the device is the CPU).

When the model's parameters are sharded (FSDP), the model may only run inside its wrapper and on
every rank together: :func:`model_call` gives that call, and sharded extraction runs it the same
number of times on every rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from selfsup.distributed import gather_rows, is_distributed, rank, world_size
from selfsup.models.teacher import representation_encoder


@contextlib.contextmanager
def eval_mode(module: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """``module`` in eval mode (or, ``training=True``, train mode) for the block, then back to its mode."""
    was_training = module.training
    module.train(training)
    try:
        yield module
    finally:
        module.train(was_training)


def shard_loader(loader: DataLoader) -> DataLoader:
    """``loader`` over this rank's share of its dataset: indices ``rank, rank + W, ...``.

    Every rank gets ``ceil(N / W)`` indices (the last ones wrap around to the start and are dropped
    again after the gather), so every rank runs the same number of batches.
    """
    n, world = len(loader.dataset), world_size()
    indices = [(rank() + i * world) % n for i in range(math.ceil(n / world))]
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def _gather_in_order(features: Tensor, labels: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's rows, in dataset order, each index once (the wrap-around padding dropped)."""
    features, labels, index = gather_rows(features), gather_rows(labels), gather_rows(index)
    index, order = index.sort(stable=True)
    first = torch.ones_like(index, dtype=torch.bool)
    first[1:] = index[1:] != index[:-1]
    keep = order[first]
    return features[keep], labels[keep]


class RawPixels(nn.Module):
    """The trivial baseline "encoder": an image's normalised pixels, flattened, after averaging them down to
    at most ``max_side`` x ``max_side`` per channel (area averaging; smaller images as they are). Scored like
    an encoder, it shows whether pretraining beat the pixels themselves."""

    def __init__(self, max_side: int = 32):
        super().__init__()
        if max_side < 1:
            raise ValueError(f"max_side={max_side} must be at least 1")
        self.max_side = max_side

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if max(h, w) > self.max_side:
            x = F.adaptive_avg_pool2d(x.float(), (min(h, self.max_side), min(w, self.max_side)))
        return x.flatten(1)


@torch.no_grad()
def extract_features(encoder: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                     bf16: bool = False, shard: bool = False, forward: Callable[[Tensor], Tensor] | None = None,
                     image_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Pooled float32 features and labels, on ``device``, for every readable image of ``loader`` (eval mode).

    Args:
        shard: under DDP, each rank extracts its share and the results are gathered (every rank must
            call this); outside a process group it changes nothing.
        forward: what runs on a batch instead of ``encoder`` (e.g. the FSDP wrapper, :func:`model_call`).
            It then runs the same number of times on every rank: a batch with no readable image runs it
            on one black ``image_size`` image whose features are dropped.
    """
    device = torch.device(device)
    sharded = shard and is_distributed()
    if sharded:
        loader = shard_loader(loader)
    run = forward or encoder
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    feats, labels, index = [], [], []
    with eval_mode(encoder), autocast:
        for batch in loader:
            if len(batch) == 0:
                if forward is not None and image_size:
                    channels = getattr(encoder, "in_chans", 3)
                    forward(torch.zeros(1, channels, image_size, image_size, device=device))
                continue
            feats.append(run(batch.views[0].to(device, non_blocking=True)).float())
            labels.append(batch.labels.to(device))
            index.append(batch.index.to(device))
    if feats:
        x, y, i = torch.cat(feats), torch.cat(labels), torch.cat(index)
    else:
        x = torch.empty(0, 0, device=device)
        y = i = torch.empty(0, dtype=torch.long, device=device)
    if sharded:
        x, y = _gather_in_order(x, y, i)
    if len(x) == 0:
        raise ValueError("no readable images to extract features from")
    return x, y


def shards_parameters(trainer: Any, pl_module: nn.Module | None = None) -> bool:
    """Whether the model's parameters are sharded over the ranks (FSDP, FSDP2/ModelParallel, DeepSpeed
    ZeRO-3): then the model runs only inside its wrapper, on every rank together."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    strategy = getattr(trainer, "strategy", None)
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or getattr(strategy, "zero_stage_3", False):
        return True
    return pl_module is not None and any(isinstance(p, DTensor) for p in pl_module.parameters())


def representation(trainer: Any, pl_module: nn.Module) -> tuple[nn.Module, Callable[..., Any]]:
    """The encoder the callbacks score and the callable that runs it: an :class:`SSLMethod`'s
    representation (its student encoder or the EMA teacher's copy, ``represent``), else ``pl_module.encoder``."""
    if hasattr(pl_module, "represent"):
        return representation_encoder(pl_module), model_call(trainer, pl_module, "represent")
    return pl_module.encoder, model_call(trainer, pl_module, "encoder")


def model_call(trainer: Any, pl_module: nn.Module, attribute: str) -> Callable[..., Any]:
    """``pl_module.<attribute>`` (a method or a submodule such as ``encoder``) as a callable.

    Under a sharding strategy the call goes through the wrapped model's ``forward`` (Lightning's forward
    redirection, as it does for ``training_step``), so FSDP gathers the parameters it needs; every rank must
    then make the same calls. Otherwise it is the attribute itself: no collective runs inside, so one rank
    may call it alone (DDP's forward would broadcast buffers: it is not used).
    """
    target = getattr(pl_module, attribute)
    if not shards_parameters(trainer, pl_module):
        return target
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    def call(*args: Any, **kwargs: Any) -> Any:
        return _ForwardRedirection()(trainer.strategy.model, pl_module, attribute, *args, **kwargs)

    return call


@torch.no_grad()
def recalibrate_batchnorm(encoder: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                          max_batches: int = 20) -> nn.Module:
    """Re-estimate BatchNorm running statistics from ``loader`` images (no labels, no gradient).

    A randomly initialised network has no BatchNorm statistics, so in eval mode its activations are
    not normalised at all; scoring it that way would flatter any pretrained encoder. This gives the
    random baseline the same benefit a trained network has.
    """
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return encoder
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    try:
        with eval_mode(encoder, training=True):  # BatchNorm updates its statistics in train mode only
            for i, batch in enumerate(loader):
                if i >= max_batches:
                    break
                if len(batch):
                    encoder(batch.views[0].to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
    return encoder
