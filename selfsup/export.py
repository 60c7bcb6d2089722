"""Export a pretrained encoder as timm weights, and load it back.

``export_encoder(ckpt, out)`` writes ``out/model.safetensors`` (the timm model's own state dict, no
classifier) and ``out/config.json`` in timm's Hugging Face Hub format (``architecture``, ``num_classes``,
``num_features``, ``model_args``, ``pretrained_cfg`` with mean, std, input size, interpolation and crop
percentage), plus a ``selfsup`` entry with the full :class:`Encoder` config and preprocessing.

Loading (:func:`selfsup.checkpoint.load_encoder`)::

    encoder = selfsup.load_encoder(out)                        # an Encoder, any model
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=out / "model.safetensors"),
                              **config["model_args"])         # plain timm ...
    model = timm.create_model(f"local-dir:{out}", pretrained=True)  # ... or via timm's local-dir source

The CIFAR stem (a 3x3 stride-1 first conv and no max-pool) is not expressible with timm's ResNet
arguments (its stem is always a stride-2 7x7 conv or a stride-2 deep stem). Such exports say so in
``config.json`` and in a warning; plain timm then fails loudly on the ``conv1.weight`` shape, and
``selfsup.load_encoder`` must be used.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from selfsup.checkpoint import (CONFIG_FILE, WEIGHTS_FILE, encoder_state, load_checkpoint, load_into,
                                selfsup_metadata)
from selfsup.models.encoder import Encoder

CIFAR_STEM_NOTE = ("cifar_stem=True: conv1 is a 3x3 stride-1 conv and maxpool is Identity. timm's ResNet "
                   "arguments cannot build this stem, so plain timm.create_model cannot load these weights "
                   "(conv1.weight shape mismatch); use selfsup.load_encoder(DIR).")


def timm_model_args(config: dict[str, Any]) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that rebuild the encoder's architecture."""
    args: dict[str, Any] = {"num_classes": 0, "in_chans": config["in_chans"], **config.get("model_kwargs", {})}
    for key, timm_key in (("image_size", "img_size"), ("patch_size", "patch_size"), ("pool", "global_pool")):
        if config.get(key) is not None:
            args[timm_key] = config[key]
    if config.get("dynamic_img_size"):
        args["dynamic_img_size"] = True
    return args


def pretrained_cfg(config: dict[str, Any], preprocessing: dict[str, Any] | None, in_chans: int) -> dict[str, Any]:
    """timm's ``pretrained_cfg``; a grayscale mean/std of length 1 is repeated to ``in_chans``."""
    pre = preprocessing or {}
    size = pre.get("image_size") or config.get("image_size") or 224

    def per_channel(values: Any, default: tuple[float, ...]) -> list[float]:
        values = list(values or default)
        return values * in_chans if len(values) == 1 else values

    return {"input_size": [in_chans, size, size], "interpolation": pre.get("interpolation", "bilinear"),
            "mean": per_channel(pre.get("mean"), (0.485, 0.456, 0.406)),
            "std": per_channel(pre.get("std"), (0.229, 0.224, 0.225)),
            "crop_pct": pre.get("crop_pct", 1.0), "crop_mode": "center", "num_classes": 0}


def export_encoder(ckpt: str | Path, out: str | Path, unsafe_load: bool = False) -> Path:
    """Write ``model.safetensors`` and ``config.json`` for the encoder of a selfsup checkpoint."""
    checkpoint = load_checkpoint(ckpt, unsafe_load)
    meta = selfsup_metadata(checkpoint, ckpt)
    encoder = Encoder(**meta["encoder"])
    load_into(encoder, encoder_state(checkpoint, ckpt), ckpt)  # validates the weights before writing
    return save_encoder(encoder, out, meta.get("preprocessing"), source=str(ckpt))


def save_encoder(encoder: Encoder, out: str | Path, preprocessing: dict[str, Any] | None,
                 source: str = "") -> Path:
    """Write an in-memory :class:`Encoder` as a timm-loadable directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = encoder.config
    weights = {k: v.detach().cpu().contiguous() for k, v in encoder.model.state_dict().items()}
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    document = {
        "architecture": config["name"], "num_classes": 0, "num_features": encoder.embed_dim,
        "model_args": timm_model_args(config),
        "pretrained_cfg": pretrained_cfg(config, preprocessing, config["in_chans"]),
        "selfsup": {"encoder": config, "preprocessing": preprocessing, "source": source,
                    "plain_timm_loadable": not config.get("cifar_stem", False)},
    }
    if config.get("cifar_stem"):
        document["selfsup"]["note"] = CIFAR_STEM_NOTE
        warnings.warn(f"exported to {out}: {CIFAR_STEM_NOTE}", stacklevel=2)
    (out / CONFIG_FILE).write_text(json.dumps(document, indent=2))
    return out


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfsup export", description="Write a checkpoint's encoder as "
                                     "model.safetensors + config.json loadable by timm and selfsup.load_encoder.")
    parser.add_argument("--ckpt", required=True, help="selfsup checkpoint")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--unsafe-load", action="store_true", help="allow checkpoints that need full "
                        "unpickling (can run arbitrary code: only for files you trust)")
    return parser


def main(argv: list[str]) -> None:
    """``selfsup export --ckpt RUN.ckpt --out DIR`` (``argv`` without the word ``export``)."""
    from selfsup.eval.command import run_command

    def export(args: argparse.Namespace) -> None:
        out = export_encoder(args.ckpt, args.out, args.unsafe_load)
        print(f"exported {args.ckpt} -> {out}/model.safetensors, {out}/config.json")

    run_command(export_parser(), export, argv)
