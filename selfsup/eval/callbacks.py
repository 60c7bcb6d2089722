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
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from selfsup.distributed import all_reduce_sum, world_size
from selfsup.eval.features import extract_features, recalibrate_batchnorm
from selfsup.eval.knn import topk_accuracy
from selfsup.eval.protocols import EvalContext, FeatureSet, run_protocols
from selfsup.eval.scorecard import CheckpointScorer  # noqa: F401  (re-exported for recipes)

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
        self._val_scores: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.head is None:
            dim = pl_module.encoder.embed_dim
            linear = nn.Linear(dim, _num_classes(trainer))
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False), linear) if self.batch_norm else linear
            self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            if self._pending_state is not None:
                self._restore(self._pending_state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.head.to(pl_module.device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and k != "step":
                    state[k] = v.to(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        features = outputs.get("features") if isinstance(outputs, dict) else None
        if features is None or (batch.labels < 0).all():
            return
        known = batch.labels >= 0
        self.head.train()
        with torch.enable_grad(), torch.autocast(pl_module.device.type, enabled=False):
            logits = self.head(features[known].float())
            loss = F.cross_entropy(logits, batch.labels[known])
            self.optimizer.zero_grad(set_to_none=False)
            loss.backward()
        for p in self.head.parameters():
            all_reduce_sum(p.grad).div_(world_size())
        self.optimizer.step()
        pl_module.log_dict({"probe/train_loss": loss.detach(),
                            "probe/train_acc": topk_accuracy(logits.detach(), batch.labels[known])},
                           batch_size=int(known.sum()))

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.head is not None and len(batch):
            self.head.eval()
            self._val_scores.append(self.head(outputs["features"].float()).detach())
            self._val_labels.append(batch.labels)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_scores:
            acc = topk_accuracy(torch.cat(self._val_scores), torch.cat(self._val_labels).to(pl_module.device))
            pl_module.log("probe/val_acc", acc, prog_bar=True, sync_dist=True)
        self._val_scores, self._val_labels = [], []

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
                  knn_temperature: float = 0.07) -> dict[str, float]:
    """kNN and/or linear-probe top-1 of a frozen encoder on the data module's labelled splits.

    The protocols are the registered ones of :mod:`selfsup.eval.protocols`, as in ``selfsup eval``."""
    train_x, train_y = extract_features(encoder, datamodule.probe_dataloader("train"), device, bf16)
    test_x, test_y = extract_features(encoder, datamodule.probe_dataloader("test"), device, bf16)
    context = EvalContext(FeatureSet(train_x, train_y, test_x, test_y), encoder, device=device)
    rows = run_protocols(protocols, context, {"knn": {"k": knn_k, "temperature": knn_temperature}}
                         if "knn" in protocols else {})
    return {f"{row['protocol']}_top1": row["value"] for row in rows if row["metric"] == "top1"}


def _uses_bf16(trainer: L.Trainer) -> bool:
    return "bf16" in str(trainer.precision)


class KNNMonitor(L.Callback):
    """Weighted cosine kNN accuracy (k=20, T=0.07) of the frozen encoder, every ``every_n_epochs``."""

    def __init__(self, every_n_epochs: int = 1, k: int = 20, temperature: float = 0.07):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be at least 1")
        self.every_n_epochs, self.k, self.temperature = every_n_epochs, k, temperature

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        scores = frozen_scores(pl_module.encoder, trainer.datamodule, pl_module.device, _uses_bf16(trainer),
                               ("knn",), self.k, self.temperature)
        pl_module.log("knn/top1", scores["knn_top1"], prog_bar=True)


class ProbeReport(L.Callback):
    """At the end of fit, score the trained encoder and the same architecture at random
    initialisation with kNN and a linear probe; print a table and write ``probe_report.json``.

    The random encoder's BatchNorm statistics are estimated on training images first, so the
    baseline is a fair one (see :func:`selfsup.eval.features.recalibrate_batchnorm`)."""

    def __init__(self, protocols: tuple[str, ...] = ("knn", "linear"), seed: int = 0):
        self.protocols, self.seed = tuple(protocols), seed
        self.results: dict[str, dict[str, float]] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        from selfsup.models.encoder import Encoder

        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            random_encoder = Encoder(**pl_module.encoder.config).to(pl_module.device)
        if pl_module.channels_last:
            random_encoder.to(memory_format=torch.channels_last)
        recalibrate_batchnorm(random_encoder, trainer.datamodule.probe_dataloader("train"), pl_module.device)
        bf16 = _uses_bf16(trainer)
        self.results = {name: frozen_scores(enc, trainer.datamodule, pl_module.device, bf16, self.protocols)
                        for name, enc in (("pretrained", pl_module.encoder), ("random init", random_encoder))}
        self._report(trainer)

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
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
        out = Path(trainer.log_dir or trainer.default_root_dir) / "probe_report.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.results, indent=2))
        log.info("wrote %s", out)
