"""Unreadable training images are replaced, never dropped: a rank's batch keeps its size.

A replacement is drawn from the sample's own seed (so it is the same in every worker, rank and resumed
run) and brings its own label and index; every unreadable file met is counted. When no draw is
readable, a black placeholder keeps the batch full and the training step is skipped on every rank.
Eval items (no seed) are still dropped and counted.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from selfsup.data import datasets
from selfsup.data.datamodule import (MAX_REPLACEMENT_ATTEMPTS, SSLDataModule, ViewDataset, collate_views,
                                     replacement_index)
from selfsup.data.datasets import UnreadableImage
from selfsup.data.transforms import ViewTransform
from selfsup.run import DataHealth, NonFiniteGuard
from tests.helpers.dist import run_distributed
from tests.helpers.images import record_failed_decodes
from tests.helpers.guard import guard_step
from tests.helpers.methods import run_callback, tiny_fit

SEED = 1234


class FlakyImages(Dataset):
    """``n`` 8x8 PIL images whose red channel is their index; ``bad`` ones raise; every read is recorded."""

    def __init__(self, n: int, bad: set[int] | None = None):
        self.n, self.bad, self.reads = n, set(range(n)) if bad is None else bad, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        self.reads.append(index)
        if index in self.bad:
            raise UnreadableImage(f"image {index} is broken")
        return Image.new("RGB", (8, 8), (index, 0, 0)), 100 + index


class Identify(ViewTransform):
    """The image's pixels, plus one draw of the seeded torch generator (to see the augmentation seed)."""

    def bind(self, preprocessing) -> None:
        pass

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [torch.from_numpy(np.array(image.resize((8, 8)))).permute(2, 0, 1), torch.rand(3)]


def test_replacement_index_depends_only_on_seed_and_attempt():
    first = [replacement_index(SEED, attempt, 1000) for attempt in range(1, MAX_REPLACEMENT_ATTEMPTS + 1)]
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert [replacement_index(SEED, a, 1000) for a in range(1, MAX_REPLACEMENT_ATTEMPTS + 1)] == first
    assert len(set(first)) > MAX_REPLACEMENT_ATTEMPTS // 2, "attempts draw different images"
    assert all(0 <= i < 1000 for i in first)
    assert [replacement_index(SEED + 1, a, 1000) for a in range(1, 17)] != first, "the seed matters"
    code = ("from selfsup.data.datamodule import replacement_index as r; "
            f"print([r({SEED}, a, 1000) for a in range(1, {MAX_REPLACEMENT_ATTEMPTS + 1})])")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED="123"), cwd=Path(__file__).parents[2])
    assert other.stdout.strip() == str(first), "a fresh process (another worker, a resumed run) draws the same"


def test_an_unreadable_sample_is_replaced_by_its_own_label_index_and_pixels():
    images = FlakyImages(40, bad={2, 5, 7, 11, 30})
    dataset = ViewDataset(images, Identify(), placeholder_size=8)
    for index in range(40):
        images.reads.clear()
        sample = dataset[(index, SEED + index)]
        bad_reads = [i for i in images.reads if i in images.bad]
        assert sample.skipped == len(bad_reads), "every unreadable file met is counted"
        assert not sample.invalid and sample.index not in images.bad
        assert sample.index == (index if index not in images.bad else images.reads[-1]), "the image read last"
        assert sample.label == 100 + sample.index, "the label belongs to the image used"
        assert (sample.views[0][0] == sample.index).all(), "the pixels are the replacement's"


def test_replacement_does_not_depend_on_what_was_read_before():
    items = [(i, SEED + 7 * i) for i in range(30)]
    forward = [ViewDataset(FlakyImages(30, {1, 4, 9}), Identify(), placeholder_size=8)[item] for item in items]
    fresh = ViewDataset(FlakyImages(30, {1, 4, 9}), Identify(), placeholder_size=8)
    backward = [fresh[item] for item in reversed(items)][::-1]
    for a, b in zip(forward, backward):
        assert (a.index, a.label, a.skipped) == (b.index, b.label, b.skipped)
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views))


def test_no_readable_draw_gives_a_black_placeholder_and_a_full_batch(caplog):
    images = FlakyImages(6)  # every image is broken
    dataset = ViewDataset(images, Identify(), placeholder_size=8)
    batch = collate_views([dataset[(i, SEED + i)] for i in range(4)])
    assert len(batch) == 4 and batch.invalid == 4
    assert batch.skipped == 4 * (MAX_REPLACEMENT_ATTEMPTS + 1) == len(images.reads)
    assert batch.views[0].shape == (4, 3, 8, 8) and (batch.views[0] == 0).all()
    assert (batch.labels == -1).all() and batch.index.tolist() == [0, 1, 2, 3]
    assert "black placeholder" in caplog.text


def test_strict_mode_raises_at_the_first_unreadable_file():
    images = FlakyImages(10, bad={3, 4})
    with pytest.raises(UnreadableImage, match="image 3"):
        ViewDataset(images, Identify(), strict=True)[(3, SEED)]
    assert images.reads == [3], "no replacement is tried"


def _labelled_folder_with_bad_files(root: Path) -> set[str]:
    """Two classes of 10 PNGs each (red = index), 3 of them unreadable; returns the bad paths."""
    bad = set()
    for c, name in enumerate(("ant", "bee")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            path = root / name / f"{i}.png"
            if i in (2, 6) and c == 0 or i == 9 and c == 1:
                path.write_bytes(b"" if i == 2 else b"not an image")
                bad.add(str(path))
            else:
                Image.new("RGB", (12, 12), (10 * i + c, 0, 0)).save(path)
    return bad


def _batches(root: Path, num_workers: int) -> list:
    data = SSLDataModule(dataset="folder", root=str(root), views=Identify(), batch_size=4, num_workers=num_workers,
                         drop_last=False, seed=SEED)
    return list(data.train_dataloader()), data.split("train")


def test_training_batches_keep_their_size_and_count_every_bad_read(tmp_path, monkeypatch):
    bad = _labelled_folder_with_bad_files(tmp_path / "images")
    record_failed_decodes(monkeypatch, tmp_path / "failures.txt")
    batches, folder = _batches(tmp_path / "images", num_workers=0)
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4], "20 files, batches of 4: none shorter"
    failures = (tmp_path / "failures.txt").read_text().splitlines()
    assert set(failures) == bad, "one epoch visits every file once"
    assert sum(b.skipped for b in batches) == len(failures)
    assert sum(b.invalid for b in batches) == 0
    for batch in batches:
        for index, label, pixels in zip(batch.index.tolist(), batch.labels.tolist(), batch.views[0]):
            path, file_label = folder.files[index]
            assert path not in bad and label == file_label
            assert (pixels[0] == 10 * int(Path(path).stem) + label).all(), "views, label and index agree"

    (tmp_path / "failures.txt").unlink()
    with_workers, _ = _batches(tmp_path / "images", num_workers=2)
    for a, b in zip(batches, with_workers):
        assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels) and a.skipped == b.skipped
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views)), "the same in any worker"
    assert len((tmp_path / "failures.txt").read_text().splitlines()) == len(failures)


def test_eval_loaders_still_drop_and_count_unreadable_files(tmp_path):
    bad = _labelled_folder_with_bad_files(tmp_path / "test")
    data = SSLDataModule(dataset="folder", root=str(tmp_path / "test"), test_root=str(tmp_path / "test"),
                         image_size=8, eval_batch_size=64, num_workers=0)
    batch = next(iter(data.probe_dataloader("test")))
    assert len(batch) == 20 - len(bad) and batch.skipped == len(bad) and batch.invalid == 0


class AllBadFirst(Dataset):
    """Random 3x32x32 uint8 images; the first ``bad_reads`` reads raise (a first batch of placeholders)."""

    def __init__(self, n: int, bad_reads: int):
        self.images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
        self.bad_reads, self.reads = bad_reads, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        self.reads += 1
        if self.reads <= self.bad_reads:
            raise UnreadableImage(f"read {self.reads} fails")
        return self.images[index], -1


class StepRecorder(L.Callback):
    """The weights before and after each step, and the ``invalid`` count of each batch training_loss saw."""

    def __init__(self):
        self.before, self.after, self.seen = [], [], []

    def setup(self, trainer, module, stage):
        original = module.training_loss

        def training_loss(batch):
            self.seen.append(batch.invalid)
            return original(batch)

        module.training_loss = training_loss

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before.append({k: v.clone() for k, v in module.state_dict().items()})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after.append({k: v.clone() for k, v in module.state_dict().items()})


def test_a_placeholder_batch_runs_the_loss_then_skips_the_step_and_training_goes_on(tmp_path, monkeypatch):
    name = "all_bad_first"
    source = AllBadFirst(16, bad_reads=4 * (MAX_REPLACEMENT_ATTEMPTS + 1))
    monkeypatch.setitem(datasets._SOURCES, name, datasets.SourceSpec(lambda split, root=None: source,
                                                                     datasets.SourceInfo(), ("train", None, None)))
    recorder = StepRecorder()
    method, trainer = tiny_fit("simclr", tmp_path, 3, callbacks=[recorder], dataset=name,
                               max_consecutive_nonfinite=1)
    assert recorder.seen == [4, 0, 0], "the placeholder batch still ran training_loss (and its collectives)"
    changed = [k for k in recorder.before[0] if not torch.equal(recorder.before[0][k], recorder.after[0][k])]
    assert changed == [], f"the skipped step changed {changed[:3]}"
    moved = [k for k, v in recorder.before[1].items()
             if v.is_floating_point() and not torch.equal(v, recorder.after[1][k])]
    assert moved, "the next good step trains"
    guard = run_callback(trainer, NonFiniteGuard)
    assert guard.requested_skips == 1 and guard.skipped_steps == 0
    assert guard.consecutive == 0, "not counted as a non-finite step (max_consecutive=1)"
    assert run_callback(trainer, DataHealth).skipped_images == 4 * (MAX_REPLACEMENT_ATTEMPTS + 1)
    assert trainer.global_step == 3


def test_guard_skips_a_requested_step_outside_the_nonfinite_count():
    guard = NonFiniteGuard(max_consecutive=2)
    assert guard_step(guard, float("nan"), step=3)
    assert guard_step(guard, float("nan"), invalid=2, step=4), "a requested skip wins over a non-finite loss"
    assert guard_step(guard, 1.0, invalid=1, step=5)
    assert (guard.requested_skips, guard.skipped_steps, guard.consecutive) == (2, 1, 1)
    assert not guard_step(guard, 1.0, step=6)


def _request_on_rank(rank: int, world_size: int) -> list:
    import torch.distributed as dist

    calls, original = [0], dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    guard = NonFiniteGuard()
    skipped = guard_step(guard, 1.0, invalid=2 if rank else 0, step=7)
    dist.all_reduce = original
    return [skipped, calls[0], guard.requested_skips, guard.consecutive]


def test_every_rank_skips_when_one_rank_requests_it_in_one_all_reduce():
    results = run_distributed(_request_on_rank, 2)
    assert results == [[True, 1, 1, 0], [True, 1, 1, 0]], "one all-reduce; counted apart from non-finite"
