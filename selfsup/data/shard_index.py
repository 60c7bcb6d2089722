"""The files of a shard dataset: the ``.tar`` paths of ``data.root`` and each shard's record count.

``shards.json`` beside the shards holds ``{"shards": {name: {"records": n, "bytes": size}}, "classes": [...]}``;
a shard whose size changed, or that the index lacks, is counted from its tar headers (decoding nothing).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from pathlib import Path
from typing import Any

from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix

log = logging.getLogger(__name__)

INDEX = "shards.json"
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset's tar_file_iterator skips


def shard_paths(root: str | os.PathLike | None) -> list[str]:
    """``data.root`` as tar files: a folder's ``*.tar`` (sorted), a brace pattern, or one ``.tar``."""
    if root is None:
        raise ValueError("dataset 'shards' needs data.root: a folder of .tar shards or a brace pattern "
                         "such as /data/train-{000000..000127}.tar")
    root = os.path.expanduser(str(root))
    if os.path.isdir(root):
        paths = sorted(str(p) for p in Path(root).glob("*.tar"))
        if not paths:
            raise ValueError(f"no .tar shards in {root!r}; write them with `selfsup shards write`")
        return paths
    paths = list(braceexpand(root))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} shards of data.root={root!r} do not exist, "
                                f"e.g. {missing[0]!r}")
    return paths


def count_records(path: str) -> int:
    """The records of a shard, as webdataset groups its members, from the tar headers alone (seeking past
    the data, decoding nothing)."""
    records, last = 0, None
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            name = member.name
            if not member.isreg() or _META.match(name) or (
                    "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
                continue
            key, _ = base_plus_ext(name)
            if key is not None and key != last:
                records, last = records + 1, key
    return records


def read_index(folder: str | os.PathLike) -> dict[str, Any]:
    """``<folder>/shards.json``, or an empty index."""
    path = Path(folder) / INDEX
    return json.loads(path.read_text()) if path.is_file() else {"shards": {}}


def record_counts(paths: list[str]) -> list[int]:
    """Each shard's records: from ``shards.json`` where it has the shard at its current size, else counted."""
    indexes: dict[str, dict] = {}
    counts, counted = [], 0
    for path in paths:
        folder = os.path.dirname(path)
        entry = indexes.setdefault(folder, read_index(folder))["shards"].get(os.path.basename(path))
        if entry is not None and entry.get("bytes") == os.path.getsize(path):
            counts.append(int(entry["records"]))
        else:
            counts.append(count_records(path))
            counted += 1
    if counted:
        log.info("counted the records of %d shards without an up-to-date %s (write one with `"
                 "selfsup shards index <root>`)", counted, INDEX)
    return counts


def write_index(folder: str | os.PathLike, shards: dict[str, dict], classes: list[str] | None = None) -> Path:
    """Write ``<folder>/shards.json`` atomically (a temporary file renamed)."""
    path = Path(folder) / INDEX
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps({"shards": shards, "classes": list(classes or [])}, indent=1))
    os.replace(temporary, path)
    return path
