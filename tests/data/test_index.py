"""The file index of an image folder: the old listing's results, numpy storage, the on-disk cache and its
invalidation, and one listing per job under torch.distributed (rank 0 lists, every rank gets the index)."""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfsup.data import datasets
from selfsup.data import index as index_module
from selfsup.data.datamodule import SSLDataModule
from selfsup.data.datasets import ImageFolder
from selfsup.data.index import IMAGE_EXTENSIONS, FileIndex, build_file_index, cache_path, file_index
from tests.helpers.dist import run_distributed

def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 99, 199)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


def make_tree(root: Path, files: list[str]) -> Path:
    """Write each relative path of ``files`` (images as real PNG bytes, whatever their extension)."""
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG)
    return root


def backdate(root: Path, seconds: float = 60.0) -> None:
    """Set every directory's mtime ``seconds`` into the past: a folder not written to just now (the
    index does not cache a listing of a directory modified in the last 2 s, see RECENT_NS)."""
    past = time.time_ns() - int(seconds * 1e9)
    for directory, _, _ in os.walk(root, followlinks=True):
        os.utime(directory, ns=(past, past))


def reference_listing(root: Path, labelled: bool | None = None, classes: list[str] | None = None):
    """ImageFolder's listing before the index (a copy of the old code): ``(files, classes)``."""
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    labelled = classes is not None or (bool(subdirs) if labelled is None else labelled)
    class_list = list(classes) if classes is not None else subdirs if labelled else []
    files = []
    for label, sub in enumerate(class_list or [""]):
        if not (root / sub).is_dir():
            continue
        for dirpath, _, names in sorted(os.walk(root / sub, followlinks=True)):
            files += [(os.path.join(dirpath, n), label if labelled else -1)
                      for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return files, class_list


TREE = ["cat/1.png", "cat/0.JPG", "cat/notes.txt", "cat/deep/er/2.webp", "cat/deep/3.jpeg", "cat/.hidden/4.png",
        "dog/a.png", "dog/B.tif", "dog-2/x.png", ".git/objects/5.png", "top-level.png", "bird/empty.txt"]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "tree", TREE)
    (root / "fish").mkdir()  # a class folder without images
    os.symlink(root / "dog", root / "wolf")  # a symlinked class folder is followed
    (root / "dangling.png").symlink_to(root / "nowhere.png")  # listed, and replaced when read (as before)
    backdate(root)
    return root


@pytest.mark.parametrize("labelled,classes", [(None, None), (False, None), (True, None),
                                              (None, ["ant", "bird", "cat", "dog", "dog-2", "fish", "wolf"])])
def test_the_index_lists_what_the_old_listing_did(tree, labelled, classes):
    index = build_file_index(tree, labelled, classes, cache=False)
    files, class_list = reference_listing(tree, labelled, classes)
    assert list(index) == files and index.classes == class_list
    assert [index.path(i) for i in range(len(index))] == [f for f, _ in files]
    assert [index.label(i) for i in range(len(index))] == [label for _, label in files]
    assert index[-1] == files[-1] and len(index) == len(files)
    with pytest.raises(IndexError, match="out of range"):
        index.path(len(files))


def test_image_folder_keeps_its_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(ValueError, match="dataset 'folder' needs a root directory"):
        ImageFolder(None)
    flat = make_tree(tmp_path / "flat", ["a.png"])
    with pytest.raises(ValueError, match="has no class sub-folders"):
        ImageFolder(flat, labelled=True)
    labelled = make_tree(tmp_path / "labelled", ["ant/a.png", "yak/b.png"])
    with pytest.raises(ValueError, match=r"class folder\(s\) \['yak'\] that the probe-train split does not have"):
        ImageFolder(labelled, classes=["ant", "bee"])
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")


def test_the_index_is_held_in_numpy_arrays_not_python_objects(tree):
    folder = ImageFolder(tree)
    index = folder.index
    assert folder.files is index
    assert index.paths.dtype == np.uint8 and index.offsets.dtype == np.int64 and index.labels.dtype == np.int64
    assert len(index.offsets) == len(index) + 1 and index.paths.size == index.offsets[-1]
    # nothing per file is a Python object: every attribute is an array or no longer than the class list
    for owner in (folder, index):
        for name, value in vars(owner).items():
            assert isinstance(value, (np.ndarray, str, Path, FileIndex)) or len(value) <= len(index.classes), name
    # the bytes held: ~36 per file here, against ~150 for the list of (str, int) tuples it replaces
    paths = [f"c{i % 10}/{i:07d}.jpg" for i in range(20_000)]
    many = FileIndex.from_paths("/data", paths, [i % 10 for i in range(20_000)], [])
    as_list = [(many.path(i), many.label(i)) for i in range(len(many))]
    held = many.paths.nbytes + many.offsets.nbytes + many.labels.nbytes
    python = sys.getsizeof(as_list) + sum(sys.getsizeof(t) + sys.getsizeof(t[0]) for t in as_list)
    assert held < python / 3 and [many[i] for i in (0, 19_999)] == [as_list[0], as_list[-1]]


def _count_listing(monkeypatch) -> dict[str, int]:
    calls = {"scandir": 0, "walk": 0}
    scandir, walk = os.scandir, os.walk

    def counting_scandir(*args, **kwargs):
        calls["scandir"] += 1
        return scandir(*args, **kwargs)

    def counting_walk(*args, **kwargs):
        calls["walk"] += 1
        return walk(*args, **kwargs)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    monkeypatch.setattr(os, "walk", counting_walk)
    return calls


def test_a_cache_hit_lists_no_directory(tree, monkeypatch):
    calls = _count_listing(monkeypatch)
    cold = ImageFolder(tree)
    assert calls["scandir"] >= 5, "the first build lists the folder"
    assert cache_path(tree, None, None).is_file()
    calls.update(scandir=0, walk=0)
    warm = ImageFolder(tree)
    assert calls == {"scandir": 0, "walk": 0}, "a valid cache is read, not listed again"
    assert list(warm.files) == list(cold.files) and warm.classes == cold.classes
    other = ImageFolder(tree, labelled=False)  # other options: another cache entry
    assert calls["scandir"] > 0 and len(other) != len(warm)


@pytest.mark.parametrize("change", ["add nested file", "remove file", "rename file", "new class folder",
                                    "new nested folder"])
def test_a_change_to_the_folder_invalidates_the_cache(tree, change):
    before = list(ImageFolder(tree).files)
    assert cache_path(tree, None, None).is_file()
    if change == "add nested file":
        make_tree(tree, ["cat/deep/er/new.png"])
    elif change == "remove file":
        (tree / "cat" / "deep" / "3.jpeg").unlink()
    elif change == "rename file":
        (tree / "dog" / "a.png").rename(tree / "dog" / "z.png")
    elif change == "new class folder":
        make_tree(tree, ["emu/e.png"])
    else:
        make_tree(tree, ["cat/deep/newer/n.png"])
    after = ImageFolder(tree)
    expected, classes = reference_listing(tree)
    assert list(after.files) == expected != before and after.classes == classes


def test_a_folder_modified_just_now_is_used_but_not_cached(tmp_path, caplog):
    root = make_tree(tmp_path / "fresh", ["a/1.png", "b/2.png"])  # no backdate: mtimes are now
    with caplog.at_level(logging.INFO, logger="selfsup.data.index"):
        assert len(ImageFolder(root)) == 2
    assert not cache_path(root, None, None).exists()
    assert "not cached" in caplog.text


def test_an_unwritable_cache_directory_only_logs(tree, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SELFSUP_CACHE_DIR", str(blocker))  # file-index/ cannot be made inside a file
    with caplog.at_level(logging.WARNING, logger="selfsup.data.index"):
        folder = ImageFolder(tree)
    assert list(folder.files) == reference_listing(tree)[0]
    assert "could not cache the file index" in caplog.text and "SELFSUP_CACHE_DIR" in caplog.text


def test_a_corrupt_cache_file_is_ignored_and_replaced(tree, caplog):
    expected = list(ImageFolder(tree).files)
    path = cache_path(tree, None, None)
    path.write_bytes(b"PK\x03\x04 torn write")
    with caplog.at_level(logging.WARNING, logger="selfsup.data.index"):
        assert list(ImageFolder(tree).files) == expected
    assert "ignoring unreadable file-index cache" in caplog.text
    assert list(index_module._load(path, str(tree))) == expected, "the cache was written again"


# -- torch.distributed -----------------------------------------------------------------------------
def _index_on_rank(rank: int, world_size: int, tree: str, empty: str, cache: str) -> dict:
    """Build the index on both ranks with listing forbidden on rank 1; then a data module whose properties
    must not list after setup(); then an error raised on rank 0 only."""
    os.environ["SELFSUP_CACHE_DIR"] = cache
    from selfsup.distributed import on_rank_zero

    listed = {"count": 0}
    scandir = os.scandir

    def guarded_scandir(*args, **kwargs):
        if rank != 0:
            raise AssertionError(f"rank {rank} listed a directory")
        listed["count"] += 1
        return scandir(*args, **kwargs)

    os.scandir = guarded_scandir
    os.walk = lambda *a, **k: (_ for _ in ()).throw(AssertionError("os.walk called"))
    folder = ImageFolder(tree)
    result = {"files": list(folder.files), "classes": folder.classes, "arrays": type(folder.index.paths).__name__}
    # rank 0 inside on_rank_zero builds another folder: a nested broadcast would hang, the guard runs it here
    result["nested"] = on_rank_zero(lambda: len(ImageFolder(tree, labelled=False, cache=False)))
    data = SSLDataModule(dataset="folder", root=tree, test_root=tree, image_size=8, num_workers=0)
    data.setup("fit")

    def forbidden(*args, **kwargs):
        raise AssertionError("a split was built after setup()")

    datasets.file_index = forbidden  # any later listing, on any rank, would fail here
    result["has_labels"], result["num_classes"] = data.has_labels, data.num_classes
    result["reason"] = data.probe_unavailable_reason
    result["probe_batches"] = len(data.probe_dataloader("train"))
    datasets.file_index = file_index
    try:
        ImageFolder(empty)
    except Exception as err:  # noqa: BLE001 - recorded for the test
        result["error"] = f"{type(err).__name__}: {err}"
    result["listed"] = listed["count"]
    return result


@pytest.mark.timeout(120)
def test_rank_zero_lists_and_every_rank_gets_the_same_index(tree, tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    ranks = run_distributed(_index_on_rank, 2, str(tree), str(tmp_path / "empty"), str(tmp_path / "cache"),
                            timeout=90)
    expected, classes = reference_listing(tree)
    for result in ranks:
        assert result["files"] == expected and result["classes"] == classes and result["arrays"] == "ndarray"
        assert result["nested"] == len(reference_listing(tree, labelled=False)[0])
        assert result["has_labels"] and result["num_classes"] == len(classes) and result["reason"] is None
    assert ranks[0]["listed"] > 0 and ranks[1]["listed"] == 0, "rank 1 never lists"
    assert ranks[0]["error"].startswith("ValueError: no images")
    assert ranks[1]["error"].startswith("RuntimeError: rank 0 failed") and "no images" in ranks[1]["error"]


def test_an_unreadable_sub_folder_is_left_out_logged_and_not_cached(tree, caplog, monkeypatch):
    locked, scandir = tree / "cat" / "deep", os.scandir

    def refusing_scandir(path):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)  # as chmod 0 would, also when the tests run as root
    with caplog.at_level(logging.WARNING, logger="selfsup.data.index"):
        folder = ImageFolder(tree)
    assert "cannot list" in caplog.text and str(locked) in caplog.text
    assert not [p for p, _ in folder.files if "/deep/" in p] and len(folder) > 0, "the rest is listed, as os.walk did"
    assert not cache_path(tree, None, None).exists(), "an incomplete listing is not cached"
    monkeypatch.setattr(os, "scandir", scandir)
    assert [p for p, _ in ImageFolder(tree).files if "/deep/" in p], "listed again once readable"
