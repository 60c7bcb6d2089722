import math

import numpy as np
import pytest
import torch

from selfsup.data.datamodule import Batch
from selfsup.methods.simclr import SimCLR, nt_xent
from selfsup.models.encoder import Encoder
from tests.helpers.dist import run_distributed


def reference_nt_xent(views: list[np.ndarray], temperature: float) -> float:
    """Explicit-loop NT-Xent in float64: every embedding is an anchor; the other views of its image are
    positives (averaged); every other embedding in the batch is a negative."""
    z = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in views]
    num_views, batch = len(z), len(z[0])
    flat = [(v, i, z[v][i]) for v in range(num_views) for i in range(batch)]
    losses = []
    for va, ia, a in flat:
        denom = sum(math.exp(a @ k / temperature) for vk, ik, k in flat if (vk, ik) != (va, ia))
        pos = [-(a @ k / temperature - math.log(denom)) for vk, ik, k in flat if ik == ia and vk != va]
        losses.append(sum(pos) / len(pos))
    return float(np.mean(losses))


@pytest.mark.parametrize("batch", [1, 4, 9])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_reference(batch, temperature):
    rng = np.random.default_rng(batch)
    views = [rng.normal(size=(batch, 16)) for _ in range(2)]
    got = nt_xent([torch.tensor(v, dtype=torch.float32) for v in views], temperature)
    assert got.item() == pytest.approx(reference_nt_xent(views, temperature), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("num_views", [3, 4])
def test_nt_xent_multi_view_matches_reference(num_views):
    rng = np.random.default_rng(num_views)
    views = [rng.normal(size=(5, 8)) for _ in range(num_views)]
    got = nt_xent([torch.tensor(v, dtype=torch.float32) for v in views], 0.2)
    assert got.item() == pytest.approx(reference_nt_xent(views, 0.2), rel=1e-4)


def test_nt_xent_is_float32_under_bf16_autocast():
    views = [torch.randn(8, 16), torch.randn(8, 16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent([v.bfloat16() for v in views], 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, nt_xent([v.bfloat16().float() for v in views], 0.1))


def _tiny_simclr() -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(Encoder("resnet18"), proj_hidden_dim=32, proj_dim=16, temperature=0.2)


def _global_batch(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)]


def _loss_and_grads(model: SimCLR, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.eval()  # BatchNorm on running statistics: a per-sample function, so ranks are comparable
    batch = Batch(views=views, labels=torch.zeros(len(views[0]), dtype=torch.long), index=torch.arange(len(views[0])))
    loss = model.training_loss(batch)["loss"]
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _rank_fn(rank: int, world_size: int):
    views = _global_batch()
    per_rank = len(views[0]) // world_size
    local = [v[rank * per_rank:(rank + 1) * per_rank] for v in views]
    loss, grads = _loss_and_grads(_tiny_simclr(), local)
    for g in grads.values():  # what DDP does to gradients
        torch.distributed.all_reduce(g)
        g /= world_size
    torch.distributed.all_reduce(loss)
    return loss / world_size, grads


def test_two_ranks_equal_one_rank_on_the_global_batch():
    ranks = run_distributed(_rank_fn, 2)
    loss, grads = _loss_and_grads(_tiny_simclr(), _global_batch())
    for rank_loss, rank_grads in ranks:
        torch.testing.assert_close(rank_loss, loss, rtol=1e-5, atol=1e-6)
        assert rank_grads.keys() == grads.keys()
        for k in grads:
            torch.testing.assert_close(rank_grads[k], grads[k], rtol=1e-4, atol=1e-6, msg=k)
    assert any(k.startswith("encoder.") and g.abs().sum() > 0 for k, g in grads.items())


def test_training_loss_returns_detached_features():
    model = _tiny_simclr()
    views = _global_batch(4)
    out = model.training_loss(Batch(views=views, labels=torch.zeros(4, dtype=torch.long), index=torch.arange(4)))
    assert out["features"].shape == (4, 512) and not out["features"].requires_grad
    assert out["loss"].requires_grad


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        SimCLR(Encoder("resnet18"), temperature=0)


@pytest.mark.slow
def test_short_run_on_embedded_data_beats_random_init(tmp_path):
    """Real learning: a short SimCLR run improves kNN accuracy over the same encoder at initialisation."""
    import lightning as L

    from torch.utils.data import DataLoader, Subset

    from selfsup.data.datamodule import SSLDataModule, ViewDataset, collate_views
    from selfsup.data.transforms import EvalView
    from selfsup.eval.features import extract_features, recalibrate_batchnorm
    from selfsup.eval.knn import knn_accuracy

    data = SSLDataModule(batch_size=128, num_workers=0, image_size=32)
    model = SimCLR(Encoder("resnet18"), proj_hidden_dim=256, temperature=0.2, base_lr=2e-3, weight_decay=1e-4,
                   warmup_epochs=0, channels_last=True)
    initial = Encoder("resnet18")
    initial.load_state_dict(model.encoder.state_dict())
    view = EvalView()
    view.bind(data.preprocessing)

    def loader(split: str, every: int) -> DataLoader:  # every n-th image: a class-balanced subset
        images = data.split(split)
        return DataLoader(ViewDataset(Subset(images, range(0, len(images), every)), view), batch_size=500,
                          collate_fn=collate_views)

    recalibrate_batchnorm(initial, loader("train", 5))

    def knn(encoder) -> float:
        return knn_accuracy(*extract_features(encoder, loader("train", 5)),
                            *extract_features(encoder, loader("test", 2)))["top1"]

    L.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(model, data)
    before, after = knn(initial), knn(model.encoder)
    assert after > before + 0.05, (before, after)


def test_proj_last_bn_ends_the_projector_with_simclr_batchnorm():
    from torch import nn

    from selfsup.models.heads import ScaleBatchNorm1d

    plain = SimCLR(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16)
    assert isinstance(plain.projector[-1], nn.Linear) and plain.projector[-1].bias is not None
    method = SimCLR(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16, proj_last_bn=True)
    last, linear = method.projector[-1], method.projector[-2]
    assert type(last) is ScaleBatchNorm1d and last.num_features == 16
    assert isinstance(linear, nn.Linear) and linear.bias is None  # the BatchNorm would remove a bias anyway
    assert last.weight.requires_grad and not last.bias.requires_grad
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert "projector.4.weight" in trainable and "projector.4.bias" not in trainable
