"""Encoder: any timm model behind one interface (pooled features and, for ViTs, tokens)."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import Tensor, nn


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"


def _divisors_hint(image_size: int, patch_size: int) -> str:
    below = image_size - image_size % patch_size
    options = [s for s in (below, below + patch_size) if s > 0]
    return f"use image_size {' or '.join(map(str, options))}, or a patch_size that divides {image_size}"


def _create(name: str, in_chans: int, image_size: int | None, patch_size: int | None,
            kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` without a classifier; sizes go only to models that take them."""
    sizes = {k: v for k, v in (("img_size", image_size), ("patch_size", patch_size)) if v is not None}
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs, **sizes)
    except TypeError as err:
        if not sizes or not any(k in str(err) for k in sizes):
            raise
    if patch_size is not None:
        raise ValueError(f"patch_size={patch_size} only applies to ViT-like models, not {name!r}")
    # CNNs take any image size: drop it.
    return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)


class Encoder(nn.Module):
    """A timm backbone without its classifier.

    Args:
        name: any ``timm.list_models()`` name, e.g. ``resnet18``, ``resnet50``, ``vit_small_patch16_224``.
        cifar_stem: for ResNets on small images: a 3x3 stride-1 first conv and no max-pool.
        image_size, patch_size: for ViT-like models, the input and patch size (e.g. 32 and 4).
        in_chans: input channels of the model. A 1-channel batch fed to a 3-channel model is repeated.
        pool: for ViTs, the pooled feature: ``"token"`` (cls token) or ``"avg"`` (mean of patch tokens).
            ``None`` keeps timm's default.
        drop_path_rate: stochastic depth, where the model supports it.
        model_kwargs: any further ``timm.create_model`` keyword arguments.
    """

    def __init__(self, name: str = "resnet18", cifar_stem: bool = False, image_size: int | None = None,
                 patch_size: int | None = None, in_chans: int = 3, pool: str | None = None,
                 drop_path_rate: float = 0.0, model_kwargs: dict[str, Any] | None = None):
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}{_suggest(name)}")
        if image_size is not None and patch_size is not None and image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size} "
                             f"({_divisors_hint(image_size, patch_size)})")
        kwargs: dict[str, Any] = dict(model_kwargs or {})
        if pool is not None:
            kwargs["global_pool"] = pool
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        self.config = dict(name=name, cifar_stem=cifar_stem, image_size=image_size, patch_size=patch_size,
                           in_chans=in_chans, pool=pool, drop_path_rate=drop_path_rate,
                           model_kwargs=dict(model_kwargs or {}))
        self.model = _create(name, in_chans, image_size, patch_size, kwargs)
        self.is_vit = hasattr(self.model, "patch_embed")
        if cifar_stem:
            self._use_cifar_stem(name, in_chans)
        self.in_chans = in_chans
        self.embed_dim: int = self.model.num_features

    def _use_cifar_stem(self, name: str, in_chans: int) -> None:
        conv = getattr(self.model, "conv1", None)
        if not isinstance(conv, nn.Conv2d) or not hasattr(self.model, "maxpool"):
            raise ValueError(f"cifar_stem=True needs a ResNet-style model with conv1 and maxpool, not {name!r}")
        self.model.conv1 = nn.Conv2d(in_chans, conv.out_channels, 3, stride=1, padding=1, bias=False)
        self.model.maxpool = nn.Identity()

    def _match_channels(self, x: Tensor) -> Tensor:
        if x.shape[1] == self.in_chans:
            return x
        if x.shape[1] == 1:
            return x.expand(-1, self.in_chans, -1, -1)
        raise ValueError(f"input has {x.shape[1]} channels but the encoder expects in_chans={self.in_chans}")

    def forward(self, x: Tensor) -> Tensor:
        """Pooled pre-projector features ``(B, embed_dim)``: what probes read."""
        return self.model(self._match_channels(x))

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Token features ``(B, N, embed_dim)`` for ViT-like models (prefix tokens included)."""
        if not self.is_vit:
            raise TypeError(f"forward_tokens needs a ViT-like model, not {self.config['name']!r}")
        return self.model.forward_features(self._match_channels(x))

