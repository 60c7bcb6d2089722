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


def test_scale_last_norm_is_simclr_batchnorm_with_scale_and_no_shift():
    mlp = MLP(8, 16, 4, last_norm="scale")
    final, linear = mlp[-1], mlp[-2]
    assert isinstance(final, nn.BatchNorm1d) and isinstance(linear, nn.Linear) and linear.bias is None
    assert final.weight.requires_grad and not final.bias.requires_grad
    assert torch.equal(final.bias, torch.zeros(4))
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.5)
    x = torch.randn(32, 8)
    mlp.train()(x).pow(3).sum().backward()
    optimizer.step()
    assert torch.equal(final.bias, torch.zeros(4)) and not torch.equal(final.weight, torch.ones(4))
    out = mlp(x).detach()  # per feature: zero mean, standard deviation = the learned scale
    torch.testing.assert_close(out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), final.weight.detach().abs(), atol=1e-3, rtol=1e-3)


def test_unknown_last_norm_names_the_choices():
    with pytest.raises(ValueError, match=r"last_norm='ln' must be one of"):
        MLP(8, 16, 4, last_norm="ln")


def test_mlp_last_bias_overrides_the_default():
    assert MLP(8, 16, 4, num_layers=3)[-1].bias is not None
    no_bias = MLP(8, 16, 4, num_layers=3, last_bias=False)
    assert all(m.bias is None for m in no_bias if isinstance(m, nn.Linear))  # BatchNorm after the hidden ones
    assert MLP(8, 16, 4, num_layers=2, last_norm=True, last_bias=True)[-2].bias is not None
