"""Training-time evaluation callbacks: online linear probe, kNN monitor, the frozen-probe report and
the checkpoint scorer (defined in :mod:`selfsup.eval.scorecard`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from selfsup.distributed import all_reduce_sum, broadcast_tensors, on_rank_zero
from selfsup.eval.features import RawPixels, extract_features, recalibrate_batchnorm, representation
from selfsup.eval.knn import topk_accuracy
from selfsup.eval.protocols import EvalContext, FeatureSet, run_protocols
from selfsup.eval.scorecard import CheckpointScorer, probes_unavailable  # noqa: F401  (re-exported for recipes)

log = logging.getLogger(__name__)


def _num_classes(trainer: L.Trainer) -> int:
    num_classes = getattr(trainer.datamodule, "num_classes", None)
    if not num_classes:
        raise ValueError("probe callbacks need a labelled dataset (the data module reports no classes)")
    return num_classes


class OnlineLinearProbe(L.Callback):
    """A linear classifier trained every step on detached encoder features.

    It has its own optimizer, so its loss never reaches the encoder. Validation accuracy on the
    labelled test split is logged as ``probe/val_acc``. Under DDP its gradients are averaged
    over ranks so every rank keeps the same head.

    ``batch_norm=True`` puts BatchNorm without affine before the linear layer, the MAE linear-probe
    protocol (features of MIM encoders have very different scales per channel).
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, batch_norm: bool = False):
        self.lr, self.weight_decay, self.batch_norm = lr, weight_decay, batch_norm
        self.head: nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None
        self._val_counts = torch.zeros(2, dtype=torch.long)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.head is None and _probes_available(trainer, self):
            dim = pl_module.encoder.embed_dim
            linear = nn.Linear(dim, _num_classes(trainer))
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), linear) if self.batch_norm else linear
            self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            if self._pending_state is not None:
                self._restore(self._pending_state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.head is None:
            return
        self.head.to(pl_module.device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    state[k] = v.to(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """One step of the head on the labelled images of this step, over all ranks.

        Every rank takes part in the same all-reduce (gradient sums and the labelled-image count in one
        tensor), also a rank whose batch has no labels or whose step was skipped, so the ranks never wait
        in different collectives; the update is the mean over every labelled image of the global batch."""
        if self.head is None:  # no labelled splits: the same on every rank
            return
        features = outputs.get("features") if isinstance(outputs, dict) else None
        labels = batch.labels.to(pl_module.device)
        known = labels >= 0 if features is not None else torch.zeros_like(labels, dtype=torch.bool)
        self.head.train()
        self.optimizer.zero_grad(set_to_none=False)
        logits = loss = None
        if int(known.sum()):  # (a BatchNorm head cannot run on no images)
            with torch.enable_grad(), torch.autocast(pl_module.device.type, enabled=False):
                logits = self.head(features[known].float())
                loss = F.cross_entropy(logits, labels[known], reduction="sum")
                loss.backward()
        params = list(self.head.parameters())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads] + [known.sum().float().view(1)])
        count = int(all_reduce_sum(flat)[-1])  # whether any rank had labelled images
        if count == 0:
            return
        for p, g in zip(params, flat[:-1].div_(count).split([p.numel() for p in params])):
            p.grad = g.view_as(p)
        self.optimizer.step()
        if loss is not None:
            pl_module.log_dict({"probe/train_loss": loss.detach() / len(logits),
                                "probe/train_acc": topk_accuracy(logits.detach(), labels[known])},
                               batch_size=int(known.sum()))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.head is not None and len(batch):
            self.head.eval()
            logits = self.head(outputs["features"].float()).detach()
            labels = batch.labels.to(logits.device)
            self._val_counts += torch.stack([(logits.argmax(1) == labels).sum(), labels.new_tensor(len(labels))])

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_counts = torch.zeros(2, dtype=torch.long, device=pl_module.device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Accuracy over every rank's validation images (one all-reduce that every rank runs)."""
        correct, total = all_reduce_sum(self._val_counts).tolist()
        if total:
            pl_module.log("probe/val_acc", correct / total, prog_bar=True, sync_dist=True)  # the same on every rank

    def state_dict(self) -> dict[str, Any]:
        if self.head is None:
            return {}
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.head is None:
            self._pending_state = state_dict
        elif state_dict:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def frozen_scores(encoder: nn.Module, datamodule: Any, device: torch.device, bf16: bool = False,
                  protocols: tuple[str, ...] = ("knn", "linear"), knn_k: int = 20,
                  knn_temperature: float = 0.07, forward: Any = None) -> dict[str, float]:
    """kNN and/or linear-probe top-1 of a frozen encoder on the data module's labelled splits.

    The protocols are the registered ones of :mod:`selfsup.eval.protocols`, as in ``selfsup eval``. Under
    DDP every rank calls this: features are extracted sharded over the ranks and gathered, rank 0 alone
    runs the protocols, and every rank returns its scores."""
    size = getattr(getattr(datamodule, "preprocessing", None), "image_size", None)
    train = extract_features(encoder, datamodule.probe_dataloader("train"), device, bf16, True, forward, size)
    test = extract_features(encoder, datamodule.probe_dataloader("test"), device, bf16, True, forward, size)
    settings = {"knn": {"k": knn_k, "temperature": knn_temperature}} if "knn" in protocols else {}

    def score() -> dict[str, float]:
        context = EvalContext(FeatureSet(*train, *test), encoder, device=device)
        rows = run_protocols(protocols, context, settings)
        return {f"{row['protocol']}_top1": row["value"] for row in rows if row["metric"] == "top1"}

    return on_rank_zero(score)


def _uses_bf16(trainer: L.Trainer) -> bool:
    return "bf16" in str(trainer.precision)


def _probes_available(trainer: L.Trainer, callback: L.Callback) -> bool:
    """Whether the data module has labelled splits to probe on; else one line saying why (same on every rank)."""
    if getattr(trainer.datamodule, "has_labels", False):
        return True
    rank_zero_info(f"[selfsup] {type(callback).__name__}: {probes_unavailable(trainer.datamodule)}")
    return False


class KNNMonitor(L.Callback):
    """Weighted cosine kNN accuracy (k=20, T=0.07) of the frozen encoder, every ``every_n_epochs``.

    Under DDP the features are extracted sharded over the ranks and rank 0 alone runs the kNN."""

    def __init__(self, every_n_epochs: int = 1, k: int = 20, temperature: float = 0.07):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be at least 1")
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs or not _probes_available(trainer, self):
            return
        encoder, forward = representation(trainer, pl_module)
        scores = frozen_scores(encoder, trainer.datamodule, pl_module.device, _uses_bf16(trainer),
                               ("knn",), self.k, self.temperature, forward)
        pl_module.log("knn/top1", scores["knn_top1"], prog_bar=True, sync_dist=True)  # the same on every rank


class ProbeReport(L.Callback):
    """At the end of fit, score the trained encoder, the same architecture at random initialisation and
    (``raw_pixels``) the pixels themselves (:class:`~selfsup.eval.features.RawPixels`, at most 32 x 32 per
    channel) with kNN and a linear probe; print a table and write ``probe_report.json`` into the run's log
    directory.

    The random encoder's BatchNorm statistics are estimated on training images first (on rank 0, then
    broadcast), so the baseline is a fair one (see :func:`selfsup.eval.features.recalibrate_batchnorm`).
    Under DDP every rank takes part in the feature extraction and rank 0 alone scores and writes."""

    def __init__(self, protocols: tuple[str, ...] = ("knn", "linear"), seed: int = 0, raw_pixels: bool = True):
        self.protocols, self.seed, self.raw_pixels = tuple(protocols), seed, raw_pixels
        self.results: dict[str, dict[str, float]] = {}
        self.path: Path | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not _probes_available(trainer, self):
            return
        from selfsup.models.encoder import Encoder

        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: log_dir broadcasts
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            random_encoder = Encoder(**pl_module.encoder.config).to(pl_module.device)
        if pl_module.channels_last:
            random_encoder.to(memory_format=torch.channels_last)
        loader = trainer.datamodule.probe_dataloader("train")
        def recalibrate() -> None:
            recalibrate_batchnorm(random_encoder, loader, pl_module.device)

        on_rank_zero(recalibrate)  # once, then the statistics go to every rank
        broadcast_tensors(list(random_encoder.buffers()))
        bf16 = _uses_bf16(trainer)
        encoder, forward = representation(trainer, pl_module)
        self.results = {
            "pretrained": frozen_scores(encoder, trainer.datamodule, pl_module.device, bf16, self.protocols,
                                        forward=forward),
            "random init": frozen_scores(random_encoder, trainer.datamodule, pl_module.device, bf16, self.protocols)}
        if self.raw_pixels:
            self.results["raw pixels"] = frozen_scores(RawPixels(), trainer.datamodule, pl_module.device, False,
                                                       self.protocols)
        self.path = out_dir / "probe_report.json"
        on_rank_zero(self._report)

    def _report(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Frozen-encoder accuracy on the labelled test split (top-1, %)")
        table.add_column("encoder")
        columns = [c for c in ("knn_top1", "linear_top1") if c in next(iter(self.results.values()))]
        for c in columns:
            table.add_column(c.replace("_top1", ""), justify="right")
        for name, scores in self.results.items():
            table.add_row(name, *(f"{100 * scores[c]:.2f}" for c in columns))
        Console().print(table)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.results, indent=2))
        log.info("wrote %s", self.path)
