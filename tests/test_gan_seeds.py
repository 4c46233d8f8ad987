"""Counted cluster seeds from candidate keys (`uhg.models.gan_seeds`) are those of the dense
Gumbel top-k over every pixel, whichever path (candidates, grown candidates, all keys) an image takes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uhg.models.gan_seeds import (
    SparseUniforms,
    counted_seed_index,
    gumbel_keys,
    place_counted_seeds,
)


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


def sparse(n_events: int, images_per_event: int, n_pix: int, seed: int) -> SparseUniforms:
    gens = [torch.Generator().manual_seed(seed + e) for e in range(n_events)]
    return SparseUniforms(gens, images_per_event, n_pix)


@pytest.mark.parametrize("spread", [0.05, 3.0, 12.0])
def test_sparse_uniforms_give_the_dense_draw_of_the_map_they_complete_to(spread: float) -> None:
    """Uniforms drawn only above each image's threshold (grown where the check fails, whole where all
    keys are needed): the seeds are the dense draw's on the map completed below the thresholds."""
    g = torch.Generator().manual_seed(2)
    n_img, n_pix = 24, 4096
    gate = -5.0 + spread * torch.randn(n_img, n_pix, generator=g)
    counts = torch.randint(0, 60, (n_img,), generator=g)
    counts[0], counts[1], counts[2] = 0, n_pix, n_pix // 3
    u = sparse(3, 8, n_pix, seed=10)
    got = counted_seed_index(counts, u, lambda r, p: gate[r, p], gate.amax(dim=1), lambda: gate).numpy()
    drawn = np.array([len(p) for p in u.pix])
    assert drawn[0] == 0 and drawn[1] == n_pix  # no seeds: nothing drawn; every pixel a seed: all
    if spread == 0.05:  # flat gates: the first candidates suffice, ~4x the seeds of each image
        assert drawn[3:].sum() < 6 * int(counts[3:].sum()) + 24 * 64
    full = u.images(np.arange(n_img))
    assert np.array_equal(got, dense_seeds(gate, counts, full))
    assert np.array_equal(np.bincount(got // n_pix, minlength=n_img), counts.numpy())


def test_sparse_uniforms_complete_to_independent_uniforms() -> None:
    """In law the dense map: thresholds raised in steps, then every pixel read, give uniform values,
    the pixels above each threshold a Bernoulli process (their share as its fraction)."""
    from scipy import stats

    n_img, n_pix = 16, 20_000
    u = sparse(2, 8, n_pix, seed=3)
    rows = np.arange(0, n_img, 2)
    for f in (0.001, 0.01, 0.08):
        row, pix, val = u.at_least(rows, np.full(len(rows), 1 - f, np.float32))
        share = np.bincount(row, minlength=len(rows)) / n_pix
        assert np.all(np.abs(share - f) < 5 * np.sqrt(f / n_pix) + 1e-9), (f, share)
        assert float(val.min()) >= 1 - f
        assert np.all(np.diff(pix[row == 0]) > 0)  # each image's pixels ascending, distinct
    full = u.images(np.arange(n_img)).numpy()
    assert stats.kstest(full.ravel(), "uniform").pvalue > 1e-3
    for r in (0, 1):  # grown in steps and drawn whole at once
        assert stats.kstest(full[r], "uniform").pvalue > 1e-3
    above = full[0] >= 0.9  # where the pixels above a threshold are: no preference along the image
    assert stats.kstest(np.flatnonzero(above) / n_pix, "uniform").pvalue > 1e-3


def test_sparse_uniforms_place_the_seeds_as_often_as_the_dense_map() -> None:
    """The same law as a dense uniform map: each pixel is a seed as often under both (600 draws of 8
    images of 768 pixels, counts 1-11, gates spread so that candidates grow and images are read whole)."""
    g = torch.Generator().manual_seed(0)
    n_img, n_pix, draws = 8, 768, 600
    gate = -5.0 + 3.0 * torch.randn(n_img, n_pix, generator=g)
    counts = torch.randint(1, 12, (n_img,), generator=g)
    counts[0] = 200  # beyond the candidate fractions: every key of the image

    def seeds(u) -> np.ndarray:
        return counted_seed_index(counts, u, lambda r, p: gate[r, p], gate.amax(dim=1), lambda: gate).numpy()

    dense, lazy = np.zeros(n_img * n_pix), np.zeros(n_img * n_pix)
    for i in range(draws):
        dense[seeds(torch.rand(n_img, n_pix, generator=g))] += 1
        lazy[seeds(sparse(1, n_img, n_pix, seed=1000 + i))] += 1
    p = (dense + lazy) / (2 * draws)
    often = (p > 0.02) & (p < 0.98)
    z = (lazy - dense)[often] / np.sqrt(2 * draws * p[often] * (1 - p[often]))
    assert often.sum() > 300
    assert abs(z.mean()) < 0.15 and (z**2).mean() < 1.25, (z.mean(), (z**2).mean())
