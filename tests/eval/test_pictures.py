"""PatchPCAImages: the PCA colouring against NumPy's SVD, and a DINOv2 run through the CLI writing the picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.eval.pictures import PatchPCAImages, pca_rgb


def test_pca_colours_are_the_top_components_scaled_to_unit_range():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    scores = rng.normal(size=(2 * 4 * 5, 8)) * np.array([5.0, 3.0, 2.0, 0.3, 0.2, 0.1, 0.1, 0.1])
    x = scores @ basis.T + 1.5                                     # an offset the PCA must remove
    rgb = pca_rgb(torch.tensor(x, dtype=torch.float32).reshape(2, 4, 5, 8))
    assert rgb.shape == (2, 3, 4, 5)
    flat = rgb.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    centred = x - x.mean(0)
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    for c in range(3):
        reference = centred @ vh[c]
        assert abs(np.corrcoef(flat[:, c], reference)[0, 1]) > 0.9999, c   # the c-th component, up to sign
        assert flat[:, c].min() == pytest.approx(0.0, abs=1e-6) and flat[:, c].max() == pytest.approx(1.0)
        largest = np.argmax(np.abs(reference))
        assert flat[largest, c] == pytest.approx(1.0)              # its sign: the largest projection is positive


def test_fewer_than_three_feature_dimensions_leave_the_rest_black():
    rgb = pca_rgb(torch.randn(1, 3, 3, 2))
    assert rgb.shape == (1, 3, 3, 3) and torch.all(rgb[:, 2] == 0)


def test_a_cnn_method_is_refused():
    from tests.helpers.methods import build

    method, _ = build("simclr")
    with pytest.raises(TypeError, match="ViT"):
        PatchPCAImages().on_fit_start(None, method)


def test_cli_dinov2_run_writes_the_patch_pca_picture(tmp_path):
    main(["fit", "--config", "recipes/demo/dinov2.yaml", "--trainer.max_steps", "2", "--data.batch_size", "8",
          "--data.eval_batch_size", "8", "--data.num_workers", "0", "--trainer.default_root_dir", str(tmp_path),
          "--model.init_args.encoder.init_args.model_kwargs",
          '{"depth": 1, "embed_dim": 32, "num_heads": 2, "reg_tokens": 4}',
          "--trainer.callbacks",
          '[{"class_path": "selfsup.eval.pictures.PatchPCAImages", "init_args": {"num_images": 3}}]'])
    pngs = list(tmp_path.rglob("patch_pca/*.png"))
    assert [p.name for p in pngs] == ["epoch000-step000002.png"]
    with Image.open(pngs[0]) as png:
        assert png.size == (2 * (96 + 2) + 2, 3 * (96 + 2) + 2)   # image | PCA map, 32 px shown 3x, 3 rows
        pixels = np.asarray(png.convert("RGB"), dtype=np.float32)
    pca_tile = pixels[2:98, 100:196]
    assert pca_tile.std(axis=(0, 1)).min() > 1.0, "the map has structure in every colour channel"
