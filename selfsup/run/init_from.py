"""Start a new run from the encoder weights of a selfsup checkpoint or an export."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from selfsup.checkpoint import CheckpointError, init_encoder_from, load_checkpoint, selfsup_metadata
from selfsup.models.teacher import teachers


WEIGHTS = ("encoder", "all")


class InitFrom(L.Callback):
    """Start a new run from the weights of ``path`` when fit sets up, before any wrapping.

    Args:
        path: a selfsup ``.ckpt``, an export directory or its ``model.safetensors``, or a timm model's weights
            file (``.safetensors``, or ``.pth``/``.bin`` saved with ``torch.save``: its classifier dropped,
            input channels and position embeddings adapted by timm); ``None`` does nothing.
        weights: ``encoder`` loads the checkpoint's representation (its student or its teacher encoder) into
            ``pl_module.encoder`` and resets the EMA teachers to it, the heads staying fresh; ``all`` loads
            every weight of a selfsup ``.ckpt`` of the same method (encoder, heads, EMA teacher, centres),
            for a further phase of the same training such as DINOv3's Gram anchoring. Modules the checkpoint
            lacks entirely (a Gram teacher) keep their own initialisation; anything else missing, or a
            weight the model has no place for, is an error.
        freeze_encoder_steps: a head warm-up: for the first this many optimizer steps the student's encoder
            gets no update (its gradients are dropped on every rank before the step), so that randomly
            initialised heads do not wreck pretrained features; the EMA teacher's encoder, a copy of it, stays
            put too. Counted from the run's step 0, so a resumed run keeps it.

    Different from ``--ckpt_path``, which resumes a run (optimizer, schedule and step included): on resume
    the restored weights win and this does nothing. A run started with ``init_from`` builds its optimizer
    and schedules afresh.
    """

    def __init__(self, path: str | None = None, weights: str = "encoder", freeze_encoder_steps: int = 0):
        if weights not in WEIGHTS:
            raise ValueError(f"init_from.weights={weights!r} must be one of {WEIGHTS}")
        if freeze_encoder_steps < 0:
            raise ValueError(f"init_from.freeze_encoder_steps={freeze_encoder_steps} must be >= 0")
        self.path, self.weights, self.freeze_encoder_steps = path, weights, freeze_encoder_steps

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.path is not None and trainer.global_step < self.freeze_encoder_steps:
            for p in pl_module.encoder.parameters():
                p.grad = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.path is None or trainer.ckpt_path:
            return
        if self.weights == "all":
            load_all_weights(pl_module, self.path)
            rank_zero_info(f"[selfsup] every weight initialised from {self.path}")
            return
        init_encoder_from(pl_module.encoder, self.path)
        for _, teacher in teachers(pl_module):  # an EMA teacher starts from the student it follows
            teacher.reset()
        rank_zero_info(f"[selfsup] encoder initialised from {self.path}")


def load_all_weights(module: L.LightningModule, path: str) -> None:
    """Every weight of the selfsup checkpoint ``path`` into ``module`` (see :class:`InitFrom`)."""
    checkpoint = load_checkpoint(path)
    meta = selfsup_metadata(checkpoint, path)
    method = f"{type(module).__module__}.{type(module).__qualname__}"
    if meta.get("method", method) != method:
        raise CheckpointError(f"init_from={path!r} was written by {meta['method']} but the model is {method}; "
                              "init_from.weights: all needs the same method (use weights: encoder)")
    state = checkpoint["state_dict"]
    result = module.load_state_dict(state, strict=False)
    present = {key.split(".")[0] for key in state}
    missing = [key for key in result.missing_keys if key.split(".")[0] in present]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"init_from={path!r} does not fit the model: missing {missing[:4]}, unexpected "
                              f"{result.unexpected_keys[:4]} (same method, other sizes or options?)")
