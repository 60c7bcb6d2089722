"""The probe callbacks score a method's representation: its student encoder, or the EMA teacher's copy of it."""

import torch
from torch import nn

from selfsup.eval.features import representation
from selfsup.models.encoder import Encoder
from selfsup.models.teacher import representation_encoder
from tests.helpers.methods import build, tiny_fit


def test_representation_encoder_is_the_student_or_the_teachers_copy():
    method, _ = build("byol")
    assert representation_encoder(method) is method.encoder
    method.representation = "teacher"
    copy = representation_encoder(method)
    assert copy is not method.encoder and isinstance(copy, Encoder)
    assert copy is method.teacher.copies[0]


def test_callbacks_run_the_teacher_when_it_is_the_representation(tmp_path):
    """After a short fit the teacher has drifted from the student; ``representation`` (what KNNMonitor,
    ProbeReport and CheckpointScorer call) must run the teacher's copy, not the student."""
    method, trainer = tiny_fit("byol", tmp_path, 3)
    x = torch.rand(4, 3, 16, 16)
    method.eval()
    student_encoder, forward = representation(trainer, method)
    assert student_encoder is method.encoder
    method.representation = "teacher"
    teacher_encoder, forward = representation(trainer, method)
    assert teacher_encoder is method.teacher.copies[0]
    with torch.no_grad():
        features = forward(x)
        torch.testing.assert_close(features, method.teacher.copies[0](x))
        assert not torch.allclose(features, method.encoder(x)), "the teacher must differ from the student here"


def test_a_plain_module_with_an_encoder_is_scored_on_that_encoder(tmp_path):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder("test_resnet")

    module = Plain()
    _, trainer = tiny_fit("simclr", tmp_path, 1)
    encoder, forward = representation(trainer, module)
    assert encoder is module.encoder and forward is module.encoder
