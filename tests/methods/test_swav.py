import itertools
import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selfsup.data.datamodule import Batch, SSLDataModule
from selfsup.data.transforms import Crops, MultiCropViews
from selfsup.methods.swav import SwAV, code_statistics, sinkhorn, swav_loss
from selfsup.models.encoder import Encoder
from tests.helpers.dist import run_distributed


# -- independent references (float64 NumPy) ---------------------------------------------------------
def reference_sinkhorn(scores: np.ndarray, iterations: int, epsilon: float) -> np.ndarray:
    """Sinkhorn-Knopp as diagonal scalings ``codes = N * diag(a) exp(S / eps) diag(b)``: ``b`` gives each
    prototype mass 1/K, then ``a`` gives each sample mass 1/N."""
    kernel = np.exp(scores / epsilon)                                   # (N, K)
    n, k = kernel.shape
    a, b = np.ones(n), np.ones(k)
    for _ in range(iterations):
        b = 1.0 / (k * (a @ kernel))
        a = 1.0 / (n * (kernel @ b))
    return n * a[:, None] * kernel * b[None, :]


def reference_swav_loss(scores: np.ndarray, codes: np.ndarray, crops_for_assign, temperature: float) -> float:
    """Explicit loop: each assigned crop's code predicted from every other crop, per sample."""
    num_crops, batch, _ = scores.shape
    terms = []
    for a, crop in enumerate(crops_for_assign):
        for v in range(num_crops):
            if v == crop:
                continue
            for i in range(batch):
                logits = scores[v, i] / temperature
                log_p = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
                terms.append(-(codes[a, i] * log_p).sum())
    return float(np.mean(terms))


def cosine_scores(rng: np.random.Generator, n: int, k: int, d: int = 16) -> np.ndarray:
    z = rng.normal(size=(n, d))
    c = rng.normal(size=(k, d))
    return (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T


# -- Sinkhorn and the loss ------------------------------------------------------------------------
@pytest.mark.parametrize("iterations", [1, 3, 10])
@pytest.mark.parametrize("epsilon", [0.05, 0.2])
def test_sinkhorn_matches_numpy_reference(iterations, epsilon):
    scores = cosine_scores(np.random.default_rng(iterations), 24, 7)
    got = sinkhorn(torch.tensor(scores, dtype=torch.float32), iterations, epsilon)
    np.testing.assert_allclose(got.numpy(), reference_sinkhorn(scores, iterations, epsilon), rtol=2e-4, atol=1e-6)


def test_sinkhorn_marginals_are_uniform():
    scores = torch.tensor(cosine_scores(np.random.default_rng(0), 60, 12), dtype=torch.float32)
    codes = sinkhorn(scores, iterations=200, epsilon=0.05)
    torch.testing.assert_close(codes.sum(1), torch.ones(60))                          # each sample: 1
    torch.testing.assert_close(codes.sum(0), torch.full((12,), 60 / 12), rtol=1e-4, atol=1e-4)
    # The paper's 3 iterations already move far towards equipartition from the plain softmax.
    imbalance = lambda q: (q.sum(0) / (60 / 12) - 1).abs().max()  # noqa: E731
    assert imbalance(sinkhorn(scores, 3, 0.05)) < 0.5 * imbalance(F.softmax(scores / 0.05, dim=1))


def test_sinkhorn_is_float32_under_bf16_autocast():
    scores = torch.tensor(cosine_scores(np.random.default_rng(1), 16, 5), dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = sinkhorn(scores.bfloat16(), 3, 0.05)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, sinkhorn(scores.bfloat16().float(), 3, 0.05))


@pytest.mark.parametrize("crops_for_assign", [(0,), (0, 1), (1, 3)])
def test_swav_loss_matches_numpy_reference(crops_for_assign):
    rng = np.random.default_rng(len(crops_for_assign))
    scores = np.stack([cosine_scores(rng, 6, 9) for _ in range(4)])              # (V=4, B=6, K=9)
    loss, codes = swav_loss(torch.tensor(scores, dtype=torch.float32), crops_for_assign, 0.1, 0.05, 3)
    ref_codes = np.stack([reference_sinkhorn(scores[c], 3, 0.05) for c in crops_for_assign])
    np.testing.assert_allclose(codes.numpy(), ref_codes, rtol=2e-4, atol=1e-6)
    assert loss.item() == pytest.approx(reference_swav_loss(scores, ref_codes, crops_for_assign, 0.1), rel=1e-5)


def test_queue_joins_sinkhorn_but_not_the_loss():
    rng = np.random.default_rng(3)
    scores, queue = np.stack([cosine_scores(rng, 5, 8) for _ in range(3)]), cosine_scores(rng, 10, 8)
    loss, codes = swav_loss(torch.tensor(scores, dtype=torch.float32), (0,),
                            queue_scores=torch.tensor(queue, dtype=torch.float32)[None])
    ref_codes = reference_sinkhorn(np.concatenate([queue, scores[0]]), 3, 0.05)[-5:][None]
    np.testing.assert_allclose(codes.numpy(), ref_codes, rtol=2e-4, atol=1e-6)
    assert loss.item() == pytest.approx(reference_swav_loss(scores, ref_codes, (0,), 0.1), rel=1e-5)


def test_code_statistics():
    codes = torch.eye(4)[[0, 0, 1, 1]]                        # 4 samples on 2 of 4 prototypes, evenly
    stats = code_statistics(codes, torch.zeros(4, 4), temperature=0.1)
    assert stats["prototypes_used"].item() == 2
    assert stats["code_entropy"].item() == pytest.approx(math.log(2))
    assert stats["prediction_entropy"].item() == pytest.approx(math.log(4))   # equal scores: uniform
    assert code_statistics(codes, 10 * codes, 0.1)["prediction_entropy"].item() < 1e-3   # confident


# -- two processes equal one process on the global batch --------------------------------------------
def _tiny_swav(**kwargs) -> SwAV:
    torch.manual_seed(0)
    kwargs = {"proj_hidden_dim": 32, "proj_dim": 16, "num_prototypes": 10, **kwargs}
    return SwAV(Encoder("test_resnet"), **kwargs)  # 0.4M-parameter timm ResNet: fast on CPU


def _global_views(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(n, 3, 8, 8, generator=g)]


def _batch(views: list[torch.Tensor]) -> Batch:
    n = len(views[0])
    return Batch(views=views, labels=torch.zeros(n, dtype=torch.long), index=torch.arange(n))


def _loss_level(embeddings: torch.Tensor, weight: torch.Tensor, queue: torch.Tensor):
    """Loss, codes and gradients of given embeddings ``(V, B, D)`` and prototype weights."""
    z, w = embeddings.clone().requires_grad_(), weight.clone().requires_grad_()
    scores = F.normalize(z, dim=-1) @ F.normalize(w, dim=-1).T
    queue_scores = F.normalize(queue, dim=-1) @ F.normalize(weight, dim=-1).T
    loss, codes = swav_loss(scores, (0, 1), queue_scores=queue_scores)
    loss.backward()
    return loss.detach(), codes, z.grad, w.grad


def _loss_level_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 8, 16, generator=g), torch.randn(10, 16, generator=g), torch.randn(2, 6, 16, generator=g)


def _method_level(model: SwAV, views: list[torch.Tensor]):
    """Two steps (the first fills the queue, the second uses it); loss and gradients of the second."""
    model.eval()  # BatchNorm on running statistics: a per-sample function, so ranks are comparable
    model.training_loss(_batch(views))
    model.zero_grad()
    out = model.training_loss(_batch(views))
    out["loss"].backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads, model.queue.clone()


def _rank_fn(rank: int, world_size: int):
    embeddings, weight, queue = _loss_level_inputs()
    per_rank, share = embeddings.shape[1] // world_size, queue.shape[1] // world_size
    loss, codes, z_grad, w_grad = _loss_level(embeddings[:, rank * per_rank:(rank + 1) * per_rank], weight,
                                              queue[:, rank * share:(rank + 1) * share])
    views = _global_views()
    local = [v[rank * per_rank:(rank + 1) * per_rank] for v in views]
    model_loss, grads, model_queue = _method_level(_tiny_swav(queue_length=8, queue_start_epoch=0), local)
    for g in [w_grad, *grads.values()]:  # what DDP does to gradients
        torch.distributed.all_reduce(g)
        g /= world_size
    for value in (loss, model_loss):
        torch.distributed.all_reduce(value)
        value /= world_size
    return loss, codes, z_grad / world_size, w_grad, model_loss, grads, model_queue


def test_two_ranks_equal_one_rank_on_the_global_batch():
    ranks = run_distributed(_rank_fn, 2)
    embeddings, weight, queue = _loss_level_inputs()
    loss, codes, z_grad, w_grad = _loss_level(embeddings, weight, queue)
    model_loss, grads, model_queue = _method_level(_tiny_swav(queue_length=8, queue_start_epoch=0), _global_views())
    for rank, (r_loss, r_codes, r_z_grad, r_w_grad, r_model_loss, r_grads, r_queue) in enumerate(ranks):
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.testing.assert_close(r_codes, codes[:, rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r_loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r_z_grad, z_grad[:, rows], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(r_w_grad, w_grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(r_model_loss, model_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r_queue, model_queue)  # gathered in rank order before enqueue
        assert r_grads.keys() == grads.keys()
        for k in grads:
            torch.testing.assert_close(r_grads[k], grads[k], rtol=1e-4, atol=1e-6, msg=k)
    assert any(k.startswith("encoder.") and g.abs().sum() > 0 for k, g in grads.items())
    assert grads["prototypes.linear.weight"].abs().sum() > 0


# -- the method on single batches -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_mixed_resolution_forward_and_backward(name):
    vit = dict(image_size=16, patch_size=8, dynamic_img_size=True) if name.startswith("vit") else {}
    encoder = Encoder(name, **vit)
    model = SwAV(encoder, proj_hidden_dim=32, proj_dim=16, num_prototypes=10)
    views = _global_views(4) + [torch.randn(4, 3, 8, 8)]
    out = model.training_loss(_batch(views))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["features"].shape == (4, encoder.embed_dim)
    patch_embed = next(p for k, p in model.encoder.named_parameters() if k.startswith("model."))
    assert patch_embed.grad is not None and patch_embed.grad.abs().sum() > 0


def test_bf16_autocast_keeps_scores_and_loss_in_float32():
    model = _tiny_swav()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.training_loss(_batch(_global_views(2)))
    out["loss"].backward()
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert model.prototypes.weight.grad.dtype == torch.float32


def test_vit_without_dynamic_size_is_told_how_to_fix_it():
    model = SwAV(Encoder("vit_tiny_patch16_224", image_size=16, patch_size=8), proj_hidden_dim=32, proj_dim=16,
                 num_prototypes=10)
    with pytest.raises(ValueError, match="dynamic_img_size: true"):
        model.training_loss(_batch(_global_views(2)))


def test_bad_crops_for_assign():
    with pytest.raises(ValueError, match="crops_for_assign"):
        _tiny_swav(crops_for_assign=())
    with pytest.raises(ValueError, match=r"crops_for_assign=\[0, 3\] names crop\(s\) \[3\]"):
        _tiny_swav(crops_for_assign=(0, 3)).training_loss(_batch(_global_views(2)))


def test_non_finite_features_give_a_non_finite_loss_for_the_guard():
    """No host read in the step: a NaN reaches the loss, which the non-finite guard then skips."""
    model = _tiny_swav()
    with torch.no_grad():
        model.projector[0].weight[0, 0] = float("nan")
    assert not torch.isfinite(model.training_loss(_batch(_global_views(2)))["loss"])


def test_collapse_warns_once_per_interval():
    model = _tiny_swav()
    with torch.no_grad():  # identical prototypes: uniform predictions, the loss sits at ln(K)
        model.prototypes.weight.copy_(model.prototypes.weight[:1].expand(10, -1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = model.training_loss(_batch(_global_views(2)))
    assert out["loss"].item() == pytest.approx(math.log(10), abs=1e-4)
    assert sum("ln(num_prototypes)" in str(w.message) for w in caught) == 1
    assert out["prototypes_used"].item() >= 1
    assert out["prediction_entropy"].item() == pytest.approx(math.log(10), abs=1e-4)


# -- in a Trainer: frozen prototypes, unit norm, the queue and resume --------------------------------
def _datamodule(batch_size: int = 8) -> SSLDataModule:
    views = MultiCropViews(Crops(2, 16, (0.3, 1.0)), Crops(2, 8, (0.1, 0.3)))
    return SSLDataModule(views=views, image_size=16, batch_size=batch_size, num_workers=0)


def _trainer(tmp_path, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                     default_root_dir=tmp_path, callbacks=list(callbacks), **kwargs)


class Record(L.Callback):
    """Prototype weights and queue state seen at the start of every step, and at the end."""

    def __init__(self):
        self.weights, self.filled, self.uses_queue, self.epochs = [], [], [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.weights.append(module.prototypes.weight.detach().clone())
        self.epochs.append(trainer.current_epoch)
        if module.queue is not None:
            self.filled.append(int(module.queue_filled))
            self.uses_queue.append(module._queue_scores() is not None)

    def on_train_end(self, trainer, module):
        self.weights.append(module.prototypes.weight.detach().clone())


@pytest.mark.parametrize("optimizer", ["lars", "adamw"])
def test_prototypes_frozen_then_trained_and_unit_norm(tmp_path, optimizer):
    record = Record()
    model = _tiny_swav(freeze_prototypes_steps=3, optimizer=optimizer, base_lr=0.5, weight_decay=0.1,
                       warmup_epochs=0)
    _trainer(tmp_path, [record], max_steps=6).fit(model, datamodule=_datamodule())
    frozen, trained = record.weights[:4], record.weights[4:]   # before steps 0..3 / after steps 3..5
    for w in frozen[1:]:
        assert torch.equal(w, frozen[0])                         # bit-identical: no grad, decay or momentum
    for before, after in zip([frozen[-1]] + trained[:-1], trained):
        assert not torch.equal(before, after)
    for w in record.weights:
        torch.testing.assert_close(w.norm(dim=1), torch.ones(10), rtol=0, atol=1e-6)


def test_queue_fills_from_start_epoch_is_used_and_survives_resume(tmp_path):
    record = Record()
    model = _tiny_swav(queue_length=16, queue_start_epoch=1, freeze_prototypes_steps=0)
    trainer = _trainer(tmp_path, [record], max_epochs=3, limit_train_batches=2)
    trainer.fit(model, datamodule=_datamodule())
    assert record.epochs == [0, 0, 1, 1, 2, 2]
    assert record.filled == [0, 0, 0, 8, 16, 16]                # filled from epoch 1, 8 images per step
    assert record.uses_queue == [False, False, False, False, True, True]
    assert model.queue[:, :16].abs().sum(-1).gt(0).all()

    path = tmp_path / "swav.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.testing.assert_close(state["queue"], model.queue)
    assert int(state["queue_filled"]) == 16

    resumed = Record()
    fresh = _tiny_swav(queue_length=16, queue_start_epoch=1, freeze_prototypes_steps=0)
    _trainer(tmp_path, [resumed], max_epochs=4, limit_train_batches=2).fit(
        fresh, datamodule=_datamodule(), ckpt_path=path)
    assert resumed.filled == [16, 16] and resumed.uses_queue == [True, True]


def test_queue_length_must_split_over_ranks():
    _tiny_swav(queue_length=8).check_queue_split(2)
    with pytest.raises(ValueError, match="queue_length=9 must be divisible by the 2 processes"):
        _tiny_swav(queue_length=9).check_queue_split(2)


# -- it learns ----------------------------------------------------------------------------------------
def _knn_top1(encoder: Encoder, data: SSLDataModule, train_images: int = 2000, test_images: int = 1000) -> float:
    """kNN top-1 on fixed subsets of the embedded splits, with the checkpoint's eval transform."""
    from torch.utils.data import DataLoader, Subset

    from selfsup.data.datamodule import ViewDataset, collate_views
    from selfsup.data.transforms import EvalView
    from selfsup.eval.features import extract_features
    from selfsup.eval.knn import knn_accuracy

    view = EvalView()
    view.bind(data.preprocessing)
    features = [extract_features(encoder, DataLoader(ViewDataset(Subset(data.split(split), range(n)), view),
                                                     batch_size=500, collate_fn=collate_views))
                for split, n in (("train", train_images), ("test", test_images))]
    return knn_accuracy(*features[0], *features[1])["top1"]


@pytest.mark.slow
def test_short_run_beats_random_init_in_knn(tmp_path):
    """15 steps of 64 images with 2x32 + 4x16 crops: kNN clearly above the same encoder at random init
    (built as ProbeReport builds it), even when that encoder's BatchNorm statistics are fitted to the data."""
    views = MultiCropViews(Crops(2, 32, (0.14, 1.0)), Crops(4, 16, (0.05, 0.14)), blur_p=0.0)
    data = SSLDataModule(views=views, image_size=32, batch_size=64, num_workers=0)
    L.seed_everything(0)
    model = SwAV(Encoder("resnet18"), proj_hidden_dim=512, proj_dim=64, num_prototypes=30,
                 freeze_prototypes_steps=5, optimizer="adamw", base_lr=1e-3, weight_decay=1e-4, warmup_epochs=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_init = Encoder(**model.encoder.config)
    _trainer(tmp_path, max_steps=15).fit(model, datamodule=data)
    trained, random = _knn_top1(model.encoder, data), _knn_top1(random_init, data)
    with torch.no_grad():  # the same number of batches through the random encoder: BatchNorm statistics only
        for batch in itertools.islice(data.train_dataloader(), 15):
            random_init(torch.cat(data.prepare_batch(batch).views[:2]))
    random_fitted_norm = _knn_top1(random_init, data)
    assert trained > max(random, random_fitted_norm) + 0.15, (trained, random, random_fitted_norm)


def test_sinkhorn_with_weights_balances_only_the_selected_rows():
    """DINOv2 balances the masked patch tokens only: weights of 0 must act as if those rows were absent."""
    rng = np.random.default_rng(3)
    scores = rng.uniform(-1, 1, size=(12, 5))
    keep = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], dtype=bool)
    got = sinkhorn(torch.tensor(scores, dtype=torch.float32), 3, 0.05, weights=torch.tensor(keep))
    np.testing.assert_allclose(got.numpy()[keep], reference_sinkhorn(scores[keep], 3, 0.05), rtol=2e-4, atol=1e-6)
    assert np.all(got.numpy()[~keep] == 0)


def test_sinkhorn_without_a_score_bound_handles_large_logits():
    """``max_score=None`` shifts by the global maximum: logits far above 1 give finite codes, as float64 does."""
    rng = np.random.default_rng(4)
    scores = rng.normal(0, 0.3, size=(10, 6)) + 3.5         # about 2.5-4.5: exp(4 / 0.04) overflows float32
    got = sinkhorn(torch.tensor(scores, dtype=torch.float32), 3, 0.04, max_score=None)
    shifted = scores - scores.max()                           # the reference's own shift, in float64
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), reference_sinkhorn(shifted, 3, 0.04), rtol=2e-3, atol=1e-6)
