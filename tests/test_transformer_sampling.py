"""Hit transformer sampling: top-q, counter-based randomness, KV cache, END and the length cap,
bit-identical results for any batch split."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from uhg.config.transformer import TransformerConfig
from uhg.geometry import get_geometry
from uhg.models.transformer import HitTransformer
from uhg.models.transformer_sampling import (
    counter_uniform,
    draw_from_cdf,
    generate_tokens,
    sample_events,
    sample_top_q,
    top_q_cdf,
    top_q_mask,
)
from uhg.models.transformer_tokens import layout_for_geometry
from uhg.seeding import event_seed

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(geometry: str = "pxd-tiny", end_bias: float = 0.0, row0_bias: float = 0.0, **kw) -> HitTransformer:
    torch.manual_seed(1)
    cfg = TransformerConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 2, "latent_dim": 4, "conditions": ["luminosity"], **kw})
    model = HitTransformer(cfg, layout_for_geometry(get_geometry(geometry), n_energy_bins=16)).eval()
    with torch.no_grad():  # an untrained model ends a sequence with p ~ 1/17; make lengths varied
        model.row_head.bias[-1] += end_bias
        model.row_head.bias[0] += row0_bias
        if row0_bias:  # and the next column, so row 0 fills pixel by pixel
            model.col_head[2].bias -= 10.0 * torch.arange(model.layout.n_cols)
    return model


def _seeds(seed: int, first: int, n: int) -> list[int]:
    return [event_seed(seed, first + i, "generate") for i in range(n)]


def test_top_q_keeps_smallest_set_reaching_q():
    p = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15]])
    assert top_q_mask(p, 0.5).tolist() == [[False, True, False, True, False]]  # 0.4 + 0.3 >= 0.5
    assert top_q_mask(p, 0.7).tolist() == [[False, True, False, True, False]]  # exactly 0.7 reached
    assert top_q_mask(p, 0.71).tolist() == [[False, True, False, True, True]]
    assert top_q_mask(p, 0.01).tolist() == [[False, True, False, False, False]]  # the top token always
    assert top_q_mask(p, 1.0).all()
    rand = torch.softmax(torch.randn(50, 30), -1)
    for q in (0.3, 0.9):
        keep = top_q_mask(rand, q)
        mass = (rand * keep).sum(-1)
        smallest_kept = torch.where(keep, rand, torch.inf).min(-1).values
        assert bool((mass >= q - 1e-6).all())
        assert bool((mass - smallest_kept < q).all())  # dropping any kept token falls below q
        assert bool((torch.where(keep, 0.0, rand).max(-1).values <= smallest_kept).all())  # most probable kept


def test_sample_top_q_follows_renormalised_distribution():
    logits = torch.log(torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15]))[None].expand(10000, 5)
    u = (torch.arange(10000, dtype=torch.float64) + 0.5) / 10000  # a uniform grid: exact frequencies
    counts = torch.bincount(sample_top_q(logits, u, 1.0, 0.7), minlength=5).double() / 10000
    torch.testing.assert_close(counts, torch.tensor([0, 4 / 7, 0, 3 / 7, 0], dtype=torch.float64), atol=2e-4, rtol=0)
    counts = torch.bincount(sample_top_q(logits, u, 1.0, 1.0), minlength=5).double() / 10000
    torch.testing.assert_close(counts, torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15], dtype=torch.float64), atol=2e-4, rtol=0)
    # temperature sharpens; masked (-inf) tokens are never drawn
    sharp = torch.bincount(sample_top_q(logits, u, 0.5, 1.0), minlength=5).double() / 10000
    p2 = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15], dtype=torch.float64) ** 2
    torch.testing.assert_close(sharp, p2 / p2.sum(), atol=2e-4, rtol=0)
    masked = logits.clone()
    masked[:, 1] = -torch.inf
    assert not (sample_top_q(masked, u, 1.0, 0.9) == 1).any()


def test_draw_from_cdf_equals_the_full_search_at_the_top_of_the_cdf():
    """Redraws reuse one CDF and find the last token with mass only where u * total rounds to
    the total: every draw must equal the plain inverse-CDF search clamped to that token."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4000, 40, generator=gen, dtype=torch.float64) * 3
    logits[torch.rand(4000, 40, generator=gen) < 0.3] = -torch.inf  # masked tokens, masked tails too
    logits[::7, -5:] = -torch.inf
    logits[::11, 1:] = -torch.inf
    logits[:, 0] = 0.0  # every row has a token with mass
    u = torch.rand(4000, generator=gen, dtype=torch.float64)
    u[::3] = 1.0  # target = total, as when u * total rounds up to the total
    for q in (1.0, 0.8):
        probs, cdf = top_q_cdf(logits, 1.0, q)
        plain = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)
        last = 39 - torch.argmax((probs.flip(-1) > 0).to(torch.int8), -1)
        got = draw_from_cdf(probs, cdf, u)
        assert bool((plain == 40).any())  # the edge is exercised
        assert torch.equal(got, torch.minimum(plain, last))
        assert bool((probs.gather(1, got[:, None]) > 0).all())  # never a masked token
        sel = torch.arange(0, 4000, 2)
        assert torch.equal(draw_from_cdf(probs[sel], cdf[sel], u[sel]), got[sel])  # rows are independent


def test_counter_uniform_is_pure_and_uniform():
    keys = torch.tensor([event_seed(5, i, "generate") for i in range(2000)]).repeat_interleave(5)
    units = torch.arange(5).repeat(2000)
    a = counter_uniform(keys, units, 3, 1)
    assert torch.equal(a, counter_uniform(keys, units, 3, 1))
    assert torch.equal(a[7:9], counter_uniform(keys[7:9], units[7:9], 3, 1))
    assert not torch.equal(a, counter_uniform(keys, units, 4, 1))
    assert not torch.equal(a, counter_uniform(keys, units, 3, 2))
    assert float(a.min()) >= 0 and float(a.max()) < 1
    counts = np.bincount((a.numpy() * 20).astype(int), minlength=20)  # 500 expected per bin
    assert ((counts - 500) ** 2 / 500).sum() < 50  # chi2 with 19 dof: p ~ 1e-4 at 50
    assert len(torch.unique(a)) == len(a)


def test_kv_cache_equals_full_recomputation():
    model = _model()
    cond = torch.tensor([[-1.0], [0.5], [2.0]])
    seeds = _seeds(4, 0, 3)
    cached = generate_tokens(model, cond, seeds, top_q=0.9, max_hits=40)
    full = generate_tokens(model, cond, seeds, top_q=0.9, max_hits=40, use_cache=False)
    assert int(cached.lengths.sum()) > 40
    assert torch.equal(cached.lengths, full.lengths)
    for k in ("rows", "cols", "values"):
        assert torch.equal(getattr(cached, k), getattr(full, k))


def test_windowed_attention_cache_equals_recomputation_and_batch_split():
    """attention_window: the ring-buffer KV cache (start token + W most recent) samples exactly
    what recomputing the windowed prefix does, for any batch split; the window changes the
    samples of longer sequences (it is not a no-op)."""
    model = _model(end_bias=-2.0, attention_window=3)
    cond = torch.tensor([[-1.0], [0.5], [2.0]])
    seeds = _seeds(4, 0, 3)
    cached = generate_tokens(model, cond, seeds, top_q=0.9, max_hits=40)
    full = generate_tokens(model, cond, seeds, top_q=0.9, max_hits=40, use_cache=False)
    assert int(cached.lengths.max()) > 8  # far beyond the window
    for k in ("rows", "cols", "values", "lengths"):
        assert torch.equal(getattr(cached, k), getattr(full, k))
    lum = {"luminosity": np.geomspace(1e35, 1e36, 3)}
    whole = sample_events(model, cond, seeds, lum, top_q=0.95, batch_events=3, max_hits=40)
    split = sample_events(model, cond, seeds, lum, top_q=0.95, batch_events=1, max_hits=40)
    np.testing.assert_array_equal(split.offsets, whole.offsets)
    for k in whole.columns:
        np.testing.assert_array_equal(split.columns[k], whole.columns[k])
    unwindowed = _model(end_bias=-2.0)  # same weights (same seed), full attention
    other = generate_tokens(unwindowed, cond, seeds, top_q=0.9, max_hits=40)
    assert not torch.equal(other.rows, cached.rows)


def test_samples_are_sorted_unique_hits_on_the_grid():
    model = _model(end_bias=-2.0)
    batch = sample_events(model, torch.zeros(4, 1), _seeds(1, 0, 4), {"luminosity": np.full(4, 2e35)},
                          max_hits=200)
    assert batch.kind == "pixel" and len(batch) == 4 and batch.n_hits > 100
    again = batch.sorted()
    for k in batch.columns:
        np.testing.assert_array_equal(batch.columns[k], again.columns[k])
    key = batch.event_index() * 40 * 768 + batch.columns["sensor"].astype(np.int64) * 768 + \
        batch.columns["row"].astype(np.int64) * 48 + batch.columns["col"]
    assert len(np.unique(key)) == batch.n_hits
    assert batch.columns["row"].max() < 16 and batch.columns["col"].max() < 48
    assert batch.columns["value"].min() >= 7
    np.testing.assert_array_equal(batch.conditions["luminosity"], np.full(4, 2e35))


def test_end_token_and_length_cap(caplog):
    never_end = _model(end_bias=-40.0, row0_bias=40.0)  # walks along row 0 first: 48 pixels
    with caplog.at_level(logging.WARNING, logger="uhg.models.transformer"):
        g = generate_tokens(never_end, torch.zeros(2, 1), _seeds(0, 0, 2), max_hits=6)
    assert torch.equal(g.lengths, torch.full((80,), 6)) and g.n_capped == 80
    assert "80 of 80 sequences reached the cap of model.max_hits=6" in caplog.text
    # without a cap the grid itself ends a sequence: 16 x 48 pixels at most, far beyond training sizes
    free = generate_tokens(never_end, torch.zeros(1, 1), _seeds(0, 0, 1), max_hits=16 * 48)
    assert free.n_capped == 0 and int(free.lengths.min()) > 48
    always_end = _model(end_bias=40.0)
    caplog.clear()
    g = generate_tokens(always_end, torch.zeros(3, 1), _seeds(0, 0, 3), max_hits=6)
    assert int(g.lengths.sum()) == 0 and g.n_capped == 0 and "cap" not in caplog.text


def test_bit_identical_for_any_batch_split():
    model = _model(end_bias=-1.0)
    n, seed = 7, 11
    cond = torch.linspace(-1, 3, n)[:, None]
    lum = {"luminosity": np.geomspace(1e35, 1e36, n)}
    whole = sample_events(model, cond, _seeds(seed, 0, n), lum, top_q=0.95, batch_events=n, max_hits=64)
    assert whole.n_hits > 200
    for batch_events in (1, 3):
        split = sample_events(model, cond, _seeds(seed, 0, n), lum, top_q=0.95, batch_events=batch_events, max_hits=64)
        np.testing.assert_array_equal(split.offsets, whole.offsets)
        for k in whole.columns:
            np.testing.assert_array_equal(split.columns[k], whole.columns[k])
    # event 5 alone (a later part of the same run) is event 5 of the whole run
    alone = sample_events(model, cond[5:6], _seeds(seed, 5, 1), {"luminosity": lum["luminosity"][5:6]}, max_hits=64,
                          top_q=0.95)
    ev = whole.event(5)
    np.testing.assert_array_equal(alone.columns["row"], ev.row)
    np.testing.assert_array_equal(alone.columns["value"], ev.value)


def test_calorimeter_sampling():
    model = _model("ds1-photons", end_bias=-4.0, conditions=["incident_energy"])
    g = get_geometry("ds1-photons")
    batch = sample_events(model, torch.zeros(3, 1), _seeds(2, 0, 3), {"incident_energy": np.full(3, 5000.0)},
                          max_hits=300)
    assert batch.kind == "calo" and len(batch) == 3 and batch.n_hits > 10
    width = np.asarray(g.cells_per_layer)[batch.columns["layer"]]
    assert (batch.columns["cell"] < width).all()
    assert (batch.columns["value"] >= model.layout.energy_min_mev).all()
    assert (batch.columns["value"] <= model.layout.energy_max_mev).all()
    flat = g.layer_offsets[batch.columns["layer"]] + batch.columns["cell"]
    for i in range(3):
        seg = flat[batch.offsets[i]:batch.offsets[i + 1]]
        assert (np.diff(seg) > 0).all()
