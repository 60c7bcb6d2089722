"""On-disk cache of frozen features, so a second protocol or a second run does not re-extract them.

An entry is keyed by a SHA-256 of (weights identity, data source + split + size, preprocessing) and
stored as ``<key>.safetensors`` (features and labels; no pickle) plus ``<key>.json`` (what it holds,
including the class names, checked on every hit).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)


class CacheMismatchError(ValueError):
    """Cached features were extracted for data with other classes than the data now given."""


def cache_key(**parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (weights digest, data identity, preprocessing...)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class FeatureCache:
    """Features ``(N, D)`` and labels ``(N,)`` per key under ``root``. ``hits``/``misses`` count lookups."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = self.misses = 0

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.json"

    def get_or_extract(self, key: str, classes: list[str], describe: dict[str, Any],
                       extract: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Cached ``(features, labels)`` for ``key``, or ``extract()`` them and store them.

        ``classes`` are the class names of the data now; a cached entry made for other classes
        is an error rather than silently wrong scores.
        """
        tensors_path, meta_path = self.paths(key)
        if tensors_path.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta["classes"] != list(classes):
                raise CacheMismatchError(
                    f"cached features {tensors_path} were extracted for classes {meta['classes'][:10]} "
                    f"({len(meta['classes'])}) but the data now has classes {list(classes)[:10]} "
                    f"({len(classes)}); the data changed under the same source: delete {tensors_path} "
                    "or use --no-cache")
            tensors = load_file(str(tensors_path))
            self.hits += 1
            log.info("feature cache hit: %s", tensors_path)
            return tensors["features"], tensors["labels"]
        self.misses += 1
        features, labels = extract()
        self.root.mkdir(parents=True, exist_ok=True)
        save_file({"features": features.cpu().contiguous(), "labels": labels.cpu().contiguous()},
                  str(tensors_path))
        meta_path.write_text(json.dumps({"classes": list(classes), "shape": list(features.shape), **describe},
                                        indent=2, default=str))
        return features, labels
