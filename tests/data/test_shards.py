"""The ``shards`` source (selfsup.data.shards): the writer, the split over ranks and workers, equal batch
counts, unreadable records, exact mid-epoch resume, the two forms of ``data.root``, and fits through Lightning.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from selfsup.data import shards as shards_module
from selfsup.data.datamodule import SSLDataModule, ViewDataset, collate_views
from selfsup.data.datasets import UnreadableImage
from selfsup.data.shard_writer import main, write_shards
from selfsup.data.shard_index import INDEX, count_records, record_counts, shard_paths
from selfsup.data.shards import ShardSource, shard_loader
from selfsup.data.transforms import ContrastiveViews, Preprocessing
from tests.helpers.dist import run_distributed
from tests.helpers.interrupt import SigtermAt
from tests.helpers.methods import same_weights, tiny_fit

SEED = 7


def image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 16) -> Path:
    """Small distinct images, PNG and JPEG alternately, by class sub-folder."""
    rng = np.random.default_rng(0)
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (10 + i % 5, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i:02d}.{'png' if i % 2 else 'jpg'}")
    return root


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def hand_written_shards(root: Path, sizes: list[int], corrupt: set[int] = frozenset()) -> list[int]:
    """Shards of ``sizes`` records (no index); record ``i`` (counting over all shards) is a PNG, or garbage
    bytes for ``i`` in ``corrupt``. Returns the record ids."""
    root.mkdir(parents=True, exist_ok=True)
    record = 0
    for number, size in enumerate(sizes):
        with wds.TarWriter(str(root / f"part-{number:03d}.tar"), encoder=False) as tar:
            for _ in range(size):
                image = b"not an image" if record in corrupt else png_bytes(record)
                tar.write({"__key__": f"r{record:05d}", "png": image, "cls": str(record % 3).encode()})
                record += 1
    return list(range(record))


def views(root: Path | str, strict: bool = False) -> ViewDataset:
    transform = ContrastiveViews(blur_p=0.0)
    transform.bind(Preprocessing(image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3))
    return ViewDataset(ShardSource(root), transform, strict)


def epoch(root, batch_size: int = 4, num_workers: int = 2, rank: int = 0, world_size: int = 1, at: int = 0,
          state: dict | None = None) -> list:
    """Every batch one rank's loader yields in epoch ``at`` (or from a saved ``state``)."""
    loader = shard_loader(views(root), batch_size, SEED, num_workers, collate_views, rank=rank, world_size=world_size)
    loader.set_epoch(at)
    if state is not None:
        loader.load_state_dict(state)
    return list(loader)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    main(["write", str(folder), str(out), "--max-count", "4"])
    return out


# -- the writer and the index -----------------------------------------------------------------------
def test_writer_keeps_bytes_labels_and_writes_a_true_index(folder, shards):
    index = json.loads((shards / INDEX).read_text())
    assert index["classes"] == ["cat", "dog"]
    names = sorted(p.name for p in shards.glob("*.tar"))
    assert names == sorted(index["shards"]) and len(names) == 8  # 32 images, at most 4 per shard
    originals = {p.read_bytes(): sorted(["cat", "dog"]).index(p.parent.name) for p in folder.rglob("*.*")}
    seen = []
    for sample in wds.WebDataset(str(shards / "shard-{000000..000007}.tar"), shardshuffle=False):  # webdataset's reader
        image = sample.get("png", sample.get("jpg"))
        assert originals[image] == int(sample["cls"]), "the label is the class sub-folder's"
        seen.append(image)
    assert sorted(seen) == sorted(originals), "every image once, its bytes unchanged"
    for name in names:
        assert count_records(str(shards / name)) == index["shards"][name]["records"] == 4


def test_writer_balances_shards_and_respects_max_size(folder, tmp_path):
    write_shards(folder, tmp_path / "a", max_count=5)  # 32 images: 7 shards of 4 or 5, not 6 of 5 and one of 2
    counts = [e["records"] for e in json.loads((tmp_path / "a" / INDEX).read_text())["shards"].values()]
    assert len(counts) == 7 and set(counts) == {4, 5} and sum(counts) == 32
    write_shards(folder, tmp_path / "b", max_size=8 * 1024)  # tar pads each file to a multiple of 10 KiB
    written = list((tmp_path / "b").glob("*.tar"))
    assert len(written) > 4 and all(p.stat().st_size <= 10240 for p in written)
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_shards(folder, tmp_path / "b")


def test_folder_and_brace_pattern_forms_and_counting_without_an_index(shards, tmp_path):
    paths = shard_paths(shards)
    assert paths == shard_paths(str(shards / "shard-{000000..000007}.tar")) and len(paths) == 8
    with pytest.raises(FileNotFoundError, match="shard-000008.tar"):
        shard_paths(str(shards / "shard-{000000..000008}.tar"))
    with pytest.raises(ValueError, match="no .tar shards"):
        shard_paths(tmp_path)
    hand_written_shards(tmp_path / "plain", [3, 5, 2])  # no shards.json: counted from the tar headers
    assert record_counts(shard_paths(tmp_path / "plain")) == [3, 5, 2]
    (tmp_path / "plain" / INDEX).write_text(json.dumps({"shards": {"part-000.tar": {"records": 9, "bytes": 1}}}))
    assert record_counts(shard_paths(tmp_path / "plain")) == [3, 5, 2], "a stale index entry is recounted"
    main(["index", str(tmp_path / "plain" / "part-{000..002}.tar")])
    index = json.loads((tmp_path / "plain" / INDEX).read_text())["shards"]
    assert [index[f"part-00{i}.tar"]["records"] for i in range(3)] == [3, 5, 2]


# -- one epoch over ranks and workers ---------------------------------------------------------------
def test_every_image_once_per_epoch_across_two_ranks_of_two_workers(shards):
    source = ShardSource(shards)
    records = [r for shard in range(len(source.paths)) for _, r in source.records(shard)]
    label_of = {i: int(r["cls"]) for i, r in enumerate(records)}  # record id: its place in the sorted shards
    orders = []
    for at in (0, 1):
        ranks = [epoch(shards, rank=r, world_size=2, at=at) for r in (0, 1)]
        assert [len(r) for r in ranks] == [4, 4], "8 shards of 4 over 4 slots, batch 4: 4 batches per rank"
        indices = [i for batches in ranks for b in batches for i in b.index.tolist()]
        assert sorted(indices) == list(range(32)), f"epoch {at}: every image exactly once"
        assert all(len(b) == 4 and b.skipped == 0 for batches in ranks for b in batches)
        assert all(label_of[i] == label for batches in ranks for b in batches
                   for i, label in zip(b.index.tolist(), b.labels.tolist())), "an index names its own record"
        orders.append(indices)
    assert orders[0] != orders[1], "each epoch deals and shuffles anew"


def test_unequal_shards_give_every_rank_the_same_full_batches(tmp_path):
    ids = hand_written_shards(tmp_path, [6, 9, 12, 7, 10, 8, 11, 5])  # 68 records
    for at in range(3):
        ranks = [epoch(tmp_path, batch_size=2, rank=r, world_size=2, at=at) for r in (0, 1)]
        # 4 slots of 2 shards each: the 2 smallest hold 5 + 6 = 11 records, 5 batches of 2 per slot
        assert [len(r) for r in ranks] == [10, 10]
        assert all(len(b) == 2 for batches in ranks for b in batches)
        indices = [i for batches in ranks for b in batches for i in b.index.tolist()]
        assert len(set(indices)) == len(indices) == 40 and set(indices) <= set(ids), "no record twice"


def test_fewer_shards_than_slots_is_an_error_naming_the_numbers(tmp_path):
    hand_written_shards(tmp_path, [4, 4, 4])
    with pytest.raises(ValueError, match=r"3 shards cannot feed 2 ranks x 2 workers = 4 loader slots.*num_workers=1"):
        epoch(tmp_path, rank=0, world_size=2)


def test_an_unreadable_record_is_replaced_and_counted_and_the_batch_stays_full(tmp_path, caplog):
    hand_written_shards(tmp_path, [8, 8], corrupt={5, 12})
    with caplog.at_level(logging.WARNING):
        batches = epoch(tmp_path, batch_size=4, num_workers=0)
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)
    assert sum(b.skipped for b in batches) == 2 and sum(b.invalid for b in batches) == 0
    counts = Counter(i for b in batches for i in b.index.tolist())
    assert 5 not in counts and 12 not in counts
    assert sum(counts.values()) == 16 and sum(n == 2 for n in counts.values()) == 2, "replaced by a neighbour"
    assert "r00005" in caplog.text and "r00012" in caplog.text
    with pytest.raises(UnreadableImage, match="r000"):
        list(shard_loader(views(tmp_path, strict=True), 4, SEED, 0, collate_views))


def test_a_run_of_unreadable_records_becomes_counted_placeholders(tmp_path):
    hand_written_shards(tmp_path, [20], corrupt=set(range(20)))
    batches = epoch(tmp_path, batch_size=4, num_workers=0)
    assert len(batches) == 5 and all(b.invalid == 4 and len(b) == 4 for b in batches)
    assert batches[0].skipped == 4 * 17


# -- exact resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_batch_k_gives_the_remaining_batches_exactly(tmp_path, num_workers, monkeypatch):
    hand_written_shards(tmp_path, [6, 7, 5, 8, 6, 4], corrupt={3, 17})  # 36 records, 2 unreadable
    reference = epoch(tmp_path, batch_size=3, num_workers=num_workers, at=1)
    layout = shard_loader(views(tmp_path), 3, SEED, num_workers, collate_views, world_size=1).dataset.layout()
    assert len(reference) >= 6
    decoded = Counter()
    original = shards_module.decode_record
    monkeypatch.setattr(shards_module, "decode_record", lambda record: decoded.update([1]) or original(record))
    for k in (1, 4, 5):
        decoded.clear()
        state = {"epoch": 1, "batches_done": k, **layout}
        resumed = epoch(tmp_path, batch_size=3, num_workers=num_workers, state=state)
        assert len(resumed) == len(reference) - k
        if num_workers == 0:  # (workers count in their own processes)
            assert decoded[1] == sum(len(b) + b.skipped for b in resumed), "the skipped records were not decoded"
        for a, b in zip(reference[k:], resumed):
            assert torch.equal(a.index, b.index) and a.skipped == b.skipped
            assert all(torch.equal(x, y) for x, y in zip(a.views, b.views)), "the same pixels"
    after_end = epoch(tmp_path, batch_size=3, num_workers=num_workers,
                      state={"epoch": 1, "batches_done": len(reference), **layout})
    assert [b.index.tolist() for b in after_end] == [b.index.tolist() for b in epoch(tmp_path, 3, num_workers, at=2)]


def test_resume_with_another_layout_restarts_the_epoch(tmp_path, caplog):
    hand_written_shards(tmp_path, [6, 6, 6, 6])
    reference = epoch(tmp_path, batch_size=3, num_workers=2, at=1)
    state = {"epoch": 1, "batches_done": 3, "world_size": 2, "num_workers": 2, "batch_size": 3, "num_shards": 4,
             "records": 24}
    with caplog.at_level(logging.WARNING):
        resumed = epoch(tmp_path, batch_size=3, num_workers=2, state=state)
    assert "not an exact resume" in caplog.text
    assert [b.index.tolist() for b in resumed] == [b.index.tolist() for b in reference]


# -- many processes ---------------------------------------------------------------------------------
def _rank_epoch(rank: int, world_size: int, root: str) -> dict:
    """One epoch on a real process group: rank 0 counts the records (no index) and broadcasts them."""
    loader = shard_loader(views(root), 2, SEED, 2, collate_views)
    return {"length": len(loader), "indices": [b.index.tolist() for b in loader], "rank": loader.dataset.rank}


@pytest.mark.timeout(120)
def test_two_gloo_processes_split_an_epoch_without_overlap(tmp_path):
    ids = hand_written_shards(tmp_path, [5, 6, 7, 5, 6, 8, 5, 6])  # unequal, no index
    results = run_distributed(_rank_epoch, 2, str(tmp_path), timeout=90)
    assert [r["rank"] for r in results] == [0, 1]
    assert [len(r["indices"]) for r in results] == [r["length"] for r in results] == [10, 10]  # 2 shards >= 10
    indices = [i for r in results for batch in r["indices"] for i in batch]
    assert len(indices) == len(set(indices)) == 40 and set(indices) <= set(ids)


# -- through the data module and Lightning ----------------------------------------------------------
def test_data_module_probes_on_folders_and_streams_pretrain_images(shards, folder):
    data = SSLDataModule(dataset="shards", root=str(shards), image_size=8, batch_size=4, num_workers=0)
    assert not data.has_labels and "probe_train_root" in data.probe_unavailable_reason
    pretrain = list(data.probe_dataloader("pretrain"))
    assert sorted(i for b in pretrain for i in b.index.tolist()) == list(range(32))
    data = SSLDataModule(dataset="shards", root=str(shards), image_size=8, batch_size=4, num_workers=0,
                         probe_train_root=str(folder), test_root=str(folder))
    assert data.has_labels and data.num_classes == 2
    assert len(next(iter(data.probe_dataloader("test")))) == 32


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fit_and_exact_resume_through_lightning(tmp_path, num_workers):
    """16 records, batch 4: 4 steps an epoch. SIGTERM after step 5 (mid-epoch 1) and resume: the weights
    equal those of the uninterrupted run of 6 steps."""
    hand_written_shards(tmp_path / "shards", [4, 4, 4, 4])
    data = {"dataset": "shards", "data_root": tmp_path / "shards", "num_workers": num_workers}
    reference, trainer = tiny_fit("simclr", tmp_path / "reference", 6, **data)
    assert trainer.global_step == 6
    with pytest.raises(SystemExit):
        tiny_fit("simclr", tmp_path / "run", 6, callbacks=[SigtermAt(5)], **data)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert state["epoch"] == 1 and state["batches_done"] == 1
    resumed, _ = tiny_fit("simclr", tmp_path / "run", 6, ckpt_path=str(last), **data)
    assert same_weights(reference, resumed) == []
    assert same_weights(reference, tiny_fit("simclr", tmp_path / "short", 5, **data)[0]) != [], "sanity"
