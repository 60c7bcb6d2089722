"""Pictures of a run on a fixed batch of images: the shared machinery, and the PCA of patch features.

:class:`FixedImagePictures` picks ``num_images`` images once (the labelled test split when there is one, else
the training split, with the deterministic eval transform), renders a grid every ``every_n_epochs`` and at the
end of training, and writes it to every logger that shows images (TensorBoard, wandb) and as a PNG under
``<log_dir>/<folder>/``. Subclasses implement :meth:`render`.

:class:`PatchPCAImages` is the DINOv2 figure: the patch features of the representation's encoder (the EMA
teacher's for DINO, iBOT and DINOv2) reduced to their first 3 principal components, computed over every patch
of the fixed images together, each component scaled to [0, 1] and shown as RGB over the image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid, save_image

from selfsup.eval.features import eval_mode, model_call

log = logging.getLogger(__name__)


class FixedImagePictures(L.Callback):
    """Every ``every_n_epochs`` (and once more at the end of training), a grid of :meth:`render` on the same
    ``num_images`` images; images smaller than ``min_display_size`` pixels are enlarged by a whole factor."""

    folder = "pictures"  # under the run's log directory; also the loggers' image key

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

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, images: Tensor) -> Tensor:
        """The ``(3, H, W)`` grid in [0, 1] for ``images`` (on the module's device); every rank calls it."""
        raise NotImplementedError

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_step != trainer.global_step:
            self.write(trainer, pl_module)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Render the grid for the current weights and send it to the loggers and the run directory.

        Every rank calls it together: the run directory is resolved on all of them (``trainer.log_dir``
        broadcasts), every rank renders the same fixed images (inside the wrapped model when the parameters
        are sharded), and rank 0 alone writes."""
        self.last_step = trainer.global_step
        out = Path(trainer.log_dir or trainer.default_root_dir) / self.folder
        images = self.fixed_images(trainer).to(pl_module.device)
        with eval_mode(pl_module), torch.no_grad():
            grid = self.render(trainer, pl_module, images)
        if trainer.is_global_zero:
            grid = grid.cpu()
            self.to_loggers(trainer, grid)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"epoch{trainer.current_epoch:03d}-step{trainer.global_step:06d}.png"
            save_image(grid, path)
            self.paths.append(path)
            log.info("wrote %s", path)

    def display_scale(self, images: Tensor) -> int:
        return max(1, self.min_display_size // images.shape[-1])

    def fixed_images(self, trainer: L.Trainer) -> Tensor:
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

    def to_loggers(self, trainer: L.Trainer, grid: Tensor) -> None:
        for logger in trainer.loggers:
            experiment: Any = getattr(logger, "experiment", None)
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(self.folder, images=[grid], step=trainer.global_step)
            elif hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image(self.folder, grid, global_step=trainer.global_step)


def pca_rgb(patches: Tensor) -> Tensor:
    """``(B, h, w, D)`` patch features -> ``(B, 3, h, w)`` in [0, 1]: the projections on the first 3 principal
    components of all ``B * h * w`` patches together, each min-max scaled over those patches. A component's
    sign is fixed so that its largest-magnitude projection is positive (repeatable colours)."""
    b, h, w, d = patches.shape
    x = patches.reshape(-1, d).float()
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(3, vh.shape[0])
    projected = x @ vh[:k].T                                               # (N, k)
    sign = torch.sign(projected.gather(0, projected.abs().argmax(0, keepdim=True)))
    projected = projected * torch.where(sign == 0, 1.0, sign)
    low, high = projected.min(0).values, projected.max(0).values
    rgb = (projected - low) / (high - low).clamp_min(1e-12)
    if k < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(len(rgb), 3 - k)], dim=1)
    return rgb.reshape(b, h, w, 3).permute(0, 3, 1, 2)


class PatchPCAImages(FixedImagePictures):
    """The first 3 principal components of the representation's patch features as RGB, beside each image
    (one row per image: the image, then its PCA map), under ``<log_dir>/patch_pca/``. ViT methods only."""

    folder = "patch_pca"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not getattr(pl_module.encoder, "is_vit", False) or not hasattr(pl_module.encoder.model, "blocks"):
            raise TypeError(f"PatchPCAImages needs a ViT encoder with patch tokens; "
                            f"{pl_module.encoder.config['name']!r} has none")

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule, images: Tensor) -> Tensor:
        encoder = pl_module.encoder
        tokens = model_call(trainer, pl_module, "represent")(images, tokens=True)
        grid = (images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size)
        patches = tokens[:, encoder.num_prefix_tokens:].reshape(len(images), *grid, -1)
        maps = F.interpolate(pca_rgb(patches), size=images.shape[-2:], mode="nearest")
        preprocessing = trainer.datamodule.preprocessing
        mean = torch.tensor(preprocessing.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(preprocessing.std, device=images.device).view(1, -1, 1, 1)
        shown = (images.float() * std + mean).clamp(0, 1)
        shown = shown.expand(-1, 3, -1, -1) if shown.shape[1] == 1 else shown[:, :3]  # multi-band: first 3
        tiles = torch.stack([shown, maps], dim=1).flatten(0, 1)             # image, map, image, map, ...
        scale = self.display_scale(images)
        if scale > 1:
            tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
        return make_grid(tiles, nrow=2, padding=2, pad_value=1.0)
