"""DINO: the loss and the centre against NumPy loops, the head, the last layer frozen for its epochs, 2 ranks
(teacher and centre included) equal 1 process, the centre untouched by a skipped step, the teacher-temperature
schedule, and the teacher exported as the representation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.methods.dino import DINO, dino_loss
from selfsup.models.encoder import Encoder
from selfsup.models.heads import DINOHead
from selfsup.models.teacher import Center
from tests.helpers.dist import run_distributed
from tests.helpers.methods import assert_teacher_ranks_match, build, synthetic_batch, tiny_fit

pytestmark = pytest.mark.timeout(180)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_dino(student: list[np.ndarray], teacher: list[np.ndarray], center: np.ndarray, ts: float,
                   tt: float) -> float:
    """Float64 loops over crops and images: for each global crop g and every other crop v, the mean over
    images of ``-sum_k softmax((t_g - c) / tt)_k log softmax(s_v / ts)_k``, averaged over the (g, v) pairs."""
    total, pairs = 0.0, 0
    for g, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == g:
                continue
            per_image = [-np.sum(_softmax((t[i] - center) / tt) * np.log(_softmax(s[i] / ts))) for i in range(len(t))]
            total, pairs = total + np.mean(per_image), pairs + 1
    return total / pairs


@pytest.mark.parametrize("global_crops,local_crops,batch", [(2, 0, 3), (2, 4, 5), (1, 2, 1)])
def test_loss_matches_numpy(global_crops, local_crops, batch):
    rng = np.random.default_rng(global_crops * 10 + local_crops)
    k = 12
    student = [rng.normal(size=(batch, k)) for _ in range(global_crops + local_crops)]
    teacher = [rng.normal(size=(batch, k)) for _ in range(global_crops)]
    center = rng.normal(size=k) * 0.3
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    got = dino_loss([as_t(s) for s in student], [as_t(t) for t in teacher], as_t(center)[None], 0.1, 0.04)
    assert got.item() == pytest.approx(reference_dino(student, teacher, center, 0.1, 0.04), rel=1e-5)


def test_loss_is_float32_under_bf16_and_gives_the_teacher_no_gradient():
    s = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    t = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dino_loss([x.bfloat16() for x in s], [x.detach().bfloat16() for x in t], torch.zeros(1, 8), 0.1, 0.07)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)


# -- the centre ---------------------------------------------------------------------------------------
def test_center_is_an_ema_of_the_mean_teacher_output_over_real_steps():
    rng = np.random.default_rng(0)
    center, expected = Center(5, momentum=0.8), np.zeros(5)
    for step in range(4):
        micro = [rng.normal(size=(3, 5)) for _ in range(2)]  # two accumulation micro-steps of 3 outputs
        for outputs in micro:
            center.accumulate(torch.tensor(outputs, dtype=torch.float32))
        if step == 2:  # a skipped step: its outputs are dropped
            center.discard()
            continue
        center.update()
        expected = 0.8 * expected + 0.2 * np.concatenate(micro).mean(0)
        np.testing.assert_allclose(center.center[0].numpy(), expected, rtol=1e-5, atol=1e-6)
    before = center.center.clone()
    center.update()  # nothing pending: no change
    assert torch.equal(center.center, before)
    assert list(center.state_dict()) == ["center"], "the pending sum is not part of a checkpoint"
    with pytest.raises(ValueError, match="center_momentum=1.0"):
        Center(5, momentum=1.0)


def _center_on_rank(rank: int, world_size: int) -> torch.Tensor:
    rng = np.random.default_rng(1)
    outputs = torch.tensor(rng.normal(size=(8, 6)), dtype=torch.float32)
    center = Center(6)
    center.accumulate(outputs[rank * 4:(rank + 1) * 4])
    center.update()
    return center.center


def test_center_on_two_ranks_is_the_center_of_the_global_batch():
    rng = np.random.default_rng(1)
    outputs = rng.normal(size=(8, 6))
    for got in run_distributed(_center_on_rank, 2):
        np.testing.assert_allclose(got[0].numpy(), 0.1 * outputs.mean(0), rtol=1e-5, atol=1e-7)


# -- the head --------------------------------------------------------------------------------------------
def test_head_bottleneck_is_normalised_and_prototype_norms_are_fixed_or_trained():
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8)
    g, v = head.last_layer.weight_g, head.last_layer.weight_v
    assert not g.requires_grad and v.requires_grad and torch.equal(g, torch.ones(32, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(32))  # unit-norm prototypes
    rows = v.detach().numpy() / np.linalg.norm(v.detach().numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(head.last_layer.weight.detach().numpy(), rows, rtol=1e-5, atol=1e-7)
    x = torch.randn(5, 16)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    torch.testing.assert_close(head(x), z @ head.last_layer.weight.T)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert DINOHead(16, 32, 24, 8, norm_last_layer=False).last_layer.weight_g.requires_grad
    import pickle

    pickle.loads(pickle.dumps(head))  # ddp_spawn pickles the module: torch's weight_norm parametrization cannot
    with_bn = DINOHead(16, 32, 24, 8, batch_norm=True)  # the ResNet set-up: BatchNorm, bias-free hidden layers
    assert [type(m).__name__ for m in with_bn.mlp] == ["Linear", "BatchNorm1d", "GELU"] * 2 + ["Linear"]
    assert with_bn.mlp[0].bias is None and with_bn.mlp[-1].bias is not None


# -- 2 gloo ranks x B == 1 process x 2B, teacher and centre updated after every step --------------------
def test_two_ranks_equal_one_process_teacher_and_center_included():
    assert_teacher_ranks_match("dino")


# -- in a fit --------------------------------------------------------------------------------------------
class _Trace:
    """What changes between the steps of a fit: the head's last layer, the rest of the head, the centre."""

    @staticmethod
    def callback(records: list):
        import lightning as L

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                records.append({"last": module.head.last_layer.weight_v.detach().clone(),
                                "mlp": module.head.mlp[0].weight.detach().clone(),
                                "center": module.center.center.clone(),
                                "lr_wd": [(g["lr"], g["weight_decay"]) for g in trainer.optimizers[0].param_groups]})

        return Record()


def test_last_layer_is_frozen_for_its_epochs_then_trains(tmp_path):
    records: list = []
    tiny_fit("dino", tmp_path, 4, callbacks=[_Trace.callback(records)], num_images=8,
             model_overrides={"freeze_last_layer_epochs": 1.0, "base_lr": 1e-2})  # 2 steps per epoch
    changed = lambda key: [not torch.equal(a[key], b[key]) for a, b in zip(records, records[1:])]  # noqa: E731
    assert changed("mlp") == [True, True, True]
    assert changed("last") == [False, True, True], "frozen at steps 0 and 1 (epoch 0), trained from step 2"
    assert changed("center") == [True, True, True]


def test_center_and_teacher_untouched_on_a_guard_skipped_step(tmp_path):
    from tests.test_nan_guard import _install, _poison_loss

    records: list = []
    method, _ = tiny_fit("dino", tmp_path, 4, callbacks=[_install(lambda m: _poison_loss(m, {2})),
                                                         _Trace.callback(records)])
    assert torch.equal(records[1]["center"], records[2]["center"]), "the NaN step left the centre as it was"
    assert not torch.equal(records[2]["center"], records[3]["center"])
    assert torch.isfinite(method.center.center).all() and method.center.pending.abs().sum() == 0


def test_teacher_temperature_and_weight_decay_follow_their_schedules(tmp_path):
    from selfsup.optim import Constant, Cosine

    class Logged:
        values: list = []

    import lightning as L

    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):  # after the step's own logging
            Logged.values.append((float(trainer.callback_metrics["train/teacher_temp"]),
                                  float(trainer.callback_metrics["train/weight_decay"]),
                                  [g["weight_decay"] for g in trainer.optimizers[0].param_groups]))

    Logged.values = []
    tiny_fit("dino", tmp_path, 4, callbacks=[Capture()], num_images=8, model_overrides={
        "teacher_temp": Constant(0.07, warmup_epochs=1, warmup_start=0.04),  # 2 steps per epoch
        "weight_decay": Cosine(0.04, 0.4)})
    temps = [t for t, _, _ in Logged.values]
    np.testing.assert_allclose(temps, [0.04 + 0.03 * 1 / 2, 0.07, 0.07, 0.07], rtol=1e-6)
    for step, (_, wd, groups) in enumerate(Logged.values):
        expected = 0.04 + (0.4 - 0.04) * 0.5 * (1 - np.cos(np.pi * step / 4))
        assert wd == pytest.approx(expected, rel=1e-6)
        assert groups == [pytest.approx(expected, rel=1e-6), 0.0], "biases and norms keep no decay"


def test_bad_settings_are_named():
    encoder = Encoder("test_resnet")
    with pytest.raises(ValueError, match="model.student_temp=0"):
        DINO(encoder, out_dim=8, student_temp=0)
    with pytest.raises(ValueError, match="model.teacher_temp"):
        DINO(encoder, out_dim=8, teacher_temp=-0.1)
    with pytest.raises(ValueError, match="model.weight_decay"):
        DINO(encoder, out_dim=8, weight_decay="fast")
    method, views = build("dino")
    batch = synthetic_batch(views, 2)
    batch.views = batch.views[:1]
    with pytest.raises(ValueError, match="at least 2 views"):
        method.training_loss(batch)


def test_teacher_is_the_representation_and_exports_to_timm(tmp_path):
    import timm

    from selfsup.checkpoint import load_encoder
    from selfsup.export import export_encoder

    method, _ = tiny_fit("dino", tmp_path / "run", max_steps=2, model_overrides={"base_lr": 1e-2})
    out = export_encoder(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "export")
    model = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    x = torch.randn(2, 3, 32, 32)
    teacher = method.teacher.copies[0].eval()
    torch.testing.assert_close(model(x), teacher(x))
    torch.testing.assert_close(load_encoder(tmp_path / "run" / "checkpoints" / "last.ckpt")(x), teacher(x))
    assert not torch.allclose(method.encoder.eval()(x), teacher(x)), "sanity: student and teacher differ"


def test_vit_multicrop_needs_dynamic_img_size():
    from selfsup.data.transforms import Crops, MultiCropViews

    vit = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, model_kwargs={"depth": 1, "embed_dim": 32,
                                                                                   "num_heads": 2})
    method = DINO(vit, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    batch = synthetic_batch(MultiCropViews(Crops(2, 16, (0.4, 1.0)), Crops(2, 8, (0.05, 0.4))), 2)
    with pytest.raises(ValueError, match="dynamic_img_size: true"):
        method.training_loss(batch)
    vit = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4, dynamic_img_size=True,
                  model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    method = DINO(vit, out_dim=16, hidden_dim=16, bottleneck_dim=8)
    method.training_loss(batch)["loss"].backward()
    assert method.encoder.model.patch_embed.proj.weight.grad is not None
