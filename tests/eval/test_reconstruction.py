"""ReconstructionImages: the grid layout, the loggers, and MAE/SimMIM through the CLI writing PNGs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.eval.reconstruction import ReconstructionImages, reconstruction_grid


def test_grid_rows_are_original_masked_reconstruction_unnormalised():
    mean, std = (0.5,), (0.25,)
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    masked, reconstruction = torch.zeros_like(images), torch.full_like(images, -2.0)
    grid = reconstruction_grid(images, masked, reconstruction, mean, std)
    assert grid.shape == (3, 2 * (8 + 2) + 2, 3 * (8 + 2) + 2)  # 2 rows x 3 columns, padding 2
    for row in range(2):
        top = 2 + row * 10
        original = grid[0, top:top + 8, 2:10]
        assert torch.allclose(original, (images[row, 0] * 0.25 + 0.5).clamp(0, 1))
        assert torch.allclose(grid[:, top:top + 8, 12:20], torch.full((3, 8, 8), 0.5))  # masked: 0 -> mean
        assert torch.allclose(grid[:, top:top + 8, 22:30], torch.zeros(3, 8, 8))  # -2 -> clamped to black
    enlarged = reconstruction_grid(images, masked, reconstruction, mean, std, scale=2)
    assert enlarged.shape == (3, 2 * (16 + 2) + 2, 3 * (16 + 2) + 2)
    assert torch.equal(enlarged[0, 2:18:2, 2:18:2], grid[0, 2:10, 2:10])  # nearest: every other pixel


def test_images_go_to_tensorboard_and_wandb_style_loggers():
    calls = []
    tensorboard = SimpleNamespace(experiment=SimpleNamespace(add_image=lambda *a, **k: calls.append("tb")))
    wandb = SimpleNamespace(experiment=None, log_image=lambda *a, **k: calls.append("wandb"))
    csv = SimpleNamespace(experiment=SimpleNamespace())
    trainer = SimpleNamespace(loggers=[tensorboard, wandb, csv], global_step=3)
    ReconstructionImages().to_loggers(trainer, torch.zeros(3, 4, 4))
    assert calls == ["tb", "wandb"]


def test_method_without_reconstruct_is_an_error():
    with pytest.raises(TypeError, match="reconstruct"):
        ReconstructionImages().on_fit_start(None, torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="every_n_epochs"):
        ReconstructionImages(every_n_epochs=0)


TINY = ["--trainer.max_steps", "2", "--data.batch_size", "8", "--data.eval_batch_size", "8",
        "--data.num_workers", "0", "--trainer.log_every_n_steps", "1",
        "--model.init_args.encoder.init_args.model_kwargs", '{"depth": 1, "embed_dim": 32, "num_heads": 2}',
        "--trainer.callbacks",
        '[{"class_path": "selfsup.eval.reconstruction.ReconstructionImages", "init_args": {"num_images": 4}}]']


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_cli_run_writes_reconstruction_png(method, tmp_path):
    extra = ["--model.init_args.decoder_depth", "1", "--model.init_args.decoder_width", "32",
             "--model.init_args.decoder_heads", "2"] if method == "mae" else []
    logger = ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger"] if method == "simmim" else []
    main(["fit", "--config", f"recipes/demo/{method}.yaml", *TINY, *extra, *logger,
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path)])
    pngs = list(tmp_path.rglob("reconstructions/*.png"))
    assert [p.name for p in pngs] == ["epoch000-step000002.png"]
    with Image.open(pngs[0]) as png:
        # 4 rows of original | masked | reconstruction, 32 px enlarged 3x for display, 2 px padding
        assert png.size == (3 * (96 + 2) + 2, 4 * (96 + 2) + 2)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    if method == "simmim":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
        events.Reload()
        assert "reconstructions" in events.Tags()["images"]
