"""Hit transformer: tokenisation, masking, loss, FLOP accounting, calorimeter variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uhg.config.transformer import TransformerConfig
from uhg.data.hits import HitBatch
from uhg.errors import GeometryError
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.transformer import HitTransformer, length_buckets, mean_attended
from uhg.models.transformer_tokens import (
    TokenBatch,
    decode_tokens,
    encode_hits,
    layout_for_geometry,
)
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sparse.torch_hits import TorchHits

SMALL = dict(d_model=32, n_layers=2, n_heads=2, latent_dim=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_events() -> HitBatch:
    return simulate_pxd_background(get_geometry("pxd-tiny"), 6, seed=3, luminosity=1e35, luminosity_max=3e35)


def _model(geometry: str = "pxd-tiny", **kw) -> HitTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(**{**SMALL, "conditions": ["luminosity"], **kw})
    return HitTransformer(cfg, layout_for_geometry(get_geometry(geometry), n_energy_bins=32))


def _cond(hits: TorchHits) -> torch.Tensor:
    norm = ConditionNorm.from_ranges({"luminosity": (1e35, 3e35)}, ["luminosity"])
    return norm(hits.conditions)


def test_encode_decode_round_trip(tiny_events):
    layout = layout_for_geometry(get_geometry("pxd-tiny"))
    tok = encode_hits(TorchHits.from_batch(tiny_events), layout)
    assert tok.rows.shape == (6 * 40, int(tok.lengths.max()) + 1)
    assert int(tok.lengths.sum()) == tiny_events.n_hits
    assert tok.n_tokens == tiny_events.n_hits + 6 * 40
    # decode takes hit tokens at positions 0..n-1 (drop the start slot)
    back = decode_tokens(tok.rows[:, 1:], tok.cols[:, 1:], tok.values[:, 1:], tok.lengths, layout, 6,
                         tiny_events.conditions)
    for k in ("sensor", "row", "col", "value"):
        np.testing.assert_array_equal(back.columns[k], tiny_events.columns[k])
    np.testing.assert_array_equal(back.offsets, tiny_events.offsets)


def test_encode_sorts_unsorted_hits(tiny_events):
    layout = layout_for_geometry(get_geometry("pxd-tiny"))
    perm = np.random.default_rng(0).permutation(tiny_events.offsets[1])  # shuffle the first event
    cols = {k: v.copy() for k, v in tiny_events.columns.items()}
    for k in cols:
        cols[k][: len(perm)] = tiny_events.columns[k][perm]
    shuffled = HitBatch("pixel", cols, tiny_events.offsets, tiny_events.conditions)
    a = encode_hits(TorchHits.from_batch(tiny_events), layout)
    b = encode_hits(TorchHits.from_batch(shuffled), layout)
    assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols) and torch.equal(a.values, b.values)


def test_hits_outside_grid_are_rejected():
    layout = layout_for_geometry(get_geometry("pxd-tiny"))
    bad = HitBatch("pixel", {"sensor": [0], "row": [16], "col": [0], "value": [9]}, [0, 1], {})
    with pytest.raises(GeometryError, match="outside"):
        encode_hits(TorchHits.from_batch(bad), layout)


def test_padding_does_not_change_loss_of_real_tokens(tiny_events):
    model = _model(latent_dim=0)
    hits = TorchHits.from_batch(tiny_events)
    tok, cond = encode_hits(hits, model.layout), _cond(hits)
    base = model.loss(tok, cond)
    # junk tokens in every padding position, and 7 more padding columns of junk
    L, pad = model.layout, 7
    S, T = tok.rows.shape
    is_pad = torch.arange(T + pad)[None] > tok.lengths[:, None]

    def junk(x: torch.Tensor, hi: int) -> torch.Tensor:
        x = torch.cat([x, torch.zeros(S, pad, dtype=x.dtype)], 1)
        return torch.where(is_pad, torch.randint(0, hi, x.shape), x)

    padded = TokenBatch(junk(tok.rows, L.n_rows), junk(tok.cols, L.n_cols), junk(tok.values, L.n_values),
                        tok.lengths, tok.event, tok.unit)
    for slack in (1.3, float("inf")):  # length buckets, or one bucket padded to the longest sequence
        other = model.loss(padded, cond, bucket_slack=slack)
        for k in ("loss", "nll", "nll_row", "nll_col", "nll_value"):
            torch.testing.assert_close(other[k], base[k], rtol=1e-5, atol=1e-5)


def test_length_buckets_partition_and_bound_padding():
    lengths = torch.tensor(np.random.default_rng(0).geometric(0.05, 500) - 1)
    groups = length_buckets(lengths, slack=1.3, min_rows=32)
    assert len(groups) > 2
    assert torch.equal(torch.sort(torch.cat(groups)).values, torch.arange(500))
    assert all(len(g) >= 32 for g in groups[:-1])
    real = int((lengths + 1).sum())
    padded = sum(len(g) * (int(lengths[g].max()) + 1) for g in groups)
    assert padded <= 1.5 * real < 500 * (int(lengths.max()) + 1) / 3  # one bucket would pad > 3x
    assert len(length_buckets(lengths, slack=float("inf"))) == 1


def test_invalid_continuations_are_masked():
    model = _model()
    h = torch.randn(3, model.config.d_model)
    prev_r, prev_c = torch.tensor([-1, 5, 15]), torch.tensor([-1, 47, 47])
    rows = model.row_logits(h, prev_r, prev_c)
    ok = torch.isfinite(rows)
    assert ok[0].all()  # before the first hit every row and END are allowed
    assert not ok[1, :6].any() and ok[1, 6:].all()  # row 5 is full after col 47
    assert not ok[2, :16].any() and ok[2, 16]  # after the last pixel only END remains
    cols = model.col_logits(h[:1], torch.tensor([5]), torch.tensor([5]), torch.tensor([10]))
    assert not torch.isfinite(cols[0, :11]).any() and torch.isfinite(cols[0, 11:]).all()


def test_loss_goes_down_on_simulated_events(tiny_events):
    model = _model()
    hits = TorchHits.from_batch(tiny_events)
    tok, cond = encode_hits(hits, model.layout), _cond(hits)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = model(tok.rows, tok.cols, tok.values, tok.lengths, cond)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = float(out["loss"].detach()) if first is None else first
    final = float(model.loss(tok, cond, sample_latent=False)["loss"])
    assert final < first - 1.0, (first, final)


def test_flops_per_token():
    model = _model(latent_dim=0)
    d, L = 32, model.layout
    per_block = 4 * d * d + 8 * d * d
    heads = d * (L.n_rows + 1) + d * d + d * L.n_cols + d * d + d * L.n_values
    expected = 3 * (2 * (2 * per_block + heads) + 4 * 2 * d * 10)
    assert model.flops_per_token(10) == expected
    assert model.flops_per_token(10, training=False) == expected / 3
    assert mean_attended(torch.tensor([0, 2])) == pytest.approx((1 + 6) / 4)
    # window 1: the start token and the token itself, 1 key for the first token of a sequence
    assert mean_attended(torch.tensor([0, 2]), window=1) == pytest.approx((1 + 1 + 2 + 2) / 4)


def test_attention_window_sees_start_token_and_recent_tokens_only():
    """With attention_window W each block sees the start token and the W most recent tokens, so
    after n_layers blocks token i depends on tokens i - n_layers (W - 1)..i and the start token
    only: changing an older token leaves it unchanged, a recent one does not."""
    model = _model(latent_dim=0, attention_window=2)
    S, T, d = 2, 8, 32
    torch.manual_seed(0)
    x = torch.randn(S, T, d)
    ctx = torch.randn(S, d)
    rows, cols = torch.randint(0, 16, (S, T)), torch.randint(0, 48, (S, T))
    with torch.no_grad():
        h = model.hidden(x, ctx, rows, cols)
        old = x.clone()
        old[:, 3] += torch.randn(S, d)  # token 3: reaches tokens 3..5 through 2 blocks of window 2
        h_old = model.hidden(old, ctx, rows, cols)
        start = x.clone()
        start[:, 0] += torch.randn(S, d)
        h_start = model.hidden(start, ctx, rows, cols)
    assert torch.equal(h_old[:, 6:], h[:, 6:]) and not torch.allclose(h_old[:, 5], h[:, 5])
    assert not torch.allclose(h_start[:, 7], h[:, 7])


def test_calorimeter_variant_shapes_and_loss():
    from uhg.sim.calo import simulate_calo_showers

    g = get_geometry("ds1-photons")
    showers = simulate_calo_showers(g, 3, seed=1, energy_min=1000.0, energy_max=4000.0)
    model = _model("ds1-photons", conditions=["incident_energy"])
    L = model.layout
    assert (L.n_units, L.n_rows, L.n_cols, L.n_values) == (1, g.n_layers, max(g.cells_per_layer), 32)
    hits = TorchHits.from_batch(showers)
    tok = encode_hits(hits, L)
    assert tok.rows.shape == (3, showers.hits_per_event.max() + 1)
    cond = ConditionNorm.from_ranges({"incident_energy": (1000.0, 4000.0)}, ["incident_energy"])(hits.conditions)
    out = model.loss(tok, cond)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    # value code: energies come back inside their log bin
    e = torch.tensor([0.02, 1.0, 250.0])
    back = L.decode_values(L.encode_values(e), torch.full((3,), 0.5))
    ratio = np.exp(np.log(L.energy_max_mev / L.energy_min_mev) / L.n_values)
    assert torch.all(back / e < ratio) and torch.all(e / back < ratio)


def test_digital_calorimeter_values_are_one():
    layout = layout_for_geometry(get_geometry("epical-mini"))
    assert layout.digital and layout.n_values == 1 and layout.n_cols == 4096
    assert torch.equal(layout.decode_values(torch.zeros(2, dtype=torch.long), torch.rand(2)), torch.ones(2))
    with pytest.raises(GeometryError, match="cells in a layer"):
        layout_for_geometry(get_geometry("epical"))
