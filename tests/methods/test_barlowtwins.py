import numpy as np
import pytest
import torch

from selfsup.data.datamodule import Batch
from selfsup.methods.barlowtwins import BarlowTwins, barlow_twins_loss
from selfsup.models.encoder import Encoder
from tests.helpers.dist import run_distributed
from tests.helpers.methods import assert_ranks_match, loss_and_grads, rank_share, train_on_fixed_pairs


def reference_barlow_twins(a: np.ndarray, b: np.ndarray, lambd: float = 0.0051, scale: float = 1.0,
                           eps: float = 1e-5) -> dict[str, float]:
    """Barlow Twins written out with loops, in float64: each dimension standardised over the batch (mean 0,
    biased variance 1, as an affine-free BatchNorm), then the cross-correlation matrix against the identity."""
    n, d = a.shape

    def standardise(z: np.ndarray) -> list[list[float]]:
        out = [[0.0] * d for _ in range(n)]
        for j in range(d):
            mean = sum(z[i, j] for i in range(n)) / n
            var = sum((z[i, j] - mean) ** 2 for i in range(n)) / n
            for i in range(n):
                out[i][j] = (z[i, j] - mean) / (var + eps) ** 0.5
        return out

    na, nb = standardise(a), standardise(b)
    c = [[sum(na[k][i] * nb[k][j] for k in range(n)) / n for j in range(d)] for i in range(d)]
    on = sum((1 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if i != j)
    return {"loss": scale * (on + lambd * off), "on_diagonal": on, "off_diagonal": off}


@pytest.mark.parametrize("batch,dim,lambd", [(2, 3, 0.0051), (7, 5, 0.1), (16, 8, 1.0)])
def test_barlow_twins_loss_matches_loop_reference(batch, dim, lambd):
    rng = np.random.default_rng(batch)
    a = rng.normal(size=(batch, dim))
    b = 0.5 * a + rng.normal(size=(batch, dim))  # correlated, so the diagonal is not all noise
    got = barlow_twins_loss(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), lambd)
    want = reference_barlow_twins(a, b, lambd)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].item() == pytest.approx(want[k], rel=1e-4, abs=1e-5), k


def test_scale_loss_multiplies_the_loss_only():
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    plain, scaled = barlow_twins_loss(a, b), barlow_twins_loss(a, b, scale_loss=0.1)
    torch.testing.assert_close(scaled["loss"], 0.1 * plain["loss"])
    torch.testing.assert_close(scaled["off_diagonal"], plain["off_diagonal"])


def test_identical_decorrelated_views_give_zero_loss():
    z = torch.linalg.qr(torch.randn(64, 8, dtype=torch.float64))[0]  # orthogonal columns...
    z = (z - z.mean(0)) * 8 / z.std(0, unbiased=False)  # ...standardised: a near-identity cross-correlation
    got = barlow_twins_loss(z, z, eps=0.0)
    assert got["on_diagonal"].item() == pytest.approx(0.0, abs=1e-10)
    assert got["off_diagonal"].item() < 0.05


def test_barlow_twins_loss_is_float32_under_bf16_autocast():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = barlow_twins_loss(a.bfloat16(), b.bfloat16())
    assert got["loss"].dtype == torch.float32
    torch.testing.assert_close(got["loss"], barlow_twins_loss(a.bfloat16().float(), b.bfloat16().float())["loss"])


def _tiny_barlow() -> BarlowTwins:
    """In float64: standardising 16 dimensions over 8 images amplifies float32 rounding beyond a tight rtol."""
    torch.manual_seed(0)
    return BarlowTwins(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16).double()


def _global_batch(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2)]


def _rank_fn(rank: int, world_size: int):
    return rank_share(_tiny_barlow(), _global_batch(), rank, world_size)


def test_two_ranks_equal_one_rank_on_the_global_batch():
    ranks = run_distributed(_rank_fn, 2, timeout=60)
    terms, grads = loss_and_grads(_tiny_barlow(), _global_batch())
    assert_ranks_match(ranks, terms, grads, (1e-10, 1e-12), (1e-8, 1e-10))  # the cross-correlation is over the global batch, identical on each rank


def test_projector_is_the_papers_shape():
    from torch import nn

    method = BarlowTwins(Encoder("test_resnet"))
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [8192, 8192, 8192] and all(m.bias is None for m in linears)
    assert method.lambd == 0.0051 and method.scale_loss == 1.0


def test_biases_and_norms_take_the_papers_learning_rate_under_lars():
    """The paper's LARS: weights at lr with the trust ratio, biases and BatchNorm parameters at 0.024 x lr
    (0.0048 against 0.2), without weight decay and without the trust ratio. One step from zero momentum,
    compared with the update written out here."""
    from torch import nn

    from selfsup.optim import Constant, create_optimizer, lr_scheduler

    torch.manual_seed(0)
    method = BarlowTwins(Encoder("test_resnet"), proj_hidden_dim=16, proj_dim=8)
    lr, wd = 1.6, 1.5e-6
    opt = create_optimizer(method, "lars", lr=lr, weight_decay=wd, no_decay=None, lr_scales=method.lr_scales)
    lr_scheduler(opt, Constant(1.0), 10, 10)
    for p in method.parameters():
        p.grad = torch.randn_like(p)
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in method.named_parameters()}
    opt.step()
    norms = {n for n, m in method.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    checked = {"bias": 0, "weight": 0}
    for name, p in method.named_parameters():
        w, g = before[name]
        if p.ndim == 1:                                   # a bias or a BatchNorm weight
            assert name.rsplit(".", 1)[0] in norms or name.endswith("bias"), name
            expected = w - 0.024 * lr * g
            checked["bias"] += 1
        else:
            trust = 0.001 * w.norm() / (g.norm() + wd * w.norm())  # timm's (and the official) trust coefficient
            expected = w - lr * trust * (g + wd * w)
            checked["weight"] += 1
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
    assert checked["bias"] > 4 and checked["weight"] > 4, checked
    one_rate = BarlowTwins(Encoder("test_resnet"), proj_hidden_dim=16, proj_dim=8, bias_lr_ratio=1.0)
    assert one_rate.lr_scales == {}


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="lambd"):
        BarlowTwins(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=8, lambd=-1)
    with pytest.raises(ValueError, match="bias_lr_ratio"):
        BarlowTwins(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=8, bias_lr_ratio=0)
    method = BarlowTwins(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=8)
    views = [v.float() for v in _global_batch(2)] + [torch.randn(2, 3, 32, 32)]
    with pytest.raises(ValueError, match="exactly 2 views"):
        method.training_loss(Batch(views=views, labels=torch.zeros(2, dtype=torch.long), index=torch.arange(2)))


def test_a_few_steps_lower_the_loss():
    """Learning check: on fixed augmented pairs, Adam steps move the cross-correlation towards the identity."""
    torch.manual_seed(0)
    method = BarlowTwins(Encoder("test_resnet"), proj_hidden_dim=64, proj_dim=32)
    first, last = train_on_fixed_pairs(method)
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["on_diagonal"] < first["on_diagonal"], (first, last)
