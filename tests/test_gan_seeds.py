"""Counted cluster seeds from candidate keys (`uhg.models.gan_seeds`) are those of the dense
Gumbel top-k over every pixel, whichever path (candidates, grown candidates, all keys) an image takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uhg.models.gan_seeds import counted_seed_index, gumbel_keys, place_counted_seeds


def dense_seeds(gate: torch.Tensor, counts: torch.Tensor, uniforms: torch.Tensor) -> np.ndarray:
    """The draw over all keys: each image's counts[r] largest, as flat indices, ascending."""
    keys = gumbel_keys(gate, uniforms)
    top = keys.topk(int(counts.max()), dim=1, sorted=True).indices
    return np.sort(np.concatenate([r * gate.shape[1] + top[r, : int(c)].numpy() for r, c in enumerate(counts)]))


def draw(gate: torch.Tensor, counts: torch.Tensor, uniforms: torch.Tensor, rank_all: bool = False) -> np.ndarray:
    return counted_seed_index(counts, uniforms, lambda r, p: gate[r, p], gate.amax(dim=1), lambda: gate,
                              rank_all=rank_all).numpy()


@pytest.mark.parametrize("spread", [0.05, 3.0, 12.0])  # flat gates (candidates suffice) to steep ones (more, or all keys)
def test_candidate_keys_give_the_dense_draw(spread: float) -> None:
    g = torch.Generator().manual_seed(0)
    n_img, n_pix = 24, 4096
    gate = -5.0 + spread * torch.randn(n_img, n_pix, generator=g)
    uniforms = torch.rand(n_img, n_pix, generator=g)
    counts = torch.randint(0, 60, (n_img,), generator=g)
    counts[0], counts[1], counts[2] = 0, n_pix, n_pix // 3  # none, every pixel, beyond the candidate fractions
    got = draw(gate, counts, uniforms)
    assert np.array_equal(got, dense_seeds(gate, counts, uniforms))
    assert np.array_equal(draw(gate, counts, uniforms, rank_all=True), got)  # the path a GPU takes
    assert np.array_equal(np.bincount(got // n_pix, minlength=n_img), counts.numpy())


def test_tied_keys_fall_back_to_the_dense_draw() -> None:
    """Equal keys at the cut: the candidates cannot tell which the dense top-k keeps, all keys are computed."""
    gate = torch.full((3, 512), -4.0)
    uniforms = torch.full((3, 512), 0.999)
    counts = torch.tensor([5, 1, 17])
    assert np.array_equal(draw(gate, counts, uniforms), dense_seeds(gate, counts, uniforms))


def test_place_counted_seeds_marks_the_drawn_pixels() -> None:
    g = torch.Generator().manual_seed(1)
    gate = torch.randn(2, 3, 8, 64, generator=g) - 4.0
    uniforms = torch.rand(2, 3, 8, 64, generator=g)
    counts = torch.tensor([[3, 0, 9], [1, 40, 2]])
    mask = place_counted_seeds(gate, counts, uniforms)
    assert torch.equal(mask.sum(dim=(2, 3)), counts)
    expected = dense_seeds(gate.reshape(6, -1), counts.reshape(-1), uniforms.reshape(6, -1))
    assert np.array_equal(np.flatnonzero(mask.numpy()), expected)
