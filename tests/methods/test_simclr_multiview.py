"""SimCLR beyond two views: the 2-view loss is the standard NT-Xent, and 4 views train end to end."""

import numpy as np
import pytest
import torch

from selfsup.data.datamodule import SSLDataModule
from selfsup.data.transforms import ContrastiveViews
from selfsup.methods.simclr import SimCLR, nt_xent
from selfsup.models.encoder import Encoder


def standard_nt_xent(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    """The SimCLR paper's form: a (2N, 2N) similarity matrix without its diagonal, cross entropy
    towards the other view of the same image (row i's positive is i + N, and i - N)."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    logits = z @ z.T / temperature
    np.fill_diagonal(logits, -np.inf)
    positive = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    top = logits.max(axis=1, keepdims=True)
    log_normaliser = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_normaliser - logits[np.arange(2 * n), positive]))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_two_views_equal_the_standard_nt_xent(temperature):
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    got = nt_xent([torch.tensor(z1, dtype=torch.float32), torch.tensor(z2, dtype=torch.float32)], temperature)
    assert got.item() == pytest.approx(standard_nt_xent(z1, z2, temperature), rel=1e-5)


def test_simclr_trains_on_four_views():
    data = SSLDataModule(views=ContrastiveViews(num_views=4), image_size=16, batch_size=8, num_workers=0)
    data.setup("fit")
    batch = data.prepare_batch(next(iter(data.train_dataloader())))
    assert len(batch.views) == 4 and all(v.shape == (8, 1, 16, 16) for v in batch.views)
    model = SimCLR(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16, temperature=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        loss = model.training_loss(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.1, losses
