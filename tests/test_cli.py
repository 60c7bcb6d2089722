"""The `selfsup` command: the demo recipe, overrides, resume, loggers and config errors."""

from __future__ import annotations

import pytest
import torch

from selfsup.cli import main

TINY = ["--trainer.max_steps", "2", "--data.batch_size", "16", "--data.num_workers", "0",
        "--data.image_size", "16", "--trainer.limit_val_batches", "2", "--trainer.callbacks",
        '[{"class_path": "selfsup.eval.callbacks.OnlineLinearProbe"}]',
        "--model.init_args.proj_hidden_dim", "32", "--trainer.precision", "32", "--trainer.log_every_n_steps", "1"]


def fit(tmp_path, *extra: str) -> None:
    main(["fit", "--config", "recipes/demo/simclr.yaml", *TINY, "--trainer.default_root_dir", str(tmp_path),
          "--trainer.logger.init_args.save_dir", str(tmp_path), *extra])


def test_demo_recipe_runs_and_writes_last_checkpoint(tmp_path):
    fit(tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert ckpt["selfsup"]["preprocessing"]["image_size"] == 16
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss" in header and "train/lr" in header


def test_resume_matches_uninterrupted_run(tmp_path):
    """Resume from the epoch-1 checkpoint of a 2-epoch run (same config, so the same schedule): the
    resumed run must end with the same weights as the run that was never stopped."""
    run = ["--trainer.max_steps", "-1", "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "2",
           "--checkpoint.save_top_k", "-1"]
    fit(tmp_path / "straight", *run)
    first_epoch = tmp_path / "straight" / "checkpoints" / "epoch=0-step=2.ckpt"
    fit(tmp_path / "resumed", *run, "--ckpt_path", str(first_epoch))
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 4
    first = torch.load(first_epoch, weights_only=True)["state_dict"]
    assert not torch.equal(first["encoder.model.conv1.weight"], straight["state_dict"]["encoder.model.conv1.weight"])
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key


def test_wandb_logger_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    fit(tmp_path, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.offline", "true", "--trainer.logger.init_args.save_dir", str(tmp_path))
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_tensorboard_logger(tmp_path):
    fit(tmp_path, "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path))
    assert list(tmp_path.rglob("events.out.tfevents.*"))


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit(tmp_path, "--model.init_args.temprature", "0.3")
    assert "temprature" in capsys.readouterr().err


def test_missing_dataset_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        fit(tmp_path, "--data.dataset", "folder", "--data.root", str(tmp_path / "no-such-dir"))
