"""selfsup's fused CPU BatchNorm (selfsup.models.cpu_norm) against BatchNorm computed independently."""
from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.models import cpu_kernels
from selfsup.models.cpu_norm import FusedBatchNorm2d, use_fused_batchnorm
from selfsup.models.encoder import Encoder

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the fused kernels cannot be built here")
FUSED = "_BatchNormActBackward"  # the autograd node of the fused kernels


def _channels_last(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale + shift).to(memory_format=torch.channels_last)


def _reference(x, residual, weight, bias, eps, relu):
    """relu(BatchNorm(x) + residual) in float64, from its definition."""
    x = x.double()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.double()
    return y.clamp(min=0) if relu else y


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12)).item()


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(16, 24, 5, 7), (4, 3, 2, 2), (2, 64, 1, 3)])
def test_output_and_gradients_equal_float64_definition(relu, residual, affine, shape):
    """Output and the gradients of x, residual, weight and bias, against autograd through the float64
    definition; channel counts that are not a multiple of the vector width, and 4 values per channel."""
    bn = FusedBatchNorm2d(shape[1], relu=relu, affine=affine)
    if affine:
        nn.init.normal_(bn.weight, 1.0, 0.5)
        nn.init.normal_(bn.bias, 0.0, 0.5)
    x = _channels_last(*shape, scale=3.0, shift=2.0).requires_grad_()
    r = _channels_last(*shape).requires_grad_() if residual else None
    grad = _channels_last(*shape)
    inputs = [t for t in (x, r) if t is not None] + list(bn.parameters())

    y = bn(x, r)
    assert y.grad_fn.name() == FUSED
    assert y.is_contiguous(memory_format=torch.channels_last)
    ours = torch.autograd.grad(y, inputs, grad)

    weight, bias = (bn.weight, bn.bias) if affine else (None, None)
    expected = _reference(x, r, weight, bias, bn.eps, relu)
    theirs = torch.autograd.grad(expected, inputs, grad.double())
    assert _relative_error(y, expected) < 1e-5
    for got, want in zip(ours, theirs):
        assert _relative_error(got, want) < 1e-4


@pytest.mark.parametrize("mean", [100.0, 1000.0])
def test_channels_with_a_large_mean_keep_their_precision(mean):
    """A nearly constant channel (mean >> spread, common in trained ResNets): output and gradients as close to
    float64 as torch's own float32 BatchNorm (a one-pass E[x^2] - E[x]^2 would lose the variance)."""
    x = _channels_last(32, 4, 6, 6, scale=1.0, shift=mean).requires_grad_()
    grad = _channels_last(32, 4, 6, 6)
    results = []
    for bn in (FusedBatchNorm2d(4, relu=True), nn.BatchNorm2d(4)):
        y = bn(x) if isinstance(bn, FusedBatchNorm2d) else F.relu(bn(x))
        results.append((y, *torch.autograd.grad(y, [x, bn.weight], grad)))
    assert results[0][0].grad_fn.name() == FUSED
    xd = x.detach().double().requires_grad_()
    weight = torch.ones(4, dtype=torch.float64, requires_grad=True)
    exact = _reference(xd, None, weight, torch.zeros(4, dtype=torch.float64), 1e-5, True)
    exact = (exact, *torch.autograd.grad(exact, [xd, weight], grad.double()))
    for ours, theirs, want in zip(*results, exact):
        assert _relative_error(ours, want) <= 2 * _relative_error(theirs, want) + 1e-6


def test_double_backward_raises_instead_of_dropping_terms():
    """A gradient penalty through the kernels would silently miss the BatchNorm's second-order terms (the other
    path, here the identity, keeps the graph alive): it must raise."""
    x = _channels_last(4, 3, 5, 5).requires_grad_()
    y = FusedBatchNorm2d(3, relu=True)(x) + x * x
    (grad,) = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.pow(2).sum().backward()


def test_saved_tensor_hooks_that_change_the_layout():
    """A saved-tensor hook (as save_on_cpu) may hand the tensors back NCHW: the backward must not read them as
    channels-last memory."""
    x = _channels_last(6, 5, 4, 3, shift=1.0).requires_grad_()
    r = _channels_last(6, 5, 4, 3).requires_grad_()
    grad = _channels_last(6, 5, 4, 3)
    bn = FusedBatchNorm2d(5, relu=True)
    plain = bn(x, r)
    expected = torch.autograd.grad(plain, [x, r, bn.weight], grad)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.contiguous()):
        hooked = bn(x, r)
    assert hooked.grad_fn.name() == FUSED
    for ours, theirs in zip(torch.autograd.grad(hooked, [x, r, bn.weight], grad), expected):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_batchnorm2d(momentum):
    """Running mean, unbiased running variance and the batch counter after three steps, as nn.BatchNorm2d
    (momentum None: the cumulative average); in eval mode both then normalise with them alike."""
    ours, torch_bn = FusedBatchNorm2d(8, momentum=momentum), nn.BatchNorm2d(8, momentum=momentum)
    for step in range(3):
        x = _channels_last(6, 8, 3, 3, scale=2.0, shift=step)
        assert ours(x).grad_fn.name() == FUSED
        torch_bn(x)
    assert ours.num_batches_tracked.item() == torch_bn.num_batches_tracked.item() == 3
    torch.testing.assert_close(ours.running_mean, torch_bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, torch_bn.running_var, rtol=1e-5, atol=1e-6)
    ours.eval()
    torch_bn.eval()
    x = _channels_last(2, 8, 3, 3)
    torch.testing.assert_close(ours(x), torch_bn(x), rtol=1e-5, atol=1e-6)


def test_one_module_through_both_paths_in_one_graph():
    """A network run at two resolutions (multi-crop) can take torch's path for one (here NCHW) and the fused
    one for the other (a channels-last or 1x1 map): the fused update of the running statistics must not
    invalidate what torch's BatchNorm saved for its backward."""
    bn, twin = FusedBatchNorm2d(6, relu=True), nn.BatchNorm2d(6)
    nchw = torch.randn(4, 6, 5, 5, requires_grad=True)
    one_by_one = torch.randn(8, 6, 1, 1, requires_grad=True)
    first, second = bn(nchw), bn(one_by_one)
    assert first.grad_fn.name() != FUSED and second.grad_fn.name() == FUSED
    (first.sum() + (second * 2).sum()).backward()
    reference = [t.detach().clone().requires_grad_() for t in (nchw, one_by_one)]
    (F.relu(twin(reference[0])).sum() + (F.relu(twin(reference[1])) * 2).sum()).backward()
    for ours, theirs in zip((nchw, one_by_one, bn.running_var), (*reference, twin.running_var)):
        torch.testing.assert_close(ours.grad if ours.requires_grad else ours, theirs.grad if theirs.requires_grad
                                   else theirs, rtol=1e-5, atol=1e-6)


def test_without_running_statistics_uses_batch_statistics_in_eval_mode():
    ours = FusedBatchNorm2d(4, relu=True, track_running_stats=False).eval()
    x = _channels_last(8, 4, 3, 3, shift=1.0)
    y = ours(x)
    assert y.grad_fn.name() == FUSED
    assert _relative_error(y, _reference(x, None, ours.weight, ours.bias, ours.eps, True)) < 1e-5


def test_nan_propagates_as_in_torch():
    """A NaN activation must reach the loss (the non-finite guard looks there), not vanish in the ReLU."""
    x = _channels_last(4, 8, 3, 3)
    x[1, 2, 0, 1] = float("nan")
    y = FusedBatchNorm2d(8, relu=True)(x.requires_grad_())
    assert y.grad_fn.name() == FUSED
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, 3]).any()  # channel 2's mean is NaN


def test_results_do_not_depend_on_timing():
    """Sums are added in thread order: the same input gives the same bits."""
    x = _channels_last(64, 32, 8, 8, scale=5.0, shift=3.0).requires_grad_()
    grad = _channels_last(64, 32, 8, 8)
    runs = []
    for _ in range(3):
        bn = FusedBatchNorm2d(32, relu=True)
        y = bn(x)
        runs.append((y, *torch.autograd.grad(y, [x, bn.weight], grad)))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.parametrize("case", ["eval", "nchw", "float64", "autocast", "one value per channel"])
def test_other_inputs_go_through_torch_with_the_same_result(case):
    relu_bn = FusedBatchNorm2d(4, relu=True)
    plain = nn.BatchNorm2d(4)
    x = _channels_last(1 if case == "one value per channel" else 5, 4, 1 if case == "one value per channel" else 3, 1)
    r = torch.randn_like(x)
    if case == "eval":
        relu_bn.eval(), plain.eval()
    elif case == "nchw":
        x, r = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    elif case == "float64":
        relu_bn.double(), plain.double()
        x, r = x.double(), r.double()
    if case == "one value per channel":
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            relu_bn(x, r)
        return
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = relu_bn(x, r)
    else:
        y = relu_bn(x, r)
    assert y.grad_fn is None or y.grad_fn.name() != FUSED
    assert torch.equal(y, F.relu(plain(x) + r))


def _twins(name: str, **kwargs) -> tuple[Encoder, Encoder, int]:
    torch.manual_seed(0)
    torch_encoder = Encoder(name, **kwargs).to(memory_format=torch.channels_last).train()
    fused = copy.deepcopy(torch_encoder)
    return torch_encoder, fused, use_fused_batchnorm(fused)


def _norm_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-300)).item()


@pytest.mark.parametrize("name, kwargs, size, fused", [("resnet18", {"cifar_stem": True}, 16, 20),
                                                       ("resnet26", {}, 64, 29)])
def test_resnets_as_accurate_as_torch_batchnorm(name, kwargs, size, fused):
    """A training step of a ResNet (basic blocks; bottleneck blocks) with fused BatchNorms: its output,
    parameter gradients and running statistics are as close to the same network's in float64 (torch's
    BatchNorm) as those of torch's float32 BatchNorm are: within 2x its error, parameter by parameter.
    The modules keep their state-dict keys; the stem's ReLU moves into its BatchNorm."""
    torch_encoder, ours, changed = _twins(name, **kwargs)
    assert changed == fused == sum(type(m) is FusedBatchNorm2d for m in ours.modules())
    assert isinstance(ours.model.act1, nn.Identity) and ours.model.bn1.relu
    assert list(ours.state_dict()) == list(torch_encoder.state_dict())
    exact = copy.deepcopy(torch_encoder).double()

    x = _channels_last(8, 3, size, size)
    results = []
    for encoder in (torch_encoder, ours, exact):
        out = encoder(x.to(exact.model.conv1.weight.dtype if encoder is exact else torch.float32))
        weights = torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)
        grads = torch.autograd.grad((out * weights).sum(), list(encoder.parameters()))
        buffers = [b for b in encoder.buffers() if b.is_floating_point()]
        results.append([out, *grads, *buffers])
    torch_errors = [_norm_error(a, b) for a, b in zip(results[0], results[2])]
    fused_errors = [_norm_error(a, b) for a, b in zip(results[1], results[2])]
    assert 0 < max(torch_errors) < 1e-4
    assert all(f <= 2 * t + 1e-7 for f, t in zip(fused_errors, torch_errors)), max(
        zip(fused_errors, torch_errors), key=lambda e: e[0] / (e[1] + 1e-7))


def test_fused_kernels_run_in_every_block():
    """Every BatchNorm of a fused ResNet-18 takes the fused path in a channels-last training step."""
    _, ours, _ = _twins("resnet18", cifar_stem=True)
    names = []
    for module in ours.modules():
        if isinstance(module, FusedBatchNorm2d):
            module.register_forward_hook(lambda m, args, out: names.append(out.grad_fn.name()))
    ours(_channels_last(4, 3, 16, 16))
    assert names == [FUSED] * 20


def test_blocks_with_extras_or_hooks_keep_their_relu():
    """A block with attention, or a BatchNorm with a hook, is not fused with its ReLU (the hook would see
    the ReLU's output); its BatchNorms still run fused, without ReLU, where nothing is attached."""
    torch.manual_seed(0)
    se = Encoder("seresnet18").train()
    hooked = Encoder("resnet18").train()
    seen = []
    hooked.model.layer1[0].bn1.register_forward_hook(lambda m, args, out: seen.append(out.min().item()))
    reference = copy.deepcopy(hooked)
    use_fused_batchnorm(se)
    use_fused_batchnorm(hooked)
    assert all(not m.relu for m in se.model.layer1.modules() if isinstance(m, FusedBatchNorm2d))
    assert len([m for m in se.model.layer1.modules() if isinstance(m, FusedBatchNorm2d)]) == 4
    assert type(hooked.model.layer1[0].bn1) is nn.BatchNorm2d
    assert type(hooked.model.layer1[0]).__name__ == "BasicBlock"
    assert type(hooked.model.layer1[1]).__name__ == "_FusedBasicBlock"
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    assert _relative_error(hooked(x), reference(x)) < 1e-4
    assert seen[0] < 0  # the BatchNorm's own output, before the ReLU


def test_sync_batchnorm_conversion_refuses_fused_relu():
    from selfsup.models.sync_batchnorm import convert_sync_batchnorm

    _, ours, _ = _twins("resnet18", cifar_stem=True)
    with pytest.raises(ValueError, match="cpu_batchnorm: false"):
        convert_sync_batchnorm(ours)


def test_without_a_compiler_warns_once_and_runs_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_library", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path / "cache"))
    bn = FusedBatchNorm2d(4, relu=True)
    x = _channels_last(5, 4, 3, 3)
    with pytest.warns(RuntimeWarning, match="compiled CPU kernels unavailable"):
        y = bn(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn(x)  # no second warning
    assert y.grad_fn.name() != FUSED
    torch.testing.assert_close(y, F.relu(F.batch_norm(x, None, None, bn.weight, bn.bias, True)))


def test_a_truncated_cached_library_is_rebuilt_not_loaded(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_library", False)
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path))
    assert cpu_kernels.kernels() is not None
    (built,) = (tmp_path / "kernels").glob("selfsup-*.so")
    whole = built.read_bytes()
    built.unlink()  # a new file: this process keeps the library it mapped
    built.write_bytes(whole[:20000])  # loading this would crash the process
    monkeypatch.setattr(cpu_kernels, "_library", False)
    assert cpu_kernels.kernels() is not None
    assert built.read_bytes() == whole


def test_a_compiler_that_writes_nothing_installs_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_library", False)
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", shutil.which("true"))
    with pytest.warns(RuntimeWarning, match="wrote no shared library"):
        assert cpu_kernels.kernels() is None
    assert list((tmp_path / "kernels").iterdir()) == []


def test_kernels_are_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_library", False)
    monkeypatch.setenv("SELFSUP_CACHE", str(tmp_path))
    assert cpu_kernels.kernels() is not None
    built = list((tmp_path / "kernels").glob("selfsup-*.so"))
    assert len(built) == 1 and not list((tmp_path / "kernels").glob(".selfsup-*"))  # no temp file left
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_library", False)
    assert cpu_kernels.kernels() is not None
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.mark.parametrize("cpu_batchnorm", [True, False])
def test_cpu_fit_fuses_batchnorm_unless_turned_off(tmp_path, cpu_batchnorm):
    from tests.helpers.methods import tiny_fit

    method, _ = tiny_fit("simclr", tmp_path, 1, model_overrides={
        "cpu_batchnorm": cpu_batchnorm, "channels_last": True, "encoder": Encoder("resnet18", cifar_stem=True)})
    fused = [m for m in method.encoder.modules() if isinstance(m, FusedBatchNorm2d)]
    assert len(fused) == (20 if cpu_batchnorm else 0)
