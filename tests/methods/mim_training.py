"""A few real optimisation steps of a masked-image-modeling method on the embedded Fashion-MNIST."""

from __future__ import annotations

import itertools

import torch

from selfsup.data.datamodule import SSLDataModule
from selfsup.data.transforms import MaskedImageView
from selfsup.methods.base import SSLMethod


def held_out_loss(method: SSLMethod, batch, seed: int = 123) -> float:
    """The method's loss on ``batch`` with a fixed mask (same seed), in eval mode."""
    method.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        loss = method.training_loss(batch)["loss"].item()
    method.train()
    return loss


def held_out_loss_drop(method: SSLMethod, steps: int, lr: float = 2e-3, batch_size: int = 64,
                       image_size: int = 16) -> tuple[float, float]:
    """Train ``steps`` AdamW steps; return the held-out loss (test images, fixed mask) before and after."""
    data = SSLDataModule(image_size=image_size, batch_size=batch_size, eval_batch_size=128, num_workers=0,
                         views=MaskedImageView(crop_scale=(0.5, 1.0)))
    data.setup("fit")
    held_out = next(iter(data.probe_dataloader("test")))
    before = held_out_loss(method, held_out)
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention on a shared machine
    try:
        for batch in itertools.islice(itertools.cycle(data.train_dataloader()), steps):
            loss = method.training_loss(data.prepare_batch(batch))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return before, held_out_loss(method, held_out)
