"""The `selfsup` command: the demo recipe, overrides, resume, loggers and config errors."""

from __future__ import annotations

import pytest
import torch
import yaml
from jsonargparse import Namespace

from selfsup.cli import ROOT_DIR_PLACEHOLDER, loggers_in_run_directory, main
from tests.helpers.cli import fit


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


def test_one_run_directory_holds_logs_config_and_checkpoints(tmp_path):
    """Only ``--trainer.default_root_dir`` is set: the default logger follows it."""
    fit(tmp_path / "run")
    version = tmp_path / "run" / "lightning_logs" / "version_0"
    assert (version / "metrics.csv").is_file() and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_logger_save_dir_follows_the_run_directory_unless_set():
    root = "runs/x"
    csv = Namespace(class_path="CSVLogger", init_args=Namespace(save_dir=ROOT_DIR_PLACEHOLDER))
    unset = Namespace(class_path="CometLogger", init_args=Namespace(save_dir=None))
    chosen = Namespace(class_path="TensorBoardLogger", init_args=Namespace(save_dir="runs/tb"))
    without = Namespace(class_path="NeptuneLogger", init_args=Namespace(project="p"))
    out = loggers_in_run_directory([csv, unset, chosen, without], root)
    assert [logger.init_args.get("save_dir") for logger in out] == [root, root, "runs/tb", None]
    assert "save_dir" not in out[3].init_args, "a logger without a save_dir argument gets none"
    assert loggers_in_run_directory(False, root) is False


def test_wandb_logger_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    fit(tmp_path, "--trainer.logger", "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.offline", "true")
    assert list((tmp_path / "wandb").glob("offline-run-*")), "a chosen logger also writes into the run directory"


def test_tensorboard_logger_with_its_own_save_dir(tmp_path):
    fit(tmp_path / "run", "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "tb"))
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "an explicit save_dir is honoured"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_unknown_config_key_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit(tmp_path, "--model.init_args.temprature", "0.3")
    assert "temprature" in capsys.readouterr().err


def test_missing_dataset_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        fit(tmp_path, "--data.dataset", "folder", "--data.root", str(tmp_path / "no-such-dir"))


def test_help_lists_every_subcommand(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "eval", "export", "shards"):
        assert f"\n  {command} " in out, command
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--protocols" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["shards", "write", "--help"])
    assert "--max-count" in capsys.readouterr().out
