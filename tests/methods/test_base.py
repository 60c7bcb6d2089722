"""SSLMethod's shared machinery, and the promise that a new method takes one short file."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from selfsup.data.datamodule import Batch, SSLDataModule
from selfsup.methods.base import SSLMethod
from selfsup.methods.simclr import SimCLR
from selfsup.models.encoder import Encoder
from selfsup.models.heads import MLP


class VICReg(SSLMethod):
    """VICReg (Bardes et al. 2022) in a few lines: invariance + variance + covariance terms."""

    def __init__(self, encoder: Encoder, proj_dim: int = 64, sim_weight: float = 25.0, var_weight: float = 25.0,
                 cov_weight: float = 1.0, **base):
        super().__init__(encoder, **base)
        self.projector = MLP(encoder.embed_dim, proj_dim, proj_dim, num_layers=2)
        self.weights = (sim_weight, var_weight, cov_weight)

    def training_loss(self, batch: Batch) -> dict[str, Tensor]:
        h = self.encode_views(batch.views)
        za, zb = self.projector(torch.cat(h)).float().chunk(2)
        invariance = F.mse_loss(za, zb)
        variance = sum(F.relu(1 - (z.var(0) + 1e-4).sqrt()).mean() for z in (za, zb)) / 2
        covariance = sum(_off_diagonal(torch.cov(z.T)).pow(2).sum() / z.shape[1] for z in (za, zb))
        loss = self.weights[0] * invariance + self.weights[1] * variance + self.weights[2] * covariance
        return {"loss": loss, "invariance": invariance, "variance": variance, "features": h[0].detach()}


def _off_diagonal(m: Tensor) -> Tensor:
    return m - torch.diag(torch.diag(m))


def _tiny_data(**kwargs) -> SSLDataModule:
    return SSLDataModule(batch_size=kwargs.pop("batch_size", 16), num_workers=0, image_size=16, **kwargs)


def _fit(model: SSLMethod, tmp_path, data=None, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        **{"max_steps": 2, **trainer_kwargs})
    trainer.fit(model, data or _tiny_data())
    return trainer


def test_new_method_in_one_short_file_trains(tmp_path):
    model = VICReg(Encoder("resnet18"), base_lr=1e-3, warmup_epochs=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _fit(model, tmp_path, max_steps=3)
    assert trainer.global_step == 3
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("projector.") for k in changed)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_lr_scales_with_global_batch_including_accumulation(tmp_path, accumulate):
    model = SimCLR(Encoder("resnet18"), proj_hidden_dim=32, proj_dim=16, base_lr=0.3, warmup_epochs=0)
    _fit(model, tmp_path, max_steps=1, accumulate_grad_batches=accumulate)
    assert model.effective_lr == pytest.approx(0.3 * 16 * accumulate / 256)


def test_lr_batch_denominator(tmp_path):
    model = SimCLR(Encoder("resnet18"), proj_hidden_dim=32, proj_dim=16, base_lr=1e-3, lr_batch_denominator=512)
    _fit(model, tmp_path, max_steps=1)
    assert model.effective_lr == pytest.approx(1e-3 * 16 / 512)


def _warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.0) -> float:
    """The papers' schedule, written out: linear warmup to 1, then half a cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def test_schedule_is_applied_every_step(tmp_path):
    model = SimCLR(Encoder("resnet18"), proj_hidden_dim=32, proj_dim=16, base_lr=0.256, warmup_epochs=0.004)
    data = _tiny_data()
    trainer = _fit(model, tmp_path, data=data, max_steps=5)
    steps_per_epoch = len(data.train_dataloader())
    warmup = round(0.004 * steps_per_epoch)
    total = trainer.estimated_stepping_batches
    expected = 0.256 * 16 / 256 * _warmup_cosine(5, warmup, total)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lars"])
def test_bias_and_norm_get_no_weight_decay(tmp_path, optimizer):
    model = SimCLR(Encoder("resnet18"), proj_hidden_dim=32, proj_dim=16, optimizer=optimizer, weight_decay=0.1)
    trainer = _fit(model, tmp_path, max_steps=1)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in trainer.optimizers[0].param_groups:
        for p in group["params"]:
            is_bias_or_norm = p.ndim <= 1
            assert group["weight_decay"] == (0.0 if is_bias_or_norm else 0.1), names[id(p)]
    expected = {"adamw": "AdamW", "sgd": "SGD", "lars": "Lars"}[optimizer]
    assert type(trainer.optimizers[0]).__name__ == expected
    if optimizer == "sgd":
        assert trainer.optimizers[0].param_groups[0]["nesterov"] is False
    if optimizer in ("adamw", "sgd"):
        assert trainer.optimizers[0].defaults["fused"] is True


def test_gradient_clipping_under_mixed_precision_trains_with_an_unfused_optimizer(tmp_path):
    """Lightning's mixed-precision plugin refuses to clip a fused optimizer's gradients (it would unscale them
    inside step); the SimMIM recipes clip at 5.0 under bf16-mixed, so there the optimizer must not be fused."""
    model = SimCLR(Encoder("resnet18", cifar_stem=True), proj_hidden_dim=32, proj_dim=16, optimizer="adamw")
    trainer = _fit(model, tmp_path, max_steps=1, precision="bf16-mixed", gradient_clip_val=5.0)
    assert trainer.global_step == 1
    assert not trainer.optimizers[0].defaults.get("fused")


def test_checkpoint_stores_preprocessing_and_encoder_config(tmp_path):
    model = SimCLR(Encoder("resnet18", cifar_stem=True), proj_hidden_dim=32, proj_dim=16)
    trainer = _fit(model, tmp_path, max_steps=1)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    meta = ckpt["selfsup"]
    assert meta["method"] == "selfsup.methods.simclr.SimCLR"
    assert meta["encoder"]["name"] == "resnet18" and meta["encoder"]["cifar_stem"] is True
    pre = meta["preprocessing"]
    assert pre["image_size"] == 16 and pre["mean"] == pytest.approx((0.2860,)) and pre["std"] == pytest.approx((0.3530,))
    assert pre["resize"] == "resize_center_crop" and pre["interpolation"] == "bilinear"
    assert ckpt["hyper_parameters"]["temperature"] == 0.1


@pytest.mark.parametrize("key,value", [("base_lr", -1.0), ("weight_decay", -0.1), ("optimizer", "adam"),
                                       ("warmup_epochs", -1), ("min_lr_ratio", 2.0)])
def test_bad_optimizer_settings_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"model.{key}="):
        SimCLR(Encoder("resnet18"), **{key: value})


def _views(batch: int, size: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]


def _record_chunks(method) -> list[Tensor]:
    """Make ``method.encoder`` remember every batch it is called on."""
    seen, forward = [], method.encoder.forward

    def recording(x):
        seen.append(x.detach().clone())
        return forward(x)

    method.encoder.forward = recording
    return seen


def _rows(chunk: Tensor, x: Tensor) -> list[int]:
    """Indices of ``chunk``'s images in ``x``."""
    same = (chunk.flatten(1)[:, None] == x.flatten(1)[None]).all(-1)
    assert (same.sum(1) == 1).all()
    return same.float().argmax(1).tolist()


def test_micro_batches_give_batchnorm_statistics_per_chunk():
    """``micro_batch_size`` = the encoder run separately on chunks of the concatenated views (ghost
    BatchNorm): every view in exactly one chunk, its features those of its chunk, gradients reaching the
    encoder through every chunk."""
    torch.manual_seed(0)
    method = SimCLR(Encoder("test_resnet"), proj_hidden_dim=16, proj_dim=8, micro_batch_size=3).train()
    views = _views(4, 16, seed=1)
    seen = _record_chunks(method)
    chunked = torch.cat(method.encode_views(views))
    seen, x = list(seen), torch.cat(views)
    assert [len(c) for c in seen] == [3, 3, 2]
    rows = [_rows(c, x) for c in seen]
    assert sorted(sum(rows, [])) == list(range(8))
    for chunk, index in zip(seen, rows):
        torch.testing.assert_close(chunked[index], method.encoder(chunk))
    method.micro_batch_size = None
    whole = torch.cat(method.encode_views(views))
    assert not torch.allclose(whole, chunked, atol=1e-4)  # BatchNorm really saw different batches
    chunked.sum().backward()
    assert all(p.grad is not None for p in method.encoder.parameters() if p.requires_grad)


def test_micro_batches_do_not_group_positives():
    """Split in order, chunk i of view 0 and chunk i of view 1 would hold the same images, and BatchNorm
    statistics would point each view to the chunk of its positive. Chunks are drawn at random instead:
    the positives of one chunk's views are spread over other chunks."""
    torch.manual_seed(0)
    method = SimCLR(Encoder("test_resnet"), proj_hidden_dim=16, proj_dim=8, micro_batch_size=16).train()
    views = _views(64, 8, seed=3)
    seen = _record_chunks(method)
    with torch.no_grad():
        method.encode_views(views)
    x = torch.cat(views)
    chunk_of = {}
    for c, chunk in enumerate(seen):
        chunk_of.update({row: c for row in _rows(chunk, x)})
    positive = lambda row: (row + 64) % 128  # noqa: E731
    for c in range(len(seen)):
        members = [row for row, k in chunk_of.items() if k == c]
        assert len({chunk_of[positive(row)] for row in members}) > 1
    in_order = [list(range(i, i + 16)) for i in range(0, 128, 16)]
    assert sorted(sorted(k for k, c in chunk_of.items() if c == j) for j in range(8)) != in_order


def test_micro_batches_leave_a_model_without_batchnorm_unchanged():
    torch.manual_seed(0)
    encoder = Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4)
    method = SimCLR(encoder, proj_hidden_dim=16, proj_dim=8).train()
    views = _views(5, 16, seed=2)
    with torch.no_grad():
        whole = method.encode_views(views)
        method.micro_batch_size = 2
        chunked = method.encode_views(views)
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_micro_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="micro_batch_size=0"):
        SimCLR(Encoder("test_resnet"), micro_batch_size=0)


def test_token_level_methods_reject_micro_batches():
    from selfsup.methods.mae import MAE

    with pytest.raises(ValueError, match="micro_batch_size=4.*MAE"):
        MAE(Encoder("vit_tiny_patch16_224", image_size=16, patch_size=4), micro_batch_size=4)
