import pytest
import torch
from torch import nn

from selfsup.models.heads import MLP


def test_mlp_structure():
    mlp = MLP(8, 16, 4, num_layers=3)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 4)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in mlp) == 2
    assert linears[0].bias is None and linears[-1].bias is not None  # BN follows hidden layers
    assert mlp(torch.randn(5, 8)).shape == (5, 4)


def test_mlp_without_norm_and_last_norm():
    assert not any(isinstance(m, nn.BatchNorm1d) for m in MLP(8, 16, 4, norm=None))
    out = MLP(8, 16, 4, last_norm=True).train()(torch.randn(64, 8))
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)


def test_mlp_single_layer_is_linear():
    mlp = MLP(8, 16, 4, num_layers=1)
    assert len(mlp) == 1 and isinstance(mlp[0], nn.Linear)


@pytest.mark.parametrize("kwargs", [dict(num_layers=0), dict(norm="ln")])
def test_mlp_bad_config(kwargs):
    with pytest.raises(ValueError):
        MLP(8, 16, 4, **kwargs)
