"""`selfsup eval` end to end: scorecard files, feature cache, preprocessing from the checkpoint, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import selfsup.eval.protocols as protocols_module
from selfsup.cli import main
from selfsup.data.transforms import Preprocessing
from selfsup.eval.cache import CacheMismatchError, FeatureCache
from selfsup.checkpoint import CheckpointError, load_checkpoint, selfsup_metadata
from selfsup.eval.command import parse_settings, resolve_preprocessing
from selfsup.eval.protocols import EvalData, frozen_features
from tests.helpers.checkpoints import IMAGE_SIZE, one_thread, tiny_config, tiny_data, tiny_fit  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["--train-size", "300", "--test-size", "100", "--num-workers", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two epochs of two steps, every epoch's checkpoint kept."""
    return tiny_fit(tmp_path_factory.mktemp("run"), max_epochs=2, steps=-1, limit_train_batches=2, keep_all=True)


def scorecard(out: Path) -> list[dict]:
    return json.loads((out / "scorecard.json").read_text())["rows"]


def test_eval_writes_scorecard_and_plot_and_reuses_cached_features(run: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = protocols_module.extract_features
    monkeypatch.setattr(protocols_module, "extract_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    main(["eval", "--ckpt", str(run), "--protocols", "knn,linear", "--out", str(tmp_path), *SMALL])
    rows = scorecard(tmp_path)
    assert [(r["protocol"], r["metric"]) for r in rows] == [("knn", "top1"), ("knn", "top5"),
                                                             ("linear", "top1"), ("linear", "top5")]
    assert all(0 <= r["value"] <= 1 and r["epoch"] == 1 and r["step"] == 4 for r in rows)
    table = (tmp_path / "scorecard.md").read_text()
    assert "| protocol | metric | value | settings |" in table and "k=20, temperature=0.07" in table
    assert (tmp_path / "embedding_pca_epoch1.png").stat().st_size > 1000
    assert len(calls) == 2  # train and test features, extracted once

    main(["eval", "--ckpt", str(run), "--protocols", "knn", "--set", "knn.k=5", "--out", str(tmp_path), *SMALL])
    assert len(calls) == 2, "the second run reads both splits from the feature cache"
    rows = scorecard(tmp_path)
    assert len(rows) == 6 and rows[-1]["settings"]["k"] == 5


def test_several_checkpoints_of_a_run_plot_accuracy_against_epoch(run: Path, tmp_path: Path) -> None:
    epoch_files = sorted(run.parent.glob("epoch=*.ckpt"))
    assert len(epoch_files) == 2
    main(["eval", "--ckpt", *map(str, epoch_files), "--protocols", "knn", "--out", str(tmp_path), "--no-cache",
          *SMALL])
    assert sorted({r["epoch"] for r in scorecard(tmp_path)}) == [0, 1]
    assert (tmp_path / "accuracy_vs_epoch.png").is_file()


def test_preprocessing_comes_from_the_checkpoint_and_an_override_warns(run: Path, tmp_path: Path) -> None:
    stored = load_checkpoint(run)["selfsup"]["preprocessing"]
    assert stored["image_size"] == IMAGE_SIZE
    assert resolve_preprocessing(stored, {"image_size": None}) == Preprocessing(**stored)
    with pytest.warns(UserWarning, match=r"image_size=24 differs from the checkpoint's image_size=16"):
        main(["eval", "--ckpt", str(run), "--protocols", "knn", "--image-size", "24", "--out", str(tmp_path),
              *SMALL])
    with pytest.warns(UserWarning, match=r"mean=\(0.5,\) differs from the checkpoint's mean=\(0.286,\)"):
        assert resolve_preprocessing(stored, {"mean": [0.5]}).mean == (0.5,)


def test_cached_features_of_other_classes_are_refused(tmp_path: Path) -> None:
    data = EvalData.from_datamodule(tiny_data(), train_size=40, test_size=20)
    cache = FeatureCache(tmp_path)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
    first = frozen_features(encoder, data, cache=cache, weights_id="w")
    again = frozen_features(encoder, data, cache=cache, weights_id="w")
    assert cache.hits == 2 and cache.misses == 2 and torch.equal(first.test_features, again.test_features)
    data.classes = [f"renamed{i}" for i in range(10)]  # e.g. an image folder whose class folders changed
    with pytest.raises(CacheMismatchError, match=r"extracted for classes \['0', '1'.*but the data now has classes "
                                                 r"\['renamed0'"):
        frozen_features(encoder, data, cache=cache, weights_id="w")


def test_truncated_foreign_and_unpickling_checkpoints_are_named(run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(run.read_bytes()[: run.stat().st_size // 2])
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--ckpt", str(truncated), "--protocols", "knn"])
    assert exit_info.value.code == 2
    assert "truncated.ckpt' is truncated or corrupt" in capsys.readouterr().err

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"backbone.weight": torch.zeros(1)}, "epoch": 0}, foreign)
    with pytest.raises(CheckpointError, match="was not written by a selfsup method.*no 'selfsup' entry"):
        selfsup_metadata(load_checkpoint(foreign), foreign)

    pickled = tmp_path / "pickled.ckpt"
    checkpoint = load_checkpoint(run)
    checkpoint["selfsup"]["preprocessing_object"] = Preprocessing()  # an arbitrary Python object
    torch.save(checkpoint, pickled)
    with pytest.raises(CheckpointError, match="needs full unpickling.*--unsafe-load"):
        load_checkpoint(pickled)
    assert load_checkpoint(pickled, unsafe_load=True)["selfsup"]["preprocessing_object"] == Preprocessing()


def test_settings_and_protocol_names_are_checked(run: Path, capsys: pytest.CaptureFixture) -> None:
    assert parse_settings(["knn.k=10", "fewshot.seeds=[0, 1, 2, 3]"]) == {"knn": {"k": 10},
                                                                           "fewshot": {"seeds": [0, 1, 2, 3]}}
    with pytest.raises(ValueError, match="must look like PROTOCOL.SETTING=VALUE"):
        parse_settings(["k=10"])
    with pytest.raises(SystemExit):
        main(["eval", "--ckpt", str(run), "--protocols", "knn,lora", *SMALL])
    assert "unknown protocol 'lora'" in capsys.readouterr().err


def test_checkpoint_from_the_fit_command_loads_with_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    monkeypatch.setattr(sys, "argv", ["selfsup"])  # LightningCLI warns when given both args and sys.argv
    main(["fit", "--config", str(tiny_config(tmp_path))])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)  # raises if anything needs full unpickling
    assert checkpoint["selfsup"]["method"] == "selfsup.methods.simclr.SimCLR"
    main(["eval", "--ckpt", str(ckpt), "--protocols", "knn", *SMALL])
    assert [r["metric"] for r in scorecard(tmp_path / "scorecard")] == ["top1", "top5"]
