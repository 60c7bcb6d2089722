"""selfsup.optim: weight decay decided by name before wrapping, and the scalar schedules.

The expected no-decay sets are written out here by plain rules on the parameter names (biases, norm
weights, the listed tokens), not computed by the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from selfsup.models.encoder import Encoder
from selfsup.optim import Constant, Cosine, Linear, create_optimizer, no_weight_decay_names, param_groups, values


def _by_rule(model: nn.Module, tokens: set[str]) -> set[str]:
    """Biases, norm weights (any parameter of a norm layer) and the given token names."""
    norms = (nn.LayerNorm, nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)
    names = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    for prefix, module in model.named_modules():
        if isinstance(module, norms):
            names |= {f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)}
    return names | tokens


def test_vit_tokens_and_position_embedding_get_no_weight_decay():
    encoder = Encoder("vit_tiny_patch16_224", image_size=32, patch_size=4, model_kwargs={"depth": 2, "reg_tokens": 2})
    expected = _by_rule(encoder, {"model.pos_embed", "model.cls_token", "model.reg_token"})
    assert no_weight_decay_names(encoder) == expected
    assert "model.patch_embed.proj.weight" not in expected and "model.blocks.0.attn.qkv.weight" not in expected


def test_swin_relative_position_tables_get_no_weight_decay():
    encoder = Encoder("swin_tiny_patch4_window7_224", model_kwargs={"depths": (1, 1, 1, 1), "embed_dim": 24,
                                                                     "num_heads": (1, 1, 1, 1)})
    tables = {n for n, _ in encoder.named_parameters() if n.endswith("relative_position_bias_table")}
    assert len(tables) == 4
    assert no_weight_decay_names(encoder) == _by_rule(encoder, tables)


def test_resnet_decays_convolutions_only():
    encoder = Encoder("resnet18")
    no_decay = no_weight_decay_names(encoder)
    assert no_decay == _by_rule(encoder, set())
    convolutions = {n for n, p in encoder.named_parameters() if p.ndim == 4}
    assert convolutions and not convolutions & no_decay


def test_a_methods_own_token_gets_no_weight_decay():
    class WithToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, 4))

        def no_weight_decay(self) -> set[str]:
            return {"mask_token"}

    assert no_weight_decay_names(WithToken()) == {"encoder.bias", "mask_token"}


def _flatten_parameters(model: nn.Module) -> None:
    """What FSDP's flat parameters look like to a shape rule: every parameter 1-D."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().flatten()))


def test_groups_decided_before_flattening_keep_the_split():
    encoder = Encoder("vit_tiny_patch16_224", image_size=32, patch_size=4, model_kwargs={"depth": 1})
    no_decay = no_weight_decay_names(encoder)
    names = {id(p): n for n, p in encoder.named_parameters()}
    before = [sorted(names[id(p)] for p in g["params"]) for g in param_groups(encoder, 0.05, no_decay)]
    _flatten_parameters(encoder)
    names = {id(p): n for n, p in encoder.named_parameters()}
    after = [sorted(names[id(p)] for p in g["params"]) for g in param_groups(encoder, 0.05, no_decay)]
    assert after == before
    assert no_weight_decay_names(encoder) != no_decay, "sanity: decided after flattening, everything looks 1-D"


def test_wrapper_prefixes_do_not_change_the_groups():
    wrapped = nn.Module()
    wrapped._forward_module = nn.Module()
    wrapped._forward_module._fsdp_wrapped_module = Encoder("resnet18")
    no_decay = no_weight_decay_names(Encoder("resnet18"))
    groups = param_groups(wrapped, 0.1, no_decay)
    assert [len(g["params"]) for g in groups] == [sum(1 for n in (p for p in Encoder("resnet18").parameters())
                                                      if n.ndim > 1), len(no_decay)]


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars", "lamb"])
def test_create_optimizer_sets_each_groups_weight_decay(name):
    encoder = Encoder("vit_tiny_patch16_224", image_size=32, patch_size=4, model_kwargs={"depth": 1})
    optimizer = create_optimizer(encoder, name, lr=0.1, weight_decay=0.05)
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays == [0.0, 0.05]
    with pytest.raises(ValueError, match="optimizer='adam'"):
        create_optimizer(encoder, "adam", lr=0.1, weight_decay=0.0)


# -- schedules -------------------------------------------------------------------------------------
def test_cosine_with_warmup_against_the_formula():
    total, per_epoch = 100, 10
    got = list(values(Cosine(1.0, 0.1, warmup_epochs=1, warmup_start=0.0), total, per_epoch))
    for step, value in enumerate(got):
        if step < 10:
            expected = (step + 1) / 10
        else:
            expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90))
        assert value == pytest.approx(expected), step
    assert got[9] == pytest.approx(1.0) and got[-1] == pytest.approx(0.1, abs=1e-3)


def test_teacher_momentum_temperature_and_weight_decay_schedules():
    momentum = list(values(Cosine(0.996, 1.0), 50, 5))
    assert momentum[0] == pytest.approx(0.996) and momentum == sorted(momentum) and momentum[-1] < 1.0
    temperature = list(values(Constant(0.07, warmup_epochs=3, warmup_start=0.04), 50, 5))
    assert temperature[0] == pytest.approx(0.04 + 0.03 / 15) and temperature[14:] == [pytest.approx(0.07)] * 36
    weight_decay = list(values(Linear(0.04, 0.4), 11, 1))
    assert weight_decay[5] == pytest.approx(0.04 + 0.36 * 5 / 11)  # progress = step / steps, as DINO


def test_bad_schedule_values_are_errors():
    with pytest.raises(ValueError, match="warmup_epochs=-1"):
        Cosine(1.0, 0.0, warmup_epochs=-1)
    with pytest.raises(ValueError, match="start=nan"):
        Linear(float("nan"), 1.0)


@pytest.mark.parametrize("name", ["adamw", "lars"])
def test_a_weight_decay_schedule_moves_the_decayed_group_only(name):
    """``set_weight_decay`` (what SSLMethod does each step with a ``weight_decay`` schedule) changes the
    decayed group and leaves biases and norms at 0; the optimizer then applies the new value."""
    from selfsup.optim import set_weight_decay

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = create_optimizer(model, name, lr=0.1, weight_decay=0.04)
    set_weight_decay(optimizer, 0.4)
    assert [(g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == [(0.4, 1), (0.0, 3)]
    if name == "adamw":  # decoupled decay with zero gradients: w <- w (1 - lr wd)
        before = model[0].weight.detach().clone()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        torch.testing.assert_close(model[0].weight, before * (1 - 0.1 * 0.4))


def test_weight_decay_takes_a_schedule_and_keeps_plain_data_in_hparams():
    from selfsup.methods.simclr import SimCLR

    method = SimCLR(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=4, weight_decay=Cosine(0.04, 0.4))
    assert method.weight_decay == Cosine(0.04, 0.4)
    assert method.hparams["weight_decay"] == {"class_path": "selfsup.optim.Cosine",
                                              "init_args": {"start": 0.04, "end": 0.4, "warmup_epochs": 0.0,
                                                            "warmup_start": 0.0}}
    assert SimCLR(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=4, weight_decay=0.1).hparams["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="model.weight_decay"):
        SimCLR(Encoder("test_resnet"), weight_decay=Cosine(0.04, -0.1))


def test_layer_decay_scales_follow_dinov2s_rule_and_reach_the_optimizer():
    """decay ** (L + 1 - layer): embeddings ``decay ** (L + 1)``, block i ``decay ** (L - i)``; the final norm
    shares the last block's rate (timm's grouping); the patch embedding also gets its extra factor."""
    import re

    from selfsup.optim import layer_decay_scales, lr_scheduler

    encoder = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, in_chans=1, model_kwargs={"depth": 3})
    scales = layer_decay_scales(encoder.model, 0.5, prefix="model.", extra={"patch_embed": 0.2})
    for name, _ in encoder.named_parameters():
        block = re.match(r"model\.blocks\.(\d+)\.", name)
        if block:
            expected = 0.5 ** (3 - int(block.group(1)))
        elif name.startswith("model.norm."):
            expected = 0.5
        else:                                                  # cls token, positions, patch embedding
            expected = 0.5 ** 4 * (0.2 if name.startswith("model.patch_embed") else 1.0)
        assert scales[name] == pytest.approx(expected), name
    opt = create_optimizer(encoder, "adamw", lr=1.0, weight_decay=0.05, lr_scales=scales)
    lr_scheduler(opt, Constant(1.0), 10, 10)
    for group in opt.param_groups:                             # every group's lr is its scale times the lr
        names = {n for n, p in encoder.named_parameters() if any(p is q for q in group["params"])}
        assert names and all(scales[n] == pytest.approx(group["lr"]) for n in names)
    with pytest.raises(ValueError, match="layer_decay"):
        layer_decay_scales(encoder.model, 1.5)
