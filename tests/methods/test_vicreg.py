import numpy as np
import pytest
import torch

from selfsup.data.datamodule import Batch
from selfsup.methods.vicreg import VICReg, vicreg_loss
from selfsup.models.encoder import Encoder
from tests.helpers.dist import run_distributed
from tests.helpers.methods import assert_ranks_match, loss_and_grads, rank_share, train_on_fixed_pairs


def reference_vicreg(a: np.ndarray, b: np.ndarray, lam: float = 25.0, mu: float = 25.0, nu: float = 1.0,
                     gamma: float = 1.0, eps: float = 1e-4) -> dict[str, float]:
    """VICReg written out with loops over images and dimensions, in float64 (paper, eqs. 1-6)."""
    n, d = a.shape
    invariance = sum((a[i, j] - b[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def var_cov(z: np.ndarray) -> tuple[float, float]:
        mean = [sum(z[i, j] for i in range(n)) / n for j in range(d)]
        cov = [[sum((z[i, j] - mean[j]) * (z[i, k] - mean[k]) for i in range(n)) / (n - 1) for k in range(d)]
               for j in range(d)]
        v = sum(max(0.0, gamma - (cov[j][j] + eps) ** 0.5) for j in range(d)) / d
        c = sum(cov[j][k] ** 2 for j in range(d) for k in range(d) if j != k) / d
        return v, c

    (va, ca), (vb, cb) = var_cov(a), var_cov(b)
    variance, covariance = (va + vb) / 2, ca + cb
    return {"loss": lam * invariance + mu * variance + nu * covariance, "invariance": invariance,
            "variance": variance, "covariance": covariance}


@pytest.mark.parametrize("batch,dim,scale", [(2, 3, 1.0), (7, 5, 0.3), (16, 8, 2.0)])
def test_vicreg_loss_matches_loop_reference(batch, dim, scale):
    rng = np.random.default_rng(batch)
    a, b = scale * rng.normal(size=(batch, dim)), scale * rng.normal(size=(batch, dim))
    got = vicreg_loss(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    want = reference_vicreg(a, b)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].item() == pytest.approx(want[k], rel=1e-4, abs=1e-5), k


def test_vicreg_loss_weights_and_std_target():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    got = vicreg_loss(torch.tensor(a), torch.tensor(b), 2.0, 3.0, 0.5, std_target=1.5, eps=1e-3)
    assert got["loss"].item() == pytest.approx(reference_vicreg(a, b, 2.0, 3.0, 0.5, 1.5, 1e-3)["loss"], rel=1e-5)


def test_vicreg_loss_is_float32_under_bf16_autocast():
    a, b = torch.randn(8, 16), torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vicreg_loss(a.bfloat16(), b.bfloat16())
    assert got["loss"].dtype == torch.float32
    torch.testing.assert_close(got["loss"], vicreg_loss(a.bfloat16().float(), b.bfloat16().float())["loss"])


def test_vicreg_loss_needs_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        vicreg_loss(torch.randn(1, 4), torch.randn(1, 4))


def _tiny_vicreg() -> VICReg:
    torch.manual_seed(0)
    return VICReg(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16)


def _global_batch(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)]


def _rank_fn(rank: int, world_size: int):
    return rank_share(_tiny_vicreg(), _global_batch(), rank, world_size)


def test_two_ranks_equal_one_rank_on_the_global_batch():
    ranks = run_distributed(_rank_fn, 2, timeout=60)
    terms, grads = loss_and_grads(_tiny_vicreg(), _global_batch())
    assert_ranks_match(ranks, terms, grads, (1e-5, 1e-6), (1e-4, 1e-6))  # every term is a global-batch statistic, identical on each rank


def test_expander_is_the_papers_shape():
    from torch import nn

    method = VICReg(Encoder("test_resnet"))
    linears = [m for m in method.projector if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [8192, 8192, 8192]
    assert linears[-1].bias is None and sum(isinstance(m, nn.BatchNorm1d) for m in method.projector) == 2
    assert method.loss_args == dict(invariance_weight=25.0, variance_weight=25.0, covariance_weight=1.0,
                                    std_target=1.0, eps=1e-4)


def test_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="variance_weight"):
        VICReg(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=8, variance_weight=-1)
    method = VICReg(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=8)
    views = _global_batch(2) + [torch.randn(2, 3, 32, 32)]
    with pytest.raises(ValueError, match="exactly 2 views"):
        method.training_loss(Batch(views=views, labels=torch.zeros(2, dtype=torch.long), index=torch.arange(2)))


def test_a_few_steps_lower_the_loss_and_spread_the_embeddings():
    """Learning check: on fixed augmented pairs, Adam steps lower the loss and lift the per-dimension std."""
    torch.manual_seed(0)
    method = VICReg(Encoder("test_resnet"), proj_hidden_dim=64, proj_dim=32)
    first, last = train_on_fixed_pairs(method)
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["variance"] < first["variance"], (first, last)
