"""The loader's CPU cost per view: selfsup's ``Augmentation`` against torchvision's ``T.Compose`` of the same v2
transforms (same random draws, same tensors), and one multi-crop batch through ``SSLDataModule``.

Loader workers share the cores with the training step on a CPU, so every microsecond here comes off the step.
Reference configuration (issue 4): SwAV's 2x32 + 4x16 crops of 28 px Fashion-MNIST, colour jitter 1.0 (p=0.8),
grayscale (p=0.2) and blur (p=0.5) on every crop; one thread, as in a loader worker.

    python benchmarks/augmentation.py
    python benchmarks/augmentation.py --images 64 --batch-size 64      # smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_mb, record  # noqa: E402

from selfsup.data.datamodule import SSLDataModule  # noqa: E402
from selfsup.data.datasets import FASHION_MNIST_INFO, embedded_fashion_mnist  # noqa: E402
from selfsup.data.transforms import Augmentation, Crops, MultiCropViews  # noqa: E402

CROPS = {"global 32 px": (32, (0.14, 1.0)), "local 16 px": (16, (0.05, 0.14))}
PARAMS = dict(jitter_strength=1.0, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)


def compose(size: int, scale: tuple[float, float]) -> T.Compose:
    """What ``Augmentation`` replaces: the v2 transforms, each called through ``Transform.forward``."""
    return T.Compose([T.ToImage(), T.RandomResizedCrop(size, scale=scale, antialias=True), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(0.2),
                      T.RandomApply([T.GaussianBlur(max(3, (size // 10) | 1), sigma=(0.1, 2.0))], p=0.5),
                      T.ToDtype(torch.float32, scale=True),
                      T.Normalize(FASHION_MNIST_INFO.mean, FASHION_MNIST_INFO.std)])


def us_per_view(transform, images: list[torch.Tensor]) -> float:
    for image in images[:50]:
        transform(image)
    start = time.perf_counter()
    for image in images:
        transform(image)
    return 1e6 * (time.perf_counter() - start) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="views timed per transform")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    source = embedded_fashion_mnist("train")
    images = [source[i % len(source)][0] for i in range(args.images)]
    for name, (size, scale) in CROPS.items():
        ours = Augmentation(size, scale, **PARAMS, mean=FASHION_MNIST_INFO.mean, std=FASHION_MNIST_INFO.std)
        reference, selfsup = us_per_view(compose(size, scale), images), us_per_view(ours, images)
        print(f"{name:<14} T.Compose {reference:6.0f} us/view   Augmentation {selfsup:6.0f} us/view", flush=True)
        record({"name": f"augmentation {name}", "compose_us": round(reference, 1), "selfsup_us": round(selfsup, 1)})

    views = MultiCropViews(Crops(2, *CROPS["global 32 px"]), Crops(4, *CROPS["local 16 px"]), **PARAMS)
    data = SSLDataModule(views=views, image_size=32, batch_size=args.batch_size, num_workers=0)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    next(batches)
    start = time.perf_counter()
    next(batches)
    seconds = time.perf_counter() - start
    print(f"multi-crop batch of {args.batch_size} (2x32 + 4x16): {seconds:.3f} s on one thread, "
          f"{args.batch_size / seconds:.0f} images/s, peak memory {peak_memory_mb():.0f} MB", flush=True)
    record({"name": "augmentation multi-crop batch", "images_per_s": round(args.batch_size / seconds, 1),
            "seconds_per_batch": round(seconds, 3), "batch_size": args.batch_size,
            "peak_memory_mb": round(peak_memory_mb(), 1)})


if __name__ == "__main__":
    main()
