"""ReconstructionImages: original | masked | reconstruction grids for masked image modeling.

The method under training provides ``reconstruct(images) -> (masked_images, reconstruction)`` in
the normalised pixel space of its input (MAE and SimMIM do); this callback un-normalises them with
the run's preprocessing, lays them out one image per row, and writes the grid to every logger that
shows images (TensorBoard, wandb) and as a PNG under ``<log_dir>/reconstructions/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torchvision.utils import make_grid, save_image

from selfsup.eval.features import eval_mode, model_call

log = logging.getLogger(__name__)


def reconstruction_grid(images: Tensor, masked: Tensor, reconstruction: Tensor, mean: tuple[float, ...],
                        std: tuple[float, ...], scale: int = 1) -> Tensor:
    """A ``(3, H', W')`` grid in [0, 1]: one row per image with original, masked and reconstruction,
    each enlarged ``scale`` times (nearest neighbour, so patches stay sharp)."""
    channels = reconstruction.shape[1]
    images = images.expand(-1, channels, -1, -1) if images.shape[1] != channels else images
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    columns = torch.stack([images.float(), masked.float(), reconstruction.float()])  # (3, B, C, H, W)
    columns = (columns * std_t + mean_t).clamp(0, 1)
    tiles = rearrange(columns, "k b c h w -> (b k) c h w")
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    return make_grid(tiles, nrow=3, padding=2, pad_value=1.0)


class ReconstructionImages(L.Callback):
    """Every ``every_n_epochs``, reconstruct a fixed batch of ``num_images`` validation images.

    The batch and the mask are the same every time (``seed``), so successive grids show progress.
    Images come from the labelled test split when there is one, else from the training split, with
    the deterministic eval transform. Images smaller than ``min_display_size`` pixels are enlarged by a
    whole factor. A final grid is written at the end of training.
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 8, seed: int = 0, min_display_size: int = 96):
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be at least 1")
        if num_images < 1:
            raise ValueError(f"num_images={num_images} must be at least 1")
        self.every_n_epochs, self.num_images, self.seed = every_n_epochs, num_images, seed
        self.min_display_size = min_display_size
        self.images: Tensor | None = None
        self.last_step: int | None = None
        self.paths: list[Path] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "reconstruct", None)):
            raise TypeError(f"ReconstructionImages needs a method with reconstruct(images), such as MAE or "
                            f"SimMIM; {type(pl_module).__name__} has none")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_step != trainer.global_step:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Render the grid for the current weights and send it to the loggers and the run directory.

        Every rank calls it together: the run directory is resolved on all of them (``trainer.log_dir``
        broadcasts), every rank reconstructs the same fixed images (inside the wrapped model when the
        parameters are sharded), and rank 0 alone writes."""
        self.last_step = trainer.global_step
        out = Path(trainer.log_dir or trainer.default_root_dir) / "reconstructions"
        images = self._fixed_images(trainer).to(pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        with eval_mode(pl_module), torch.no_grad():
            masked, reconstruction = model_call(trainer, pl_module, "reconstruct")(images, generator=generator)
        if trainer.is_global_zero:
            preprocessing = trainer.datamodule.preprocessing
            scale = max(1, self.min_display_size // images.shape[-1])
            grid = reconstruction_grid(images, masked, reconstruction, preprocessing.mean, preprocessing.std,
                                       scale).cpu()
            self._to_loggers(trainer, grid)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"epoch{trainer.current_epoch:03d}-step{trainer.global_step:06d}.png"
            save_image(grid, path)
            self.paths.append(path)
            log.info("wrote %s", path)

    def _fixed_images(self, trainer: L.Trainer) -> Tensor:
        if self.images is None:
            datamodule = trainer.datamodule
            loader = datamodule.probe_dataloader("test" if datamodule.has_labels else "pretrain")
            batches: list[Tensor] = []
            for batch in loader:
                batches += list(batch.views[0])
                if len(batches) >= self.num_images:
                    break
            self.images = torch.stack(batches[:self.num_images])
        return self.images

    def _to_loggers(self, trainer: L.Trainer, grid: Tensor) -> None:
        for logger in trainer.loggers:
            experiment: Any = getattr(logger, "experiment", None)
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image("reconstructions", images=[grid], step=trainer.global_step)
            elif hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("reconstructions", grid, global_step=trainer.global_step)
