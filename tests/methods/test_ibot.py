"""iBOT: the masked patch loss against a NumPy loop, BEiT's blockwise masks, the masked token path (the student
sees mask tokens, the teacher the image), 2 ranks (teacher and both centres included) equal 1 process, both
centres untouched by a guard-skipped step, and the settings it refuses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.data.datamodule import Batch
from selfsup.methods.ibot import IBOT, ibot_patch_loss
from selfsup.models.encoder import Encoder
from selfsup.models.masking import blockwise_mask
from tests.helpers.methods import assert_teacher_ranks_match, build, synthetic_batch, tiny_fit

pytestmark = pytest.mark.timeout(180)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_patch_loss(s: np.ndarray, t: np.ndarray, mask: np.ndarray, center: np.ndarray, ts: float,
                         tt: float) -> float:
    """Float64 loops: per image, the mean over its masked patches of ``-sum_k q_k log p_k`` with
    ``q = softmax((t - c) / tt)`` and ``p = softmax(s / ts)``; an image with no masked patch gives 0; the
    mean over images."""
    per_image = []
    for i in range(len(s)):
        terms = [-np.sum(_softmax((t[i, n] - center) / tt) * np.log(_softmax(s[i, n] / ts)))
                 for n in range(s.shape[1]) if mask[i, n]]
        per_image.append(np.mean(terms) if terms else 0.0)
    return float(np.mean(per_image))


def test_patch_loss_matches_numpy():
    rng = np.random.default_rng(0)
    b, n, k = 4, 9, 7
    s, t = rng.normal(size=(b, n, k)), rng.normal(size=(b, n, k))
    mask = rng.random((b, n)) < 0.4
    mask[2] = False  # an image with nothing masked
    center = rng.normal(size=k) * 0.3
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = ibot_patch_loss(as_t(s), as_t(t), torch.tensor(mask), as_t(center)[None], 0.1, 0.05)
    assert got.item() == pytest.approx(reference_patch_loss(s, t, mask, center, 0.1, 0.05), rel=1e-5)


# -- BEiT's blockwise masks ------------------------------------------------------------------------------
def _neighbours(mask: torch.Tensor) -> float:
    """Mean number of masked 4-neighbours of a masked patch."""
    m = torch.nn.functional.pad(mask, (1, 1, 1, 1))
    around = m[:, :-2, 1:-1] + m[:, 2:, 1:-1] + m[:, 1:-1, :-2] + m[:, 1:-1, 2:]
    return float((around * mask).sum() / mask.sum())


def test_blockwise_mask_meets_its_ratio_range_in_blocks():
    torch.manual_seed(0)
    mask = blockwise_mask(500, (14, 14), ratio=(0.1, 0.5))
    fraction = mask.flatten(1).mean(1)
    assert fraction.max() <= 0.5 + 1e-6, "never more than the highest target"
    assert fraction.min() >= 0.08, "targets are met or nearly met"
    assert 0.25 < fraction.mean() < 0.35, "a ratio uniform in [0.1, 0.5] averages 0.3"
    shuffled = mask.flatten(1)[:, torch.randperm(196)].view(-1, 14, 14)  # the same counts, scattered
    assert _neighbours(mask) > 2.5 > _neighbours(shuffled) + 1, "masked patches come in blocks"


def test_blockwise_mask_probability_and_determinism():
    torch.manual_seed(1)
    mask = blockwise_mask(1000, (8, 6), ratio=(0.2, 0.4), probability=0.3)
    untouched = (mask.flatten(1).sum(1) == 0).float().mean()
    assert 0.65 < untouched < 0.75, "70% of the images get no mask"
    torch.manual_seed(1)
    assert torch.equal(mask, blockwise_mask(1000, (8, 6), ratio=(0.2, 0.4), probability=0.3))
    assert mask.shape == (1000, 8, 6) and set(mask.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="mask_ratio"):
        blockwise_mask(2, (4, 4), ratio=(0.5, 0.2))


# -- the method ------------------------------------------------------------------------------------------
def _batch(method_views, size=4):
    return synthetic_batch(method_views, size)


def test_student_sees_mask_tokens_and_the_teacher_sees_the_image():
    method, views = build("ibot", mask_probability=1.0)
    batch = _batch(views)
    student_inputs, teacher_inputs = [], []
    method.encoder.encode_masked = (lambda f: lambda x, m, t: (student_inputs.append(m), f(x, m, t))[1])(
        method.encoder.encode_masked)
    t_encoder = method.teacher.copies[0]
    t_encoder.forward_tokens = (lambda f: lambda x: (teacher_inputs.append(x), f(x))[1])(t_encoder.forward_tokens)
    out = method.training_loss(batch)
    (mask,) = student_inputs
    assert mask.shape == (8, 16) and mask.sum() > 0, "both global crops of 4 images, on the 4x4 patch grid"
    assert torch.equal(teacher_inputs[0], torch.cat(batch.views[:2])), "the teacher gets the unmasked crops"
    assert out["masked_fraction"] == mask.float().mean() and out["patch_loss"] > 0
    # the mask token is the student's input at masked positions: its gradient exists, the teacher has none
    out["loss"].backward()
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    assert not any(k.endswith("mask_token") for k in method.teacher.state_dict())


def test_without_masks_the_patch_loss_is_zero_and_the_cls_loss_is_dinos():
    from selfsup.methods.dino import dino_loss

    method, views = build("ibot", mask_probability=0.0)
    batch = _batch(views)
    out = method.training_loss(batch)
    assert out["patch_loss"] == 0 and out["masked_fraction"] == 0
    with torch.no_grad():  # unmasked, the student's global class tokens are the encoder's pooled features
        student = [method.head(method.encoder(v)) for v in batch.views]
        teacher = [method.teacher.copies[1](method.teacher.copies[0](v)) for v in batch.views[:2]]
        expected = dino_loss(student, teacher, method.center.center, 0.1, method.scheduled(method.teacher_temp))
    torch.testing.assert_close(out["cls_loss"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["cls_loss"])


def test_shared_head_puts_the_patches_on_the_class_prototypes():
    method, views = build("ibot", shared_head=True)
    assert method.patch_layer is method.head.last_layer and len(method.teacher.copies) == 2
    assert method.patch_center.center.shape == method.center.center.shape
    method.training_loss(_batch(views))["loss"].backward()
    separate, _ = build("ibot")
    assert separate.patch_layer is not separate.head.last_layer and len(separate.teacher.copies) == 3
    assert separate.patch_center.center.shape == (1, 48)


def test_two_ranks_equal_one_process_teacher_and_both_centres_included():
    assert_teacher_ranks_match("ibot")


def test_centres_and_teacher_untouched_on_a_guard_skipped_step(tmp_path):
    import lightning as L

    from tests.test_nan_guard import _install, _poison_loss

    records: list = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            records.append([module.center.center.clone(), module.patch_center.center.clone(),
                            module.teacher.copies[0].model.patch_embed.proj.weight.clone()])

    method, _ = tiny_fit("ibot", tmp_path, 4, callbacks=[_install(lambda m: _poison_loss(m, {2})), Record()])
    for before, after in zip(records[1], records[2]):
        assert torch.equal(before, after), "the NaN step left the centres and the teacher as they were"
    assert all(not torch.equal(a, b) for a, b in zip(records[2], records[3]))
    assert torch.isfinite(method.patch_center.center).all() and method.patch_center.pending.abs().sum() == 0


def test_bad_settings_are_named():
    vit = dict(image_size=16, patch_size=4, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    with pytest.raises(ValueError, match="class token"):
        IBOT(Encoder("test_resnet"))
    with pytest.raises(ValueError, match="pool: token"):
        IBOT(Encoder("vit_tiny_patch16_224", pool="avg", **vit))
    with pytest.raises(ValueError, match="mask_ratio"):
        build("ibot", mask_ratio=(0.6, 0.2))
    with pytest.raises(ValueError, match="mask_probability"):
        build("ibot", mask_probability=1.5)
    with pytest.raises(ValueError, match="teacher_patch_temp"):
        build("ibot", teacher_patch_temp=0.0)
    method, views = build("ibot")
    with pytest.raises(ValueError, match="MultiCropViews"):
        method.training_loss(Batch(views=[torch.zeros(2, 3, 16, 16)], labels=torch.zeros(2, dtype=torch.long),
                                   index=torch.arange(2)))
