"""Data parallelism: 2 gloo processes with batch B equal 1 process with batch 2B.

- :class:`SyncBatchNorm` on CPU: outputs, input/weight gradients and running statistics of 2 ranks
  with half a batch each equal plain BatchNorm on the whole batch.
- Every method: k optimizer steps on 2 ranks (gradients averaged, as DDP does; SyncBN where the
  model has BatchNorm) give the parameters of 1 process on the concatenated batch, within 1e-5.
- End to end: Lightning's Trainer with 2 CPU processes (``ddp_spawn``) and ``sync_batchnorm=True``.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.distributed as dist
from torch import nn

from selfsup.data.datamodule import Batch
from selfsup.models.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from selfsup.optim import global_batch_size
from tests.helpers.dist import run_distributed, sharded_rand
from tests.helpers.methods import METHODS, build, synthetic_batch

WORLD, PER_RANK, STEPS = 2, 4, 3
pytestmark = pytest.mark.timeout(300)  # a hang (one rank waiting in a collective) fails


# -- SyncBatchNorm ---------------------------------------------------------------------------------
def _bn_problem(dims: int):
    torch.manual_seed(0)
    shape = (2 * PER_RANK, 3) if dims == 1 else (2 * PER_RANK, 3, 5, 5)
    x = torch.randn(shape) * 3 + 1
    target = torch.randn(shape)
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return x, target, bn


def _bn_step(bn: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    x = x.clone().requires_grad_(True)
    y = bn(x)
    (y * target).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad.clone(),
            "bias_grad": bn.bias.grad.clone(), "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone()}


def _sync_bn_rank(rank: int, world_size: int) -> dict:
    results = {}
    for dims in (1, 2):  # BatchNorm1d and BatchNorm2d in one pair of processes
        x, target, bn = _bn_problem(dims)
        sync = convert_sync_batchnorm(bn)
        assert isinstance(sync, SyncBatchNorm)
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        out = _bn_step(sync, x[part], target[part])
        for key in ("weight_grad", "bias_grad"):  # the loss is a sum over ranks: gradients add up
            dist.all_reduce(out[key])
        results[dims] = out
    return results


@pytest.fixture(scope="module")
def sync_bn_ranks() -> list[dict]:
    return run_distributed(_sync_bn_rank, WORLD)


@pytest.mark.parametrize("dims", [1, 2])
def test_sync_batchnorm_on_two_ranks_equals_batchnorm_on_the_whole_batch(dims, sync_bn_ranks):
    x, target, bn = _bn_problem(dims)
    expected = _bn_step(bn, x, target)
    ranks = [r[dims] for r in sync_bn_ranks]
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), expected["y"], atol=1e-5)
    assert torch.allclose(torch.cat([r["x_grad"] for r in ranks]), expected["x_grad"], atol=1e-5)
    for key in ("weight_grad", "bias_grad", "running_mean", "running_var"):
        for r in ranks:
            assert torch.allclose(r[key], expected[key], atol=1e-5), key
    assert not torch.allclose(ranks[0]["running_mean"], _bn_step(_bn_problem(dims)[2], x[:PER_RANK],
                                                                  target[:PER_RANK])["running_mean"]), \
        "sanity: one rank's local statistics differ from the synced ones"


def test_sync_batchnorm_without_a_process_group_is_batchnorm():
    x, target, bn = _bn_problem(2)
    sync = convert_sync_batchnorm(copy.deepcopy(bn))
    expected, got = _bn_step(bn, x, target), _bn_step(sync, x, target)
    for key, value in expected.items():
        assert torch.allclose(value, got[key], atol=1e-6), key
    sync.eval()
    bn.eval()
    assert torch.allclose(sync(x), bn(x), atol=1e-6)


# -- every method: 2 ranks x B == 1 process x 2B -----------------------------------------------------
def _slice(batch: Batch, part: slice) -> Batch:
    return Batch(views=[v[part] for v in batch.views], labels=batch.labels[part], index=batch.index[part])


def _train(method, batch: Batch, world_size: int) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(method.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        torch.manual_seed(100 + step)
        optimizer.zero_grad(set_to_none=False)
        method.training_loss(batch)["loss"].backward()
        if world_size > 1:  # what DDP does: average gradients over ranks
            for p in method.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world_size
        optimizer.step()
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


def _method_rank(rank: int, world_size: int, name: str) -> dict:
    method, views = build(name)
    batch = synthetic_batch(views, WORLD * PER_RANK)
    method = convert_sync_batchnorm(method)
    torch.rand = sharded_rand(rank, world_size)
    return _train(method, _slice(batch, slice(rank * PER_RANK, (rank + 1) * PER_RANK)), world_size)


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_equal_one_process_with_the_whole_batch(name):
    method, views = build(name)
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    expected = _train(method, synthetic_batch(views, WORLD * PER_RANK), 1)
    ranks = run_distributed(_method_rank, WORLD, name)
    for key, value in expected.items():
        for r in ranks:
            assert torch.allclose(r[key].float(), value.float(), atol=1e-5), f"{key} differs on a rank"
    moved = [k for k in expected if expected[k].is_floating_point() and not torch.equal(expected[k], initial[k])]
    assert moved, "sanity: training moved the weights"


@pytest.mark.parametrize("name", METHODS)
def test_every_parameter_gets_a_gradient(name):
    """What DDP without ``find_unused_parameters`` needs: one training loss reaches every trainable parameter."""
    method, views = build(name)
    method.training_loss(synthetic_batch(views, 4))["loss"].backward()
    assert [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None] == []


# -- Lightning end to end --------------------------------------------------------------------------
class _CheckRanksAgree(L.Callback):
    """On every rank after fit: BatchNorm was synced, and the weights are identical across ranks."""

    def on_train_end(self, trainer, module):
        assert trainer.world_size == 2 and trainer.global_step == 2
        assert global_batch_size(module.trainer) == 8  # 4 per process x 2 processes: the learning-rate batch
        has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
        assert not has_batchnorm or any(isinstance(m, SyncBatchNorm) for m in module.modules()), \
            "sync_batchnorm did not apply"
        flat = torch.cat([p.detach().flatten().float() for p in module.parameters()] +  # teachers included
                         [b.flatten().float() for b in module.buffers() if b.is_floating_point()])  # DINO's centre
        gathered = [torch.empty_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), "DDP ranks diverged"
        assert torch.isfinite(flat).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simclr", "simmim", "ibot"])
def test_lightning_ddp_on_two_cpu_processes(tmp_path, name):
    """Lightning's DDP (``find_unused_parameters=False``, its default) stops at the second step if a
    parameter got no gradient: SimMIM with ``pool: avg`` (its recipes) once left the ViT's ``fc_norm`` out.
    iBOT (DINO's machinery and a mask token): its teacher and both centres (an all-reduce each per step, in
    ``optimizer_step``) agree on both ranks, and its mask token and patch prototypes get gradients."""
    from tests.helpers.methods import tiny_fit

    method, trainer = tiny_fit(name, tmp_path, 2, callbacks=[_CheckRanksAgree()],
                               devices=2, strategy="ddp_spawn", sync_batchnorm=True)
    assert trainer.state.finished  # the checks above ran on both ranks; a failure there fails the spawn
