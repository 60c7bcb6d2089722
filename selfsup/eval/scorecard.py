"""The scorecard of a run: ``scorecard.json`` (all rows), ``scorecard.md`` (a table) and plots.

Each scoring appends rows tagged with the checkpoint, epoch and step, so scoring several checkpoints
of one run builds a history; with more than one epoch scored, ``accuracy_vs_epoch.png`` plots it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from matplotlib.figure import Figure  # object-oriented matplotlib: no pyplot, no global backend change
from torch import Tensor

from selfsup.distributed import is_distributed, on_rank_zero
from selfsup.eval.cache import FeatureCache
from selfsup.eval.features import representation
from selfsup.eval.linear import standardise
from selfsup.eval.protocols import EvalContext, EvalData, FeatureSet, frozen_features, run_protocols

JSON_FILE, MARKDOWN_FILE = "scorecard.json", "scorecard.md"
EMBEDDING_PLOT, HISTORY_PLOT = "embedding_pca.png", "accuracy_vs_epoch.png"


def read_rows(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / JSON_FILE
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def append_rows(out_dir: str | Path, rows: list[dict], checkpoint: str, epoch: int | None,
                step: int | None) -> list[dict]:
    """Add ``rows`` (tagged with where they come from) to the scorecard in ``out_dir``; rewrite all files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    history = read_rows(out_dir) + [{"checkpoint": checkpoint, "epoch": epoch, "step": step, "time": stamp, **row}
                                    for row in rows]
    (out_dir / JSON_FILE).write_text(json.dumps({"rows": history}, indent=2, default=str))
    (out_dir / MARKDOWN_FILE).write_text(markdown_table(history))
    if len({row["epoch"] for row in history if row["epoch"] is not None}) > 1:
        plot_history(history, out_dir / HISTORY_PLOT)
    return history


def _format_value(row: dict) -> str:
    value = f"{100 * row['value']:.2f}"
    return value if row.get("std") is None else f"{value} ± {100 * row['std']:.2f}"


def _format_settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None).replace("|", "/")


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table: checkpoint, epoch, protocol, metric, value (%), settings."""
    lines = ["# Scorecard", "", "Accuracies in %, on the labelled test split; few-shot rows are mean ± std over "
             "seeds.", "", "| checkpoint | epoch | step | protocol | metric | value | settings |",
             "|---|---:|---:|---|---|---:|---|"]
    for row in rows:
        lines.append(f"| {Path(str(row['checkpoint'])).name} | {row['epoch']} | {row['step']} | {row['protocol']} "
                     f"| {row['metric']} | {_format_value(row)} | {_format_settings(row['settings'])} |")
    return "\n".join(lines) + "\n"


def plot_history(rows: list[dict], path: Path) -> None:
    """Top-1 accuracy of each protocol/metric against epoch."""
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        if row["epoch"] is not None and "top1" in row["metric"]:
            series.setdefault(f"{row['protocol']} {row['metric']}", {})[row["epoch"]] = 100 * row["value"]
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    for name, points in sorted(series.items()):
        epochs = sorted(points)
        axis.plot(epochs, [points[e] for e in epochs], marker="o", label=name)
    axis.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Checkpoint scores")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def pca_2d(features: Tensor) -> Tensor:
    """The first two principal components ``(N, 2)`` of the standardised features (``torch.pca_lowrank``)."""
    centred = standardise(features.float())[0]
    _, _, basis = torch.pca_lowrank(centred, q=min(2, *centred.shape), center=False, niter=4)
    return centred @ basis


def plot_embedding(features: Tensor, labels: Tensor, path: str | Path, classes: list[str] | None = None,
                   title: str = "Test features, PCA", max_points: int = 5000) -> Path:
    """A 2-D PCA scatter of ``features`` coloured by label."""
    if len(features) > max_points:
        keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:max_points]
        features, labels = features[keep], labels[keep]
    points = pca_2d(features)
    figure = Figure(figsize=(6, 5))
    axis = figure.subplots()
    scatter = axis.scatter(points[:, 0], points[:, 1], c=labels.numpy(), cmap="tab10" if int(labels.max()) < 10
                           else "tab20", s=4, alpha=0.7)
    handles, _ = scatter.legend_elements(num=None)
    names = classes or [str(i) for i in range(int(labels.max()) + 1)]
    present = sorted(labels.unique().tolist())
    axis.legend(handles, [names[i] for i in present], fontsize=6, markerscale=0.8, loc="best")
    axis.set(title=title, xlabel="PC 1", ylabel="PC 2")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)


def score_encoder(encoder: torch.nn.Module, data: EvalData, protocols: list[str], out_dir: Path | None,
                  settings: dict[str, dict[str, Any]] | None = None, device: torch.device | str = "cpu",
                  cache: FeatureCache | None = None, weights_id: str | None = None, checkpoint: str = "",
                  epoch: int | None = None, step: int | None = None, bf16: bool = False,
                  plot: bool = True, forward: Any = None) -> list[dict]:
    """Run ``protocols`` on ``encoder``; append the rows to ``out_dir``'s scorecard and plot the test features.

    The one scoring path of ``selfsup eval`` and :class:`CheckpointScorer`. Under DDP every rank calls it:
    the features are extracted once, sharded over the ranks, then rank 0 alone runs the protocols and
    writes the files, and every rank returns its rows. ``forward``: see
    :func:`selfsup.eval.features.extract_features`.
    """
    device = torch.device(device)
    if is_distributed():  # extracted by every rank together, before rank 0 works alone
        features: Any = frozen_features(encoder, data, device, cache, weights_id, bf16, shard=True, forward=forward)
    else:  # lazily: a protocol that needs no frozen features (finetune) extracts none
        def features() -> FeatureSet:
            return frozen_features(encoder, data, device, cache, weights_id, bf16)

    def score() -> list[dict]:
        context = EvalContext(features, encoder, data, device, out_dir)
        rows = run_protocols(protocols, context, settings)
        if out_dir is not None:
            append_rows(out_dir, rows, checkpoint, epoch, step)
            if plot:
                frozen = context.frozen()
                name = EMBEDDING_PLOT if epoch is None else EMBEDDING_PLOT.replace(".png", f"_epoch{epoch}.png")
                plot_embedding(frozen.test_features.cpu(), frozen.test_labels.cpu(), Path(out_dir) / name,
                               data.classes, title=f"Test features, PCA ({Path(checkpoint).name or 'encoder'})")
        return rows

    return on_rank_zero(score)


class CheckpointScorer(L.Callback):
    """Score the encoder with offline protocols at the end of every ``every_n_epochs``-th training epoch,
    and the final weights at the end of fit.

    Runs :func:`score_encoder`, the same path as ``selfsup eval``, on the data module's labelled splits
    (optionally fixed subsets), logs ``score/<protocol>_<metric>`` to the active loggers and appends rows
    and a PCA plot to ``<default_root_dir>/scorecard`` (where ``selfsup eval`` writes too). Under DDP the
    features are extracted sharded over the ranks and rank 0 alone scores and writes. It never scores
    inside a checkpoint save: those run on SIGTERM and SLURM requeue too, which leave seconds.

    Args:
        protocols: registered protocol names, e.g. ``["knn", "linear"]`` (``finetune`` is slow).
        every_n_epochs: score at the end of epochs that are multiples of this; the final weights are
            always scored.
        settings: per-protocol settings, e.g. ``{"knn": {"k": 10}}``.
        train_size, test_size: score on fixed random subsets of the labelled splits (faster).
        out_dir: where the scorecard goes (default ``<default_root_dir>/scorecard``).
    """

    def __init__(self, protocols: list[str] = ("knn", "linear"), every_n_epochs: int = 1,
                 settings: dict[str, dict[str, Any]] | None = None, train_size: int | None = None,
                 test_size: int | None = None, out_dir: str | None = None):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be at least 1")
        self.protocols, self.every_n_epochs, self.settings = list(protocols), every_n_epochs, settings or {}
        self.train_size, self.test_size, self.out_dir = train_size, test_size, out_dir
        self.scored_steps: set[int] = set()
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.score(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.interrupted:
            self.score(trainer, pl_module)

    def score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict]:
        """Score the current weights once per global step (every rank calls this together)."""
        step, epoch = trainer.global_step, trainer.current_epoch
        if step in self.scored_steps:
            return []
        self.scored_steps.add(step)
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "split"):
            raise ValueError("CheckpointScorer needs an SSLDataModule (trainer.datamodule) with labelled splits")
        if not datamodule.has_labels:
            rank_zero_info(f"[selfsup] CheckpointScorer: {probes_unavailable(datamodule)}")
            return []
        data = EvalData.from_datamodule(datamodule, self.train_size, self.test_size)
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "scorecard")
        encoder, forward = representation(trainer, pl_module)
        rows = score_encoder(encoder, data, self.protocols, out_dir, self.settings, pl_module.device,
                             checkpoint=f"epoch={epoch}-step={step}", epoch=epoch, step=step,
                             bf16="bf16" in str(trainer.precision), forward=forward)
        self.rows += rows
        self._log(trainer, rows, step)
        return rows

    @rank_zero_only
    def _log(self, trainer: L.Trainer, rows: list[dict], step: int) -> None:
        metrics = {f"score/{row['protocol']}_{row['metric']}": row["value"] for row in rows}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def probes_unavailable(datamodule: Any) -> str:
    """The data module's one-line reason why probes cannot run (no labelled probe-train or test split)."""
    reason = getattr(datamodule, "probe_unavailable_reason", None)
    return reason or f"probes skipped: dataset {getattr(datamodule, 'dataset', '?')!r} has no labelled splits"
