"""Masking, patchify and position embeddings, checked against explicit loops and NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfsup.models.masking import (block_mask, normalized_patch_targets, patchify, random_token_mask,
                                    sincos_position_embedding, unpatchify)


def test_random_mask_keeps_exact_count_per_sample():
    mask = random_token_mask(32, 64, 0.75)
    assert mask.keep.shape == (32, 16)
    assert (mask.mask.sum(1) == 48).all()
    for row in range(32):  # kept indices are distinct and are exactly the unmasked positions
        kept = set(mask.keep[row].tolist())
        assert len(kept) == 16
        assert kept == set(torch.nonzero(mask.mask[row] == 0).flatten().tolist())


def test_random_mask_differs_between_samples_and_is_reproducible_under_a_seed():
    mask = random_token_mask(8, 64, 0.75, generator=torch.Generator().manual_seed(3))
    assert len({tuple(row.tolist()) for row in mask.mask}) == 8
    again = random_token_mask(8, 64, 0.75, generator=torch.Generator().manual_seed(3))
    other = random_token_mask(8, 64, 0.75, generator=torch.Generator().manual_seed(4))
    assert torch.equal(mask.keep, again.keep) and torch.equal(mask.mask, again.mask)
    assert not torch.equal(mask.mask, other.mask)


def test_restore_inverts_keep():
    batch, tokens = 4, 16
    mask = random_token_mask(batch, tokens, 0.6)
    ids = torch.arange(tokens).repeat(batch, 1)
    kept = ids.gather(1, mask.keep)
    filler = torch.full((batch, tokens - kept.shape[1]), -1)
    restored = torch.cat([kept, filler], dim=1).gather(1, mask.restore)
    assert torch.equal(restored == -1, mask.mask.bool())          # masked positions get the fillers
    assert torch.equal(restored[restored >= 0], ids[restored >= 0])  # kept tokens return to their place


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval_is_an_error(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_token_mask(2, 16, ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        block_mask(2, 4, ratio, scale=2)


def test_patchify_matches_explicit_loop_and_unpatchify_inverts_it():
    images = torch.randn(2, 3, 8, 8)
    patches = patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    for b in range(2):
        for index in range(4):
            i, j = divmod(index, 2)
            block = images[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].permute(1, 2, 0).reshape(-1)  # (p q c)
            assert torch.equal(patches[b, index], block)
    assert torch.equal(unpatchify(patches, 4, 3), images)


def test_normalized_patch_targets_match_numpy():
    patches = torch.randn(3, 5, 12, dtype=torch.float64) * 3 + 1
    reference = patches.numpy()
    reference = (reference - reference.mean(-1, keepdims=True)) / np.sqrt(reference.var(-1, ddof=1, keepdims=True)
                                                                          + 1e-6)
    np.testing.assert_allclose(normalized_patch_targets(patches).numpy(), reference, rtol=1e-10)


def test_block_mask_ratio_and_upsampling():
    grid, scale, ratio = 4, 2, 0.6
    mask = block_mask(16, grid, ratio, scale)
    assert mask.shape == (16, 8, 8)
    coarse = mask[:, ::scale, ::scale]
    assert (coarse.sum((1, 2)) == math.ceil(ratio * grid * grid)).all()
    # every coarse cell is a constant scale x scale block of the patch grid
    blocks = mask.reshape(16, grid, scale, grid, scale)
    assert torch.equal(blocks, coarse[:, :, None, :, None].expand_as(blocks))
    assert len({tuple(m.flatten().tolist()) for m in mask}) > 1


def _sincos_reference(dim: int, grid: int) -> np.ndarray:
    """MAE's formulation, token by token: first half encodes the column, second half the row."""
    table = np.zeros((grid * grid, dim))
    quarter = dim // 4
    for row in range(grid):
        for col in range(grid):
            for half, position in enumerate((col, row)):
                for i in range(quarter):
                    omega = 1.0 / 10000 ** (i / quarter)
                    table[row * grid + col, half * dim // 2 + i] = math.sin(position * omega)
                    table[row * grid + col, half * dim // 2 + quarter + i] = math.cos(position * omega)
    return table


def test_sincos_position_embedding_matches_reference():
    table = sincos_position_embedding(16, 3, num_prefix_tokens=1)
    assert table.shape == (10, 16)
    assert torch.equal(table[0], torch.zeros(16))
    np.testing.assert_allclose(table[1:].numpy(), _sincos_reference(16, 3), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(18, 3)
