"""MoCo v3: the loss against NumPy loops, keys gathered without gradient on 2 ranks, 2 ranks (teacher included)
equal 1 process, the reference's heads, the frozen random patch projection, the export of the representation
(the student) and a learning check on a fixed batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from selfsup.data.datamodule import Batch
from selfsup.methods.mocov3 import MoCoV3, contrastive_loss, mocov3_loss
from selfsup.models.encoder import Encoder
from selfsup.optim import Cosine, schedule_config
from tests.helpers.dist import run_distributed
from tests.helpers.methods import (assert_ranks_match, assert_teacher_ranks_match, loss_and_grads, rank_share,
                                   train_on_fixed_pairs)

pytestmark = pytest.mark.timeout(120)


def reference_ctr(q: np.ndarray, k: np.ndarray, temperature: float, offset: int = 0) -> float:
    """Float64 loops: for each query ``i``, softmax cross-entropy over its cosine similarities to every key divided
    by the temperature, the positive being key ``offset + i``; the mean over queries, times ``2 * temperature``."""
    losses = []
    for i, a in enumerate(q):
        logits = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) / temperature for b in k]
        top = max(logits)
        log_sum = top + np.log(sum(np.exp(x - top) for x in logits))
        losses.append(log_sum - logits[offset + i])
    return 2 * temperature * float(np.mean(losses))


def _tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.tensor(a, dtype=torch.float32) for a in arrays]


@pytest.mark.parametrize("temperature", [0.2, 1.0])
@pytest.mark.parametrize("batch", [1, 5])
def test_loss_matches_numpy(batch, temperature):
    rng = np.random.default_rng(batch)
    q1, q2, k1, k2 = (rng.normal(size=(batch, 8)) for _ in range(4))
    got = mocov3_loss(_tensors(q1, q2), _tensors(k1, k2), temperature)
    want = reference_ctr(q1, k2, temperature) + reference_ctr(q2, k1, temperature)
    assert got.item() == pytest.approx(want, rel=1e-5)
    if batch == 1:  # a single image is its own only candidate: nothing to contrast
        assert got.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_is_float32_under_autocast_and_keys_get_no_gradient():
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(q.bfloat16(), k.bfloat16(), 0.2)
    assert loss.dtype == torch.float32
    contrastive_loss(q, k, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0 and k.grad is None


def test_exactly_two_views_and_bad_arguments_name_the_key():
    with pytest.raises(ValueError, match="exactly 2 views"):
        mocov3_loss([torch.randn(2, 4)] * 3, [torch.randn(2, 4)] * 3, 0.2)
    with pytest.raises(ValueError, match=r"model.temperature=0.0 is invalid: it must be positive"):
        MoCoV3(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=8, pred_hidden_dim=8, temperature=0.0)
    with pytest.raises(ValueError, match=r"model.proj_layers=0"):
        MoCoV3(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=8, pred_hidden_dim=8, proj_layers=0)
    with pytest.raises(ValueError, match=r"model.random_patch_projection=True .* 'test_resnet'"):
        MoCoV3(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=8, pred_hidden_dim=8, random_patch_projection=True)
    method = MoCoV3(Encoder("test_resnet"), proj_hidden_dim=8, proj_dim=8, pred_hidden_dim=8)
    views = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    with pytest.raises(ValueError, match="exactly 2 views"):
        method.training_loss(Batch(views=views, labels=torch.zeros(2, dtype=torch.long), index=torch.arange(2)))


# -- 2 gloo ranks: keys gathered without gradient --------------------------------------------------
WORLD, PER_RANK, TEMPERATURE = 2, 3, 0.5


def _embeddings() -> list[torch.Tensor]:
    """q1, q2, k1, k2 of the global batch."""
    g = torch.Generator().manual_seed(2)
    return [torch.randn(WORLD * PER_RANK, 8, generator=g) for _ in range(4)]


def _tiny() -> MoCoV3:
    torch.manual_seed(0)
    return MoCoV3(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, temperature=TEMPERATURE)


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(WORLD * PER_RANK, 3, 32, 32, generator=g) for _ in range(2)]


def _gather_rank(rank: int, world_size: int) -> dict:
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    q1, q2, k1, k2 = (x[part].clone().requires_grad_(True) for x in _embeddings())
    loss = mocov3_loss([q1, q2], [k1, k2], TEMPERATURE)
    loss.backward()
    model = rank_share(_tiny(), _images(), rank, world_size)
    return {"loss": loss.detach(), "q_grads": [q1.grad, q2.grad], "k_grads": [k1.grad, k2.grad], "model": model}


@pytest.fixture(scope="module")
def gather_ranks() -> list[dict]:
    return run_distributed(_gather_rank, WORLD, timeout=90)


def test_each_rank_contrasts_its_queries_with_every_ranks_keys(gather_ranks):
    """Rank ``r``'s loss is its own queries against the whole global batch of keys, positives at ``r * B + i``."""
    q1, q2, k1, k2 = (x.double().numpy() for x in _embeddings())
    for r, out in enumerate(gather_ranks):
        part = slice(r * PER_RANK, (r + 1) * PER_RANK)
        want = (reference_ctr(q1[part], k2, TEMPERATURE, offset=r * PER_RANK)
                + reference_ctr(q2[part], k1, TEMPERATURE, offset=r * PER_RANK))
        assert out["loss"].item() == pytest.approx(want, rel=1e-5), f"rank {r}"
        assert out["k_grads"] == [None, None], "the keys are gathered without gradient"
    assert gather_ranks[0]["loss"].item() != pytest.approx(gather_ranks[1]["loss"].item()), "sanity: ranks differ"


def test_rank_averaged_gradients_equal_one_process_on_the_global_batch(gather_ranks):
    q1, q2, k1, k2 = (x.requires_grad_(True) for x in _embeddings())
    loss = mocov3_loss([q1, q2], [k1, k2], TEMPERATURE)
    loss.backward()
    assert np.mean([r["loss"].item() for r in gather_ranks]) == pytest.approx(loss.item(), rel=1e-5)
    for view, grad in enumerate((q1.grad, q2.grad)):
        ranks = torch.cat([r["q_grads"][view] for r in gather_ranks]) / WORLD  # DDP averages over ranks
        torch.testing.assert_close(ranks, grad, rtol=1e-5, atol=1e-7)
    assert k1.grad is None and k2.grad is None

    terms, grads = loss_and_grads(_tiny(), _images())
    ranks = [r["model"] for r in gather_ranks]
    assert_ranks_match([({}, g) for _, g in ranks], {}, grads, (0, 0), (1e-4, 1e-6))
    assert np.mean([t["loss"].item() for t, _ in ranks]) == pytest.approx(terms["loss"].item(), rel=1e-5)
    assert not any(k.startswith("teacher.") for k in grads), "the momentum encoder is not trained"


# -- 2 gloo ranks x B == 1 process x 2B, teacher updated after every step -----------------------
def test_two_ranks_equal_one_process_teacher_included():
    assert_teacher_ranks_match("mocov3")


# -- heads and the random patch projection ------------------------------------------------------------
def _tiny_vit(**kwargs) -> MoCoV3:
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny_patch16_224", image_size=32, patch_size=8, pos_embed="sincos",
                      model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    return MoCoV3(encoder, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, **kwargs)


def _shape(mlp: nn.Module) -> list:
    return [(type(m).__name__, m.bias is not None) if isinstance(m, nn.Linear) else
            (type(m).__name__, getattr(m, "affine", None)) for m in mlp if not isinstance(m, nn.ReLU)]


def test_heads_are_the_references():
    """``_build_mlp`` of the reference: bias-free linears, BatchNorm between them, an affine-free BatchNorm
    last; ViT: 3-layer projector, predictor ending in BatchNorm; ResNet: 2-layer projector, predictor without."""
    linear, bn, last_bn = ("Linear", False), ("BatchNorm1d", True), ("BatchNorm1d", False)
    vit, resnet = _tiny_vit(), MoCoV3(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    assert _shape(vit.projector) == [linear, bn, linear, bn, linear, last_bn]
    assert _shape(vit.predictor) == [linear, bn, linear, last_bn]
    assert _shape(resnet.projector) == [linear, bn, linear, last_bn]
    assert _shape(resnet.predictor) == [linear, bn, linear]
    explicit = _tiny_vit(proj_layers=2, pred_last_norm=False)
    assert _shape(explicit.projector) == _shape(resnet.projector) and _shape(explicit.predictor) == _shape(resnet.predictor)
    assert resnet.representation == "student" and resnet.temperature == 0.2
    assert resnet.hparams["teacher_momentum"] == schedule_config(Cosine(0.99, 1.0))


def test_random_patch_projection_stays_frozen_and_the_rest_trains():
    from selfsup.optim import create_optimizer

    method = _tiny_vit(random_patch_projection=True)
    frozen = dict(method.encoder.model.patch_embed.named_parameters())
    assert frozen and not any(p.requires_grad for p in frozen.values())
    before = {k: v.clone() for k, v in method.state_dict().items()}
    optimizer = create_optimizer(method, "adamw", 1e-2, 0.05)
    assert not {id(p) for p in frozen.values()} & {id(p) for g in optimizer.param_groups for p in g["params"]}
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    method.training_loss(Batch(views=views, labels=torch.zeros(4, dtype=torch.long), index=torch.arange(4)))["loss"].backward()
    assert all(p.grad is None for p in frozen.values())
    assert [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None] == []
    optimizer.step()
    method.teacher.update(0, 10, 10)
    after = method.state_dict()
    unchanged = {k for k in before if torch.equal(before[k], after[k])}
    for name in frozen:
        assert f"encoder.model.patch_embed.{name}" in unchanged
        teacher = f"teacher.copies.0.model.patch_embed.{name}"  # m * t + (1 - m) * t: t up to rounding
        torch.testing.assert_close(after[teacher], before[teacher], rtol=1e-6, atol=1e-7)
    assert "encoder.model.blocks.0.attn.qkv.weight" not in unchanged, "sanity: the rest of the ViT trained"
    assert "encoder.model.pos_embed" in unchanged, "sin-cos positions are fixed"
    default = _tiny_vit()
    assert all(p.requires_grad for p in default.encoder.model.patch_embed.parameters())


# -- export: the representation (the student) -> timm ---------------------------------------------
def test_export_of_the_student_loads_in_timm_with_identical_features(tmp_path):
    import timm

    from selfsup.checkpoint import load_encoder
    from selfsup.export import export_encoder
    from tests.helpers.methods import tiny_fit

    method, _ = tiny_fit("mocov3", tmp_path / "run", max_steps=2, model_overrides={"base_lr": 1e-2,
                         "teacher_momentum": 0.5})
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["selfsup"]["encoder_prefix"] == "encoder."
    out = export_encoder(ckpt, tmp_path / "export")
    model = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = method.encoder.eval()(x)
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(load_encoder(ckpt)(x), expected)
    assert not torch.allclose(expected, method.teacher.copies[0].eval()(x)), "sanity: student and teacher differ"


# -- learning ---------------------------------------------------------------------------------------
def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    method = MoCoV3(Encoder("test_resnet"), proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=64, temperature=0.2,
                    teacher_momentum=0.9)
    first, last = train_on_fixed_pairs(method)
    assert last["loss"] < 0.6 * first["loss"], (first, last)
