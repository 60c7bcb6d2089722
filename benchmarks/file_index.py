"""Listing an image folder: the old ``sorted(os.walk)`` listing, the index listed cold, and a cache hit;
and the memory a forked DataLoader worker copies when it reads every entry (copy-on-read).

Generates ``--files`` empty ``.jpg`` files in ``--classes`` class folders (once; reused if present), with
the directories' mtimes set a minute back (the index does not cache a folder written in the last 2 s).
Timings are the median of ``--repeats`` runs, with the OS's directory cache warm (no page-cache drop).

    python benchmarks/file_index.py                       # 100k files in 100 classes under /tmp
    python benchmarks/file_index.py --files 2000 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

from selfsup.data.index import IMAGE_EXTENSIONS, build_file_index, cache_path, list_folder  # noqa: E402


def make_folder(root: Path, files: int, classes: int) -> None:
    marker = root / f".complete-{files}-{classes}"
    if marker.exists():
        return
    for i in range(files):
        folder = root / f"class{i % classes:04d}"
        if i < classes:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:08d}.jpg").touch()
    marker.touch()
    past = time.time_ns() - 60_000_000_000
    for directory, _, _ in os.walk(root):
        os.utime(directory, ns=(past, past))


def old_listing(root: Path) -> list[tuple[str, int]]:
    """ImageFolder's listing before the index: a list of (str, int) tuples."""
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[str, int]] = []
    for label, sub in enumerate(subdirs):
        for dirpath, _, names in sorted(os.walk(root / sub, followlinks=True)):
            files += [(os.path.join(dirpath, n), label) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return files


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def private_dirty_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


def copied_on_read_mb(read_all) -> float:
    """MB of the parent's memory a forked child copies by reading every entry (as a loader worker does)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        before = private_dirty_kb()
        read_all()
        os.write(w, str(private_dirty_kb() - before).encode())
        os._exit(0)
    os.close(w)
    delta = int(os.read(r, 64).decode())
    os.waitpid(pid, 0)
    return delta / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "selfsup-file-index-bench"))
    args = parser.parse_args()
    root = Path(args.dir) / f"{args.files}x{args.classes}"
    start = time.perf_counter()
    make_folder(root, args.files, args.classes)
    print(f"folder: {root} ({args.files} files, {args.classes} classes; made in {time.perf_counter() - start:.1f} s)")

    with tempfile.TemporaryDirectory() as cache:
        old = median_seconds(lambda: old_listing(root), args.repeats)
        cold = median_seconds(lambda: list_folder(root), args.repeats)
        write = median_seconds(lambda: (cache_path(root, None, None, cache).unlink(missing_ok=True),
                                        build_file_index(root, directory=cache)), args.repeats)
        hit = median_seconds(lambda: build_file_index(root, directory=cache), args.repeats)
        files, index = old_listing(root), build_file_index(root, directory=cache)
        assert list(index) == files, "the index and the old listing differ"
        size_kb = cache_path(root, None, None, cache).stat().st_size / 1024

    def read_list() -> None:
        for i in range(len(files)):
            path, label = files[i]  # what ImageFolder.__getitem__ did

    def read_index() -> None:
        for i in range(len(index)):
            path, label = index.path(i), index.label(i)

    list_copied, index_copied = copied_on_read_mb(read_list), copied_on_read_mb(read_index)
    row = {"name": f"file_index {args.files} files", "files": args.files, "classes": args.classes,
           "old_listing_s": round(old, 4), "index_cold_s": round(cold, 4),
           "index_cold_and_cache_write_s": round(write, 4),
           "cache_hit_s": round(hit, 4), "cache_file_kb": round(size_kb, 1),
           "list_copied_on_read_mb": round(list_copied, 1), "index_copied_on_read_mb": round(index_copied, 1)}
    for key, value in row.items():
        print(f"  {key:<30} {value}")
    record(row)


if __name__ == "__main__":
    main()
