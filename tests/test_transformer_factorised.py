"""Factorised pixel head of the hit transformer (model.pixel_head: factorised): the cell of a pixel
in its layer is predicted as the pixel row, then the pixel column given the row, so the full
25 M-channel `epical` (layers of 1024 x 1024 pixels) trains and generates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uhg.config.loading import config_from_dict
from uhg.config.transformer import TransformerConfig
from uhg.errors import ConfigError, GeometryError
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.seeding import event_seed
from uhg.sim.calo import simulate_calo_showers
from uhg.sparse.torch_hits import TorchHits
from uhg.train.engine import PlainEngine
from uhg.train.family import build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = (1000.0, 2000.0)
NORM = ConditionNorm.from_ranges({"incident_energy": TRAIN}, ["incident_energy"])
BASE = dict(d_model=16, n_layers=1, n_heads=2, latent_dim=0, conditions=["incident_energy"], multiplicity="count",
            count_bootstrap=0, max_hits=4096, layer_counts=True, layer_split=True, count_law="unit_quadratic",
            cell_field=True, pixel_head="factorised")


def _model(geometry: str, **kw):
    family = build_family(get_geometry(geometry), TransformerConfig(**{**BASE, **kw}), NORM)
    torch.manual_seed(0)
    return family, family.build_modules()["model"]


# tokens: (layer, previous pixel's layer, previous pixel's flat cell, pixels of the layer still to place)
TOKENS = ([0, -1, -1, 40], [3, 2, 5000, 3], [5, 5, 300_000, 100], [7, 7, 1_048_000, 2], [10, 9, 20, 1_000_000])


def _all_cells(model, h, row, prev_row, prev_col, left) -> torch.Tensor:
    """(N, ny, nx) log p(cell) of every cell of the layer: row factor + column factor given each row."""
    ny, nx = model.grid
    N = len(h)
    lp_y = torch.log_softmax(model.pixel_row_logits(h, row, prev_row, prev_col, left), -1)
    rep = lambda t: t.repeat_interleave(ny, 0)  # noqa: E731
    y = torch.arange(ny).repeat(N)
    lp_x = torch.log_softmax(model.pixel_col_logits(rep(h), rep(row), rep(prev_row), rep(prev_col), rep(left), y), -1)
    return lp_y[..., None] + lp_x.view(N, ny, nx)


def test_factorised_log_probabilities_normalise_on_the_full_geometry():
    """Over the 1 M cells of a full-epical layer the probabilities of the next pixel sum to 1 (the
    field set to a non-trivial value), only cells after the previous pixel that leave room for the
    layer's remaining pixels are possible, and cell_log_prob is the same two factors."""
    _, model = _model("epical")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.field_head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    row, prev_row, prev_col, left = (torch.tensor(c) for c in zip(*TOKENS, strict=True))
    h = torch.randn(len(row), 16, generator=gen)
    n = model.layout.n_cols
    with torch.no_grad():
        lp = _all_cells(model, h, row, prev_row, prev_col, left).view(len(row), n)
        cells = torch.arange(n)
        first = torch.where(row == prev_row, prev_col + 1, 0)
        allowed = (cells >= first[:, None]) & (cells <= (n - left)[:, None])
        assert torch.equal(torch.isfinite(lp), allowed)
        np.testing.assert_allclose(torch.logsumexp(lp, -1).numpy(), 0.0, atol=1e-4)
        target = torch.stack([torch.multinomial(lp[i].exp(), 1, generator=gen)[0] for i in range(len(row))])
        direct = model.cell_log_prob(h, row, prev_row, prev_col, left, target)
        np.testing.assert_allclose(direct.numpy(), lp.gather(1, target[:, None])[:, 0].numpy(), atol=1e-5)


def test_factorised_field_is_the_first_success_law_of_the_tiles():
    """With the network's row and column heads at zero the factorised head is exactly the flat
    head's law: every cell fires on its own with probability sigmoid(l), l constant on a tile, and
    the next pixel is the first to fire in (row, column) order within the layer's open span."""
    _, model = _model("epical-mini", field_tile=4)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for head in (model.col_head[-1], model.x_head[-1]):
            head.weight.zero_()
            head.bias.zero_()
        for p in model.field_head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ny, nx = model.grid
    tokens = ([0, -1, -1, 40], [3, 2, 50, 3], [5, 5, 1000, 100], [7, 7, 4000, 2], [10, 10, 2047, 1])
    row, prev_row, prev_col, left = (torch.tensor(c) for c in zip(*tokens, strict=True))
    h = torch.randn(len(row), 16, generator=gen)
    with torch.no_grad():
        lp = _all_cells(model, h, row, prev_row, prev_col, left).view(len(row), ny * nx)
        ell = model.pixel_span(h, row, prev_row, prev_col, left).ell  # (N, ny / 4, nx / 4)
        first = torch.where(row == prev_row, prev_col + 1, 0)
        ell = ell.repeat_interleave(4, 1).repeat_interleave(4, 2).reshape(len(row), -1)
        c = torch.arange(ny * nx)
        open_ = (c >= first[:, None]) & (c <= (ny * nx - left)[:, None])
        off = torch.nn.functional.logsigmoid(-ell).masked_fill(c < first[:, None], 0.0)
        flat = torch.nn.functional.logsigmoid(ell) + torch.cumsum(off, -1) - off
        flat = torch.log_softmax(flat.masked_fill(~open_, float("-inf")), -1)
    assert torch.equal(torch.isfinite(lp), open_)
    np.testing.assert_allclose(lp[open_].numpy(), flat[open_].numpy(), rtol=1e-5, atol=2e-4)


@pytest.mark.slow
def test_tiny_full_geometry_model_trains_and_generates_valid_cells():
    """A tiny model on simulated full-epical showers: its teacher-forced loss falls in a few steps,
    and the showers it generates hold valid cells of the 24 x 1024 x 1024 geometry, sorted and
    unique within each layer, as many per layer as the count laws drew."""
    g = get_geometry("epical")
    family, model = _model("epical")
    train = simulate_calo_showers(g, 48, seed=21, energy_min=TRAIN[0], energy_max=TRAIN[1])
    family.initialise_from_data({"model": model}, [train])
    cfg = config_from_dict({"name": "x", "geometry": "epical", "data": {"store": "unused.zarr"},
                            "train": {"steps": 4, "batch_size": 6, "lr": 3e-3}, "model": {**BASE, "family": "transformer"}}, "test")
    engine = {"model": PlainEngine(model, family.build_optimizer("model", model, cfg.train), 1.0)}
    batch = TorchHits.from_batch(train.take(np.arange(6)))
    losses = [family.train_step(engine, batch, step)["loss"] for step in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    model.eval()
    e_inc = torch.tensor([1200.0, 1900.0, 4000.0])
    out = family.sample(model, {"incident_energy": e_inc}, [event_seed(3, i, "generate") for i in range(3)])
    layer, cell = out.columns["layer"].astype(np.int64), out.columns["cell"].astype(np.int64)
    assert len(cell) > 0 and (out.hits_per_event > 0).all()
    assert cell.min() >= 0 and cell.max() < 1024 * 1024 and layer.min() >= 0 and layer.max() < 24
    ev = np.repeat(np.arange(len(out)), out.hits_per_event)
    key = (ev * 24 + layer) * 1024 * 1024 + cell
    assert (np.diff(key) > 0).all()  # sorted by (shower, layer, cell) and unique
    assert (out.columns["value"] == 1).all()


def test_factorised_settings_are_checked():
    raw = {"name": "x", "geometry": "epical", "data": {"store": "unused.zarr"}, "train": {"steps": 1, "batch_size": 2},
           "model": {**BASE, "family": "transformer", "pixel_head": "factorised", "layer_counts": False, "layer_split": False,
                     "cell_field": False}}
    with pytest.raises(ConfigError, match="layer_counts"):
        config_from_dict(raw, "test")
    with pytest.raises(ConfigError, match="pixel grid"):
        _model("ds2")
    with pytest.raises(ConfigError, match="field_tile"):
        _model("epical", field_tile=48)
    with pytest.raises(GeometryError, match="factorised"):
        _model("epical", pixel_head="flat", cell_field=False)


def test_factorised_showers_do_not_depend_on_the_batch_split():
    """A shower generated with the factorised head is a function of its seed and conditions: the
    same cells whether it is sampled alone or beside others."""
    family, model = _model("epical-mini", field_tile=4)
    train = simulate_calo_showers(get_geometry("epical-mini"), 24, seed=22, energy_min=TRAIN[0], energy_max=TRAIN[1])
    family.initialise_from_data({"model": model}, [train])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.field_head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    model.eval()
    e_inc = torch.tensor([1100.0, 1500.0, 1900.0])
    seeds = [event_seed(4, i, "generate") for i in range(3)]
    together = family.sample(model, {"incident_energy": e_inc}, seeds)
    parts = [family.sample(model, {"incident_energy": e_inc[s]}, seeds[s]) for s in (slice(0, 1), slice(1, 3))]
    assert together.hits_per_event.sum() > 0
    np.testing.assert_array_equal(together.hits_per_event, np.concatenate([p.hits_per_event for p in parts]))
    for name in ("layer", "cell", "value"):
        np.testing.assert_array_equal(together.columns[name], np.concatenate([p.columns[name] for p in parts]))
