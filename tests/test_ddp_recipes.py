"""Every method through ``selfsup fit`` on 2 CPU processes (DDP, gloo), as a user runs a recipe on 2 GPUs.

Each run carries the callbacks of every shipped recipe of that method (read from ``recipes/``, so a
callback added to a recipe is tested here) plus :class:`CheckpointScorer`, and trains on a labelled
folder in which some files are unreadable, all of them on rank 1 in the first epoch, a whole batch of
rank 1 among them. It must finish (a hang is a timeout, so a failure), the ranks must hold identical
weights, the skips must be summed over the ranks, and what the callbacks write must be written once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from torch.utils.data import DistributedSampler

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES, PER_CLASS, TEST_PER_CLASS = 2, 16, 4
BATCH, EPOCHS, SEED = 4, 2, 0
TINY_ENCODERS = {
    "resnet": {"name": "test_resnet"},
    "vit": {"name": "vit_tiny_patch16_224", "image_size": 32, "patch_size": 4, "in_chans": 3,
            "model_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}},
}
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def _recipe_callbacks(model_class: str) -> list[dict]:
    """The callbacks of every shipped recipe of ``model_class``, once each, firing every epoch."""
    found: dict[str, dict] = {}
    for recipe in sorted(REPO.glob("recipes/*/*.yaml")):
        config = yaml.safe_load(recipe.read_text())
        if config.get("model", {}).get("class_path") != model_class:
            continue
        for callback in config.get("trainer", {}).get("callbacks", []):
            args = dict(callback.get("init_args") or {})
            if "every_n_epochs" in args:
                args["every_n_epochs"] = 1
            found.setdefault(callback["class_path"], {"class_path": callback["class_path"], "init_args": args})
    return list(found.values())


def _bad_indices() -> list[int]:
    """Rank 1's whole first batch and one image of its third batch, in epoch 0; none of rank 0's."""
    n = NUM_CLASSES * PER_CLASS
    order = []
    for rank in (0, 1):
        sampler = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=SEED, drop_last=True)
        sampler.set_epoch(0)
        order.append(list(sampler))
    bad = order[1][:BATCH] + [order[1][2 * BATCH]]
    assert not set(bad) & set(order[0])
    return bad


def _write_folders(root: Path) -> tuple[Path, Path, list[int]]:
    rng = np.random.default_rng(0)
    bad = set(_bad_indices())
    train, test = root / "train", root / "test"
    for c in range(NUM_CLASSES):
        for split, count in ((train, PER_CLASS), (test, TEST_PER_CLASS)):
            (split / f"class{c}").mkdir(parents=True)
            for j in range(count):
                path = split / f"class{c}" / f"{j:02d}.png"
                if split is train and c * PER_CLASS + j in bad:
                    path.write_bytes(b"")  # zero bytes: unreadable
                    continue
                base = rng.integers(0, 128, (32, 32, 3)) + 100 * c  # the classes differ in brightness
                Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(path)
    return train, test, sorted(bad)


def _config(method: str, root: Path, train: Path, test: Path) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "demo" / f"{method}.yaml").read_text())
    model = recipe["model"]
    arch = "vit" if "vit" in model["init_args"]["encoder"]["init_args"]["name"] else "resnet"
    model["init_args"]["encoder"]["init_args"] = {**TINY_ENCODERS[arch],
                                                  **({"dynamic_img_size": True} if method == "dinov2" else {})}
    model["init_args"]["channels_last"] = False
    data = {**recipe["data"], "dataset": "folder", "root": str(train), "test_root": str(test), "image_size": 32,
            "batch_size": BATCH, "eval_batch_size": 8, "num_workers": 0}
    callbacks = _recipe_callbacks(model["class_path"]) + [
        {"class_path": "selfsup.eval.callbacks.CheckpointScorer",
         "init_args": {"protocols": ["knn"], "settings": {"knn": {"k": 5}}}},
        {"class_path": "selfsup.eval.collapse.RankMe", "init_args": {"every_n_steps": 1, "num_samples": 16}},
        {"class_path": "tests.helpers.ranks.RecordRanks", "init_args": {"out_dir": str(root / "ranks")}}]
    trainer = {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "precision": "32", "max_epochs": EPOCHS,
               "sync_batchnorm": arch == "resnet", "default_root_dir": str(root / "run"), "callbacks": callbacks,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
               "log_every_n_steps": 1,
               "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                          "init_args": {"save_dir": str(root / "run")}}}
    if "limit_val_batches" in recipe["trainer"]:
        trainer["limit_val_batches"] = recipe["trainer"]["limit_val_batches"]
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({"seed_everything": SEED, "trainer": trainer, "model": model, "data": data}))
    return path


@pytest.mark.parametrize("method", ["simclr", "swav", "mae", "simmim", "dinov2"])
def test_recipe_callbacks_and_unreadable_files_under_two_process_ddp(method, tmp_path):
    train, test, bad = _write_folders(tmp_path / "data")
    config = _config(method, tmp_path, train, test)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "selfsup.cli", "fit", "--config", str(config)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = EPOCHS * NUM_CLASSES * PER_CLASS // (2 * BATCH)
    assert [r["step"] for r in ranks] == [steps, steps] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["identical"] and r["finite"] for r in ranks), ranks
    met = sum(r["skipped_images"] for r in ranks)
    assert met >= EPOCHS * len(bad), "every bad file is met once per epoch (replacements may meet more)"
    assert ranks[1]["skipped_images"] >= len(bad), "rank 1 met all of epoch 0's bad files"
    assert f"[selfsup] skipped {met} unreadable images" in output, "the report sums the ranks' skips"

    run = tmp_path / "run"
    versions = sorted((run / "lightning_logs").iterdir())
    assert [v.name for v in versions] == ["version_0"], "one log directory for both ranks"
    rows = json.loads((run / "scorecard" / "scorecard.json").read_text())["rows"]
    assert [(r["epoch"], r["metric"]) for r in rows] == [(e, m) for e in range(EPOCHS) for m in ("top1", "top5")]
    callbacks = _callbacks_of(config)
    log_dir = versions[0]
    if any(c.endswith("ProbeReport") for c in callbacks):
        report = json.loads((log_dir / "probe_report.json").read_text())
        assert set(report) == {"pretrained", "random init", "raw pixels"}
        assert output.count("Frozen-encoder accuracy") == 1, "the table is printed once"
    if any(c.endswith("ReconstructionImages") for c in callbacks):
        grids = sorted(p.name for p in (log_dir / "reconstructions").iterdir())
        assert len(grids) == EPOCHS, grids  # one per epoch; the final one is the last epoch's
    if any(c.endswith("KNNMonitor") for c in callbacks):
        assert "knn/top1" in (log_dir / "metrics.csv").read_text().splitlines()[0]
    if any(c.endswith("PatchPCAImages") for c in callbacks):
        pictures = sorted(p.name for p in (log_dir / "patch_pca").iterdir())
        assert len(pictures) == EPOCHS, pictures
    logged = "train/rankme" in (log_dir / "metrics.csv").read_text().splitlines()[0]
    reports_features = method in ("simclr", "swav", "dinov2")               # MAE and SimMIM report none
    assert logged is reports_features, "RankMe logged on 2 ranks, where the method reports features"


def _callbacks_of(config: Path) -> list[str]:
    return [c["class_path"] for c in yaml.safe_load(config.read_text())["trainer"]["callbacks"]]
