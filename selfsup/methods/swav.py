"""SwAV: predict the cluster assignment (code) of one crop from every other crop of the same image.

Reference: Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020 (75.3% ImageNet linear, ResNet-50, multi-crop, 800 epochs).
Paper defaults: projector 2048-2048-128 with BatchNorm, output L2-normalised; 3000 unit-norm
prototypes, frozen for the first epoch (313 steps at batch 4096); Sinkhorn-Knopp with epsilon 0.05
and 3 iterations, codes from the two 224 px crops; swapped prediction with temperature 0.1;
multi-crop 2x224 + 6x96; LARS, lr 4.8 at batch 4096 (cosine to 0.0048), weight decay 1e-6,
SyncBatchNorm. At batch 256 a queue of 3840 past embeddings, filled from epoch 15, joins the
Sinkhorn batch.

Per step (the paper's pseudo-code):
    z = normalize(projector(encoder(crops)))           every crop, one encoder pass per resolution
    scores = prototypes(z)                              cosine similarity to each prototype
    q = sinkhorn(scores of the crops_for_assign [+ queue])   codes, equipartitioned over the global batch
    loss = mean over (assign crop a, other crop v) of  -sum q_a * log softmax(scores_v / temperature)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from selfsup.data.datamodule import Batch
from selfsup.distributed import all_reduce_max, all_reduce_sum, gather, rank, world_size
from selfsup.methods.base import SSLMethod
from selfsup.methods.common import check_arg, full_precision
from selfsup.models.encoder import Encoder
from selfsup.models.heads import MLP
from selfsup.models.prototypes import Prototypes


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05, weights: Tensor | None = None,
             max_score: float | None = 1.0) -> Tensor:
    """Sinkhorn-Knopp codes ``(N, K)`` for this rank's ``N`` rows of prototype scores, in float32.

    Alternately rescales ``exp(scores / epsilon)`` so that every prototype receives an equal share
    of the (global) batch and every sample distributes a total of one. Under DDP the row sums and
    totals are all-reduced, so each rank gets exactly its rows of the codes that one process would
    compute on the global batch. Each returned row sums to 1.

    ``weights`` ``(N,)`` of 0 and 1 leaves rows out (their codes are 0), as if they were not there: DINOv2
    balances only the masked patch tokens, and a boolean index would cost a host synchronisation.
    ``max_score`` bounds the scores (1 for cosine similarities) so that ``exp`` cannot overflow; ``None``
    uses the global maximum instead (one more all-reduce), for unnormalised logits.
    """
    with full_precision(scores.device.type):
        scores = scores.float()
        top = all_reduce_max(scores.max().detach().clone()) if max_score is None else max_score
        # the same shift on every rank keeps exp() <= 1 without changing the normalised result
        q = torch.exp((scores - top) / epsilon).T                                # (K, N)
        if weights is not None:
            q = q * weights.to(q.dtype)
        num_prototypes = q.shape[0]
        count = float(q.shape[1]) if weights is None else weights.float().sum()
        num_samples = all_reduce_sum(torch.as_tensor(count, dtype=q.dtype, device=q.device).clone()).clamp_min(1)
        q /= all_reduce_sum(q.sum()).clamp_min(torch.finfo(q.dtype).tiny)
        for _ in range(iterations):
            q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(torch.finfo(q.dtype).tiny)  # prototype: 1/K
            q /= num_prototypes
            q /= q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)  # each sample: 1/N
            q /= num_samples
        return (q * num_samples).T


def swav_loss(scores: Tensor, crops_for_assign: tuple[int, ...], temperature: float = 0.1,
              epsilon: float = 0.05, sinkhorn_iterations: int = 3,
              queue_scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Swapped prediction loss and the codes ``(A, B, K)`` of the assigned crops.

    ``scores`` ``(V, B, K)``: this rank's prototype scores of every crop. ``queue_scores``
    ``(A, Q, K)``: this rank's share of the queue, scored by the current prototypes, one per
    assigned crop; they join Sinkhorn as extra samples but not the loss. The code of each crop in
    ``crops_for_assign`` is predicted from every other crop; the loss averages over both.
    """
    num_crops, batch = scores.shape[:2]
    with full_precision(scores.device.type):
        scores = scores.float()
        codes = []
        for i, crop in enumerate(crops_for_assign):
            assign = scores[crop].detach()
            if queue_scores is not None:
                assign = torch.cat([queue_scores[i].float(), assign])
            codes.append(sinkhorn(assign, sinkhorn_iterations, epsilon)[-batch:])
        log_predictions = F.log_softmax(scores / temperature, dim=-1)               # (V, B, K)
        loss = scores.new_zeros(())
        for code, crop in zip(codes, crops_for_assign):
            others = [v for v in range(num_crops) if v != crop]
            loss = loss - (code * log_predictions[others]).sum(-1).mean()
        return loss / len(crops_for_assign), torch.stack(codes)


@torch.no_grad()
def code_statistics(codes: Tensor, scores: Tensor, temperature: float) -> dict[str, Tensor]:
    """Collapse signals from codes ``(N, K)`` and the prototype scores ``(N, K)`` of the same crop.

    ``code_entropy``: entropy of the mean hard (argmax) code; ``prototypes_used``: prototypes that are
    some sample's argmax (soft codes are equipartitioned by construction, so their mean says nothing).
    ``prediction_entropy``: mean entropy of the predictions ``softmax(scores / temperature)``; at
    ln(K) every prediction is uniform, the collapse where the loss sits at ln(K)."""
    hard = codes.argmax(dim=1)
    share = torch.bincount(hard, minlength=codes.shape[1]).float() / len(hard)
    log_p = F.log_softmax(scores.float() / temperature, dim=1)
    return {"code_entropy": -(share * share.clamp_min(1e-12).log()).sum(),
            "prototypes_used": (share > 0).sum().float(),
            "prediction_entropy": -(log_p.exp() * log_p).sum(1).mean()}


class SwAV(SSLMethod):
    """SwAV: ``encoder -> projector -> L2-normalise -> prototypes -> swapped prediction of codes``.

    Args:
        encoder: the backbone. For a ViT with multi-crop, use ``dynamic_img_size: true``.
        proj_hidden_dim, proj_dim: projector widths (2-layer MLP with BatchNorm).
        num_prototypes: number of prototypes (clusters), 3000 for ImageNet.
        temperature: softmax temperature of the predictions.
        epsilon, sinkhorn_iterations: Sinkhorn-Knopp entropy weight and iterations.
        crops_for_assign: indices of the views whose codes are predicted (the global crops come first).
        freeze_prototypes_steps: optimizer steps during which the prototypes do not move.
        queue_length: past embeddings (over all ranks) added to Sinkhorn; 0 turns the queue off.
        queue_start_epoch: the epoch from which the queue is filled; it joins Sinkhorn once full.
        **base: optimizer and schedule settings of :class:`SSLMethod`.
    """

    COLLAPSE_WARNING_INTERVAL = 500  # steps between two "loss stuck at ln(K)" warnings

    def __init__(self, encoder: Encoder, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 num_prototypes: int = 3000, temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, crops_for_assign: tuple[int, ...] = (0, 1),
                 freeze_prototypes_steps: int = 313, queue_length: int = 0, queue_start_epoch: int = 15,
                 **base):
        super().__init__(encoder, **base)
        crops_for_assign = tuple(int(c) for c in crops_for_assign)
        check_arg("temperature", temperature > 0, temperature, "positive")
        check_arg("epsilon", epsilon > 0, epsilon, "positive (the paper uses 0.05)")
        check_arg("sinkhorn_iterations", sinkhorn_iterations >= 1, sinkhorn_iterations, ">= 1")
        check_arg("num_prototypes", num_prototypes >= 2, num_prototypes, ">= 2")
        check_arg("crops_for_assign", len(crops_for_assign) > 0 and min(crops_for_assign) >= 0
                 and len(set(crops_for_assign)) == len(crops_for_assign), crops_for_assign,
                 "distinct non-negative view indices, e.g. [0, 1] for the two global crops")
        check_arg("freeze_prototypes_steps", freeze_prototypes_steps >= 0, freeze_prototypes_steps, ">= 0")
        check_arg("queue_length", queue_length >= 0, queue_length, ">= 0 (0 turns the queue off)")
        check_arg("queue_start_epoch", queue_start_epoch >= 0, queue_start_epoch, ">= 0")
        self.projector = MLP(encoder.embed_dim, proj_hidden_dim, proj_dim, num_layers=2)
        self.prototypes = Prototypes(proj_dim, num_prototypes)
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.crops_for_assign = crops_for_assign
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.queue_length, self.queue_start_epoch = queue_length, queue_start_epoch
        # The queue is a buffer: it lives in every checkpoint, so a resumed run continues it.
        self.register_buffer("queue", torch.zeros(len(crops_for_assign), queue_length, proj_dim)
                             if queue_length else None)
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long) if queue_length else None)
        self._filled: int | None = None  # queue_filled on the host, read once (no sync every step)
        self._last_collapse_check: int | None = None

    # -- the objective ---------------------------------------------------------------------------
    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        self._check_views(batch.views)
        h = self.encode_views(batch.views)
        z = self.projector(torch.cat(h))
        with full_precision(z.device.type):  # unit vectors and cosine scores in float32
            z = F.normalize(z.float(), dim=1)
            scores = self.prototypes(z)
        scores = rearrange(scores, "(v b) k -> v b k", v=len(h))
        embeddings = rearrange(z.detach(), "(v b) d -> v b d", v=len(h))[list(self.crops_for_assign)]
        loss, codes = swav_loss(scores, self.crops_for_assign, self.temperature, self.epsilon,
                                self.sinkhorn_iterations, queue_scores=self._queue_scores())
        if self._queue_active():
            self._enqueue(embeddings)
        self._warn_if_collapsed(loss)
        statistics = code_statistics(codes[0], scores[self.crops_for_assign[0]], self.temperature)
        return {"loss": loss, **statistics, "features": h[0].detach()}

    # -- queue -----------------------------------------------------------------------------------
    def _queue_active(self) -> bool:
        return self.queue is not None and self.current_epoch >= self.queue_start_epoch

    @torch.no_grad()
    def _queue_scores(self) -> Tensor | None:
        """This rank's share of a full queue, scored by the current prototypes; ``None`` until full.

        Every rank holds the same global queue; rank r scores the r-th of ``world_size`` equal slices,
        so the all-reduced Sinkhorn counts each queued embedding once, as one process would."""
        if not self._queue_active() or self._queue_filled() < self.queue_length:
            return None
        share = self.queue_length // world_size()
        queue = self.queue[:, rank() * share:(rank() + 1) * share]
        with full_precision(queue.device.type):
            return self.prototypes(queue.float())

    @torch.no_grad()
    def _enqueue(self, embeddings: Tensor) -> None:
        """Push ``(A, B, D)`` embeddings of every rank (gathered, rank order) to the front of the queue."""
        new = rearrange(gather(rearrange(embeddings, "a b d -> b a d").contiguous()), "n a d -> a n d")
        new = new[:, :self.queue_length].to(self.queue.dtype)
        self.queue.copy_(torch.cat([new, self.queue[:, :self.queue_length - new.shape[1]]], dim=1))
        self._filled = min(self.queue_length, self._queue_filled() + new.shape[1])
        self.queue_filled.fill_(self._filled)

    def _queue_filled(self) -> int:
        if self._filled is None:
            self._filled = int(self.queue_filled)
        return self._filled

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._filled = None  # the restored buffer is read again

    # -- checks and signals ----------------------------------------------------------------------
    def _check_views(self, views: list[Tensor]) -> None:
        missing = [c for c in self.crops_for_assign if c >= len(views)]
        if missing:
            raise ValueError(f"model.crops_for_assign={list(self.crops_for_assign)} names crop(s) {missing}, but "
                             f"the batch has {len(views)} view(s); use indices below {len(views)} (the global "
                             "crops come first)")
        if len(views) < 2:
            raise ValueError("SwAV needs at least 2 views to predict one crop's code from another; "
                             "use data.views: MultiCropViews or ContrastiveViews")
        self.encoder.check_view_sizes(views)

    def _warn_if_collapsed(self, loss: Tensor) -> None:
        """Warn (every COLLAPSE_WARNING_INTERVAL steps at most, so the loss is read on the host only then)
        when the loss sits at ln(K): uniform predictions, the collapsed solution ("loss stuck at 8.006"
        for 3000 prototypes)."""
        step = self.global_step
        if step % self.COLLAPSE_WARNING_INTERVAL or step == self._last_collapse_check:
            return
        self._last_collapse_check = step
        collapsed_loss = math.log(self.prototypes.num_prototypes)
        if abs(loss.item() - collapsed_loss) < 1e-2:
            rank_zero_warn(f"SwAV loss {loss.item():.4f} at step {step} sits at ln(num_prototypes)="
                           f"{collapsed_loss:.4f}: every prediction is uniform (see train/prediction_entropy). "
                           "Early on and on small data SwAV's loss often stays here while the encoder still "
                           "improves (judge by the kNN monitor or a probe, not the loss). If it stays: local crops "
                           "large enough to recognise the image (scale them up on small images), more "
                           "freeze_prototypes_steps, a queue (queue_length) with small batches, num_prototypes "
                           "well above proj_dim, or a lower base_lr")

    # -- prototype handling around the optimizer step --------------------------------------------
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.global_step == 0:  # a resumed run already has normalised prototypes: keep them bit-exact
            self.prototypes.normalize_()
        self.check_queue_split(self.trainer.world_size)

    def check_queue_split(self, processes: int) -> None:
        """Each process scores an equal slice of the queue in Sinkhorn."""
        if self.queue is not None and self.queue_length % processes:
            raise ValueError(f"model.queue_length={self.queue_length} must be divisible by the {processes} "
                             f"processes (e.g. {self.queue_length - self.queue_length % processes})")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Frozen prototypes get no gradient, so no optimizer (momentum, weight decay) moves them."""
        super().on_before_optimizer_step(optimizer)
        if self.global_step < self.freeze_prototypes_steps:
            for p in self.prototypes.parameters():
                p.grad = None

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.global_step > self.freeze_prototypes_steps:  # they moved: back onto the unit sphere
            self.prototypes.normalize_()
