"""Encoder: any timm model behind one interface (pooled features and, for ViTs, tokens)."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from torch import Tensor, nn

from selfsup.models.vit_init import check_vit_options, fix_sincos_positions_, mae_init_


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"


def _divisors_hint(image_size: int, patch_size: int) -> str:
    below = image_size - image_size % patch_size
    options = [s for s in (below, below + patch_size) if s > 0]
    return f"use image_size {' or '.join(map(str, options))}, or a patch_size that divides {image_size}"


def _create(name: str, in_chans: int, image_size: int | None, patch_size: int | None,
            kwargs: dict[str, Any], pretrained: dict[str, Tensor] | None = None) -> nn.Module:
    """``timm.create_model`` without a classifier; sizes go only to models that take them. With a
    ``pretrained`` state dict, timm loads it as it loads pretrained weights: its classifier dropped, the input
    channels and the position embeddings adapted to this model."""
    kwargs = dict(kwargs)
    dynamic = kwargs.pop("dynamic_img_size", None) or None  # ViTs only, like the sizes
    sizes = {k: v for k, v in (("img_size", image_size), ("patch_size", patch_size),
                               ("dynamic_img_size", dynamic)) if v is not None}
    source = {"pretrained": pretrained is not None}
    if pretrained is not None:
        source["pretrained_cfg_overlay"] = {"state_dict": dict(pretrained)}  # timm edits the dict it is given
    try:
        return timm.create_model(name, num_classes=0, in_chans=in_chans, **source, **kwargs, **sizes)
    except TypeError as err:
        if not sizes or not any(k in str(err) for k in sizes):
            raise
    if patch_size is not None:
        raise ValueError(f"patch_size={patch_size} only applies to ViT-like models, not {name!r}")
    # CNNs take any image size: drop it.
    return timm.create_model(name, num_classes=0, in_chans=in_chans, **source, **kwargs)


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
        dynamic_img_size: for ViTs, accept any input size that the patch size divides, interpolating
            the position embeddings (timm's ``dynamic_img_size``); multi-crop needs it. CNNs take any
            size anyway and ignore it.
        pos_embed: for ViTs, ``"learned"`` (timm's trainable table) or ``"sincos"``: MAE's fixed 2-D sin-cos
            table, kept as the ``pos_embed`` parameter with ``requires_grad=False``.
        weight_init: ``"timm"`` (the model's own) or ``"mae"``: MAE's Xavier-uniform init of every linear
            layer and of the patch embedding, tokens ``normal(0.02)`` (:mod:`selfsup.models.vit_init`).
        grad_checkpointing: recompute each block's activations in the backward pass instead of keeping
            them (timm's ``set_grad_checkpointing``): less memory for more compute, on ``forward`` and on
            the token path of MAE and SimMIM (:meth:`encode_patches`) alike.
    """

    def __init__(self, name: str = "resnet18", cifar_stem: bool = False, image_size: int | None = None,
                 patch_size: int | None = None, in_chans: int = 3, pool: str | None = None,
                 drop_path_rate: float = 0.0, model_kwargs: dict[str, Any] | None = None,
                 dynamic_img_size: bool = False, pos_embed: str = "learned", weight_init: str = "timm",
                 grad_checkpointing: bool = False):
        super().__init__()
        check_vit_options(pos_embed, weight_init)
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
        if dynamic_img_size:
            kwargs["dynamic_img_size"] = True
        self.config = dict(name=name, cifar_stem=cifar_stem, image_size=image_size, patch_size=patch_size,
                           in_chans=in_chans, pool=pool, drop_path_rate=drop_path_rate,
                           model_kwargs=dict(model_kwargs or {}), dynamic_img_size=dynamic_img_size,
                           pos_embed=pos_embed, weight_init=weight_init, grad_checkpointing=grad_checkpointing)
        self._timm_args = (name, in_chans, image_size, patch_size, kwargs)
        self.model = _create(name, in_chans, image_size, patch_size, kwargs)
        self.is_vit = hasattr(self.model, "patch_embed")
        self.config["dynamic_img_size"] = bool(getattr(self.model, "dynamic_img_size", False))  # CNNs: False
        if cifar_stem:
            self._use_cifar_stem(name, in_chans)
        self._initialise(pos_embed, weight_init)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.in_chans = in_chans
        self.embed_dim: int = self.model.num_features

    def _initialise(self, pos_embed: str, weight_init: str) -> None:
        """Apply the MAE set-up options (both are no-ops at their defaults)."""
        if (pos_embed, weight_init) != ("learned", "timm") and not self.is_vit:
            raise ValueError(f"pos_embed={pos_embed!r} / weight_init={weight_init!r} apply to patch-embedding "
                             f"models (vit_*, swin_*), not {self.config['name']!r}; leave them at 'learned' / 'timm'")
        if weight_init == "mae":
            mae_init_(self.model)
        if pos_embed == "sincos":
            fix_sincos_positions_(self.model)

    def _use_cifar_stem(self, name: str, in_chans: int) -> None:
        conv = getattr(self.model, "conv1", None)
        if not isinstance(conv, nn.Conv2d) or not hasattr(self.model, "maxpool"):
            raise ValueError(f"cifar_stem=True needs a ResNet-style model with conv1 and maxpool, not {name!r}")
        self.model.conv1 = nn.Conv2d(in_chans, conv.out_channels, 3, stride=1, padding=1, bias=False)
        self.model.maxpool = nn.Identity()

    @torch.no_grad()
    def load_timm_weights(self, path: str) -> None:
        """Copy the weights of a timm model's weights file (``model.safetensors`` or a state dict saved with
        ``torch.save``, e.g. from ``timm.create_model(..., pretrained=True)``) into this encoder, loaded the way
        timm loads pretrained weights: its classifier dropped, the first convolution adapted to ``in_chans``
        (a grayscale model sums the RGB filters), position embeddings resampled to this grid."""
        if self.config["cifar_stem"]:
            raise ValueError(f"{path!r}: timm weights do not fit the CIFAR stem (cifar_stem: true)")
        state = timm.models.load_state_dict(str(path))  # read once (weights_only, safetensors or torch.save)
        try:
            pretrained = _create(*self._timm_args, pretrained=state)
        except (RuntimeError, KeyError) as err:
            raise ValueError(f"the timm weights in {str(path)!r} do not fit {self.config['name']!r}: "
                             f"{str(err).strip()[:600]}") from err
        # timm loads non-strictly once the classifier differs: check the names here, so that nothing is
        # left at its random initialisation without a word
        classifier = pretrained.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        heads = tuple(f"{c}." for c in classifier)
        in_file = {k for k in state if not k.startswith(heads)}
        missing, unexpected = set(pretrained.state_dict()) - in_file, in_file - set(pretrained.state_dict())
        if missing or unexpected:
            raise ValueError(f"the timm weights in {str(path)!r} do not fit {self.config['name']!r}: missing "
                             f"{sorted(missing)[:4]} ({len(missing)}), unexpected {sorted(unexpected)[:4]} "
                             f"({len(unexpected)})")
        self.model.load_state_dict(pretrained.state_dict())

    def check_view_sizes(self, views: list[Tensor]) -> None:
        """Multi-crop views of several sizes need a CNN or a ViT with ``dynamic_img_size``: else name it."""
        sizes = sorted({tuple(v.shape[-2:]) for v in views})
        if len(sizes) > 1 and self.is_vit and not getattr(self.model, "dynamic_img_size", False):
            raise ValueError(f"the views have sizes {sizes} but the ViT encoder takes one size; set "
                             "model.encoder.init_args.dynamic_img_size: true for multi-crop")

    def match_channels(self, x: Tensor) -> Tensor:
        """``x`` as the encoder sees it: grey images repeated to ``in_chans`` channels (a view, no copy);
        methods that reconstruct pixels use it for their targets."""
        if not x.is_floating_point():
            raise TypeError(f"the encoder got {x.dtype} images: loader batches carry uint8 views, which are augmented "
                            "and normalised on the device after the transfer; the Trainer does it, and by hand call "
                            "datamodule.prepare_batch(batch) first")
        if x.shape[1] == self.in_chans:
            return x
        if x.shape[1] == 1:
            return x.expand(-1, self.in_chans, -1, -1)
        raise ValueError(f"input has {x.shape[1]} channels but the encoder expects in_chans={self.in_chans}")

    def forward(self, x: Tensor) -> Tensor:
        """Pooled pre-projector features ``(B, embed_dim)``: what probes read."""
        return self.model(self.match_channels(x))

    def encode_views(self, views: list[Tensor], micro_batch_size: int | None = None,
                     channels_last: bool = False) -> list[Tensor]:
        """Pooled features of every view, one pass per distinct resolution. With ``micro_batch_size``, the
        pass runs over chunks of at most that many images of a random permutation of the views (MoCo's
        shuffling BN: chunks in order would let BatchNorm statistics tell where a view's positives are)."""
        out: list[Tensor | None] = [None] * len(views)
        for shape in dict.fromkeys(v.shape for v in views):
            idx = [i for i, v in enumerate(views) if v.shape == shape]
            x = torch.cat([views[i] for i in idx])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if micro_batch_size:
                order = torch.randperm(len(x), device=x.device)
                features = torch.cat([self(chunk) for chunk in x[order].split(micro_batch_size)])
                features = features[torch.argsort(order)]
            else:
                features = self(x)
            for i, h in zip(idx, features.chunk(len(idx))):
                out[i] = h
        return out  # type: ignore[return-value]

    def forward_tokens(self, x: Tensor) -> Tensor:
        """Token features ``(B, N, embed_dim)`` for ViT-like models (prefix tokens included)."""
        if not self.is_vit:
            raise TypeError(f"forward_tokens needs a ViT-like model, not {self.config['name']!r}")
        return self.model.forward_features(self.match_channels(x))

    def intermediate_tokens(self, x: Tensor, layers: int | list[int] = 4) -> list[Tensor]:
        """Tokens ``(B, prefix + N, D)`` after each of the last ``layers`` blocks (or the listed block indices),
        each through the final norm, from timm's ``forward_intermediates`` (ViTs): what DINOv2's and iBOT's
        linear evaluations read (the class tokens of the last 4 blocks)."""
        if not self.is_vit or not hasattr(self.model, "forward_intermediates"):
            raise TypeError(f"intermediate_tokens needs a timm ViT, not {self.config['name']!r}")
        out = self.model.forward_intermediates(self.match_channels(x), indices=layers, norm=True, output_fmt="NLC",
                                               intermediates_only=True, return_prefix_tokens=True)
        return [torch.cat([prefix, patches], dim=1) if prefix is not None else patches for patches, prefix in out]

    # -- token-level access for masked image modeling (MAE, SimMIM) -------------------------------
    @property
    def patch_size(self) -> int:
        """Side of one patch embedding, in pixels (ViT and Swin)."""
        return self.model.patch_embed.patch_size[0]

    @property
    def stride(self) -> int:
        """Pixels per position of the final feature map: the patch size for a ViT, 32 for a Swin."""
        return self.model.feature_info[-1]["reduction"]

    @property
    def num_prefix_tokens(self) -> int:
        """Class/register tokens in front of the patch tokens (0 for hierarchical models)."""
        return getattr(self.model, "num_prefix_tokens", 0)

    def embed_patches(self, x: Tensor) -> Tensor:
        """Patch embeddings ``(B, N, D)`` in row-major grid order, before positions and prefix tokens."""
        if not self.is_vit:
            raise TypeError(f"embed_patches needs a ViT-like model, not {self.config['name']!r}")
        patches = self.model.patch_embed(self.match_channels(x))
        return patches.flatten(1, -2)  # NLC (ViT) or NHWC (Swin) -> NLC

    def encode_masked(self, x: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
        """Every token ``(B, prefix + N, D)`` after the final norm, the patch embeddings where ``mask``
        ``(B, h, w)`` (or ``(B, N)``) is 1 replaced by ``mask_token`` ``(1, 1, D)`` before positions are added (SimMIM,
        iBOT, DINOv2). The mask token belongs to the method, so the encoder exported stays timm's."""
        patches = self.embed_patches(x)
        weight = mask.flatten(1)[..., None].to(patches.dtype)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return self.encode_patches(patches * (1 - weight) + mask_token.to(patches.dtype) * weight, grid=grid)

    def encode_patches(self, patches: Tensor, keep: Tensor | None = None,
                       grid: tuple[int, int] | None = None) -> Tensor:
        """Run the rest of the backbone from patch embeddings ``(B, N, D)``.

        A ViT adds its position embeddings and prefix tokens, then, when ``keep`` ``(B, K)`` indexes
        patch tokens, runs its blocks on those only (MAE); it returns ``(B, prefix + K, D)``. A
        hierarchical model (Swin) runs its stages on the full grid and returns ``(B, N / stride^2, C)``.
        Either way the tokens leave through the backbone's final norm (:attr:`token_norm`). ``grid``
        ``(h, w)`` is the patch grid of a ``dynamic_img_size`` ViT's input (any shape; square when omitted).
        """
        model = self.model
        if hasattr(model, "blocks"):
            if getattr(model, "dynamic_img_size", False):  # timm then wants NHWC, on the input's grid
                side = int(patches.shape[1] ** 0.5)
                patches = patches.unflatten(1, tuple(grid) if grid is not None else (side, side))
            tokens = model._pos_embed(patches)
            if keep is not None:
                prefix, body = tokens[:, :self.num_prefix_tokens], tokens[:, self.num_prefix_tokens:]
                body = body.gather(1, keep[..., None].expand(-1, -1, body.shape[-1]))
                tokens = torch.cat([prefix, body], dim=1)
            tokens = model.norm_pre(tokens)
            if getattr(model, "grad_checkpointing", False) and torch.is_grad_enabled():
                return self.token_norm(timm.models.checkpoint_seq(model.blocks, tokens))
            return self.token_norm(model.blocks(tokens))
        if keep is not None:
            raise ValueError(f"{self.config['name']!r} cannot run on a subset of tokens (use a ViT)")
        width = model.patch_embed.grid_size[1] if grid is None else grid[1]
        grid_map = patches.unflatten(1, (patches.shape[1] // width, width))  # Swin stages take NHWC
        return self.token_norm(model.layers(grid_map)).flatten(1, 2)

    @property
    def token_norm(self) -> nn.Module:
        """The backbone's final norm, as the token-level objectives (MAE, SimMIM) apply it to every token.

        A timm ViT built for average pooling (``pool: avg``) moves that LayerNorm behind the pooling
        (``fc_norm``) and leaves ``norm`` an identity; the MAE and SimMIM papers normalise the tokens, so
        ``fc_norm`` is used on them then. Otherwise it would get no gradient: never trained, and a parameter
        that DDP (``find_unused_parameters=False``) stops the run for."""
        norm, fc_norm = self.model.norm, getattr(self.model, "fc_norm", None)
        return fc_norm if isinstance(norm, nn.Identity) and isinstance(fc_norm, nn.Module) else norm

