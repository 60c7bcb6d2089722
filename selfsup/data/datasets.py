"""Image sources: each is a map-style dataset of ``(image, label)`` pairs.

An image is a ``uint8`` tensor ``(C, H, W)`` or a PIL image; ``label`` is ``-1`` for unlabeled data.
A source that cannot decode one of its files raises :class:`UnreadableImage`, which the view
dataset turns into a counted skip (see :mod:`selfsup.data.datamodule`).
"""

from __future__ import annotations

import gzip
import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from selfsup.data.index import IMAGE_EXTENSIONS, FileIndex, file_index
from selfsup.data.index import existing_dir as _existing_dir

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class UnreadableImage(Exception):
    """An image file that could not be decoded; the data pipeline skips and counts it."""


@dataclass(frozen=True)
class SourceInfo:
    """Facts about a source that the preprocessing defaults are derived from."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int | None = None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {payload.size} bytes")
    return payload.reshape(shape)


class ArrayImages(Dataset):
    """Images held in memory as a ``uint8`` array ``(N, H, W)`` or ``(N, H, W, C)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None):
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4:
            images = images.transpose(0, 3, 1, 2)
        else:
            raise ValueError(f"expected images of shape (N, H, W) or (N, H, W, C), got {images.shape}")
        if len(images) == 0:
            raise ValueError("the dataset is empty")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], -1 if self.labels is None else int(self.labels[index])


FASHION_MNIST_INFO = SourceInfo(mean=(0.2860,), std=(0.3530,), num_classes=10)


def embedded_fashion_mnist(split: str, root: str | None = None) -> ArrayImages:
    """The class-balanced Fashion-MNIST subset shipped in the package (10k train / 2k test)."""
    _check_split(split, ("train", "test"))
    with resources.files("selfsup.data.assets").joinpath("fashion_mnist_subset.npz").open("rb") as f:
        arrays = np.load(f)
        return ArrayImages(arrays[f"{split}_images"], arrays[f"{split}_labels"])


def fashion_mnist(split: str, root: str | None = None) -> ArrayImages:
    """The full Fashion-MNIST from a directory of IDX files (gzipped or not)."""
    _check_split(split, ("train", "test"))
    folder = _existing_dir(root, "fashion_mnist")
    prefix = "train" if split == "train" else "t10k"

    def find(kind: str) -> Path:
        for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz",
                     f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"):
            if (folder / name).exists():
                return folder / name
        raise FileNotFoundError(f"no {prefix}-{kind}-idx*-ubyte[.gz] in {folder}")

    return ArrayImages(read_idx(find("images")), read_idx(find("labels")))


class ImageFolder(Dataset):
    """Images in a folder: labelled by sub-folder (``root/<class>/x.jpg``) or unlabeled (flat).

    Files are found by extension. Decoding happens lazily; a file that fails to decode raises
    :class:`UnreadableImage` so the pipeline can skip and count it. ``classes`` fixes the class list
    (and so the label of each sub-folder), e.g. a test split labelled with its probe-train split's
    classes: a class folder missing here keeps the others' labels; an unknown one is an error.

    The folder is listed once into a :class:`~selfsup.data.index.FileIndex` (numpy arrays, which
    DataLoader workers read without copying), cached on disk while its directories are unchanged and,
    under ``torch.distributed``, listed on rank 0 and broadcast: every rank must build it together
    (``SSLDataModule.setup`` does). ``cache=False`` lists afresh without reading or writing the cache.
    """

    def __init__(self, root: str | os.PathLike, labelled: bool | None = None, classes: list[str] | None = None,
                 cache: bool = True):
        self.root = _existing_dir(root, "folder")
        self.index = file_index(self.root, labelled, classes, cache)
        self.classes = list(self.index.classes)

    @property
    def files(self) -> FileIndex:
        """The ``(path, label)`` of every image, in order: the :class:`~selfsup.data.index.FileIndex`."""
        return self.index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """The image opened but not decoded (the view transform decodes it), and its label."""
        return load_image(self.index.path(index)), self.index.label(index)


def load_image(path: str | os.PathLike | IO[bytes], name: str | None = None) -> Image.Image:
    """Open an image file (a path, or a binary file object such as a tar member's bytes) without decoding it:
    its size is known from the header, and :func:`decode_image` decodes it later (a JPEG at reduced size
    where the crops allow). ``name`` is what errors call it (default: the path). Raises
    :class:`UnreadableImage` saying why when even the header cannot be read."""
    name = _name(path) if name is None else name
    try:
        img = Image.open(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UnreadableImage(f"{name}: {err}") from err
    if min(img.size) < 1:
        raise UnreadableImage(f"{name}: empty image {img.size}")
    img.selfsup_name = name  # for decode_image's errors
    return img


def decode_image(image: Image.Image | torch.Tensor, min_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an opened image to an 8-bit RGB ``uint8`` tensor ``(3, H, W)`` (a tensor passes through).

    ``min_size=(width, height)``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (PIL's ``draft``, DCT
    scaling in libjpeg) as long as the result is at least that size, which is much faster for large files.
    16-bit images are scaled to 8 bits by their maximum. Raises :class:`UnreadableImage` on a bad file."""
    if isinstance(image, torch.Tensor):
        return image
    opened = image
    try:
        if min_size is not None and image.format == "JPEG":
            image.draft("RGB", min_size)
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            scale = 255.0 / max(array.max(), 1.0)
            image = Image.fromarray((array * scale).astype(np.uint8), mode="L")
        rgb = np.array(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        name = getattr(opened, "selfsup_name", None) or _name(getattr(opened, "filename", None) or opened)
        raise UnreadableImage(f"{name}: {err}") from err
    finally:
        opened.close()
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def _name(path: Any) -> str:
    return str(path) if isinstance(path, (str, os.PathLike)) else f"<{type(path).__name__}>"


def torchvision_dataset(name: str) -> Callable[..., Dataset]:
    """CIFAR-10/100 or STL-10 from torchvision. ``download`` is off: point ``root`` at the files."""

    def build(split: str, root: str | None = None, download: bool = False) -> Dataset:
        import torchvision.datasets as tvd

        folder = str(_existing_dir(root, name)) if not download else str(root or ".")
        if name in ("cifar10", "cifar100"):
            _check_split(split, ("train", "test"))
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(folder, train=split == "train", download=download)
            return ArrayImages(ds.data, np.asarray(ds.targets))
        _check_split(split, ("train", "test", "unlabeled", "train+unlabeled"))
        ds = tvd.STL10(folder, split=split, download=download)
        return ArrayImages(ds.data.transpose(0, 2, 3, 1), np.where(ds.labels < 0, -1, ds.labels))

    return build


def image_folder(split: str, root: str | None = None, classes: list[str] | None = None) -> ImageFolder:
    """The ``folder`` source: every split is a folder of its own (the data module picks the root)."""
    return ImageFolder(root, classes=classes)


@dataclass(frozen=True)
class SourceSpec:
    """A registered source: how to build a split, its statistics, and which split serves which purpose.

    ``splits`` is ``(pretraining split, labelled probe-train split or None, labelled test split or None)``.
    """

    build: Callable[..., Dataset]
    info: SourceInfo
    splits: tuple[str, str | None, str | None]

    def __post_init__(self) -> None:
        if len(self.splits) != 3:
            raise ValueError(f"SourceSpec.splits={self.splits!r} must be (pretraining split, labelled probe-train "
                             "split or None, labelled test split or None), e.g. ('train', 'train', 'test')")


LABELLED = ("train", "train", "test")
_SOURCES: dict[str, SourceSpec] = {}


def register_source(name: str, build: Callable[..., Dataset], info: SourceInfo = SourceInfo(),
                    splits: tuple[str, str | None, str | None] = LABELLED, overwrite: bool = False) -> SourceSpec:
    """Make ``build`` available as ``SSLDataModule(dataset=name)`` (``data.dataset: name`` in a recipe).

    ``build(split, root=None)`` returns a map-style dataset of ``(image, label)`` pairs: ``image`` a
    ``uint8`` tensor ``(C, H, W)`` or a PIL image, ``label`` an int (``-1`` when unknown); it may raise
    :class:`UnreadableImage` for a file it cannot decode. ``root`` is ``data.root``. ``info`` gives the
    default mean/std and the class count; ``splits`` names the split built for pretraining, for fitting
    probes and for scoring them (``None``: the source has no such split, so no probes). A name already
    registered is an error unless ``overwrite=True``. Returns the :class:`SourceSpec`.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_source: name={name!r} must be a non-empty string, e.g. 'my_images'")
    if not callable(build):
        raise TypeError(f"register_source({name!r}): build={build!r} is not callable; pass a function "
                        "build(split, root=None) -> Dataset")
    if name in _SOURCES and not overwrite:
        raise ValueError(f"a source named {name!r} is already registered ({_describe(_SOURCES[name].build)}); "
                         "pick another name, or pass overwrite=True to replace it")
    spec = SourceSpec(build, info, tuple(splits))
    _SOURCES[name] = spec
    return spec


def _describe(build: Callable[..., Any]) -> str:
    return f"{getattr(build, '__module__', '?')}.{getattr(build, '__qualname__', type(build).__name__)}"


register_source("fashion_mnist_embedded", embedded_fashion_mnist, FASHION_MNIST_INFO)
register_source("fashion_mnist", fashion_mnist, FASHION_MNIST_INFO)
register_source("cifar10", torchvision_dataset("cifar10"),
                SourceInfo((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10))
register_source("cifar100", torchvision_dataset("cifar100"),
                SourceInfo((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100))
# pretrain on the 5k labelled + 100k unlabeled images; probe on the 5k labelled ones only
register_source("stl10", torchvision_dataset("stl10"),
                SourceInfo((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 10), ("train+unlabeled", "train", "test"))
register_source("folder", image_folder)  # roots: data.root, probe_train_root, test_root


def source(name: str) -> SourceSpec:
    """Look up a registered source by name, with a helpful error.

    ``"package.module:name"`` imports ``package.module`` first and looks up ``name``, which that module
    registers when imported: a recipe can name a source of its own (``data.dataset: mylab.sources:scans``)
    without a line of Python to import it."""
    if name not in _SOURCES and ":" in name:
        module, _, registered = name.partition(":")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            raise ValueError(f"dataset {name!r}: cannot import {module!r} ({err}); is it installed or on "
                             "PYTHONPATH?") from err
        if registered not in _SOURCES:
            raise ValueError(f"dataset {name!r}: importing {module!r} registered no source {registered!r}; "
                             f"registered sources are {sorted(_SOURCES)}")
        return _SOURCES[registered]
    if name not in _SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_SOURCES)}, or register your own "
                         "with selfsup.data.register_source")
    return _SOURCES[name]


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split={split!r} is not one of {allowed}")
