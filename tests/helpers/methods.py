"""Tiny instances of every method, for the scale and run-management tests.

Each entry builds ``(method, view transform)`` at toy size. A method whose module does not exist yet
is skipped with ``pytest.importorskip``, so the tests pick it up automatically once it lands.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import numpy as np
import pytest
import torch

from selfsup.data.datamodule import Batch, collate_views, finish_batch
from selfsup.data.transforms import ContrastiveViews, Preprocessing, Views, ViewTransform
from selfsup.models.encoder import Encoder
from selfsup.models.teacher import Center

IMAGE_SIZE = 16
# CNN methods train at 32 px in fits: at 16 px a ResNet's last stage sees 1x1 maps, where torch 2.14's
# CPU bf16 convolution weight gradient (3x3, stride 2, 1x1 input) returns NaN in about 30% of calls.
FIT_IMAGE_SIZE = {"simclr": 32, "swav": 48, "byol": 32, "vicreg": 32, "barlowtwins": 32, "dino": 48, "mocov3": 32}
BASE = dict(optimizer="adamw", base_lr=1e-3, weight_decay=1e-4, warmup_epochs=0.0)


def _tiny_vit(pool: str = "token") -> Encoder:
    return Encoder("vit_tiny_patch16_224", image_size=IMAGE_SIZE, patch_size=4, pool=pool,
                   model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})


def _simclr(module, base: dict) -> tuple:
    encoder = base.pop("encoder", None) or Encoder("test_resnet")
    method = module.SimCLR(encoder, proj_hidden_dim=32, proj_dim=16, **base)
    return method, ContrastiveViews(blur_p=0.0)


def _mae(module, base: dict) -> tuple:
    from selfsup.data.transforms import MaskedImageView

    method = module.MAE(_tiny_vit(), mask_ratio=0.5, decoder_width=32, decoder_depth=1, decoder_heads=2, **base)
    return method, MaskedImageView()


def _simmim(module, base: dict) -> tuple:
    from selfsup.data.transforms import MaskedImageView

    return module.SimMIM(_tiny_vit(pool="avg"), mask_ratio=0.5, **base), MaskedImageView()  # as its recipes


def _swav(module, base: dict) -> tuple:
    from selfsup.data.transforms import Crops, MultiCropViews

    method = module.SwAV(Encoder("test_resnet"), **base)
    return method, MultiCropViews(global_crops=Crops(2, 48, (0.14, 1.0)), local_crops=Crops(2, 32, (0.05, 0.14)))


def _byol(module, base: dict) -> tuple:
    method = module.BYOL(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, **base)
    return method, ContrastiveViews(blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2])  # the paper's asymmetric views


def _mocov3(module, base: dict) -> tuple:
    method = module.MoCoV3(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, **base)
    return method, ContrastiveViews(blur_p=[1.0, 0.1], solarize_p=[0.0, 0.2])  # BYOL's asymmetric views


# VICReg and Barlow Twins at a tenth of their loss scale (solo-learn's CIFAR ``scale_loss`` for Barlow Twins):
# at full scale the 3 SGD steps of tests/test_distributed.py move the weights so far that float32 rounding
# (BatchNorm sums split over 2 ranks) grows past its 1e-5 tolerance; in float64 they agree to 1e-12 either way.
def _vicreg(module, base: dict) -> tuple:
    method = module.VICReg(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16, invariance_weight=2.5,
                           variance_weight=2.5, covariance_weight=0.1, **base)
    return method, ContrastiveViews(blur_p=0.0)


def _barlowtwins(module, base: dict) -> tuple:
    method = module.BarlowTwins(Encoder("test_resnet"), proj_hidden_dim=32, proj_dim=16, scale_loss=0.1, **base)
    return method, ContrastiveViews(blur_p=0.0)


def _dino(module, base: dict) -> tuple:
    from selfsup.data.transforms import Crops, MultiCropViews

    # a fast teacher (momentum 0.5) and no frozen last layer, so the teacher and the head visibly move in tests
    base = {"teacher_momentum": 0.5, "freeze_last_layer_epochs": 0.0, **base}
    method = module.DINO(Encoder("test_resnet"), out_dim=64, hidden_dim=32, bottleneck_dim=16, **base)
    return method, MultiCropViews(global_crops=Crops(2, 48, (0.4, 1.0)), local_crops=Crops(2, 32, (0.05, 0.4)),
                                  blur_p=[1.0, 0.1, 0.5], solarize_p=[0.0, 0.2, 0.0])


def _ibot(module, base: dict) -> tuple:
    from selfsup.data.transforms import Crops, MultiCropViews

    base = {"teacher_momentum": 0.5, "freeze_last_layer_epochs": 0.0, **base}  # as _dino: visible moves
    encoder = Encoder("vit_tiny_patch16_224", image_size=IMAGE_SIZE, patch_size=4, dynamic_img_size=True,
                      model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    method = module.IBOT(encoder, out_dim=64, hidden_dim=32, bottleneck_dim=16, patch_out_dim=48, **base)
    return method, MultiCropViews(global_crops=Crops(2, IMAGE_SIZE, (0.4, 1.0)), local_crops=Crops(2, 8, (0.05, 0.4)),
                                  blur_p=[1.0, 0.1, 0.5], solarize_p=[0.0, 0.2, 0.0])


def _dinov2(module, base: dict) -> tuple:
    from selfsup.methods import ibot

    own = ("koleo_weight", "centering", "sinkhorn_iterations", "layer_decay", "patch_embed_lr_mult", "gram")
    method, views = _ibot(ibot, {k: v for k, v in base.items() if k not in own})
    encoder = Encoder(**method.encoder.config)
    return module.DINOv2(encoder, out_dim=64, hidden_dim=32, bottleneck_dim=16, patch_out_dim=48,
                         **{"teacher_momentum": 0.5, "freeze_last_layer_epochs": 0.0, **base}), views


def _dinov3(module, base: dict) -> tuple:
    """DINOv2 with DINOv3's Gram anchoring from the start, the snapshot refreshed every half epoch (2 steps
    of :func:`tiny_fit`), the Gram teacher on 2x upsampled crops."""
    from selfsup.methods import dinov2
    from selfsup.methods.gram import GramAnchoring

    gram = GramAnchoring(weight=1.0, start_epochs=0.0, refresh_epochs=0.5, image_scale=2.0)
    return _dinov2(dinov2, {"gram": gram, **base})


FACTORIES: dict[str, tuple[str, Callable]] = {
    "simclr": ("selfsup.methods.simclr", _simclr),
    "mae": ("selfsup.methods.mae", _mae),
    "simmim": ("selfsup.methods.simmim", _simmim),
    "swav": ("selfsup.methods.swav", _swav),
    "byol": ("selfsup.methods.byol", _byol),
    "vicreg": ("selfsup.methods.vicreg", _vicreg),
    "barlowtwins": ("selfsup.methods.barlowtwins", _barlowtwins),
    "dino": ("selfsup.methods.dino", _dino),
    "mocov3": ("selfsup.methods.mocov3", _mocov3),
    "ibot": ("selfsup.methods.ibot", _ibot),
    "dinov2": ("selfsup.methods.dinov2", _dinov2),
    "dinov3": ("selfsup.methods.gram", _dinov3),
}
METHODS = list(FACTORIES)


def build(name: str, seed: int = 0, **overrides) -> tuple:
    """``(method, views)`` for ``name``, with weights from ``seed``; skips a method not written yet.
    ``overrides`` are :class:`SSLMethod` arguments (and, for SimCLR, ``encoder``)."""
    module_name, factory = FACTORIES[name]
    try:
        importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
    module = pytest.importorskip(module_name)
    torch.manual_seed(seed)
    return factory(module, {**BASE, **overrides})


def synthetic_batch(views: ViewTransform, size: int, seed: int = 0, channels: int = 3) -> Batch:
    """A batch of ``size`` random images through ``views`` (deterministic in ``seed``)."""
    preprocessing = Preprocessing(image_size=IMAGE_SIZE, mean=(0.5,) * channels, std=(0.25,) * channels)
    views.bind(preprocessing)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = [(views(torch.from_numpy(rng.integers(0, 256, (channels, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8))),
                    -1, i) for i in range(size)]
    samples = [(out.images, label, i) if isinstance(out, Views) else (out, label, i) for out, label, i in samples]
    return finish_batch(collate_views(samples), preprocessing)


def register_tiny_source(num_images: int = 32, channels: int = 3, seed: int = 0) -> str:
    """Register an in-memory unlabeled source of random images; returns its ``data.dataset`` name."""
    from selfsup.data import register_source

    name = f"tiny_{num_images}_{channels}_{seed}"
    images = np.random.default_rng(seed).integers(0, 256, (num_images, IMAGE_SIZE, IMAGE_SIZE, channels),
                                                  dtype=np.uint8)
    # the same name always holds the same images, so registering it again replaces it with its equal
    register_source(name, functools.partial(_array_source, images), splits=("train", None, None), overwrite=True)
    return name


def _array_source(images: np.ndarray, split: str, root=None):
    from selfsup.data.datasets import ArrayImages

    return ArrayImages(images, None)


def tiny_fit(name: str, root, max_steps: int, callbacks: list | None = None, ckpt_path=None,
             batch_size: int = 4, num_images: int = 16, num_workers: int = 0, precision="32",
             every_n_train_steps: int | None = None, model_overrides: dict | None = None,
             max_consecutive_nonfinite: int = 5, init_from: str | None = None, **trainer_kwargs):
    """Fit method ``name`` for ``max_steps`` on a tiny source with selfsup's run callbacks and plugins,
    as ``selfsup fit`` installs them.

    Returns ``(method, trainer)``. Seeds everything with 0, so two calls start identically.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from selfsup.data.datamodule import SSLDataModule
    from selfsup.run import default_callbacks, default_plugins

    L.seed_everything(0, verbose=False)
    method, views = build(name, **(model_overrides or {}))
    data_kwargs = {k: trainer_kwargs.pop(k) for k in ("dataset", "data_root", "drop_last") if k in trainer_kwargs}
    if "data_root" in data_kwargs:
        data_kwargs["root"] = str(data_kwargs.pop("data_root"))
    data_kwargs.setdefault("dataset", register_tiny_source(num_images))
    data = SSLDataModule(views=views, image_size=FIT_IMAGE_SIZE.get(name, IMAGE_SIZE), batch_size=batch_size, num_workers=num_workers,
                         **data_kwargs)
    checkpoint = ModelCheckpoint(dirpath=str(root / "checkpoints"), save_last=True, save_top_k=0,
                                 every_n_train_steps=every_n_train_steps)
    trainer_kwargs.setdefault("max_epochs", -1)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, precision=precision,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        callbacks=[checkpoint, *default_callbacks(max_consecutive_nonfinite, init_from),
                                   *(callbacks or [])],
                        plugins=default_plugins(trainer_kwargs.pop("plugins", None),
                                                trainer_kwargs.get("sync_batchnorm", False)),
                        num_sanity_val_steps=0, **trainer_kwargs)
    trainer.fit(method, data, ckpt_path=ckpt_path)
    return method, trainer


def run_callback(trainer, cls):
    """The trainer's callback of class ``cls`` (e.g. ``selfsup.run.NonFiniteGuard``)."""
    return next(c for c in trainer.callbacks if isinstance(c, cls))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the state entries (parameters and buffers) that are not bit-identical."""
    sa, sb = a.state_dict(), b.state_dict()
    return [k for k in sa if not torch.equal(sa[k], sb[k])]


def loss_and_grads(model, views: list[torch.Tensor]) -> tuple[dict, dict]:
    """``training_loss`` terms and the gradients of its loss on ``views``. BatchNorm runs on running statistics
    (per sample), so only the loss couples the samples of different ranks."""
    model.eval()
    batch = Batch(views=views, labels=torch.zeros(len(views[0]), dtype=torch.long), index=torch.arange(len(views[0])))
    terms = model.training_loss(batch)
    terms["loss"].backward()
    scalars = {k: v.detach() for k, v in terms.items() if k != "features"}
    return scalars, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def rank_share(model, views: list[torch.Tensor], rank: int, world_size: int) -> tuple[dict, dict]:
    """:func:`loss_and_grads` of this rank's slice of the global ``views``, gradients averaged as DDP does."""
    per_rank = len(views[0]) // world_size
    terms, grads = loss_and_grads(model, [v[rank * per_rank:(rank + 1) * per_rank] for v in views])
    for g in grads.values():
        torch.distributed.all_reduce(g)
        g /= world_size
    return terms, grads


def train_on_fixed_pairs(method, steps: int = 25, lr: float = 3e-3, size: int = 32) -> tuple[dict, dict]:
    """Adam steps on one fixed batch of noisy pairs of ``size`` random images (an EMA teacher updated after
    each); the loss terms (floats) at the first step and after the last: a learning check for two-view methods."""
    torch.manual_seed(0)
    base = torch.randn(size, 3, 32, 32)
    views = [base + 0.1 * torch.randn_like(base) for _ in range(2)]
    batch = Batch(views=views, labels=torch.zeros(size, dtype=torch.long), index=torch.arange(size))
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    first = None
    for step in range(steps):
        terms = method.training_loss(batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        if hasattr(method, "teacher"):
            method.teacher.update(step, steps, steps)
        first = first or {k: v.item() for k, v in terms.items() if k != "features"}
    return first, {k: v.item() for k, v in method.training_loss(batch).items() if k != "features"}


def assert_ranks_match(ranks: list, terms: dict, grads: dict, terms_tol: tuple[float, float],
                       grads_tol: tuple[float, float]) -> None:
    """Every rank's ``(terms, grads)`` from :func:`rank_share` equals one process's on the global batch,
    within ``(rtol, atol)``, and the encoder did get gradients."""
    for rank_terms, rank_grads in ranks:
        for k in terms:
            torch.testing.assert_close(rank_terms[k], terms[k], rtol=terms_tol[0], atol=terms_tol[1], msg=k)
        assert rank_grads.keys() == grads.keys()
        for k in grads:
            torch.testing.assert_close(rank_grads[k], grads[k], rtol=grads_tol[0], atol=grads_tol[1], msg=k)
    assert any(k.startswith("encoder.") and g.abs().sum() > 0 for k, g in grads.items())


FAST_TEACHER = 0.5  # an EMA momentum under which a teacher visibly moves in 3 steps


def sgd_with_teacher(method, batch: Batch, world_size: int, steps: int = 3) -> dict[str, torch.Tensor]:
    """SGD steps (momentum 0.9) on ``batch``, gradients averaged over ranks as DDP does, the EMA teacher (and
    DINO's and iBOT's centres, where there are some) updated after every step; the final state dict."""
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for step in range(steps):
        optimizer.zero_grad()
        method.training_loss(batch)["loss"].backward()
        if world_size > 1:
            for p in method.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world_size
        optimizer.step()
        method.teacher.update(step, steps, steps)
        for center in (m for m in method.children() if isinstance(m, Center)):
            center.update()
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _teacher_rank(rank: int, world_size: int, name: str, per_rank: int, steps: int) -> dict:
    from selfsup.models.sync_batchnorm import convert_sync_batchnorm
    from tests.helpers.dist import sharded_rand

    method, views = build(name, teacher_momentum=FAST_TEACHER)
    batch = synthetic_batch(views, world_size * per_rank)
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    local = Batch(views=[v[part] for v in batch.views], labels=batch.labels[part], index=batch.index[part])
    torch.rand = sharded_rand(rank, world_size)  # iBOT's masks: this rank's rows of the 1-process draw
    return sgd_with_teacher(convert_sync_batchnorm(method), local, world_size, steps)


def assert_teacher_ranks_match(name: str, world: int = 2, per_rank: int = 4, steps: int = 3) -> None:
    """Method ``name`` (one with an EMA teacher, momentum ``FAST_TEACHER`` so that it visibly moves in a few
    steps): :func:`sgd_with_teacher` on 2 gloo ranks with ``per_rank`` images each (SyncBatchNorm) ends in the
    state of 1 process on all the images, teacher included."""
    from tests.helpers.dist import run_distributed

    method, views = build(name, teacher_momentum=FAST_TEACHER)
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    expected = sgd_with_teacher(method, synthetic_batch(views, world * per_rank), 1, steps)
    ranks = run_distributed(_teacher_rank, world, name, per_rank, steps)
    for key, value in expected.items():
        for r in ranks:
            assert torch.allclose(r[key].float(), value.float(), atol=1e-5), f"{key} differs on a rank"
    moved = [k for k, v in expected.items() if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert any(k.startswith("teacher.") and k.endswith("weight") for k in moved), "sanity: the teacher moved"
    centers = [f"{n}.center" for n, m in method.named_children() if isinstance(m, Center)]
    assert all(c in moved for c in centers), "sanity: the centres moved"
