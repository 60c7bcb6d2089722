"""SSLDataModule: pretraining batches of views, plus labelled splits for probes."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import lightning as L
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from selfsup.data.datasets import ImageFolder, UnreadableImage, source
from selfsup.data.shards import ShardSource, eval_loader, shard_loader
from selfsup.data.sampling import ResumableLoader, ResumableSampler, ignore_termination_in_worker
from selfsup.data.augment import finish_views
from selfsup.data.preprocessing import Preprocessing
from selfsup.data.transforms import ContrastiveViews, EvalView, Views, ViewTransform

log = logging.getLogger(__name__)
SPLITS = ("train", "probe_train", "test")  # pretraining, labelled probe-train, labelled test
FOLDER_PROBES = ("folder", "shards")  # sources whose probe splits are labelled folders (probe_train_root, test_root)


MAX_REPLACEMENT_ATTEMPTS = 16  # draws for a readable replacement of an unreadable training sample


@dataclass
class Batch:
    """A batch of views. ``labels`` is -1 where unknown; ``skipped`` counts the unreadable files met making
    it; ``invalid`` counts black placeholders that stand in for samples no readable replacement was found
    for (the training step of such a batch is skipped on every rank)."""

    views: list[Tensor]
    labels: Tensor
    index: Tensor
    skipped: int = 0
    invalid: int = 0
    meta: dict = field(default_factory=dict)
    colour: list[Tensor | None] | None = None  # per view, (B, 11) parameters the device applies (augment.py)

    def __len__(self) -> int:
        return len(self.index)

    def pin_memory(self) -> Batch:
        """The batch with every tensor in page-locked memory (the DataLoader's ``pin_memory=True`` calls this),
        so the host-to-device copies can run asynchronously."""
        colour = None if self.colour is None else [None if c is None else c.pin_memory() for c in self.colour]
        return replace(self, views=[v.pin_memory() for v in self.views], labels=self.labels.pin_memory(),
                       index=self.index.pin_memory(), colour=colour)


class Sample(NamedTuple):
    """One item of a :class:`ViewDataset`: ``index`` is the image actually used (a replacement's own)."""

    views: list[Tensor]
    label: int
    index: int
    skipped: int = 0  # unreadable files met while making this sample
    invalid: bool = False  # a placeholder: every draw was unreadable
    colour: list[Tensor | None] | None = None  # per view, the colour parameters left to the device


def replacement_index(seed: int, attempt: int, num_images: int) -> int:
    """The image that stands in for an unreadable training sample at ``attempt`` (1, 2, ...).

    A function of ``(seed, attempt)`` and the dataset size only, so every worker, rank and resumed run
    draws the same replacement (the string seed is hashed with SHA-512: stable across processes)."""
    return random.Random(f"selfsup-replacement:{seed}:{attempt}").randrange(num_images)


class ViewDataset(Dataset):
    """Applies a view transform to a source, deciding what an unreadable image becomes.

    A training item ``(index, seed)`` is replaced by a readable image drawn from its seed (up to
    :data:`MAX_REPLACEMENT_ATTEMPTS` draws), else by a black placeholder marked invalid, so a batch
    never changes size (every rank must gather batches of one size). An eval item (a bare index)
    becomes ``None``, dropped and counted by :func:`collate_views`: replacing a test image would
    change the test set. ``strict`` raises at the first unreadable file instead.
    """

    def __init__(self, images: Dataset, views: ViewTransform, strict: bool = False, placeholder_size: int = 32):
        self.images, self.views, self.strict = images, views, strict
        self.placeholder_size = placeholder_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, int]) -> Sample | None:
        """``item`` is an index, or ``(index, seed)``: then the views are drawn from that seed alone, so
        they do not depend on the worker, the rank or a resume (see :mod:`selfsup.data.sampling`)."""
        if not isinstance(item, tuple):
            return self._attempt(lambda: self._make(*self.images[item], item, None))
        return self.training_sample(*item)

    def training_sample(self, index: int, seed: int) -> Sample:
        """The sample for ``(index, seed)``: the image itself, a seeded replacement, or a placeholder."""
        for attempt in range(MAX_REPLACEMENT_ATTEMPTS + 1):
            real = index if attempt == 0 else replacement_index(seed, attempt, len(self.images))
            sample = self._attempt(lambda: self._make(*self.images[real], real, seed, skipped=attempt))
            if sample is not None:
                return sample
        log.warning("sample %d: the image and %d replacement draws were all unreadable; a black placeholder "
                    "keeps the batch size and the step is skipped", index, MAX_REPLACEMENT_ATTEMPTS)
        placeholder = Image.new("RGB", (self.placeholder_size, self.placeholder_size))
        return self._make(placeholder, -1, index, seed, MAX_REPLACEMENT_ATTEMPTS + 1)._replace(invalid=True)

    def sample(self, image: object, label: int, index: int, seed: int, skipped: int = 0) -> Sample | None:
        """The training :class:`Sample` of an image (decoded, or opened lazily), its views drawn from ``seed``
        alone; ``None`` (with a warning) when the image turns out unreadable while decoding, unless strict.
        Sources that are not map-style (tar shards) build their samples through this too."""
        return self._attempt(lambda: self._make(image, label, index, seed, skipped))

    def _make(self, image: object, label: int, index: int, seed: int | None, skipped: int = 0) -> Sample:
        if seed is None:
            out = self.views(image)
        else:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also seeds every accelerator backend and costs
                # ~150 us per sample, as much as the whole MAE augmentation
                torch.default_generator.manual_seed(seed)
                out = self.views(image)
        if isinstance(out, Views):
            return Sample(out.images, label, index, skipped, colour=out.colour)
        return Sample(out, label, index, skipped)

    def _attempt(self, make: Callable[[], Sample]) -> Sample | None:
        """``make()``, or ``None`` (with a warning) for an unreadable file (reading or decoding) unless strict."""
        try:
            return make()
        except UnreadableImage as err:
            if self.strict:
                raise
            log.warning("skipping unreadable image: %s", err)
            return None


def collate_views(samples: list) -> Batch:
    """Stack the views of the samples; ``None`` (a dropped eval image) and ``Sample.skipped`` are counted.
    Plain ``(views, label, index)`` tuples are accepted too."""
    good = [Sample(*s) for s in samples if s is not None]
    skipped = len(samples) - len(good) + sum(s.skipped for s in good)
    invalid = sum(s.invalid for s in good)
    if not good:
        return Batch(views=[], labels=torch.empty(0, dtype=torch.long), index=torch.empty(0, dtype=torch.long),
                     skipped=skipped)
    views = [torch.stack([s.views[v] for s in good]) for v in range(len(good[0].views))]
    labels = torch.tensor([s.label for s in good], dtype=torch.long)
    colour = None
    if good[0].colour is not None and any(c is not None for c in good[0].colour):
        colour = [None if good[0].colour[v] is None else torch.stack([s.colour[v] for s in good])
                  for v in range(len(views))]
    return Batch(views=views, labels=labels, index=torch.tensor([s.index for s in good]), skipped=skipped,
                 invalid=invalid, colour=colour)


def finish_batch(batch: Batch, preprocessing: Preprocessing) -> Batch:
    """The batch with its uint8 views augmented (where the workers left the colour steps) and normalised with
    ``preprocessing``'s mean and std, on whatever device the views are; float views pass through."""
    views = finish_views(batch.views, batch.colour, preprocessing.mean, preprocessing.std)
    return replace(batch, views=views, colour=None)


class SSLDataModule(L.LightningDataModule):
    """Pretraining views from ``dataset`` and, when it has them, labelled probe-train/test splits for probes.

    Pretraining may read unlabeled images (STL-10's ``train+unlabeled``, a flat folder); probes read the
    labelled probe-train split (STL-10's ``train``, ``probe_train_root``) and the labelled test split.

    Args:
        dataset: a registered source: ``fashion_mnist_embedded`` (shipped), ``fashion_mnist`` (IDX files),
            ``folder`` (image folder), ``shards`` (WebDataset tar shards, :mod:`selfsup.data.shards`),
            ``cifar10``, ``cifar100`` or ``stl10``.
        root: where the files are (not needed for the embedded set); for ``folder``, the pretraining images.
        test_root: for ``folder`` and ``shards``: a labelled folder (``<class>/<image>``) to probe on.
        probe_train_root: for ``folder`` and ``shards``: a labelled folder to fit probes on; for ``folder``
            default ``root`` itself when it has class sub-folders (a flat ``root`` then has no probes).
        views: how an image becomes views; default two SimCLR views.
        image_size, mean, std, crop_pct, interpolation: the preprocessing, saved into checkpoints.
            ``mean``/``std`` default to the dataset's own statistics.
        batch_size: per device. The global batch is ``batch_size * devices * nodes * accumulation``.
        strict_images: raise on an unreadable image instead of replacing (training) or dropping (eval) it.
        seed: the data order and augmentation seed; ``None`` takes ``seed_everything``'s (else 0).
        device_augment: run the colour steps (jitter, grayscale, blur, solarisation) batched on the training
            device after the transfer, so loader workers only decode, crop, resize and flip; ``False`` runs
            them per sample on the workers. Both draw the same parameters from the sample seeds. Either way
            the workers ship uint8 views and :meth:`prepare_batch` normalises them on the device.
    """

    def __init__(self, dataset: str = "fashion_mnist_embedded", root: str | None = None,
                 test_root: str | None = None, views: ViewTransform | None = None, image_size: int = 32,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 crop_pct: float = 1.0, interpolation: str = "bilinear", batch_size: int = 256,
                 eval_batch_size: int = 512, num_workers: int = 2, strict_images: bool = False,
                 drop_last: bool = True, seed: int | None = None, probe_train_root: str | None = None,
                 device_augment: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["views"])  # in checkpoints: `selfsup eval` rebuilds the splits from them
        self.seed = seed
        self.spec = source(dataset)
        if batch_size <= 0:
            raise ValueError(f"data.batch_size={batch_size} must be a positive integer")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        if probe_train_root is not None and dataset not in FOLDER_PROBES:
            raise ValueError(f"data.probe_train_root={probe_train_root!r} is only for dataset 'folder' or 'shards'; "
                             f"{dataset!r} brings its own probe-train split: remove it")
        self.dataset, self.root, self.test_root = dataset, root, test_root
        self.probe_train_root = probe_train_root
        self.preprocessing = Preprocessing(image_size=image_size, mean=mean or self.spec.info.mean,
                                           std=std or self.spec.info.std, crop_pct=crop_pct,
                                           interpolation=interpolation)
        self.views = views if views is not None else ContrastiveViews()
        self.device_augment = self.views.device_augment = device_augment
        self.views.bind(self.preprocessing)
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.strict_images, self.drop_last = strict_images, drop_last
        self._sources: dict[str, Dataset | None] = {}

    # -- sources -------------------------------------------------------------------------------
    def split(self, which: str) -> Dataset | None:
        """The raw source for ``"train"`` (pretraining), ``"probe_train"`` (labelled, for probes) or
        ``"test"`` (labelled); ``None`` when the dataset has no such split. Built on first use, once;
        under ``torch.distributed`` call :meth:`setup` first (Lightning does, on every rank)."""
        if which not in SPLITS:
            raise ValueError(f"split {which!r} is not one of {SPLITS}")
        if which not in self._sources:
            self._sources[which] = (self._folder_split(which) if self.dataset in FOLDER_PROBES
                                    else self._spec_split(which))
        return self._sources[which]

    def _spec_split(self, which: str) -> Dataset | None:
        name = dict(zip(SPLITS, self.spec.splits))[which]
        if name is None:
            return None
        if which != "train" and name == self.spec.splits[0]:
            return self.split("train")  # one split serves both (CIFAR's train): read it once
        return self.spec.build(name, root=self.root)

    def _folder_split(self, which: str) -> Dataset | None:
        if which == "train":
            return self.spec.build("train", root=self.root)
        if which == "probe_train":
            if self.probe_train_root is not None:
                return ImageFolder(self.probe_train_root, labelled=True)
            train = self.split("train")
            return train if getattr(train, "classes", None) else None
        if self.test_root is None:
            return None
        probe_train = self.split("probe_train")
        return self.spec.build("test", root=self.test_root, classes=getattr(probe_train, "classes", None))

    @property
    def has_labels(self) -> bool:
        """Whether probes can run: both a labelled probe-train split and a labelled test split exist."""
        return self.split("probe_train") is not None and self.split("test") is not None

    @property
    def probe_unavailable_reason(self) -> str | None:
        """Why probes cannot run, in one line for callbacks to print when they skip (``None``: they can)."""
        missing = []
        if self.split("probe_train") is None:
            missing.append("data.root is a flat folder without class sub-folders; set data.probe_train_root to a "
                           "labelled folder" if self.dataset == "folder" else "tar shards are for pretraining; set "
                           "data.probe_train_root to a labelled folder" if self.dataset == "shards" else
                           f"dataset {self.dataset!r} has no labelled probe-train split")
        if self.split("test") is None:
            missing.append("no labelled test split; set data.test_root to a labelled folder"
                           if self.dataset in FOLDER_PROBES else f"dataset {self.dataset!r} has no labelled test split")
        return "probes skipped: " + "; ".join(missing) if missing else None

    @property
    def num_classes(self) -> int | None:
        """Number of classes of the probe-train split, or ``None`` without labelled splits."""
        if not self.has_labels:
            return None
        classes = getattr(self.split("probe_train"), "classes", None)
        return len(classes) if classes else self.spec.info.num_classes

    def setup(self, stage: str | None = None) -> None:
        """Build every split (pretraining, probe-train, test) now, on every rank.

        Building a folder split is a collective under ``torch.distributed`` (rank 0 lists, the index is
        broadcast), so it must happen on every rank at once: here, not later on first use by a property
        (``has_labels``, ``num_classes``) or a callback that may run on some ranks only."""
        for which in SPLITS:
            self.split(which)

    # -- on the device -------------------------------------------------------------------------
    def prepare_batch(self, batch: Any) -> Any:
        """Finish a batch on its device: colour augmentation (where the workers left it) and normalisation
        of the uint8 views. The Trainer calls this after each host-to-device copy
        (:meth:`on_after_batch_transfer`); call it yourself on batches taken from the loaders by hand."""
        return finish_batch(batch, self.preprocessing) if isinstance(batch, Batch) else batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.prepare_batch(batch)

    # -- loaders -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        train = ViewDataset(self.split("train"), self.views, self.strict_images, self.preprocessing.image_size)
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        if isinstance(train.images, ShardSource):  # streamed: dealt to ranks and workers, full batches only
            return shard_loader(train, self.batch_size, seed, self.num_workers, collate_views,
                                self._training_progress if self.trainer is not None else None)
        if self.drop_last and len(train) < self.batch_size:
            raise ValueError(f"the training set has {len(train)} images, fewer than data.batch_size="
                             f"{self.batch_size}; lower the batch size or set data.drop_last=false")
        loader = ResumableLoader(train, batch_size=self.batch_size, sampler=ResumableSampler(train, seed),
                                 drop_last=self.drop_last, num_workers=self.num_workers, collate_fn=collate_views,
                                 persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                                 worker_init_fn=ignore_termination_in_worker,
                                 generator=torch.Generator().manual_seed(seed))  # leaves the global RNG alone
        loader.progress = self._training_progress
        return loader

    def _training_progress(self) -> tuple[int, int]:
        """``(epoch, batches processed in it)`` from the trainer: what a resumed loader must skip."""
        loop = self.trainer.fit_loop
        epoch = loop.epoch_progress.current
        if epoch.processed == epoch.started:  # saved at an epoch end (also a short one: limit_train_batches)
            return epoch.processed, 0
        return epoch.processed, loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader | list:
        """The labelled test split with the eval transform, for the online probe."""
        return self.probe_dataloader("test") if self.has_labels else []

    def probe_dataloader(self, which: str) -> DataLoader:
        """A split with the deterministic eval transform: ``"train"`` the labelled probe-train split,
        ``"test"`` the labelled test split (each an error naming what is missing when the probes cannot
        run), ``"pretrain"`` the pretraining images (labels may be -1), for callbacks that need only images
        (reconstruction grids)."""
        if which not in ("train", "test", "pretrain"):
            raise ValueError(f"probe_dataloader({which!r}): use 'train', 'test' or 'pretrain'")
        if which != "pretrain" and not self.has_labels:
            raise ValueError(f"dataset {self.dataset!r} cannot be probed: {self.probe_unavailable_reason}")
        images = self.split({"train": "probe_train", "test": "test", "pretrain": "train"}[which])
        view = EvalView()
        view.bind(self.preprocessing)
        dataset = ViewDataset(images, view, self.strict_images)
        if isinstance(images, ShardSource):  # streamed, not map-style
            return eval_loader(dataset, self.eval_batch_size, collate_views)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_views)
