"""CheckpointScorer: scorecard rows during a short fit, through the same functions as `selfsup eval`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger

from selfsup.cli import main
from selfsup.eval.callbacks import CheckpointScorer, frozen_scores
from selfsup.checkpoint import encoder_from_checkpoint, load_checkpoint
from selfsup.eval.protocols import EvalContext, EvalData, frozen_features, run_protocols
from tests.helpers.checkpoints import one_thread, tiny_data, tiny_fit  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"linear": {"weight_decays": [1e-3]}}


def test_scorer_writes_rows_for_each_saved_checkpoint_and_logs_them(tmp_path: Path) -> None:
    scorer = CheckpointScorer(protocols=["knn", "linear"], settings=SETTINGS, train_size=200, test_size=100)
    logger = CSVLogger(str(tmp_path), name="logs")
    ckpt = tiny_fit(tmp_path, max_epochs=2, steps=-1, limit_train_batches=2, callbacks=[scorer], logger=logger)
    rows = json.loads((tmp_path / "scorecard" / "scorecard.json").read_text())["rows"]
    assert [(r["epoch"], r["step"], r["protocol"], r["metric"]) for r in rows] == [
        (epoch, step, protocol, metric) for epoch, step in ((0, 2), (1, 4))
        for protocol in ("knn", "linear") for metric in ("top1", "top5")]
    assert (tmp_path / "scorecard" / "accuracy_vs_epoch.png").is_file()
    assert (tmp_path / "scorecard" / "embedding_pca_epoch1.png").is_file()
    assert "| epoch=1-step=4 | 1 | 4 | knn | top1 |" in (tmp_path / "scorecard" / "scorecard.md").read_text()
    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "score/knn_top1" in metrics and "score/linear_top5" in metrics

    # the final rows are exactly what `selfsup eval` gives for the saved checkpoint
    out = tmp_path / "eval"
    main(["eval", "--ckpt", str(ckpt), "--protocols", "knn,linear", "--set", "linear.weight_decays=[0.001]",
          "--train-size", "200", "--test-size", "100", "--num-workers", "0", "--out", str(out), "--no-cache"])
    offline = json.loads((out / "scorecard.json").read_text())["rows"]
    assert [r["value"] for r in offline] == [r["value"] for r in rows[4:]]


def test_every_n_epochs_and_the_end_of_fit(tmp_path: Path) -> None:
    scorer = CheckpointScorer(protocols=["knn"], every_n_epochs=2, train_size=100, test_size=50)
    tiny_fit(tmp_path, max_epochs=3, steps=-1, limit_train_batches=1, callbacks=[scorer])
    assert sorted(scorer.scored_steps) == [2, 3]  # epoch index 1 (every 2nd epoch), then the end of fit
    with pytest.raises(ValueError, match="every_n_epochs=0"):
        CheckpointScorer(every_n_epochs=0)


def test_frozen_scores_use_the_registered_protocols(tmp_path: Path) -> None:
    encoder = encoder_from_checkpoint(load_checkpoint(tiny_fit(tmp_path, steps=1)))
    data = EvalData.from_datamodule(tiny_data(), train_size=300, test_size=100)
    scores = frozen_scores(encoder, SimpleNamespace(probe_dataloader=data.loader), "cpu", knn_k=5)
    features = frozen_features(encoder, data)
    rows = run_protocols(["knn", "linear"], EvalContext(features), {"knn": {"k": 5}})
    assert scores == {f"{r['protocol']}_top1": r["value"] for r in rows if r["metric"] == "top1"}


class _SaveEveryStep(Callback):
    """Saves a checkpoint after every training step, as a SIGTERM or SLURM requeue save may come at any step."""

    def __init__(self, path: Path):
        self.path, self.saves = path, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trainer.save_checkpoint(self.path)
        self.saves += 1


def test_scorer_never_scores_inside_a_checkpoint_save(tmp_path: Path) -> None:
    """Saves on SIGTERM or requeue leave seconds: scoring happens at epoch ends, never in the save path."""
    scorer = CheckpointScorer(protocols=["knn"], train_size=50, test_size=20)
    saver = _SaveEveryStep(tmp_path / "every_step.ckpt")
    tiny_fit(tmp_path, max_epochs=2, steps=-1, limit_train_batches=2, callbacks=[scorer, saver])
    assert saver.saves == 4
    assert sorted(scorer.scored_steps) == [2, 4], "once per epoch end, however many saves ran"
