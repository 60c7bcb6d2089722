"""Evaluation under several processes (2 gloo ranks on CPU): the work is done once, never on a subset
of ranks' collectives.

- ``gather_rows`` joins rows of different lengths (also none) from every rank.
- ``on_rank_zero`` runs its function on rank 0 alone, returns the result everywhere, and an error on
  rank 0 stops every rank instead of leaving them waiting.
- Sharded feature extraction equals one process's extraction, row for row, with an uneven split and an
  unreadable image; each image is encoded once over all ranks.
- With the parameters sharded by FSDP2 (``fully_shard``, which runs on CPU with gloo), extraction calls
  the model through the wrapper the same number of times on every rank (a batch left empty by an
  unreadable image included), so nothing hangs, and the features equal the unsharded model's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from selfsup.data.datamodule import ViewDataset, collate_views
from selfsup.data.datasets import UnreadableImage
from selfsup.data.transforms import EvalView, Preprocessing
from selfsup.distributed import gather_rows, on_rank_zero
from selfsup.eval.features import extract_features, model_call, shards_parameters
from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.timeout(180)
NUM_IMAGES, UNREADABLE, SIZE = 7, 3, 8


class _Images(Dataset):
    """Seven random 8 px images with labels; image 3 cannot be decoded. Counts the reads."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (NUM_IMAGES, 3, SIZE, SIZE), dtype=torch.uint8, generator=generator)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return NUM_IMAGES

    def __getitem__(self, index: int):
        self.reads.append(index)
        if index == UNREADABLE:
            raise UnreadableImage(f"image {index}")
        return self.images[index], index % 3


def _loader(batch_size: int = 1) -> DataLoader:
    view = EvalView()
    view.bind(Preprocessing(image_size=SIZE, mean=(0.5,) * 3, std=(0.25,) * 3))
    return DataLoader(ViewDataset(_Images(), view), batch_size=batch_size, collate_fn=collate_views)


class _Method(nn.Module):
    """What model_call needs of a LightningModule: an ``encoder`` attribute and a ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 16), nn.ReLU(), nn.Linear(16, 4))
        self.encoder.in_chans = 3  # as selfsup's Encoder has: the placeholder image's channels
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def _counting(module: nn.Module) -> nn.Module:
    def count(*_):
        module.calls += 1
    module.encoder.register_forward_pre_hook(count)
    return module


# -- gather_rows and on_rank_zero ------------------------------------------------------------------
def _collectives_rank(rank: int, world_size: int) -> dict:
    rows = torch.arange(rank * 3 * 2, dtype=torch.float).view(-1, 2)  # rank 0: no rows, rank 1: 3 rows
    gathered = gather_rows(rows)
    value = on_rank_zero(lambda: {"from": dist.get_rank()})
    try:
        on_rank_zero(lambda: 1 / 0)
        error = None
    except (ZeroDivisionError, RuntimeError) as err:
        error = f"{type(err).__name__}: {err}"
    return {"gathered": gathered, "value": value, "error": error}


# -- the online probe -------------------------------------------------------------------------------
PROBE_DIM, PROBE_CLASSES, PROBE_STEPS = 6, 3, 3


def _probe_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step, features and labels of a global batch of 8: rank 0's half (rows 0-3) is unlabelled."""
    generator = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(PROBE_STEPS):
        features = torch.randn(8, PROBE_DIM, generator=generator)
        labels = torch.randint(0, PROBE_CLASSES, (8,), generator=generator)
        labels[:4] = -1
        steps.append((features, labels))
    return steps


def _probe(rank: int | None = None) -> dict:
    """OnlineLinearProbe's head after the steps, on one rank's half (or, ``rank=None``, on all 8 rows)."""
    from selfsup.eval.callbacks import OnlineLinearProbe

    probe = OnlineLinearProbe(lr=0.1)
    torch.manual_seed(0)
    probe.head = nn.Linear(PROBE_DIM, PROBE_CLASSES)
    probe.optimizer = torch.optim.AdamW(probe.head.parameters(), lr=0.1, weight_decay=0.0)
    module = SimpleNamespace(device=torch.device("cpu"), log_dict=lambda *a, **k: None)
    for features, labels in _probe_batches():
        part = slice(None) if rank is None else slice(4 * rank, 4 * rank + 4)
        probe.on_train_batch_end(None, module, {"features": features[part]}, SimpleNamespace(labels=labels[part]), 0)
    return {k: v.clone() for k, v in probe.head.state_dict().items()}


def test_online_probe_on_two_ranks_equals_the_whole_batch_when_one_rank_has_no_labels(ranks):
    torch.manual_seed(0)
    head = nn.Linear(PROBE_DIM, PROBE_CLASSES)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.0)
    for features, labels in _probe_batches():  # the reference: plain cross entropy on the labelled rows
        optimizer.zero_grad()
        known = labels >= 0
        torch.nn.functional.cross_entropy(head(features[known]), labels[known]).backward()
        optimizer.step()
    for r in ranks:
        for key, value in head.state_dict().items():
            assert torch.allclose(r["probe"][key], value, atol=1e-6), key
    assert torch.allclose(_probe()["weight"], head.weight, atol=1e-6), "one process with the whole batch"


def _all_rank(rank: int, world_size: int) -> dict:
    """Every case in one pair of processes (starting them costs more than the cases)."""
    return {"collectives": _collectives_rank(rank, world_size), "ddp": _sharded_rank(rank, world_size, False),
            "fsdp2": _sharded_rank(rank, world_size, True), "probe": _probe(rank)}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_distributed(_all_rank, 2)


def test_gather_rows_and_on_rank_zero_on_two_ranks(ranks):
    ranks = [r["collectives"] for r in ranks]
    for r in ranks:
        assert torch.equal(r["gathered"], torch.arange(6, dtype=torch.float).view(3, 2))
        assert r["value"] == {"from": 0}, "rank 0's result reaches every rank"
    assert ranks[0]["error"].startswith("ZeroDivisionError")
    assert ranks[1]["error"].startswith("RuntimeError: rank 0 failed") and "ZeroDivisionError" in ranks[1]["error"]


# -- sharded extraction ----------------------------------------------------------------------------
def _sharded_rank(rank: int, world_size: int, fsdp: bool) -> dict:
    method = _counting(_Method())
    loader = _loader(batch_size=1)
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=method))
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        fully_shard(method.encoder[1], mesh=mesh)
        fully_shard(method, mesh=mesh)
        assert shards_parameters(trainer, method)
    else:
        assert not shards_parameters(trainer, method)
    forward = model_call(trainer, method, "encoder")
    features, labels = extract_features(method.encoder, loader, shard=True, forward=forward if fsdp else None,
                                        image_size=SIZE)
    return {"features": features, "labels": labels, "calls": method.calls,
            "reads": sorted(loader.dataset.images.reads)}


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_sharded_extraction_equals_one_process(fsdp, ranks):
    method = _Method()
    expected, expected_labels = extract_features(method.encoder, _loader(batch_size=4))
    assert len(expected) == NUM_IMAGES - 1  # the unreadable image is dropped, not replaced
    ranks = [r["fsdp2" if fsdp else "ddp"] for r in ranks]
    for r in ranks:
        assert torch.allclose(r["features"], expected, atol=1e-6)
        assert torch.equal(r["labels"], expected_labels)
    reads = sorted(ranks[0]["reads"] + ranks[1]["reads"])
    # 7 images over 2 ranks: 4 each, rank 1's 4th index wraps around to image 0 (dropped after the gather)
    assert reads == sorted([*range(NUM_IMAGES), 0]), "each image is read once (the wrap-around pad aside)"
    if fsdp:  # one call per batch on both ranks, rank 1's empty batch (image 3) included
        assert ranks[0]["calls"] == ranks[1]["calls"] == 4
    else:  # a rank calls the encoder directly and skips a batch it could not read
        assert sorted(r["calls"] for r in ranks) == [3, 4]
