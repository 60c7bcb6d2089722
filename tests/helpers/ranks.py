"""A callback for multi-process fits: records on every rank whether the ranks hold identical weights."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist


class RecordRanks(L.Callback):
    """At the end of training, gather every rank's parameters and buffers and write
    ``<out_dir>/rank<r>.json``: whether they are bit-identical across ranks, the step, and this rank's
    count of unreadable images met."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = [t.detach().float().flatten() for t in pl_module.state_dict().values() if t.is_floating_point()]
        flat = torch.cat(state)
        gathered = [torch.empty_like(flat) for _ in range(trainer.world_size)]
        dist.all_gather(gathered, flat)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "step": trainer.global_step,
                  "identical": all(torch.equal(gathered[0], g) for g in gathered),
                  "finite": bool(torch.isfinite(flat).all()), "skipped_images": _data_health(trainer).skipped_images}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _data_health(trainer: L.Trainer):
    from selfsup.run import DataHealth

    return next(c for c in trainer.callbacks if isinstance(c, DataHealth))
