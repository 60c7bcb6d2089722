"""The file list of an image folder: listed once, packed into numpy arrays, cached on disk, shared by ranks.

Listing a large folder (ImageNet: 1.28M files in 1,000 directories) takes seconds to minutes on a network
file system, and a Python list of ``(str, int)`` tuples costs ~150 bytes per file in every DataLoader worker:
reading an item touches its refcount, so the pages a forked worker shares with its parent are copied.
A :class:`FileIndex` holds the same list as four numpy arrays (one byte buffer of all relative paths,
their offsets, the labels, the class names), which workers read without copying.

:func:`file_index` is the entry point: under ``torch.distributed`` rank 0 alone lists (or reads the cache)
and broadcasts the index, so the other ranks never walk the folder. The cache is an ``.npz`` per
``(absolute root, options)`` in :func:`cache_dir` (``$SELFSUP_CACHE_DIR/file-index``, default
``~/.cache/selfsup/file-index``). It records every directory it listed with its ``st_mtime_ns`` and is
reused only while all of them still have that mtime: adding, removing or renaming a file changes its
directory's mtime, and a new sub-directory changes its parent's. A file's *content* is not checked
(nor need it be: the index holds names only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfsup.distributed import on_rank_zero

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FORMAT_VERSION = 1  # bump when the listing rules or the file layout change: old cache files are then ignored
# A directory modified this recently may change again within the file system's timestamp granularity
# (up to 2 s on some) without its mtime changing; a listing that saw one is used but not cached.
RECENT_NS = 2_000_000_000


class FileIndex(Sequence):
    """The image files of a folder, as numpy arrays: ``path(i)``, ``label(i)``, ``len()``.

    Indexing gives ``(path, label)`` like the list it replaces. ``label`` is the index into ``classes``,
    or ``-1`` for an unlabelled (flat) folder. Paths are stored relative to ``root`` and joined on read,
    so they read exactly as the folder was given (``root`` is not resolved).
    """

    def __init__(self, root: str, paths: np.ndarray, offsets: np.ndarray, labels: np.ndarray,
                 classes: Sequence[str]):
        if offsets.ndim != 1 or len(offsets) != len(labels) + 1:
            raise ValueError(f"FileIndex: {len(offsets)} offsets for {len(labels)} files (need one more)")
        self.root = str(root)
        self.paths = np.ascontiguousarray(paths, dtype=np.uint8)  # every relative path, fs-encoded, back to back
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)  # path i is paths[offsets[i]:offsets[i+1]]
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.classes = list(classes)

    @classmethod
    def from_paths(cls, root: str, relative_paths: Sequence[str], labels: Sequence[int],
                   classes: Sequence[str]) -> FileIndex:
        """Pack ``relative_paths`` (relative to ``root``) and their ``labels``."""
        paths, offsets = pack_strings(relative_paths)
        return cls(root, paths, offsets, np.asarray(labels, dtype=np.int64).reshape(-1), classes)

    def __len__(self) -> int:
        return len(self.labels)

    def _check(self, i: int) -> int:
        n = len(self.labels)
        if not -n <= i < n:
            raise IndexError(f"file index {i} out of range for {n} files")
        return i + n if i < 0 else i

    def relative_path(self, i: int) -> str:
        return unpack_string(self.paths, self.offsets, self._check(int(i)))

    def path(self, i: int) -> str:
        """The path of file ``i``: ``os.path.join(root, <its path inside root>)``."""
        return os.path.join(self.root, self.relative_path(i))

    def label(self, i: int) -> int:
        return int(self.labels[self._check(int(i))])

    def __getitem__(self, i: int) -> tuple[str, int]:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("FileIndex takes one integer index (path(i), label(i)); slices are not supported")
        return self.path(i), self.label(i)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"FileIndex({self.root!r}, {len(self)} files, {len(self.classes)} classes)"


def pack_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(buffer, offsets)``: the strings fs-encoded back to back (``uint8``) and ``len + 1`` int64 offsets."""
    encoded = [os.fsencode(s) for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def unpack_string(buffer: np.ndarray, offsets: np.ndarray, i: int) -> str:
    """String ``i`` of :func:`pack_strings`' output."""
    return os.fsdecode(buffer[offsets[i]:offsets[i + 1]].tobytes())


# -- listing ---------------------------------------------------------------------------------------
@dataclass
class Listing:
    """A fresh listing: the index, every directory read (relative to root) with the mtime it had just
    before it was read, and whether it is safe to cache (no directory failed or was modified just now)."""

    index: FileIndex
    directories: list[str]
    mtimes: list[int]
    cacheable: bool = True


def list_folder(root: str | os.PathLike, labelled: bool | None = None,
                classes: Sequence[str] | None = None) -> Listing:
    """Walk ``root`` (following symlinks) for files with an image extension, labelled by class sub-folder.

    ``labelled=None``: labelled when ``root`` has sub-folders (those not starting with ``.``), else flat;
    a flat listing takes every image under ``root``, at any depth, with label ``-1``. ``classes`` fixes the
    class list (and so each sub-folder's label); a class without a folder here is skipped, a folder that is
    not in ``classes`` is an error. Files are ordered by directory path, then name, as ``sorted(os.walk)``.
    """
    root = existing_dir(root)
    top = os.fspath(root)
    started = time.time_ns()
    walker = _Walker(top, started)
    entries = walker.scan("", strict=True)
    dir_names = {name for name, is_dir in entries if is_dir}
    subdirs = sorted(name for name in dir_names if not name.startswith("."))
    labelled = classes is not None or (bool(subdirs) if labelled is None else labelled)
    if labelled and not subdirs:
        raise ValueError(f"{root} has no class sub-folders (<root>/<class>/<image>); a labelled split "
                         "needs them (pass labelled=False for a flat, unlabeled folder)")
    if classes is not None:
        unknown = [d for d in subdirs if d not in classes]
        if unknown:
            raise ValueError(f"{root} has class folder(s) {unknown} that the probe-train split does not "
                             f"have; its classes are {list(classes)}: rename or remove those folders")
    class_list = list(classes) if classes is not None else subdirs if labelled else []
    paths: list[str] = []
    labels: list[int] = []
    for label, sub in enumerate(class_list or [""]):
        if sub and sub not in dir_names:
            continue  # a class absent from this split
        found = walker.walk(sub, entries if not sub else None)
        paths += found
        labels += [label if labelled else -1] * len(found)
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return Listing(FileIndex.from_paths(top, paths, labels, class_list), walker.directories, walker.mtimes,
                   walker.cacheable)


class _Walker:
    """``os.walk(followlinks=True)`` over ``os.scandir``, recording each directory's mtime before reading it."""

    def __init__(self, top: str, started_ns: int):
        self.top, self.started_ns = top, started_ns
        self.directories: list[str] = []
        self.mtimes: list[int] = []
        self.cacheable = True

    def scan(self, rel: str, strict: bool = False) -> list[tuple[str, bool]] | None:
        """``(name, is_dir)`` of the entries of directory ``rel``; ``None`` where it cannot be read (unless
        ``strict``: then the error): ``os.walk`` skips those silently, here they are logged and the listing
        is not cached."""
        path = os.path.join(self.top, rel) if rel else self.top
        try:
            mtime = os.stat(path).st_mtime_ns
            with os.scandir(path) as it:
                entries = [(entry.name, _is_dir(entry)) for entry in it]
        except OSError as err:
            if strict:
                raise
            log.warning("cannot list %s (%s); its images are left out", path, err)
            self.cacheable = False
            return None
        if mtime >= self.started_ns - RECENT_NS:
            self.cacheable = False  # it may change again without its mtime changing
        self.directories.append(rel)
        self.mtimes.append(mtime)
        return entries

    def walk(self, rel: str, entries: list[tuple[str, bool]] | None = None) -> list[str]:
        """The image files under ``rel`` (relative to top), ordered as ``sorted(os.walk(...))``."""
        found: list[tuple[str, list[str]]] = []
        pending: list[tuple[str, list[tuple[str, bool]] | None]] = [(rel, entries)]
        while pending:
            directory, listed = pending.pop()
            listed = self.scan(directory) if listed is None else listed
            if listed is None:
                continue
            names = []
            for name, is_dir in listed:
                if is_dir:
                    pending.append((os.path.join(directory, name) if directory else name, None))
                elif name.lower().endswith(IMAGE_EXTENSIONS):
                    names.append(name)
            found.append((directory, sorted(names)))
        # sorted(os.walk(top)) orders by the full directory path: top, then top/<rel>
        found.sort(key=lambda item: os.path.join(self.top, item[0]) if item[0] else self.top)
        return [prefix + n for d, names in found for prefix in (d + os.sep if d else "",) for n in names]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks, as os.walk(followlinks=True)
    except OSError:
        return False


# -- cache -----------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where file indices are cached: ``$SELFSUP_CACHE_DIR/file-index``, default ``~/.cache/selfsup/file-index``."""
    base = os.environ.get("SELFSUP_CACHE_DIR") or os.path.join("~", ".cache", "selfsup")
    return Path(base).expanduser() / "file-index"


def cache_path(root: str | os.PathLike, labelled: bool | None, classes: Sequence[str] | None,
               directory: str | os.PathLike | None = None) -> Path:
    """The cache file of a listing: a hash of the absolute root, the options and the format version."""
    key = json.dumps({"root": os.path.abspath(os.path.expanduser(os.fspath(root))), "labelled": labelled,
                      "classes": None if classes is None else list(classes), "extensions": IMAGE_EXTENSIONS,
                      "version": FORMAT_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return Path(directory if directory is not None else cache_dir()) / f"{digest}.npz"


def build_file_index(root: str | os.PathLike, labelled: bool | None = None, classes: Sequence[str] | None = None,
                     cache: bool = True, directory: str | os.PathLike | None = None) -> FileIndex:
    """The :class:`FileIndex` of ``root`` (see :func:`list_folder`), from the cache while it is valid.

    In this process only; :func:`file_index` is the one to call under ``torch.distributed``. A cache
    that cannot be read or written is logged and skipped: the listing itself is never lost to it.
    """
    top = os.fspath(existing_dir(root))
    path = cache_path(top, labelled, classes, directory) if cache else None
    if path is not None:
        cached = _load(path, top)
        if cached is not None:
            return cached
    listing = list_folder(top, labelled, classes)
    if path is not None:
        if listing.cacheable:
            _save(path, listing)
        else:
            log.info("file index of %s not cached: a directory could not be read or changed in the last %d s",
                     top, RECENT_NS // 1_000_000_000)
    return listing.index


def file_index(root: str | os.PathLike, labelled: bool | None = None, classes: Sequence[str] | None = None,
               cache: bool = True) -> FileIndex:
    """:func:`build_file_index` on rank 0 only, the index broadcast to every rank (every rank must call
    this, together: it is a collective under ``torch.distributed``). An error on rank 0 stops every rank."""
    return on_rank_zero(lambda: build_file_index(root, labelled, classes, cache))


def _load(path: Path, root: str) -> FileIndex | None:
    """The cached index at ``path`` if every directory it listed still has the recorded mtime."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: list afresh
        log.warning("ignoring unreadable file-index cache %s (%s: %s)", path, type(err).__name__, err)
        return None
    try:
        if int(arrays["version"]) != FORMAT_VERSION:
            return None
        buffer, offsets, mtimes = arrays["dir_paths"], arrays["dir_offsets"], arrays["dir_mtimes"]
        for i, mtime in enumerate(mtimes.tolist()):
            rel = unpack_string(buffer, offsets, i)
            if os.stat(os.path.join(root, rel) if rel else root).st_mtime_ns != mtime:
                log.info("file index of %s is out of date (%s changed): listing again", root, rel or ".")
                return None
        return FileIndex(root, arrays["paths"], arrays["offsets"], arrays["labels"], arrays["classes"].tolist())
    except OSError:
        return None  # a listed directory is gone
    except (KeyError, ValueError) as err:
        log.warning("ignoring malformed file-index cache %s (%s)", path, err)
        return None


def _save(path: Path, listing: Listing) -> None:
    """Write the listing atomically (a temporary file renamed into place); on failure log and go on."""
    dir_paths, dir_offsets = pack_strings(listing.directories)
    index = listing.index
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, version=np.int64(FORMAT_VERSION), paths=index.paths, offsets=index.offsets,
                         labels=index.labels, classes=np.array(index.classes, dtype=str),
                         dir_paths=dir_paths, dir_offsets=dir_offsets,
                         dir_mtimes=np.asarray(listing.mtimes, dtype=np.int64))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        log.warning("could not cache the file index of %s in %s (%s); set SELFSUP_CACHE_DIR to a writable "
                    "directory to list it once", index.root, path.parent, err)


def existing_dir(root: object, what: str = "folder") -> Path:
    """``root`` as a Path, or an error naming it: not given, missing, or not a directory."""
    if root is None:
        raise ValueError(f"dataset {what!r} needs a root directory (data.root)")
    path = Path(os.fspath(root)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset path {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"dataset path {str(path)!r} is not a directory")
    return path
