"""WebDataset tar shards, streamed: the ``shards`` source, for millions of images and many nodes.

``data.root`` is a folder of ``.tar`` files or a brace pattern (``/data/train-{000000..000127}.tar``). A
shard holds records, the tar members that share a key, as WebDataset writes them: ``<key>.jpg`` (or
``.jpeg``, ``.png``, ``.webp``, ...) and an optional ``<key>.cls``, the integer label as text. They are read
with webdataset's tar iterators. ``shards.json`` beside the shards gives each shard's record count
(``selfsup shards write``, :mod:`selfsup.data.shard_writer`, makes it; without it rank 0 counts the records
from the tar headers, decoding nothing).

An epoch, planned alike on every rank from ``(seed, epoch)`` and the counts:

- the shards are permuted by ``(seed, epoch)`` and dealt round-robin to the ``world_size x workers``
  *slots* (one slot per DataLoader worker of each rank): each shard is read by one slot, so no image is
  read twice, and there must be at least as many shards as slots;
- a slot streams its shards through a shuffle buffer seeded by ``(seed, epoch, slot)``;
- every slot yields the same number of full batches (so every rank the same, or DDP hangs at the end of
  the epoch): the records of the fewest a slot can be dealt (the ``shards // slots`` smallest shards),
  rounded down to whole batches. **The rest of each slot's records are dropped from that epoch** (a
  different set each epoch): less than a batch per slot with shards of equal size (the writer makes them
  so) and a shard count that is a multiple of the slot count, else up to about a shard per slot; rank 0
  logs how many, as a warning above 5%.

A record that does not decode is replaced by the next record of its slot's stream (so the batch stays
full) and counted in that sample's ``Sample.skipped``; a slot that runs out of records wraps to the
start of its own shards. Every sample's augmentation is drawn from ``(seed, epoch, record)``, never from
worker timing. Resume: batch ``n`` of an epoch is worker ``n % W``'s batch ``n // W`` (the DataLoader takes
its workers in turn), and a slot's batch ``i`` is always records ``[i*B, (i+1)*B)`` of its stream, so a
resumed loader skips those records (read, not decoded) and rotates its workers to continue exactly.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

import selfsup.distributed as distributed
from selfsup.data.datasets import (IMAGE_EXTENSIONS, LABELLED, ImageFolder, SourceInfo, UnreadableImage, load_image,
                                   register_source)
from selfsup.data.shard_index import INDEX, record_counts, shard_paths
from selfsup.data.sampling import ResumableLoader, ignore_termination_in_worker, sample_seed

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
SHUFFLE_BUFFER = 1000  # records (encoded bytes) a worker holds to mix its stream
MAX_NEXT_RECORDS = 16  # records after an unreadable one tried as its replacement, then a black placeholder


class SampleMaker(Protocol):
    """What the stream needs of :class:`~selfsup.data.datamodule.ViewDataset`."""

    images: Any
    strict: bool
    placeholder_size: int

    def sample(self, image: object, label: int, index: int, seed: int, skipped: int = 0) -> Any: ...


# -- shards and their record counts -----------------------------------------------------------------
class ShardSource:
    """The shards of ``data.root`` and their records. Not map-style: :class:`ShardStream` streams it.

    ``shuffle_buffer`` is how many records each loader worker mixes (their encoded bytes stay in memory).
    """

    def __init__(self, root: str | os.PathLike | None, shuffle_buffer: int = SHUFFLE_BUFFER):
        self.root, self.paths, self.shuffle_buffer = root, shard_paths(root), shuffle_buffer
        self._counts: list[int] | None = None

    def counts(self) -> list[int]:
        """Records per shard; found on rank 0 and broadcast, so every rank must call it the first time."""
        if self._counts is None:
            self._counts = distributed.on_rank_zero(lambda: record_counts(self.paths))
        return self._counts

    def records(self, shard: int, count: int | None = None) -> Iterator[tuple[int, dict]]:
        """``(position, record)`` of one shard in tar order (webdataset's grouping: ``{"__key__", "jpg", "cls",
        ...}``, bytes). With ``count``, a shard that disagrees with it is named in a warning and cut to it."""
        path = self.paths[shard]
        with open(path, "rb") as stream:
            files = tar_file_expander([{"url": path, "stream": stream}], handler=_warn_and_continue)
            position = -1
            for position, record in enumerate(group_by_keys(files, handler=_warn_and_continue)):
                if count is not None and position >= count:
                    log.warning("%s holds more records than the %d its index says; the rest are ignored: rewrite "
                                "%s with `selfsup shards index`", path, count, INDEX)
                    return
                yield position, record
        if count is not None and position + 1 < count:
            log.warning("%s holds %d records, not the %d its index says", path, position + 1, count)


def _warn_and_continue(error: Exception) -> bool:
    log.warning("unreadable tar data, skipped: %s", error)
    return True


def decode_record(record: dict) -> tuple[Image.Image, int]:
    """A record's image (opened, decoded later by the views) and label (``-1`` without a ``.cls``), or
    :class:`UnreadableImage`."""
    name = f"{record.get('__url__')}:{record.get('__key__')}"
    suffix = next((s for s in IMAGE_SUFFIXES if s in record), None)
    if suffix is None:
        raise UnreadableImage(f"{name}: no image member ({', '.join(IMAGE_EXTENSIONS)})")
    label = -1
    if "cls" in record:
        try:
            label = int(record["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError) as err:
            raise UnreadableImage(f"{name}.cls: not an integer label ({err})") from err
    return load_image(io.BytesIO(record[suffix]), name=f"{name}.{suffix}"), label


# -- one epoch: shards dealt to slots, a seeded buffer per slot ------------------------------------
def open_record(views: SampleMaker, record: dict) -> tuple[Image.Image, int] | None:
    """:func:`decode_record`, or ``None`` (with a warning) for an unreadable record unless ``views.strict``."""
    try:
        return decode_record(record)
    except UnreadableImage as err:
        if views.strict:
            raise
        log.warning("skipping unreadable record: %s", err)
        return None


def deal(num_shards: int, slots: int, seed: int, epoch: int) -> list[list[int]]:
    """The shards of each slot in one epoch: a ``(seed, epoch)`` permutation dealt round-robin."""
    order = list(range(num_shards))
    random.Random(f"selfsup-shards:{seed}:{epoch}").shuffle(order)
    return [order[slot::slots] for slot in range(slots)]


def batches_per_slot(counts: list[int], slots: int, batch_size: int) -> int:
    """Full batches every slot can yield whichever shards it is dealt: each slot gets at least
    ``len(counts) // slots`` shards, so at least the records of that many smallest shards."""
    return sum(sorted(counts)[: len(counts) // slots]) // batch_size


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """``items`` through a shuffle buffer of ``size``: each item, once, in an order fixed by ``rng``."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Training samples of a :class:`ShardSource`: this rank's share of an epoch, dealt to its workers.

    Each worker yields ``batches_per_slot x batch_size`` samples of its own slot; the loader cuts them into
    batches. ``rank``/``world_size`` default to the process group's. :meth:`begin` sets the epoch and the
    batches of it already done (a resume) before the workers start.
    """

    def __init__(self, views: SampleMaker, batch_size: int, seed: int, num_workers: int, rank: int | None = None,
                 world_size: int | None = None):
        self.views, self.source, self.batch_size, self.seed = views, views.images, batch_size, seed
        self.rank = distributed.rank() if rank is None else rank
        self.world_size = distributed.world_size() if world_size is None else world_size
        self.workers = max(1, num_workers)
        self.counts = self.source.counts()  # every rank is here: rank 0 counts, the others wait
        self.offsets = [0, *itertools.accumulate(self.counts)][:-1]  # record id = shard offset + position
        self.slots = self.world_size * self.workers
        self.batches_per_slot = self._full_batches(batch_size)
        self.epoch, self.batches_done = 0, 0
        if self.rank == 0:
            self._report_drop()

    def _full_batches(self, batch_size: int) -> int:
        """:func:`batches_per_slot`, or an error naming the numbers and the fix."""
        shards, slots = len(self.counts), self.slots
        if shards < slots:
            fewer = f"data.num_workers={shards // self.world_size}" if shards >= self.world_size else "fewer ranks"
            raise ValueError(f"{shards} shards cannot feed {self.world_size} ranks x {self.workers} workers = {slots} "
                             f"loader slots (each slot reads whole shards): write at least {slots} shards ("
                             f"selfsup shards write ... with a smaller --max-count) or use {fewer}")
        batches = batches_per_slot(self.counts, slots, batch_size)
        if batches == 0:
            smallest = sorted(self.counts)[: shards // slots]
            raise ValueError(f"the {len(smallest)} smallest shards hold {sum(smallest)} records, too few for one batch "
                             f"of data.batch_size={batch_size} in each of the {slots} loader slots: lower the batch "
                             "size or data.num_workers, or write bigger shards")
        return batches

    def _report_drop(self) -> None:
        total, kept = sum(self.counts), self.batches_per_slot * self.batch_size * self.slots
        say = log.warning if total - kept > 0.05 * total else log.info
        say("shards: %d slots (%d ranks x %d workers) yield %d batches of %d each per epoch; %d of the %d records "
            "(%.1f%%) are left out of each epoch. Fewest drop with shards of equal size and a shard count that is "
            "a multiple of %d (now %d).", self.slots, self.world_size, self.workers, self.batches_per_slot,
            self.batch_size, total - kept, total, 100 * (total - kept) / total, self.slots, len(self.counts))

    def __len__(self) -> int:
        """Samples this rank yields per epoch: ``batches_per_slot x workers x batch_size``."""
        return self.batches_per_slot * self.workers * self.batch_size

    def layout(self) -> dict[str, int]:
        """What the batches of an epoch depend on besides ``(seed, epoch)``: a resume needs the same."""
        return {"world_size": self.world_size, "num_workers": self.workers, "batch_size": self.batch_size,
                "num_shards": len(self.counts), "records": sum(self.counts)}

    def begin(self, epoch: int, batches_done: int = 0) -> None:
        """Make the next iteration stream ``epoch`` from its batch ``batches_done`` (of this rank's)."""
        self.epoch, self.batches_done = epoch, batches_done

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        if info is not None and info.num_workers != self.workers:
            raise ValueError(f"this ShardStream was planned for {self.workers} workers but its DataLoader has "
                             f"{info.num_workers}: build both with the same num_workers (shard_loader does)")
        # after a resume at batch k the DataLoader starts again at worker 0, which must yield batch k
        role = ((0 if info is None else info.id) + self.batches_done) % self.workers
        done = (self.batches_done - role + self.workers - 1) // self.workers  # batches of this role before k
        slot = self.rank * self.workers + role
        return self._samples(slot, done * self.batch_size, (self.batches_per_slot - done) * self.batch_size)

    def _samples(self, slot: int, start: int, count: int) -> Iterator:
        records = self._stream(slot)
        for _ in range(start):  # records of batches already trained on: read, not decoded
            next(records)
        window: deque = deque()  # this position's record and the next ones read to replace it
        for _ in range(count):
            if not window:
                window.append(next(records))
            yield self._sample(window, records)
            window.popleft()

    def _stream(self, slot: int) -> Iterator[tuple[int, dict]]:
        """``(record id, record)`` of a slot in the epoch's order; past the end it wraps to its first shard."""
        shards = deal(len(self.counts), self.slots, self.seed, self.epoch)[slot]
        rng = random.Random(f"selfsup-shards:{self.seed}:{self.epoch}:{slot}")
        size = min(self.source.shuffle_buffer, sum(self.counts[s] for s in shards))
        while True:
            yielded = 0
            one_pass = ((self.offsets[s] + i, r) for s in shards for i, r in self.source.records(s, self.counts[s]))
            for item in shuffled(one_pass, size, rng):
                yielded += 1
                yield item
            if yielded == 0:
                raise ValueError(f"shards {[self.source.paths[s] for s in shards]} hold no records")

    def _sample(self, window: deque, records: Iterator) -> Any:
        planned = window[0][0]
        seed = sample_seed(self.seed, self.epoch, planned)
        for attempt in range(MAX_NEXT_RECORDS + 1):
            if attempt == len(window):
                window.append(next(records))
            index, record = window[attempt]
            opened = open_record(self.views, record)
            # a record that opens may still fail to decode: then sample() is None too
            sample = None if opened is None else self.views.sample(*opened, index, seed, skipped=attempt)
            if sample is not None:
                return sample
        log.warning("record %d and the %d after it are unreadable; a black placeholder keeps the batch size and the "
                    "step is skipped", planned, MAX_NEXT_RECORDS)
        black = Image.new("RGB", (self.views.placeholder_size, self.views.placeholder_size))
        return self.views.sample(black, -1, planned, seed, skipped=MAX_NEXT_RECORDS + 1)._replace(invalid=True)


# -- loaders ----------------------------------------------------------------------------------------
class ShardLoader(ResumableLoader):
    """The training loader of a :class:`ShardStream`, which Lightning saves and restores mid-epoch.

    ``progress`` (set by the data module) returns ``(epoch, batches the training loop processed in it)``:
    the epoch to stream (Lightning calls no ``set_epoch`` on an iterable dataset's loader) and the state
    saved. Without it (outside a trainer) :meth:`set_epoch` chooses the epoch. Workers are not persistent:
    the epoch and resume position reach them in the dataset when they start.
    """

    def __init__(self, dataset: ShardStream, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        if self._resume is not None:
            epoch, done = self._resume
        else:
            epoch, done = (self.progress()[0] if self.progress is not None else self.epoch), 0
        self._resume = None
        self.dataset.begin(epoch, done)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        return {"epoch": epoch, "batches_done": batches, **self.dataset.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        epoch, done = int(state["epoch"]), int(state.get("batches_done", 0))
        saved = {key: state.get(key) for key in self.dataset.layout()}
        if saved != self.dataset.layout():
            log.warning("the checkpoint's shard loader had %s, this one has %s: epoch %d restarts from its "
                        "first batch (not an exact resume)", saved, self.dataset.layout(), epoch)
            done = 0
        if done >= len(self):
            epoch, done = epoch + 1, 0
        self._resume = (epoch, done)


def shard_loader(views: SampleMaker, batch_size: int, seed: int, num_workers: int, collate_fn: Callable,
                 progress: Callable[[], tuple[int, int]] | None = None, rank: int | None = None,
                 world_size: int | None = None) -> ShardLoader:
    """The training loader of the ``shards`` source (``views.images``): full batches only, the same
    number on every rank (see the module docstring for what an epoch drops). ``rank``/``world_size``
    default to the process group's."""
    stream = ShardStream(views, batch_size, seed, num_workers, rank, world_size)
    loader = ShardLoader(stream, batch_size=batch_size, drop_last=True, num_workers=num_workers,
                         collate_fn=collate_fn, pin_memory=torch.cuda.is_available(),
                         worker_init_fn=ignore_termination_in_worker)
    loader.progress = progress
    return loader


class ShardImages(IterableDataset):
    """Every record once, in shard order, through a deterministic view (images for callbacks, e.g.
    reconstruction grids); an unreadable record becomes ``None``, which the collate drops and counts."""

    def __init__(self, views: SampleMaker):
        self.views = views

    def __iter__(self) -> Iterator:
        index = itertools.count()
        for shard in range(len(self.views.images.paths)):
            for _, record in self.views.images.records(shard):
                opened, number = open_record(self.views, record), next(index)
                yield None if opened is None else self.views.sample(*opened, number, 0)


def eval_loader(views: SampleMaker, batch_size: int, collate_fn: Callable) -> DataLoader:
    """:class:`ShardImages` in batches, in one process (workers would each repeat the stream)."""
    return DataLoader(ShardImages(views), batch_size=batch_size, num_workers=0, collate_fn=collate_fn)


def shard_source(split: str, root: str | None = None, classes: list[str] | None = None) -> ShardSource | ImageFolder:
    """The ``shards`` source: pretraining streams the tar shards of ``data.root``; the probe splits are
    labelled folders (``data.probe_train_root``, ``data.test_root``), as for ``folder``."""
    return ShardSource(root) if split == "train" else ImageFolder(root, classes=classes)


register_source("shards", shard_source, SourceInfo(), LABELLED)  # here: datasets cannot import this module
