"""End to end: pretrain on a flat, unlabelled folder; probe and score on labelled probe-train/test folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import selfsup.eval.callbacks as callbacks_module
import selfsup.eval.protocols as protocols_module
from selfsup.cli import main as selfsup_main
from selfsup.eval.command import main as eval_main
from tests.data.test_probe_splits import write_folder
from tests.helpers.checkpoints import one_thread  # noqa: F401
from tests.helpers.cli import TINY_SIMCLR_YAML

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("ant", "bee", "cat")

RECIPE = """
seed_everything: 0
trainer:
  accelerator: cpu
  max_steps: 3
  max_epochs: -1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  limit_val_batches: 0
  default_root_dir: {root}
  callbacks:
    - class_path: selfsup.eval.callbacks.ProbeReport
{TINY_SIMCLR_YAML}data:
  dataset: folder
  root: {images}
  probe_train_root: {probe_train}
  test_root: {test}
  image_size: 16
  batch_size: 4
  eval_batch_size: 64
  num_workers: 0
"""


def _recording_labels(monkeypatch: pytest.MonkeyPatch, module) -> list[torch.Tensor]:
    """Record the labels of every feature extraction done through ``module.extract_features``."""
    seen: list[torch.Tensor] = []
    original = module.extract_features

    def extract_features(*args, **kwargs):
        features, labels = original(*args, **kwargs)
        seen.append(labels)
        return features, labels

    monkeypatch.setattr(module, "extract_features", extract_features)
    return seen


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step fit on 16 flat images, probed on 3 x 4 labelled images, scored on 3 x 2; its root."""
    root = tmp_path_factory.mktemp("unlabelled")
    config = root / "fit.yaml"
    config.write_text(RECIPE.format(TINY_SIMCLR_YAML=TINY_SIMCLR_YAML, root=root / "run", images=write_folder(root / "images", per_class=16),
                                    probe_train=write_folder(root / "probe", CLASSES, per_class=4, seed=1),
                                    test=write_folder(root / "test", CLASSES, per_class=2, seed=2)))
    with pytest.MonkeyPatch.context() as monkeypatch:
        labels = _recording_labels(monkeypatch, callbacks_module)
        selfsup_main(["fit", "--config", str(config)])
    # ProbeReport: train then test features, for the pretrained and the random encoder and the raw pixels
    assert [len(y) for y in labels] == [12, 6] * 3, "probes read the labelled folders, not the 16 flat images"
    assert all((y >= 0).all() for y in labels), "no -1 label reached kNN or the linear probe"
    return root


def test_fit_on_a_flat_folder_probes_the_labelled_folders(run: Path) -> None:
    report = json.loads((run / "run" / "probe_report.json").read_text())
    assert set(report) == {"pretrained", "random init", "raw pixels"}
    assert all(0 <= score <= 1 for scores in report.values() for score in scores.values())
    stored = torch.load(run / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stored["datamodule_hyper_parameters"]["probe_train_root"] == str(run / "probe")


def test_eval_scores_on_the_stored_probe_train_root_or_the_flag(run: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    labels = _recording_labels(monkeypatch, protocols_module)
    ckpt = str(run / "run" / "checkpoints" / "last.ckpt")
    eval_main(["--ckpt", ckpt, "--protocols", "knn", "--out", str(tmp_path / "a"), "--num-workers", "0"])
    assert [len(y) for y in labels] == [12, 6] and all((y >= 0).all() for y in labels)
    rows = json.loads((tmp_path / "a" / "scorecard.json").read_text())["rows"]
    assert [r["metric"] for r in rows if r["protocol"] == "knn"] == ["top1", "top5"]

    other = write_folder(tmp_path / "other_probe", CLASSES, per_class=3, seed=3)
    labels.clear()
    eval_main(["--ckpt", ckpt, "--protocols", "knn", "--out", str(tmp_path / "b"), "--num-workers", "0",
               "--probe-train-root", str(other)])
    assert [len(y) for y in labels] == [9, 6], "--probe-train-root replaces the stored folder"
