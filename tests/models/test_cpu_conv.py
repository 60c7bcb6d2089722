"""selfsup's CPU convolutions (selfsup.models.cpu_conv: Winograd, GEMM) against torch's direct convolution."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfsup.models.encoder import Encoder
from selfsup.models.cpu_conv import GemmConv2d, WinogradConv2d, use_cpu_convolutions, winograd_conv3x3
from selfsup.models.cpu_kernels import kernels


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _conv_and_grads(conv, x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor | None = None):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = conv(x, w)
    grad = torch.randn_like(y) if grad is None else grad
    return (y, *torch.autograd.grad(y, (x, w), grad)), grad


def _swapped_twin(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of ``conv`` (same weights) swapped for selfsup's CPU convolution."""
    twin = nn.Sequential(copy.deepcopy(conv))
    assert use_cpu_convolutions(twin, min_channels=1) == 1
    return twin[0]


def _assert_same_as(conv: nn.Conv2d, ours: nn.Conv2d, x: torch.Tensor, tolerance: float) -> None:
    """Output, input gradient and parameter gradients of ``ours`` equal those of ``conv`` on ``x``."""
    results = []
    for module in (conv, ours):
        xr = x.clone().requires_grad_()
        out = module(xr)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
        results.append([out, xr.grad, *(p.grad for p in module.parameters())])
    for direct, mine in zip(*results):
        assert mine.shape == direct.shape
        if mine.dim() == 4 and mine.shape[2] * mine.shape[3] > 1:  # a 1x1 map's strides say nothing
            assert mine.stride() == direct.stride()  # the memory format follows torch's
        assert _relative_error(mine, direct) < tolerance


def _paths(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """How often each convolution algorithm ran in one forward of ``model`` (by its outputs' grad_fn)."""
    seen: dict[str, int] = {}

    def record(module, inputs, output):
        name = type(output.grad_fn).__name__
        seen[name] = seen.get(name, 0) + 1

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, (WinogradConv2d, GemmConv2d))]
    training = model.training
    model.eval()  # leaves BatchNorm statistics as they are
    with torch.enable_grad():
        model(x)
    model.train(training)
    for hook in hooks:
        hook.remove()
    return seen


# every selfsup convolution in a ResNet-18 with the CIFAR stem at 32 px: 9 Winograd layers, layer4's stride-2
# layer onto 4x4 as one GEMM, and layer3's onto 8x8 left to torch
# With the compiled transforms, Winograd from 64 channels (layer 1 too), else from 128
COMPILED = kernels() is not None
RESNET18_SWAPPED = 15 if COMPILED else 11
RESNET18_32PX = {"_WinogradConv3x3Backward": 13 if COMPILED else 9, "_GemmConv3x3Backward": 1,
                 "ConvolutionBackward0": 1}


# (N, C, K, H, W): tiles that divide the map, ones that don't (7x5, 9x12), and maps smaller than a tile
SHAPES = [(3, 5, 7, 4, 4), (2, 3, 4, 7, 5), (2, 6, 6, 1, 1), (4, 8, 8, 2, 2), (2, 4, 5, 9, 12), (2, 4, 3, 8, 8)]


@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_output_and_gradients_equal_direct_convolution_in_float64(tile, shape, channels_last):
    n, c, k, h, w = shape
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, dtype=torch.float64)
    ours, grad = _conv_and_grads(lambda a, b: winograd_conv3x3(a, b, tile), x, weight)
    direct, _ = _conv_and_grads(lambda a, b: F.conv2d(a, b, padding=1), x, weight, grad)
    for name, a, b in zip(("output", "input gradient", "weight gradient"), ours, direct):
        assert a.shape == b.shape, name
        assert _relative_error(a, b) < 1e-13, name  # the transforms are exact: float64 rounding only
    assert ours[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: winograd_conv3x3(a, b, 4), (x, w))


@pytest.mark.parametrize("channels,size", [(64, 32), (128, 16), (512, 4)])
def test_float32_differs_from_direct_convolution_by_rounding_only(channels, size):
    torch.manual_seed(0)
    x = torch.randn(8, channels, size, size).to(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3) / (9 * channels) ** 0.5
    ours, grad = _conv_and_grads(lambda a, b: winograd_conv3x3(a, b, 4), x, w)
    direct, _ = _conv_and_grads(lambda a, b: F.conv2d(a, b, padding=1), x, w, grad)
    for a, b in zip(ours, direct):
        assert _relative_error(a, b) < 5e-5


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd_conv3x3(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3), tile=3)
    with pytest.raises(ValueError, match=r"\(K, C, 3, 3\) weight"):
        winograd_conv3x3(torch.randn(1, 2, 4, 4), torch.randn(2, 3, 3, 3))


@pytest.mark.parametrize("size", [1, 2, 5])  # the centre tap alone, F(2x2, 3x3), F(4x4, 3x3)
def test_module_with_bias_equals_conv2d(size):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1).double()
    ours = _swapped_twin(conv)
    assert isinstance(ours, WinogradConv2d)
    _assert_same_as(conv, ours, torch.randn(3, 6, size, size, dtype=torch.float64), 1e-13)


def test_use_cpu_convolutions_swaps_3x3_layers_and_keeps_parameters():
    torch.manual_seed(0)
    encoder = Encoder("resnet18", cifar_stem=True)
    before = encoder.state_dict()
    params = {name: p for name, p in encoder.named_parameters()}
    x = torch.randn(4, 3, 32, 32)
    encoder.eval()
    direct = encoder(x)

    assert use_cpu_convolutions(encoder) == RESNET18_SWAPPED
    winograd = sorted(n for n, m in encoder.named_modules() if isinstance(m, WinogradConv2d))
    layer1 = [f"model.layer1.{b}.conv{j}" for b in (0, 1) for j in (1, 2)] if COMPILED else []
    assert winograd == sorted(layer1 + [f"model.layer{i}.{b}.conv{j}" for i in (2, 3, 4)
                                        for b, j in ((0, 2), (1, 1), (1, 2))])
    gemm = sorted(n for n, m in encoder.named_modules() if isinstance(m, GemmConv2d))
    assert gemm == [f"model.layer{i}.0.conv1" for i in (3, 4)]
    # the stem, layer2's first (64 -> 128, stride 2) and the 1x1 downsampling convolutions stay torch's
    assert all(type(m) is nn.Conv2d for m in (encoder.model.conv1, encoder.model.layer2[0].conv1,
                                              encoder.model.layer2[0].downsample[0]))
    # same parameter objects (an optimizer built before keeps working), and a state dict that loads both ways
    assert all(p is params[name] for name, p in encoder.named_parameters())
    assert list(encoder.state_dict()) == list(before)
    plain = Encoder("resnet18", cifar_stem=True).eval()
    plain.load_state_dict(encoder.state_dict())
    assert torch.equal(plain(x), direct)
    assert _paths(encoder, x) == RESNET18_32PX
    assert _relative_error(encoder(x), direct) < 1e-4
    assert use_cpu_convolutions(encoder) == 0  # idempotent


@pytest.mark.parametrize("size", [2, 3, 4, 7, 8])  # onto 1x1 .. 4x4 maps, odd sizes included
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gemm_convolution_equals_direct_stride_2_convolution_in_float64(size, channels_last):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1).double()
    ours = _swapped_twin(conv)
    assert isinstance(ours, GemmConv2d)
    x = torch.randn(3, 5, size, size, dtype=torch.float64)
    _assert_same_as(conv, ours, x.to(memory_format=torch.channels_last) if channels_last else x, 1e-13)


def test_gemm_convolution_leaves_larger_maps_to_torch():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False)
    model = _swapped_twin(conv)
    x = torch.randn(2, 4, 9, 9)  # onto 5x5: above GemmConv2d.max_output
    assert torch.equal(model(x), conv(x))  # torch's own kernel, bit for bit
    assert type(model(x).grad_fn).__name__ == "ConvolutionBackward0"
    small = torch.randn(2, 4, 8, 8)  # onto 4x4: one GEMM
    assert type(model(small).grad_fn).__name__ == "_GemmConv3x3Backward"
    assert _relative_error(model(small), conv(small)) < 1e-5


def test_falls_back_to_direct_convolution_under_autocast():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    model = _swapped_twin(conv)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), conv(x))  # the same bf16 kernel, bit for bit
    assert not torch.equal(model(x), conv(x))  # float32: a different algorithm, so different rounding
    assert _relative_error(model(x), conv(x)) < 1e-5


def test_training_steps_match_direct_convolution_up_to_rounding():
    """Three SGD steps of SimCLR on a ResNet-18 with selfsup's CPU convolutions move the weights as direct
    convolution does, within the difference between two direct runs that round differently (NCHW and
    channels-last, different oneDNN kernels)."""
    from selfsup.data.transforms import ContrastiveViews
    from selfsup.methods.base import create_optimizer
    from selfsup.methods.simclr import SimCLR
    from tests.helpers.methods import synthetic_batch

    batches = [synthetic_batch(ContrastiveViews(blur_p=0.0), 16, seed=i) for i in range(3)]

    def train(cpu_conv: bool, channels_last: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = SimCLR(Encoder("resnet18", cifar_stem=True), proj_hidden_dim=64, proj_dim=32,
                       channels_last=channels_last)
        start = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        if cpu_conv:
            assert use_cpu_convolutions(model.encoder) == RESNET18_SWAPPED
            assert _paths(model.encoder, torch.randn(2, 3, 32, 32)) == RESNET18_32PX
        optimizer = create_optimizer(model, "sgd", lr=0.05, weight_decay=0.0, momentum=0.9)
        for batch in batches:
            model.training_loss(batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
        return {k: model.state_dict()[k] - v for k, v in start.items()}  # what the steps changed

    def difference(a: dict, b: dict) -> float:
        return max(_relative_error(a[k], b[k]) for k in a if b[k].abs().max() > 0)

    direct_nchw, direct_nhwc, ours = train(False, False), train(False, True), train(True, True)
    rounding = difference(direct_nchw, direct_nhwc)
    assert 0 < rounding < 0.05
    assert difference(ours, direct_nhwc) <= 1.5 * rounding
    assert difference(ours, direct_nchw) <= 1.5 * rounding


@pytest.mark.parametrize("cpu_conv", [True, False])
def test_cpu_fit_uses_cpu_convolutions_unless_turned_off(tmp_path, cpu_conv):
    from tests.helpers.methods import tiny_fit

    method, _ = tiny_fit("simclr", tmp_path, 1, model_overrides={"cpu_conv": cpu_conv,
                                                                 "encoder": Encoder("resnet18", cifar_stem=True)})
    swapped = [m for m in method.encoder.modules() if isinstance(m, (WinogradConv2d, GemmConv2d))]
    assert len(swapped) == (RESNET18_SWAPPED if cpu_conv else 0)
    assert _paths(method.encoder, torch.randn(2, 3, 32, 32)) == (RESNET18_32PX if cpu_conv else {})


def test_empty_batch_falls_back_to_torch():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1))
    assert use_cpu_convolutions(model, min_channels=1) == 2
    x = torch.randn(0, 4, 8, 8, requires_grad=True)
    out = model(x)
    out.sum().backward()
    assert out.shape == (0, 4, 4, 4) and x.grad.shape == x.shape


def test_convolutions_with_hooks_or_weight_norm_are_left_alone():
    hooked = nn.Conv2d(4, 4, 3, padding=1)
    calls = []
    hooked.register_forward_hook(lambda *args: calls.append(1))
    with pytest.warns(FutureWarning, match="weight_norm"):
        normed = torch.nn.utils.weight_norm(nn.Conv2d(4, 4, 3, padding=1))  # the old hook-based form
    parametrized = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1))
    model = nn.Sequential(hooked, normed, parametrized, nn.Conv2d(4, 4, 3, padding=1))
    assert use_cpu_convolutions(model, min_channels=1) == 1
    assert [type(m).__name__ for m in model] == ["Conv2d", "Conv2d", "ParametrizedConv2d", "WinogradConv2d"]
    model(torch.randn(1, 4, 6, 6))
    assert calls == [1]


@pytest.mark.parametrize("stride", [1, 2])
def test_frozen_weight_keeps_no_transformed_input(stride):
    """A frozen layer only passes the gradient on: it keeps the weight, not the 2.25x transformed input."""

    def saved_bytes(requires_grad: bool) -> int:
        conv = nn.Conv2d(8, 8, 3, stride=stride, padding=1, bias=False).requires_grad_(requires_grad)
        model = nn.Sequential(conv)
        use_cpu_convolutions(model, min_channels=1)
        x = torch.randn(4, 8, 8, 8, requires_grad=True)
        total = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            model(x)
        return sum(total)

    weight_bytes = 8 * 8 * 9 * 4
    assert saved_bytes(False) == weight_bytes
    assert saved_bytes(True) > 8 * weight_bytes


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 70, 6, 5), (4, 130, 8, 8), (1, 3, 1, 2)])
def test_compiled_transforms_equal_torch_transforms(monkeypatch, shape):
    """The compiled F(4x4, 3x3) transforms (csrc/winograd.c: input, output, and the output's adjoint in the
    weight gradient) against the torch ones (gather + 36x36 GEMM), on ragged maps and channel counts that are
    not multiples of the kernels' 64-channel blocks."""
    from selfsup.models import cpu_conv, cpu_kernels

    if cpu_kernels.kernels() is None:
        pytest.skip("no C compiler: the compiled transforms cannot be built here")
    n, c, h, w = shape
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    weight = torch.randn(c + 1, c, 3, 3)
    m = torch.randn(36, n * -(-h // 4) * -(-w // 4), c)

    def run():
        v = cpu_conv._input_transform(x, 4)
        y = cpu_conv._output_transform(m, 4, n, h, w, True)
        conv, _ = _conv_and_grads(lambda a, b: winograd_conv3x3(a, b, 4), x, weight,
                                  torch.linspace(-1, 1, n * (c + 1) * h * w).view(n, c + 1, h, w))
        return (v, y, *conv)

    calls = []
    library = cpu_kernels.kernels()
    monkeypatch.setattr(cpu_conv, "kernels", lambda: calls.append(1) or library)
    compiled = run()
    assert calls  # the compiled path ran
    monkeypatch.setattr(cpu_conv, "kernels", lambda: None)
    reference = run()
    assert compiled[1].is_contiguous(memory_format=torch.channels_last)
    for ours, theirs in zip(compiled, reference):
        assert ours.shape == theirs.shape
        assert _relative_error(ours, theirs) < 1e-5
