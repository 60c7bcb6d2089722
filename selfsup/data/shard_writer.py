"""Write WebDataset tar shards from an image folder, or index shards made elsewhere: ``selfsup shards``.

    selfsup shards write /data/imagenet/train /data/shards/train --max-count 10000
    selfsup shards index "/data/other/part-{00000..00511}.tar"

The shards are what the ``shards`` source (:mod:`selfsup.data.shards`) streams: ``<key>.<image suffix>`` and
an optional ``<key>.cls`` per record, plus ``shards.json`` with each shard's record count and the class list.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import time
from pathlib import Path

from webdataset import TarWriter

from selfsup.data.datasets import ImageFolder
from selfsup.data.shard_index import INDEX, count_records, read_index, shard_paths, write_index


def _tar_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512  # a member's header and its data padded to 512-byte blocks


def shard_bounds(record_bytes: list[int], max_count: int, max_size: int) -> list[int]:
    """Record boundaries of the fewest shards of at most ``max_count`` records and ``max_size`` bytes, all
    of the same record count (one apart), so that an epoch drops little (see :func:`batches_per_slot`)."""
    biggest = max(range(len(record_bytes)), key=record_bytes.__getitem__)
    if record_bytes[biggest] > max_size:
        raise ValueError(f"record {biggest} takes {record_bytes[biggest]} bytes in a tar, more than --max-size "
                         f"{max_size}: raise --max-size")
    total, cumulative = len(record_bytes), [0, *itertools.accumulate(record_bytes)]
    shards = max(1, math.ceil(total / max_count), math.ceil(cumulative[-1] / max_size))
    while True:
        bounds = [round(i * total / shards) for i in range(shards + 1)]
        if all(cumulative[b] - cumulative[a] <= max_size for a, b in zip(bounds, bounds[1:])):
            return bounds
        shards += 1


def write_shards(folder: str | os.PathLike, out: str | os.PathLike, max_count: int = 10_000,
                 max_size: int = 1_000_000_000, seed: int = 0, prefix: str = "shard") -> list[Path]:
    """Write the images of ``folder`` (class sub-folders become ``.cls`` labels) as tar shards in ``out``,
    in an order shuffled by ``seed``, with ``shards.json`` (record counts and the class list). Image bytes are
    copied as they are, not re-encoded (nor checked: the loader skips and counts what does not decode)."""
    images = ImageFolder(folder)
    files = list(images.files)
    random.Random(seed).shuffle(files)  # a shard mixes classes; the loader's buffer mixes only nearby records
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")) or (out / INDEX).exists():
        raise FileExistsError(f"{out} already holds shards: write into an empty folder")
    labelled = bool(images.classes)
    sizes = [_tar_bytes(os.path.getsize(path)) + (1024 if labelled else 0) for path, _ in files]
    bounds = shard_bounds(sizes, max_count, max_size)
    written, index, now = [], {}, int(time.time())
    for number, (first, end) in enumerate(zip(bounds, bounds[1:])):
        path = out / f"{prefix}-{number:06d}.tar"
        with TarWriter(str(path), encoder=False, mtime=now) as tar:  # a whole second: no pax header per member
            for key in range(first, end):
                image, label = files[key]
                record = {"__key__": f"{key:09d}", Path(image).suffix.lower().lstrip("."): Path(image).read_bytes()}
                if labelled:
                    record["cls"] = str(label).encode()
                tar.write(record)
        index[path.name] = {"records": end - first, "bytes": path.stat().st_size}
        written.append(path)
    write_index(out, index, images.classes)
    return written


def index_shards(root: str) -> Path:
    """Count the records of existing shards (tar headers only) and write their ``shards.json``."""
    paths = shard_paths(root)
    folder = os.path.dirname(paths[0])
    if any(os.path.dirname(p) != folder for p in paths):
        raise ValueError(f"the shards of {root!r} are in several folders; index each folder on its own")
    old = read_index(folder)
    shards = {**old["shards"], **{os.path.basename(p): {"records": count_records(p), "bytes": os.path.getsize(p)}
                                  for p in paths}}
    return write_index(folder, shards, old.get("classes"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="selfsup shards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write an image folder as tar shards with shards.json")
    write.add_argument("folder", help="images, by class sub-folder (labels) or flat (unlabeled)")
    write.add_argument("out", help="an empty or new folder for the shards")
    write.add_argument("--max-count", type=int, default=10_000, help="records per shard at most (10000)")
    write.add_argument("--max-size", type=int, default=1_000_000_000,
                       help="bytes of records per shard at most (1e9; tar pads a file to a multiple of 10 KiB)")
    write.add_argument("--seed", type=int, default=0, help="the order the images are shuffled into (0)")
    write.add_argument("--prefix", default="shard", help="shard file names: <prefix>-000000.tar (shard)")
    index = commands.add_parser("index", help="count the records of existing shards and write shards.json")
    index.add_argument("root", help="a folder of .tar shards or a brace pattern")
    args = parser.parse_args(argv)
    if args.command == "write":
        paths = write_shards(args.folder, args.out, args.max_count, args.max_size, args.seed, args.prefix)
        print(f"wrote {len(paths)} shards and {INDEX} to {args.out}")
    else:
        print(f"wrote {index_shards(args.root)}")


if __name__ == "__main__":
    main()

