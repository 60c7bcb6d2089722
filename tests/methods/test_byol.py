"""BYOL: the loss against NumPy, 2 ranks (teacher included) equal 1 process, the export of the
representation, the asymmetric per-view augmentation, and a learning check on a fixed batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.data.transforms import ContrastiveViews, Preprocessing
from selfsup.methods.byol import BYOL, byol_loss, normalized_mse
from selfsup.models.encoder import Encoder
from tests.helpers.methods import assert_teacher_ranks_match, synthetic_batch

pytestmark = pytest.mark.timeout(120)


def reference_byol(predictions: list[np.ndarray], targets: list[np.ndarray]) -> float:
    """Float64 loops: for each ordered pair of different views, the mean over images of
    ``|| p/|p| - z/|z| ||^2``, summed (two views: ``L(p1, z2) + L(p2, z1)``)."""
    total, pairs = 0.0, 0
    for i, p in enumerate(predictions):
        for j, z in enumerate(targets):
            if i == j:
                continue
            losses = [np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2) for a, b in zip(p, z)]
            total, pairs = total + float(np.mean(losses)), pairs + 1
    return total * 2 / pairs  # the two-view sum, kept at that scale for more views


@pytest.mark.parametrize("num_views", [2, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_loss_matches_numpy(num_views, batch):
    rng = np.random.default_rng(batch + num_views)
    p = [rng.normal(size=(batch, 16)) for _ in range(num_views)]
    z = [rng.normal(size=(batch, 16)) for _ in range(num_views)]
    got = byol_loss([torch.tensor(a, dtype=torch.float32) for a in p], [torch.tensor(b, dtype=torch.float32) for b in z])
    assert got.item() == pytest.approx(reference_byol(p, z), rel=1e-5)


def test_normalized_mse_is_two_minus_two_cos_float32_and_stops_target_gradient():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = normalized_mse(p.bfloat16(), z.bfloat16())
    assert loss.dtype == torch.float32
    expected = (2 - 2 * torch.nn.functional.cosine_similarity(p, z)).mean()
    torch.testing.assert_close(normalized_mse(p, z), expected)
    normalized_mse(p, z).backward()
    assert p.grad is not None and z.grad is None


# -- 2 gloo ranks x B == 1 process x 2B, teacher updated after every step -----------------------
def test_two_ranks_equal_one_process_teacher_included():
    assert_teacher_ranks_match("byol")


# -- per-view augmentation ----------------------------------------------------------------------
def test_per_view_probabilities_give_each_view_its_own_pipeline():
    views = ContrastiveViews(blur_p=[1.0, 0.0], solarize_p=[0.0, 1.0], jitter_p=0.0, grayscale_p=0.0)
    views.bind(Preprocessing(image_size=16))
    (first, n1), (second, n2) = views.groups
    assert (n1, n2) == (1, 1)
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.0, 1.0)
    from selfsup.data.augment import BLUR_SIGMA, SOLARIZE

    views.device_augment = True
    for seed in range(5):
        torch.manual_seed(seed)
        out = views(torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8))
        assert out.colour[0][BLUR_SIGMA] > 0 and out.colour[0][SOLARIZE] == 0
        assert out.colour[1][BLUR_SIGMA] == 0 and out.colour[1][SOLARIZE] == 1


def test_equal_probabilities_keep_one_group_and_a_wrong_length_is_named():
    views = ContrastiveViews(blur_p=[0.5, 0.5])
    views.bind(Preprocessing(image_size=16))
    assert len(views.groups) == 1 and views.groups[0][1] == 2
    with pytest.raises(ValueError, match=r"blur_p=\[1.0, 0.1, 0.5\] has 3 values for num_views=2"):
        ContrastiveViews(blur_p=[1.0, 0.1, 0.5])
    with pytest.raises(ValueError, match="solarize_p=1.5"):
        ContrastiveViews(solarize_p=[0.0, 1.5])


def test_yaml_per_view_lists_parse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--views", type=ContrastiveViews)
    cfg = parser.parse_string("""
views:
  class_path: selfsup.data.transforms.ContrastiveViews
  init_args: {blur_p: [1.0, 0.1], solarize_p: [0.0, 0.2], grayscale_p: 0.2}
""")
    views = parser.instantiate_classes(cfg).views
    assert [p["blur_p"] for p in views.view_params] == [1.0, 0.1]
    assert [p["solarize_p"] for p in views.view_params] == [0.0, 0.2]


def test_yaml_teacher_momentum_schedule_parses():
    from jsonargparse import ArgumentParser

    from selfsup.optim import Cosine

    parser = ArgumentParser()
    parser.add_class_arguments(BYOL, "model", skip={"encoder"}, instantiate=False)
    cfg = parser.parse_string("""
model:
  teacher_momentum: {class_path: selfsup.optim.Cosine, init_args: {start: 0.99, end: 1.0}}
""")
    assert parser.instantiate_classes(cfg).model.teacher_momentum == Cosine(0.99, 1.0)


# -- export: the representation -> timm ---------------------------------------------------------
def test_export_of_the_representation_loads_in_timm_with_identical_features(tmp_path):
    import timm

    from selfsup.checkpoint import load_encoder
    from selfsup.export import export_encoder
    from tests.helpers.methods import tiny_fit

    method, _ = tiny_fit("byol", tmp_path / "run", max_steps=2, model_overrides={"base_lr": 1e-2,
                         "teacher_momentum": 0.5})
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    x = torch.randn(2, 3, 32, 32)
    for representation, encoder in (("student", method.encoder), ("teacher", method.teacher.copies[0])):
        state = torch.load(ckpt, weights_only=True)
        if representation == "teacher":  # as a teacher-scored method (DINO, MoCo v3) writes it
            state["selfsup"]["encoder_prefix"] = "teacher.copies.0."
            ckpt = tmp_path / "teacher.ckpt"
            torch.save(state, ckpt)
        out = export_encoder(ckpt, tmp_path / representation)
        model = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
        expected = encoder.eval()(x)
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(load_encoder(ckpt)(x), expected)
    assert not torch.equal(method.encoder(x), method.teacher.copies[0](x)), "sanity: student and teacher differ"


# -- learning ---------------------------------------------------------------------------------------
def _byol_fast():
    """The tiny BYOL with a fast-moving teacher (momentum 0.5), so the teacher visibly moves in 3 steps."""
    torch.manual_seed(0)
    method = BYOL(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, teacher_momentum=0.5)
    return method, ContrastiveViews(blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2])


def test_loss_decreases_on_a_fixed_batch():
    method, views = _byol_fast()
    batch = synthetic_batch(views, 16)
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(15):
        optimizer.zero_grad()
        loss = method.training_loss(batch)["loss"]
        loss.backward()
        optimizer.step()
        method.teacher.update(step, 15, 15)
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
