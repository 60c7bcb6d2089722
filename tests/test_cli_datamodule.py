"""`selfsup fit` with a data module of one's own, named by class_path; the shipped recipes, which write
`data:` as plain SSLDataModule arguments, parse as before, and `--data.*` overrides still reach them."""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from selfsup.cli import main, selfsup_cli
from selfsup.data.datamodule import Batch, SSLDataModule
from tests.helpers.checkpoints import one_thread  # noqa: F401
from tests.helpers.cli import TINY_SIMCLR_YAML

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(REPO)) for p in REPO.glob("recipes/*/*.yaml") if p.parent.name != "slurm")


class TinyNoise(L.LightningDataModule):
    """A user's data module: random ``image_size`` images, two noisy views each, no labels, no SSLDataModule."""

    loaders_made = 0

    def __init__(self, num_images: int = 16, image_size: int = 16, batch_size: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.num_images, self.image_size, self.batch_size = num_images, image_size, batch_size

    def train_dataloader(self) -> DataLoader:
        TinyNoise.loaders_made += 1
        images = torch.randn(self.num_images, 3, self.image_size, self.image_size,
                             generator=torch.Generator().manual_seed(0))

        def collate(indices: list[int]) -> Batch:
            index = torch.tensor(indices)
            views = [images[index] + 0.1 * torch.randn_like(images[index]) for _ in range(2)]
            return Batch(views=views, labels=torch.full((len(index),), -1), index=index)

        return DataLoader(range(self.num_images), batch_size=self.batch_size, shuffle=True, drop_last=True,
                          collate_fn=collate)


@pytest.mark.usefixtures("one_thread")
def test_fit_with_a_user_data_module_named_by_class_path(tmp_path, capsys, caplog):
    config = tmp_path / "user_data.yaml"
    config.write_text(f"""
trainer: {{accelerator: cpu, max_steps: 2, limit_val_batches: 0, default_root_dir: {tmp_path / "run"},
          enable_progress_bar: false, enable_model_summary: false, logger: false,
          callbacks: [{{class_path: selfsup.eval.callbacks.OnlineLinearProbe}},
                      {{class_path: selfsup.eval.callbacks.ProbeReport}}]}}
{TINY_SIMCLR_YAML}data:
  class_path: {__name__}.TinyNoise
  init_args: {{batch_size: 4}}
""")
    TinyNoise.loaders_made = 0
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(config), "--data.num_images", "12"])
    assert TinyNoise.loaders_made == 1
    assert "OnlineLinearProbe: probes skipped" in caplog.text and "ProbeReport: probes skipped" in caplog.text
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    stored = checkpoint["datamodule_hyper_parameters"]
    assert stored["_class_path"] == f"{__name__}.TinyNoise" and stored["num_images"] == 12
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["class_path"] == f"{__name__}.TinyNoise", "the saved config names the class again"
    with pytest.raises(SystemExit):  # rather than scoring on the embedded set
        main(["eval", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt")])
    assert re.search(r"trained with data module '.*TinyNoise'.*pass --data", capsys.readouterr().err)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses_to_an_ssl_data_module(recipe, capsys):
    if any(name in recipe for name in ("mae", "simmim", "swav")):
        pytest.importorskip(f"selfsup.methods.{next(n for n in ('mae', 'simmim', 'swav') if n in recipe)}")
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", recipe, "--print_config"])
    assert done.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    written = yaml.safe_load((REPO / recipe).read_text())["data"]
    module, _, name = data["class_path"].rpartition(".")  # jsonargparse writes the shortest import path
    assert getattr(importlib.import_module(module), name) is SSLDataModule
    assert {k: data["init_args"][k] for k in written if k != "views"} == {k: v for k, v in written.items()
                                                                           if k != "views"}


def test_data_overrides_reach_the_default_data_module(tmp_path):
    cli = selfsup_cli(["--config", "recipes/demo/simclr.yaml", "--trainer.default_root_dir", str(tmp_path),
                       "--data.batch_size", "8", "--data.image_size", "24"], run=False)
    assert type(cli.datamodule) is SSLDataModule
    assert cli.datamodule.batch_size == 8 and cli.datamodule.preprocessing.image_size == 24
    assert cli.datamodule.dataset == "fashion_mnist_embedded", "the recipe's other data keys stay"


def test_a_class_path_that_is_not_a_data_module_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        selfsup_cli(["--config", "recipes/demo/simclr.yaml", "--trainer.default_root_dir", str(tmp_path),
                     "--data", "torch.nn.Linear"], run=False)
    assert "LightningDataModule" in capsys.readouterr().err
