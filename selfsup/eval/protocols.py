"""Evaluation protocols: a registry of functions that score an encoder, and the data they read.

A protocol is a function ``fn(context: EvalContext, **settings) -> list[row]``, registered by name::

    @register_protocol("lora")
    def lora(context: EvalContext, rank: int = 8) -> list[dict]:
        ...  # context.encoder, context.data, context.frozen() are all available
        return [score_row("lora", "top1", accuracy, rank=rank)]

``selfsup eval``, :class:`CheckpointScorer` and :func:`frozen_scores` all go through
:func:`run_protocols`, so each protocol has exactly one implementation. Built-in protocols: ``knn``
and ``linear`` (here), ``fewshot`` (:mod:`selfsup.eval.fewshot`), ``finetune`` (:mod:`selfsup.eval.finetune`),
``retrieval`` (:mod:`selfsup.eval.retrieval`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from selfsup.data.datamodule import ViewDataset, collate_views
from selfsup.data.preprocessing import Preprocessing
from selfsup.data.transforms import EvalView
from selfsup.eval.cache import FeatureCache, cache_key
from selfsup.eval.features import extract_features
from selfsup.eval.knn import knn_accuracy
from selfsup.eval.linear import linear_probe

BUILTIN_MODULES = ("selfsup.eval.fewshot", "selfsup.eval.finetune", "selfsup.eval.retrieval")


def score_row(protocol: str, metric: str, value: float, std: float | None = None, **settings: Any) -> dict:
    """One scorecard row: accuracies are fractions in [0, 1]; ``std`` over seeds where there are several."""
    return {"protocol": protocol, "metric": metric, "value": float(value),
            "std": None if std is None else float(std), "settings": settings}


@dataclass
class FeatureSet:
    """Frozen features and labels of the labelled train and test splits."""

    train_features: Tensor
    train_labels: Tensor
    test_features: Tensor
    test_labels: Tensor

    def __post_init__(self) -> None:
        for split, labels in (("train", self.train_labels), ("test", self.test_labels)):
            if len(labels) and int(labels.min()) < 0:
                raise ValueError(f"the {split} features include {int((labels < 0).sum())} unlabelled images "
                                 "(label -1): probes need a labelled split (for a folder of unlabelled images, "
                                 "set data.probe_train_root and data.test_root to labelled folders)")


@dataclass
class EvalData:
    """Labelled train/test images (raw sources) plus the preprocessing the weights were trained with."""

    train: Dataset
    test: Dataset
    preprocessing: Preprocessing
    classes: list[str]
    identity: dict[str, Any]
    batch_size: int = 256
    num_workers: int = 0

    @classmethod
    def from_datamodule(cls, datamodule: Any, train_size: int | None = None, test_size: int | None = None,
                        seed: int = 0, preprocessing: Preprocessing | None = None) -> EvalData:
        """The data module's labelled probe-train and test splits, optionally a fixed random subset of each
        (never the pretraining split, whose labels may be -1: STL-10's unlabeled images, a flat folder)."""
        train, test = datamodule.split("probe_train"), datamodule.split("test")
        if train is None or test is None:
            raise ValueError(f"dataset {datamodule.dataset!r} has no labelled probe-train and test splits to score "
                             f"on: {datamodule.probe_unavailable_reason}")
        classes = list(getattr(train, "classes", None) or map(str, range(datamodule.num_classes)))
        identity = {"dataset": datamodule.dataset, "root": datamodule.root, "test_root": datamodule.test_root,
                    "probe_train_root": getattr(datamodule, "probe_train_root", None),
                    "train_size": train_size, "test_size": test_size, "seed": seed}
        return cls(subset(train, train_size, seed), subset(test, test_size, seed),
                   preprocessing or datamodule.preprocessing, classes, identity,
                   datamodule.eval_batch_size, datamodule.num_workers)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dataset(self, which: str) -> Dataset:
        if which not in ("train", "test"):
            raise ValueError(f"split {which!r} is not 'train' or 'test'")
        return self.train if which == "train" else self.test

    def loader(self, which: str, view: Any | None = None, batch_size: int | None = None,
               shuffle: bool = False, drop_last: bool = False) -> DataLoader:
        """Batches of ``which`` through ``view`` (default: the deterministic eval transform)."""
        if view is None:
            view = EvalView()
            view.bind(self.preprocessing)
        return DataLoader(ViewDataset(self.dataset(which), view), batch_size=batch_size or self.batch_size,
                          shuffle=shuffle, drop_last=drop_last, num_workers=self.num_workers,
                          collate_fn=collate_views, persistent_workers=False)


def subset(dataset: Dataset, size: int | None, seed: int = 0) -> Dataset:
    """A fixed random ``size``-image subset (the whole dataset when ``size`` is None or too large)."""
    if size is None or size >= len(dataset):
        return dataset
    if size < 1:
        raise ValueError(f"subset size {size} must be at least 1")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].sort().values.tolist())


def frozen_features(encoder: torch.nn.Module, data: EvalData, device: torch.device | str = "cpu",
                    cache: FeatureCache | None = None, weights_id: str | None = None,
                    bf16: bool = False, shard: bool = False, forward: Any = None) -> FeatureSet:
    """Features of both splits on ``device``, read from / written to ``cache`` when a weights identity is
    given. ``shard`` and ``forward``: see :func:`selfsup.eval.features.extract_features` (under DDP every
    rank must call this together)."""
    parts: list[Tensor] = []
    for which in ("train", "test"):
        def extract(which: str = which) -> tuple[Tensor, Tensor]:
            return extract_features(encoder, data.loader(which), device, bf16, shard, forward,
                                    data.preprocessing.image_size)

        if cache is None or weights_id is None:
            parts += extract()
            continue
        describe = {"weights": weights_id, "data": data.identity, "split": which,
                    "size": len(data.dataset(which)), "preprocessing": data.preprocessing.as_dict()}
        parts += [t.to(device) for t in cache.get_or_extract(cache_key(**describe), data.classes, describe, extract)]
    return FeatureSet(*parts)


@dataclass
class EvalContext:
    """What a protocol may read. ``features`` may be a callable, evaluated once on first use."""

    features: FeatureSet | Callable[[], FeatureSet] | None = None
    encoder: torch.nn.Module | None = None
    data: EvalData | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    out_dir: Path | None = None

    def frozen(self) -> FeatureSet:
        if callable(self.features):
            self.features = self.features()
        if self.features is None:
            raise ValueError("this protocol needs frozen features, but none were given")
        return self.features

    @property
    def num_classes(self) -> int:
        if self.data is not None:
            return self.data.num_classes
        features = self.frozen()
        return int(max(features.train_labels.max(), features.test_labels.max())) + 1


@dataclass(frozen=True)
class Protocol:
    name: str
    run: Callable[..., list[dict]]

    def settings(self) -> dict[str, Any]:
        """The protocol's settings and their defaults (its keyword arguments)."""
        params = list(inspect.signature(self.run).parameters.values())[1:]
        return {p.name: p.default for p in params}


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str) -> Callable[[Callable[..., list[dict]]], Callable[..., list[dict]]]:
    """Decorator: make ``fn(context, **settings) -> rows`` available as protocol ``name``."""
    def add(fn: Callable[..., list[dict]]) -> Callable[..., list[dict]]:
        PROTOCOLS[name] = Protocol(name, fn)
        return fn
    return add


def get_protocol(name: str) -> Protocol:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def run_protocols(names: list[str] | tuple[str, ...], context: EvalContext,
                  settings: dict[str, dict[str, Any]] | None = None) -> list[dict]:
    """Run each named protocol with its settings; the rows of all of them, in order."""
    settings = settings or {}
    protocols = [get_protocol(name) for name in names]
    for name, given in settings.items():
        known = get_protocol(name).settings()
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"protocol {name!r} has no setting(s) {unknown}; its settings are {known}")
    rows: list[dict] = []
    for protocol in protocols:
        rows += protocol.run(context, **settings.get(protocol.name, {}))
    return rows


@register_protocol("knn")
def knn(context: EvalContext, k: int = 20, temperature: float = 0.07) -> list[dict]:
    """Weighted cosine kNN on frozen features (top-1 and top-5)."""
    f = context.frozen()
    scores = knn_accuracy(f.train_features, f.train_labels, f.test_features, f.test_labels, k, temperature)
    return [score_row("knn", metric, scores[metric], k=k, temperature=temperature) for metric in ("top1", "top5")]


@register_protocol("linear")
def linear(context: EvalContext, weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2),
           holdout_fraction: float = 0.1, max_iter: int = 100, batchnorm: bool = True,
           clinical_metrics: str = "auto") -> list[dict]:
    """Logistic regression (L-BFGS) on frozen features; weight decay chosen on held-out train images. Where
    the labels call for them (``clinical_metrics``, :mod:`selfsup.eval.metrics`), also balanced accuracy,
    macro AUC, Cohen's kappa and each class's accuracy."""
    f = context.frozen()
    scores = linear_probe(f.train_features, f.train_labels, f.test_features, f.test_labels,
                          tuple(weight_decays), holdout_fraction, max_iter, batchnorm=batchnorm,
                          clinical_metrics=clinical_metrics)
    settings = dict(weight_decay=scores["weight_decay"], swept=list(weight_decays),
                    holdout_fraction=holdout_fraction, batchnorm=batchnorm, solver="lbfgs")
    metrics = ["top1", "top5"] + [m for m in scores if m not in ("top1", "top5", "weight_decay")]
    return [score_row("linear", metric, scores[metric], **settings) for metric in metrics]
