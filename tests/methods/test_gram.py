"""DINOv3's Gram anchoring: the loss against a NumPy loop, the snapshot schedule, the Gram teacher's
snapshots and high-resolution features, and the term inside DINOv2's loss. 2 ranks against 1 process, the
non-finite guard and bit-exact resume (the snapshot included) run for ``dinov3`` in the suites that take every
method (tests/test_distributed.py, tests/test_nan_guard.py, tests/test_resume.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup.methods.gram import GramAnchoring, GramTeacher, gram_loss
from tests.helpers.methods import build, synthetic_batch


def reference_gram_loss(student: np.ndarray, teacher: np.ndarray, remove_negative: bool) -> float:
    total, count = 0.0, 0
    for s_img, t_img in zip(student, teacher):
        s_img = s_img / np.linalg.norm(s_img, axis=1, keepdims=True)
        t_img = t_img / np.linalg.norm(t_img, axis=1, keepdims=True)
        for i in range(len(s_img)):
            for j in range(len(s_img)):
                a, b = float(s_img[i] @ s_img[j]), float(t_img[i] @ t_img[j])
                if remove_negative:
                    a, b = max(a, 0.0), max(b, 0.0)
                total += (a - b) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("remove_negative", [False, True])
def test_gram_loss_matches_a_loop_over_patch_pairs(remove_negative):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(3, 5, 4)), rng.normal(size=(3, 5, 6))   # teacher width may differ
    got = gram_loss(torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32),
                    remove_negative)
    np.testing.assert_allclose(got.item(), reference_gram_loss(student, teacher, remove_negative), rtol=1e-5)


def test_gram_loss_is_zero_for_a_rotated_copy_and_float32_under_bf16():
    x = torch.randn(2, 6, 8)
    rotation = torch.linalg.qr(torch.randn(8, 8))[0]
    assert gram_loss(x, 3.0 * x @ rotation).item() == pytest.approx(0.0, abs=1e-10)  # cosines are unchanged
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gram_loss(x.bfloat16(), torch.randn(2, 6, 8).bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="same patches"):
        gram_loss(x, torch.randn(2, 5, 8))


def test_snapshot_steps_follow_start_refresh_and_cap():
    # 10 steps per epoch: start at epoch 1, refresh every half epoch, at most 2 refreshes
    gram = GramAnchoring(start_epochs=1.0, refresh_epochs=0.5, max_refreshes=2)
    got = [gram.snapshot_step(step, 10) for step in range(0, 40, 3)]
    assert got == [None, None, None, None, 10, 15, 15, 20, 20, 20, 20, 20, 20, 20]
    assert [GramAnchoring().snapshot_step(s, 10) for s in (0, 99)] == [0, 0]  # one snapshot, never refreshed
    with pytest.raises(ValueError, match="gram.image_scale"):
        GramAnchoring(image_scale=0.5)
    with pytest.raises(ValueError, match="gram.refresh_epochs"):
        GramAnchoring(refresh_epochs=0)


def test_gram_teacher_takes_and_keeps_snapshots_of_the_teacher():
    student = torch.nn.Linear(3, 3)
    teacher = torch.nn.Linear(3, 3)
    gram = GramTeacher(student, GramAnchoring(start_epochs=0.2, refresh_epochs=0.3))  # 10 steps/epoch: 2, 5, 8
    assert not any(p.requires_grad for p in gram.parameters())
    first = gram.encoder.weight.clone()
    gram.follow(teacher, 1, 10)
    assert not gram.active(1, 10) and torch.equal(gram.encoder.weight, first)           # before the phase
    gram.follow(teacher, 2, 10)
    assert gram.active(2, 10) and torch.equal(gram.encoder.weight, teacher.weight)
    snapshot = teacher.weight.detach().clone()
    with torch.no_grad():
        teacher.weight.add_(1.0)                                          # the EMA teacher moves on
    for step in (3, 4):
        gram.follow(teacher, step, 10)
        assert torch.equal(gram.encoder.weight, snapshot)                 # kept until step 5
    gram.follow(teacher, 5, 10)
    assert torch.equal(gram.encoder.weight, teacher.weight) and int(gram.taken_at) == 5
    restored = GramTeacher(student, gram.config)
    restored.load_state_dict(gram.state_dict())
    with torch.no_grad():
        teacher.weight.add_(1.0)
    restored.follow(teacher, 6, 10)                                       # a resumed run: step 5's, not a new one
    assert torch.equal(restored.encoder.weight, gram.encoder.weight)


def test_high_resolution_features_come_back_to_the_student_grid():
    method, views = build("dinov3")
    gram = method.gram_teacher
    crops = torch.randn(2, 3, 16, 16)
    features = gram.patch_features(crops, (4, 4))
    assert features.shape == (2, 16, method.encoder.embed_dim)
    big = F.interpolate(crops, scale_factor=2.0, mode="bicubic", align_corners=False)
    tokens = gram.encoder.forward_tokens(big)[:, gram.encoder.num_prefix_tokens:]   # (2, 64, D) on 8 x 8
    pooled = F.avg_pool2d(tokens.transpose(1, 2).unflatten(-1, (8, 8)), 2).flatten(2).transpose(1, 2)
    # bicubic down to 4 x 4 stays close to the 2 x 2 means of the fine grid, and far from other images'
    close = (features - pooled).norm(dim=-1).mean()
    far = (features - pooled.flip(0)).norm(dim=-1).mean()
    assert close < 0.5 * far, (close, far)


def test_dinov2_adds_the_weighted_gram_term_and_it_starts_at_zero():
    """At initialisation student, EMA teacher and snapshot are the same network: without masks and at the
    student's resolution the Gram term is 0; with masks the student's tokens differ and it is positive. The
    total is DINOv2's loss plus ``weight x gram_loss``."""
    from selfsup.methods.gram import GramAnchoring

    same = GramAnchoring(weight=3.0, image_scale=1.0)
    method, views = build("dinov3", gram=same, mask_probability=0.0)
    method.refresh_gram_teacher()                                        # as when training starts
    batch = synthetic_batch(views, 4)
    torch.manual_seed(1)
    out = method.training_loss(batch)
    assert out["gram_loss"].item() == pytest.approx(0.0, abs=1e-10)
    masked, _ = build("dinov3", gram=same, mask_probability=1.0, mask_ratio=(0.4, 0.5))
    masked.refresh_gram_teacher()
    plain, _ = build("dinov2", mask_probability=1.0, mask_ratio=(0.4, 0.5))
    torch.manual_seed(1)
    with_gram = masked.training_loss(batch)
    torch.manual_seed(1)
    without = plain.training_loss(batch)
    assert with_gram["gram_loss"] > 1e-4
    torch.testing.assert_close(with_gram["loss"], without["loss"] + 3.0 * with_gram["gram_loss"])
    with_gram["loss"].backward()
    assert masked.encoder.model.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in masked.gram_teacher.parameters())


def test_no_gram_phase_no_gram_teacher_pass(monkeypatch):
    method, views = build("dinov3", gram=GramAnchoring(start_epochs=5.0))
    calls = []
    monkeypatch.setattr(method.gram_teacher, "patch_features", lambda *a: calls.append(a))
    out = method.training_loss(synthetic_batch(views, 4))
    assert out["gram_loss"].item() == 0.0 and not calls and int(method.gram_teacher.taken_at) == -1


def test_gram_settings_reach_checkpoints_as_plain_data_and_need_dynamic_sizes():
    from selfsup.methods.dinov2 import DINOv2
    from selfsup.models.encoder import Encoder

    method, _ = build("dinov3")
    assert method.hparams["gram"] == {"weight": 1.0, "start_epochs": 0.0, "refresh_epochs": 0.5,
                                      "max_refreshes": None, "image_scale": 2.0, "remove_negative": False}
    assert "gram_teacher.taken_at" in method.state_dict()
    fixed = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, model_kwargs={"depth": 1, "embed_dim": 32,
                                                                                       "num_heads": 2})
    with pytest.raises(ValueError, match="dynamic_img_size"):
        DINOv2(fixed, out_dim=16, hidden_dim=16, bottleneck_dim=8, patch_out_dim=16, gram={"image_scale": 2.0})


def test_two_ranks_equal_one_process_with_the_gram_loss():
    """3 SGD steps with the Gram loss on 2 gloo ranks of 4 images end where 1 process on the 8 images ends,
    student and EMA teacher (the Gram loss is a per-image mean, so DDP's gradient mean is exact)."""
    from tests.helpers.methods import assert_teacher_ranks_match

    assert_teacher_ranks_match("dinov3")


def test_a_fit_refreshes_the_snapshot_on_schedule(tmp_path):
    """4 steps per epoch, refreshed every half epoch: snapshots before steps 0, 2 and 4; after 5 steps the
    Gram teacher holds the EMA teacher of the end of step 3 (the one step 4 read), not the initial network."""
    from lightning.pytorch.callbacks import Callback

    from tests.helpers.methods import tiny_fit

    class RecordSnapshots(Callback):
        taken: list[int] = []
        teacher_at_4: dict = {}

        def on_train_batch_start(self, trainer, module, *args):
            self.taken.append(int(module.gram_teacher.taken_at))
            if trainer.global_step == 4:
                self.teacher_at_4.update({k: v.clone() for k, v in module.teacher.copies[0].state_dict().items()})

    record = RecordSnapshots()
    method, _ = tiny_fit("dinov3", tmp_path, 5, callbacks=[record])
    assert record.taken == [0, 0, 2, 2, 4]
    snapshot = method.gram_teacher.encoder.state_dict()
    assert all(torch.equal(snapshot[k], v) for k, v in record.teacher_at_4.items())
    assert not all(torch.equal(snapshot[k], v) for k, v in method.encoder.state_dict().items())


def test_a_gram_phase_starts_from_every_weight_of_a_dinov2_run(tmp_path):
    """``init_from.weights: all``: a DINOv2 run's student, heads and EMA teacher carry over into a DINOv2 +
    Gram run (the Gram teacher, absent from the checkpoint, then snapshots the loaded teacher); a checkpoint of
    another method is refused by name."""
    from selfsup.checkpoint import CheckpointError, load_checkpoint
    from selfsup.run import InitFrom
    from tests.helpers.methods import tiny_fit

    tiny_fit("dinov2", tmp_path / "pre", 2)
    path = tmp_path / "pre" / "checkpoints" / "last.ckpt"
    saved = load_checkpoint(path)["state_dict"]
    method, _ = tiny_fit("dinov3", tmp_path / "gram", 1, callbacks=[InitFrom(str(path), weights="all")],
                         model_overrides={"base_lr": 1e-12, "teacher_momentum": 1.0})   # so nothing moves
    state = method.state_dict()
    for prefix in ("encoder.", "head.", "patch_layer.", "teacher."):
        keys = [k for k in saved if k.startswith(prefix)]
        assert keys and all(torch.allclose(state[k], saved[k], atol=1e-6) for k in keys), prefix
    teacher = {k[len("teacher.copies.0."):]: v for k, v in saved.items() if k.startswith("teacher.copies.0.")}
    assert all(torch.equal(method.gram_teacher.encoder.state_dict()[k], v) for k, v in teacher.items())
    tiny_fit("simclr", tmp_path / "other", 1)
    with pytest.raises(CheckpointError, match="same method"):
        tiny_fit("dinov3", tmp_path / "bad", 1,
                 callbacks=[InitFrom(str(tmp_path / "other" / "checkpoints" / "last.ckpt"), weights="all")])
    with pytest.raises(ValueError, match="init_from.weights"):
        InitFrom(str(path), weights="heads")
