"""Checkpoint cost per method: save time, load time and file size of a full training checkpoint.

    python benchmarks/checkpoint.py                                    # every recipes/imagenet/*.yaml
    python benchmarks/checkpoint.py --recipes recipes/demo/*.yaml      # small models, quick

A checkpoint holds what exact resume needs: weights and buffers (SwAV's queue included), AdamW's two
moments per parameter, the schedule, the RNG states. The model comes from the recipe, the optimizer
state from one AdamW step on random gradients, so sizes match a real run's ``last.ckpt``. Times are
the median of ``--repeats`` saves with selfsup's atomic writer (temp file + fsync + rename) and with
Lightning's default writer, to a directory on the target disk (``--dir``).
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402


def build_checkpoint(recipe: str) -> dict:
    """A checkpoint shaped like Lightning's for the recipe's model."""
    import yaml
    from lightning.pytorch.cli import LightningArgumentParser

    from selfsup.methods.base import SSLMethod
    from selfsup.run.resume import gather_rng_states

    parser = LightningArgumentParser()
    parser.add_subclass_arguments(SSLMethod, "model", required=True)
    model_config = yaml.safe_load(Path(recipe).read_text())["model"]
    model = parser.instantiate_classes(parser.parse_object({"model": model_config}))["model"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()],
            "lr_schedulers": [{"last_epoch": 1}], "global_step": 1, "epoch": 0,
            "selfsup": {"rng": gather_rng_states()}}


def time_saves(io, checkpoint: dict, directory: Path, repeats: int) -> tuple[float, float, int]:
    """Median save and load seconds and the file size in bytes."""
    path = directory / "last.ckpt"
    saves, loads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        io.save_checkpoint(checkpoint, path)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        io.load_checkpoint(path, weights_only=True)
        loads.append(time.perf_counter() - start)
    return statistics.median(saves), statistics.median(loads), path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=sorted(glob.glob("recipes/imagenet/*.yaml")))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    from selfsup.checkpoint import AtomicCheckpointIO

    for recipe in args.recipes:
        checkpoint = build_checkpoint(recipe)
        parameters = sum(v.numel() for v in checkpoint["state_dict"].values())
        with tempfile.TemporaryDirectory(dir=args.dir) as directory:
            atomic = time_saves(AtomicCheckpointIO(), checkpoint, Path(directory), args.repeats)
            default = time_saves(TorchCheckpointIO(), checkpoint, Path(directory), args.repeats)
        row = {"name": f"checkpoint {recipe}", "state_entries_million": round(parameters / 1e6, 2),
               "size_mb": round(atomic[2] / 2**20, 1), "save_s_atomic": round(atomic[0], 3),
               "load_s": round(atomic[1], 3), "save_s_lightning_default": round(default[0], 3)}
        print(f"{recipe:<40} {row['size_mb']:8.1f} MB  save {row['save_s_atomic']:.3f} s (atomic) / "
              f"{row['save_s_lightning_default']:.3f} s (Lightning default)  load {row['load_s']:.3f} s", flush=True)
        record(row)


if __name__ == "__main__":
    main()
