"""Loader throughput per worker core and bytes per batch: selfsup's data path against torchvision's per-sample
``T.Compose`` pipeline, for SwAV/DINO multi-crop (2x224 + 6x96), SimCLR's two views and MAE's single view.

The images are real JPEGs: the embedded Fashion-MNIST upsampled to 256 px (bicubic, RGB) and saved at quality 90
in a temporary folder. Each loader runs with one worker process (one thread), so images/s is per worker core;
the training process only receives the batches. Rows:

- ``torchvision``: PIL decode + ``T.Compose`` of the v2 transforms per view, float32 out (the usual recipe);
- ``selfsup worker-colour``: ``SSLDataModule(device_augment=False)``: colour steps on the worker, uint8 out;
- ``selfsup device``: ``SSLDataModule(device_augment=True)`` (the default): the worker decodes, crops, resizes
  and flips; the colour steps and normalisation run batched on the training device after the transfer (their
  cost on this CPU is printed apart: on a GPU it is a few kernels per view);
- ``baseline``: ``--baseline PATH`` runs the ``selfsup worker-colour`` measurement against another checkout
  (e.g. ``git worktree add /tmp/before <rev>``), in a subprocess, for a before/after figure.

    python benchmarks/loader.py
    python benchmarks/loader.py --baseline /tmp/before
    python benchmarks/loader.py --draft        # JPEG decoding at reduced size, on a 2048 x 2400 photo
    python benchmarks/loader.py --images 64 --batches 1 --batch-size 16   # smoke
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import record  # noqa: E402

from selfsup.data.datamodule import SSLDataModule  # noqa: E402
from selfsup.data.datasets import decode_image, embedded_fashion_mnist, load_image  # noqa: E402
from selfsup.data.transforms import ContrastiveViews, Crops, MaskedImageView, MultiCropViews  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
JITTER = dict(jitter_strength=1.0, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
# path -> [(count, size, scale, colour steps?)] and the selfsup view transform that makes the same views
PATHS = {
    "multi-crop 2x224+6x96": ([(2, 224, (0.14, 1.0), True), (6, 96, (0.05, 0.14), True)],
                              lambda: MultiCropViews(Crops(2, 224, (0.14, 1.0)), Crops(6, 96, (0.05, 0.14)), **JITTER)),
    "simclr 2x224": ([(2, 224, (0.08, 1.0), True)],
                     lambda: ContrastiveViews(2, (0.08, 1.0), **JITTER, image_size=224)),
    "mae 1x224": ([(1, 224, (0.2, 1.0), False)], lambda: MaskedImageView((0.2, 1.0), image_size=224)),
}


def make_jpegs(count: int, folder: Path) -> Path:
    """``count`` Fashion-MNIST images as 256 px RGB JPEGs (quality 90), made once per folder."""
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) != count:
        source = embedded_fashion_mnist("train")
        for i in range(count):
            gray = Image.fromarray(source[i][0][0].numpy())
            gray.resize((256, 256), Image.BICUBIC).convert("RGB").save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def compose(size: int, scale: tuple[float, float], colour: bool) -> T.Compose:
    ops = [T.RandomResizedCrop(size, scale=scale, antialias=True), T.RandomHorizontalFlip()]
    if colour:
        ops += [T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(0.2),
                T.RandomApply([T.GaussianBlur(max(3, (size // 10) | 1), sigma=(0.1, 2.0))], p=0.5)]
    return T.Compose(ops + [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD)])


class PerSample(Dataset):
    """The usual per-sample pipeline: PIL decode, then a ``T.Compose`` per view."""

    def __init__(self, folder: Path, groups: list):
        self.files = sorted(folder.glob("*.jpg"))
        self.pipelines = [(compose(size, scale, colour), count) for count, size, scale, colour in groups]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = Image.open(self.files[index]).convert("RGB")
        return [pipeline(image) for pipeline, count in self.pipelines for _ in range(count)]


def measure(loader, batches: int, finish=None) -> dict[str, float]:
    """images/s over ``batches`` batches after the first (worker start-up), bytes of one batch's views, and
    the seconds ``finish`` (the on-device step, here on the host) takes per batch."""
    iterator = iter(loader)
    first = next(iterator)
    views = first if isinstance(first, list) else first.views
    batch_bytes = sum(v.nbytes for v in views)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        batch = next(iterator)
        images += len(batch[0] if isinstance(batch, list) else batch)
    row = {"images_per_s": images / (time.perf_counter() - start), "mb_per_batch": batch_bytes / 1e6}
    if finish is not None:
        start = time.perf_counter()
        finish(first)
        row["host_finish_s"] = time.perf_counter() - start
    return row


def selfsup_loader(folder: Path, views, batch_size: int, device_augment: bool) -> SSLDataModule:
    kwargs = dict(dataset="folder", root=str(folder), views=views, image_size=224, batch_size=batch_size,
                  num_workers=1, seed=0)
    if "device_augment" in inspect.signature(SSLDataModule).parameters:  # absent before the uint8 path
        kwargs["device_augment"] = device_augment
    data = SSLDataModule(**kwargs)
    data.setup("fit")
    return data


def run(args: argparse.Namespace, folder: Path, only: str | None = None) -> list[dict]:
    rows = []
    for name, (groups, views) in PATHS.items():
        if only in (None, "torchvision"):
            loader = DataLoader(PerSample(folder, groups), batch_size=args.batch_size, shuffle=True, num_workers=1,
                                drop_last=True, persistent_workers=False)
            rows.append({"path": name, "loader": "torchvision", **measure(loader, args.batches)})
        for label, device_augment in (("selfsup worker-colour", False), ("selfsup device", True)):
            if only not in (None, label):
                continue
            data = selfsup_loader(folder, views(), args.batch_size, device_augment)
            finish = getattr(data, "prepare_batch", None) if device_augment else None
            rows.append({"path": name, "loader": label, **measure(data.train_dataloader(), args.batches, finish)})
    return rows


def draft_rows(folder: Path, samples: int = 20) -> list[dict]:
    """ms per sample of multi-crop views from a large photo (matplotlib's sample JPEG at 2048 x 2400, quality 90):
    the lazily opened file (decoded at reduced size where the crops allow) against a full decode first."""
    import matplotlib.cbook

    path = folder.parent / "selfsup-loader-large.jpg"
    if not path.exists():
        photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        photo.resize((2048, 2400), Image.LANCZOS).save(path, quality=90)
    rows = []
    for name, (groups, make) in PATHS.items():
        views = make()
        views.bind(selfsup_loader(folder, views, 2, False).preprocessing)
        timings = {}
        for label, full in (("reduced where allowed", False), ("full decode", True)):
            start = time.perf_counter()
            for seed in range(samples):
                torch.manual_seed(seed)
                image = load_image(str(path))
                views(decode_image(image) if full else image)
            timings[label] = 1e3 * (time.perf_counter() - start) / samples
        rows.append({"path": name, "full_ms": timings["full decode"], "draft_ms": timings["reduced where allowed"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="JPEGs made from the embedded dataset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per loader, after the first")
    parser.add_argument("--baseline", default=None, help="another selfsup checkout to measure the same way")
    parser.add_argument("--draft", action="store_true", help="time JPEG decoding at reduced size on a large photo")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # used for the baseline subprocess
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "selfsup-loader-jpegs"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = make_jpegs(args.images, Path(args.folder))
    if args.only:
        print(json.dumps(run(args, folder, args.only)))
        return
    if args.draft:
        print("\n| path (2048 x 2400 JPEG) | full decode ms/sample | reduced decode ms/sample | speed-up |\n|---|---:|---:|---:|")
        for row in draft_rows(folder):
            print(f"| {row['path']} | {row['full_ms']:.0f} | {row['draft_ms']:.0f} | {row['full_ms'] / row['draft_ms']:.2f} |")
            record({"name": f"loader draft {row['path']}", **row})
        return
    rows = run(args, folder)
    if args.baseline:
        command = [sys.executable, __file__, "--only", "selfsup worker-colour", "--images", str(args.images),
                   "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--folder", args.folder]
        out = subprocess.run(command, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": args.baseline})
        rows += [{**row, "loader": "baseline"} for row in json.loads(out.stdout.strip().splitlines()[-1])]
    print("\n| path | loader | images/s per worker core | x torchvision | MB per batch | host finish s/batch |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        reference = next(r for r in rows if r["path"] == row["path"] and r["loader"] == "torchvision")
        ratio = row["images_per_s"] / reference["images_per_s"]
        finish = f"{row['host_finish_s']:.3f}" if "host_finish_s" in row else ""
        print(f"| {row['path']} | {row['loader']} | {row['images_per_s']:.1f} | {ratio:.2f} | "
              f"{row['mb_per_batch']:.1f} | {finish} |")
        record({"name": f"loader {row['path']} {row['loader']}", **row, "ratio_to_torchvision": round(ratio, 3),
                "batch_size": args.batch_size, "images": args.images})


if __name__ == "__main__":
    main()
