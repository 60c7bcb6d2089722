"""Image sources, the data module and its batches. Register your own source with :func:`register_source`."""

from selfsup.data.datasets import SourceInfo, SourceSpec, UnreadableImage, register_source, source
from selfsup.data.index import FileIndex, file_index

__all__ = ["FileIndex", "SourceInfo", "SourceSpec", "UnreadableImage", "file_index", "register_source", "source"]
