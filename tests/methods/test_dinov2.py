"""DINOv2: KoLeo and the Sinkhorn-centred losses against plain NumPy references, KoLeo's guards, 2 ranks
against 1 process, and the layer-wise learning rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.methods.dinov2 import koleo_loss
from tests.helpers.dist import run_distributed
from tests.helpers.methods import build, synthetic_batch
from tests.methods.test_swav import reference_sinkhorn


def reference_koleo(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(x)):
        nearest = min(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)
        total += -np.log(nearest + eps)
    return total / len(x)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# -- KoLeo -----------------------------------------------------------------------------------------------
def test_koleo_matches_a_nearest_neighbour_loop():
    x = np.random.default_rng(0).normal(size=(9, 5))
    np.testing.assert_allclose(koleo_loss(torch.tensor(x, dtype=torch.float32)).item(), reference_koleo(x),
                               rtol=1e-5)


def test_koleo_is_finite_on_duplicates_and_zero_on_one_row():
    x = torch.randn(6, 4)
    x[3] = x[1]
    x.requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    one = torch.randn(1, 4, requires_grad=True)
    out = koleo_loss(one)
    out.backward()
    assert out.item() == 0 and torch.all(one.grad == 0)


def test_koleo_is_lower_for_spread_features():
    assert koleo_loss(torch.randn(16, 8)) < koleo_loss(torch.randn(16, 8) * 0.01 + 1.0)


def _koleo_rank(rank: int, world: int, x: torch.Tensor) -> dict:
    part = x.chunk(world)[rank].clone().requires_grad_(True)
    loss = koleo_loss(part)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total)
    (loss / world).backward()  # DDP's mean over ranks; the gather sends each rank the other ranks' terms
    return {"loss": total.item() / world, "grad": part.grad.clone()}


def test_koleo_on_two_ranks_equals_one_process():
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    whole = x.clone().requires_grad_(True)
    loss = koleo_loss(whole)
    loss.backward()
    results = run_distributed(_koleo_rank, 2, x)
    torch.testing.assert_close(torch.tensor(results[0]["loss"]), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]), whole.grad, rtol=1e-4, atol=1e-6)


# -- the method ------------------------------------------------------------------------------------------
def test_unmasked_loss_is_sinkhorn_distillation_plus_koleo():
    """No masks: the loss is the class-token distillation towards NumPy Sinkhorn targets plus 0.1 x KoLeo."""
    method, views = build("dinov2", mask_probability=0.0)
    batch = synthetic_batch(views, 4)
    out = method.training_loss(batch)
    with torch.no_grad():
        t_encoder, t_head = method.teacher.copies[0], method.teacher.copies[1]
        teacher = t_head(t_encoder.forward_tokens(torch.cat(batch.views[:2]))[:, 0]).double().numpy()
        student = [log_softmax(method.head(method.encoder(v)).double().numpy() / 0.1) for v in batch.views]
        tokens = [method.encoder.forward_tokens(v)[:, 0].double().numpy() for v in batch.views[:2]]
    targets = np.split(reference_sinkhorn(teacher, 3, method.scheduled(method.teacher_temp)), 2)
    pairs = [-(q * s).sum(-1).mean() for g, q in enumerate(targets) for v, s in enumerate(student) if v != g]
    koleo = sum(reference_koleo(z) for z in tokens)
    np.testing.assert_allclose(out["cls_loss"].item(), np.mean(pairs), rtol=1e-4)
    np.testing.assert_allclose(out["koleo_loss"].item(), koleo, rtol=1e-4)
    np.testing.assert_allclose(out["loss"].item(), np.mean(pairs) + 0.1 * koleo, rtol=1e-4)
    assert out["patch_loss"] == 0


def test_patch_targets_balance_only_the_masked_tokens():
    method, _ = build("dinov2")
    rng = np.random.default_rng(2)
    t_cls, t_patch = rng.uniform(-1, 1, (6, 64)), rng.uniform(-1, 1, (6, 16, 48))
    masks = rng.random((6, 16)) < 0.4
    _, patch = method.teacher_targets(torch.tensor(t_cls, dtype=torch.float32),
                                      torch.tensor(t_patch, dtype=torch.float32), torch.tensor(masks), 0.07, 0.05)
    flat, keep = patch.reshape(-1, 48).numpy(), masks.reshape(-1)
    np.testing.assert_allclose(flat[keep], reference_sinkhorn(t_patch.reshape(-1, 48)[keep], 3, 0.05),
                               rtol=2e-4, atol=1e-6)
    assert np.all(flat[~keep] == 0)


def test_layer_decay_covers_the_encoder_and_spares_the_heads():
    method, _ = build("dinov2", layer_decay=0.5, patch_embed_lr_mult=0.2)
    encoder_names = {f"encoder.{n}" for n, _ in method.encoder.named_parameters()}
    assert set(method.lr_scales) == encoder_names
    depth = len(method.encoder.model.blocks)
    assert method.lr_scales["encoder.model.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** depth)
    assert method.lr_scales["encoder.model.patch_embed.proj.weight"] == pytest.approx(0.5 ** (depth + 1) * 0.2)
    with pytest.raises(ValueError, match="centering"):
        build("dinov2", centering="softmax")


def test_sinkhorn_centering_keeps_no_centres_and_all_reduces_nothing_for_them(monkeypatch):
    """Sinkhorn mode has no EMA centres: none in the state dict, and the optimizer step's centre update (one
    all-reduce per centre) has nothing to run; ``centering: center`` keeps iBOT's two."""
    import selfsup.models.teacher as teacher

    sinkhorn, _ = build("dinov2")
    centred, _ = build("dinov2", centering="center")
    assert not any("center" in k for k in sinkhorn.state_dict())
    assert {k for k in centred.state_dict() if "center" in k} == {"center.center", "patch_center.center"}
    calls = []
    monkeypatch.setattr(teacher, "all_reduce_sum", lambda t: calls.append(t) or t)
    for method in (sinkhorn, centred):
        for center in (m for m in method.children() if isinstance(m, teacher.Center)):
            center.update()
    assert len(calls) == 2                                   # the centred model's two, none from Sinkhorn's


def test_two_ranks_equal_one_process_teacher_included():
    from tests.helpers.methods import assert_teacher_ranks_match

    assert_teacher_ranks_match("dinov2")
