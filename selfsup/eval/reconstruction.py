"""ReconstructionImages: original | masked | reconstruction grids for masked image modeling.

The method under training provides ``reconstruct(images) -> (masked_images, reconstruction)`` in
the normalised pixel space of its input (MAE and SimMIM do); this callback un-normalises them with
the run's preprocessing, lays them out one image per row, and writes the grid to every logger that
shows images (TensorBoard, wandb) and as a PNG under ``<log_dir>/reconstructions/``.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torchvision.utils import make_grid

from selfsup.eval.features import model_call
from selfsup.eval.pictures import FixedImagePictures


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


class ReconstructionImages(FixedImagePictures):
    """Every ``every_n_epochs``, reconstruct a fixed batch of ``num_images`` validation images.

    The batch and the mask are the same every time (``seed``), so successive grids show progress.
    Images come from the labelled test split when there is one, else from the training split, with
    the deterministic eval transform. Images smaller than ``min_display_size`` pixels are enlarged by a
    whole factor. A final grid is written at the end of training.
    """

    folder = "reconstructions"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not callable(getattr(pl_module, "reconstruct", None)):
            raise TypeError(f"ReconstructionImages needs a method with reconstruct(images), such as MAE or "
                            f"SimMIM; {type(pl_module).__name__} has none")

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, images: Tensor) -> Tensor:
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        masked, reconstruction = model_call(trainer, pl_module, "reconstruct")(images, generator=generator)
        preprocessing = trainer.datamodule.preprocessing
        return reconstruction_grid(images, masked, reconstruction, preprocessing.mean, preprocessing.std,
                                   self.display_scale(images))
