"""EMATeacher: the update against a plain loop, frozen and outside the optimizer, deterministic forward,
updated only after real optimizer steps (not on guard-skipped steps, not on accumulation micro-steps)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from selfsup.models.teacher import EMATeacher, representation_prefix
from selfsup.optim import Constant, Cosine, as_schedule, schedule_config
from tests.helpers.methods import build, tiny_fit


def _student() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def test_update_matches_a_plain_loop():
    student = _student()
    teacher = EMATeacher(student, Cosine(0.9, 1.0))
    expected = {k: v.clone() for k, v in teacher.copies[0].state_dict().items()}
    for step in range(5):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student(torch.randn(6, 4))  # moves the BatchNorm running statistics
        m = teacher.update(step, total_steps=5, steps_per_epoch=5)
        assert m == pytest.approx(Cosine(0.9, 1.0).value(step, 5, 5))
        params = dict(student.named_parameters())
        for name, value in student.state_dict().items():
            expected[name] = m * expected[name] + (1 - m) * value if name in params else value.clone()
    for name, value in teacher.copies[0].state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_frozen_and_outside_the_optimizer():
    method, _ = build("byol")
    assert not any(p.requires_grad for p in method.teacher.parameters())
    from selfsup.optim import create_optimizer

    optimizer = create_optimizer(method, "lars", 0.1, 1e-6)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in method.teacher.parameters()}
    assert {id(p) for p in method.parameters() if p.requires_grad} == in_optimizer
    keys = method.state_dict().keys()
    assert {"teacher.copies.0." + k for k in method.encoder.state_dict()} <= set(keys)
    assert "teacher.copies.1.0.weight" in keys
    assert not any(k.startswith("teacher._students") for k in keys)


def test_forward_has_no_gradient_and_no_dropout_but_batchnorm_follows_the_mode():
    student = _student()
    teacher = EMATeacher(student, 0.99)
    x = torch.randn(16, 4)
    teacher.train()
    y1, y2 = teacher(x), teacher(x)
    assert not y1.requires_grad and torch.equal(y1, y2), "dropout must be off in the teacher"
    assert teacher.copies[0][3].training, "the teacher's mode flags follow the method's (no Lightning warning)"
    student.eval()
    teacher.eval()
    teacher.reset()
    assert not torch.equal(teacher(x), y1), "in eval mode BatchNorm uses running statistics"
    torch.testing.assert_close(teacher(x), student(x))


def test_schedule_forms():
    assert as_schedule(0.99) == Constant(0.99)
    assert as_schedule(schedule_config(Cosine(0.99, 1.0))) == Cosine(0.99, 1.0)
    with pytest.raises(ValueError, match="Schedule"):
        as_schedule("fast")


def test_representation_prefix():
    method, _ = build("byol")
    assert representation_prefix(method) == "encoder."
    method.representation = "teacher"
    assert representation_prefix(method) == "teacher.copies.0."
    method.representation = "both"
    with pytest.raises(ValueError, match="student' or 'teacher"):
        representation_prefix(method)


# -- in a run: only after real optimizer steps --------------------------------------------------
class TeacherTrace(L.Callback):
    """The teacher's first weight (and DINO's centre, where there is one) after every training batch."""

    def __init__(self):
        self.values: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        parts = [next(module.teacher.parameters()).detach().flatten()[:4]]
        if hasattr(module, "center"):
            parts.append(module.center.center.flatten()[:4])
        self.values.append(torch.cat(parts).clone())


def _changes(trace: TeacherTrace) -> list[bool]:
    values = trace.values
    return [not torch.equal(a, b) for a, b in zip(values[:-1], values[1:])]


@pytest.mark.parametrize("name", ["byol", "dino"])
def test_teacher_moves_once_per_accumulated_step(name, tmp_path):
    trace = TeacherTrace()
    _, trainer = tiny_fit(name, tmp_path, max_steps=3, callbacks=[trace], accumulate_grad_batches=2,
                          model_overrides={"base_lr": 1e-2})
    assert trainer.global_step == 3 and len(trace.values) == 6
    # batch 0 is a micro-step (teacher as built), batch 1 steps, batch 2 waits, batch 3 steps, ...
    assert _changes(trace) == [True, False, True, False, True]


def test_teacher_untouched_on_a_guard_skipped_step(tmp_path):
    from tests.test_nan_guard import _install, _poison_loss

    trace = TeacherTrace()
    method, trainer = tiny_fit("byol", tmp_path, max_steps=4, model_overrides={"base_lr": 1e-2},
                               callbacks=[_install(lambda m: _poison_loss(m, {2})), trace])
    assert _changes(trace) == [True, False, True]
    assert method.step_skipped is False


def test_init_from_resets_the_teacher_to_the_loaded_student(tmp_path):
    first, _ = tiny_fit("byol", tmp_path / "a", max_steps=2, model_overrides={"base_lr": 1e-2})
    second, _ = tiny_fit("byol", tmp_path / "b", max_steps=0, init_from=str(tmp_path / "a/checkpoints/last.ckpt"))
    torch.testing.assert_close(second.encoder.state_dict(), first.encoder.state_dict())
    student, teacher = second.encoder.state_dict(), second.teacher.copies[0].state_dict()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
