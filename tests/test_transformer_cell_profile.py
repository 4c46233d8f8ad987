"""Fired-cell profile of the digital pixel calorimeter (model.cell_profile): cell_field starts from the
law of the smallest of a layer's pixels still to place drawn from the layer's profile fitted to the
training showers, not from an even spacing over the cells left."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from epical_small import GEOMETRY, epical_model, epical_run_config, epical_sample, epical_showers

from uhg.config.loading import config_from_dict
from uhg.errors import ConfigError
from uhg.models.transformer import fit_cell_profile

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = dict(cell_field=True, cell_neighbours=True)  # on top of epical_small.LAYER_LAWS
# the factorised head on epical-mini: tiles of 4 x 4 pixels (16 x 16 tiles per layer); it has no cell_neighbours
FACTORISED = dict(cell_neighbours=False, pixel_head="factorised", field_tile=4)


def _model(**kw):
    return epical_model(**{**BASE, **kw})


def _zero_heads(model):
    """The network's own cell logits at zero: what is left is the field's law (the pixel-row head is
    col_head with pixel_head=factorised, x_head its column head)."""
    with torch.no_grad():
        for head in (model.col_head, getattr(model, "x_head", None)):
            if head is not None:
                last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
                last.weight.zero_()
                last.bias.zero_()


def test_with_a_zero_field_the_next_cell_is_the_smallest_of_the_remaining_draws_from_the_profile():
    """The field's law of the next cell with the field at zero is that of the smallest of N independent
    draws from the layer's profile restricted to the cells from `first` on: (S_c^N - S_{c+1}^N) / S_first^N."""
    family, model = _model(cell_profile=True)
    family.initialise_from_data({"model": model}, [epical_showers(100, seed=5)])
    row, first, n = torch.tensor([2, 6, 6, 0]), torch.tensor([0, 0, 1900, 2000]), torch.tensor([1, 30, 7, 2])
    width = torch.full_like(row, GEOMETRY.nx * GEOMETRY.ny)
    with torch.no_grad():
        law = model._field_logits(torch.zeros(4, 32), row, first, width, n).double().exp()
        q = torch.softmax(model.cell_profile.double() @ model.cell_basis.double().T, -1)[row]
    c = torch.arange(q.shape[1])
    q = q * (c[None] >= first[:, None])
    tail = q.flip(-1).cumsum(-1).flip(-1)  # S_c over the cells from first on (S_first = 1 after division)
    tail = tail / tail[torch.arange(4), first][:, None]
    after = torch.cat([tail[:, 1:], tail.new_zeros(4, 1)], 1)
    expected = tail ** n[:, None] - after ** n[:, None]
    # away from the hazard's clamps (the cells where it is below 1e-6 or above 0.999)
    hazard = 1 - (after / tail.clamp_min(1e-300)) ** n[:, None]
    free = (c[None] >= first[:, None]) & (hazard > 1e-5) & (hazard < 0.99)
    assert free.sum() > 1000
    # float32 sums and the 1e-6 floor of the cells skipped before: 0.5 % at most
    assert torch.allclose(law[free], expected[free], rtol=1e-2, atol=1e-9)
    assert float(expected[free].sum()) > 3.0  # the comparison covers nearly all of each law's mass


def test_the_fitted_profile_follows_the_data_and_paces_the_remaining_pixels():
    """The profile fitted to simulated showers puts each layer's mass where their pixels fired (core
    rows and columns, mean row at the data's) and leaves every cell a chance."""
    family, model = _model(cell_profile=True)
    showers = epical_showers(300, seed=4)
    out = family.initialise_from_data({"model": model}, [showers])
    assert np.isfinite(out["law_cell_profile_nll"])
    assert model.cell_profile.abs().sum() > 0
    layer, cell = showers.columns["layer"].astype(np.int64), showers.columns["cell"].astype(np.int64)
    nx = GEOMETRY.nx
    with torch.no_grad():
        q = torch.softmax(model.cell_profile @ model.cell_basis.T, -1).double().numpy()
    rows = np.arange(GEOMETRY.nx * GEOMETRY.ny) // nx
    for lay in (1, 6, 12):
        data_row = (cell[layer == lay] // nx).mean()
        assert abs((q[lay] * rows).sum() - data_row) < 0.5, (lay, (q[lay] * rows).sum(), data_row)
        core = (np.abs(rows - 31.5) < 4) & (np.abs(np.arange(len(rows)) % nx - 31.5) < 4)
        assert q[lay][core].sum() > 10 * core.mean(), lay  # far above the uniform share of the core
        # the profile is not the counts themselves: a cell no shower fired still has a chance
        assert q[lay].min() > 0
def test_factorised_head_with_a_zero_network_is_the_law_of_the_smallest_draw_from_the_tile_profile():
    """pixel_head=factorised: with the network's row and column heads at zero and a zero field, the
    pixel row times the column given the row is, cell by cell, the law of the smallest of the layer's N
    pixels still to place drawn from its profile (constant on the field's tiles) over the cells from
    `first` on: (S_c^N - S_{c+1}^N) / S_first^N, cut where the rest of the layer's pixels must fit."""
    family, model = _model(cell_profile=True, **FACTORISED)
    family.initialise_from_data({"model": model}, [epical_showers(100, seed=5)])
    _zero_heads(model)
    ny, nx = model.grid
    # (layer, previous pixel's layer, previous pixel's cell, pixels of the layer left): a layer's first
    # pixel, one after a pixel mid-row (the first open row cut), one in the core, one near the end
    row, prev_row = torch.tensor([2, 6, 6, 0]), torch.tensor([-1, 6, 6, 0])
    prev_col, n = torch.tensor([-1, 100, 1900, 4000]), torch.tensor([1, 30, 7, 2])
    N = len(row)
    rep = lambda t: t.repeat_interleave(ny, 0)  # noqa: E731
    with torch.no_grad():
        lp_y = torch.log_softmax(model.pixel_row_logits(torch.zeros(N, 32), row, prev_row, prev_col, n), -1)
        lp_x = torch.log_softmax(model.pixel_col_logits(torch.zeros(N * ny, 32), rep(row), rep(prev_row),
                                                        rep(prev_col), rep(n), torch.arange(ny).repeat(N)), -1)
        law = (lp_y[..., None] + lp_x.view(N, ny, nx)).view(N, -1).double().exp()
        tiles = torch.softmax(model.cell_profile.double() @ model.cell_basis.double().T, -1)[row]
    c = torch.arange(ny * nx)
    first = torch.where(row == prev_row, prev_col + 1, 0)
    q = tiles[:, model.basis_unit(c)] * (c[None] >= first[:, None])  # a pixel: its tile's mass
    tail = q.flip(-1).cumsum(-1).flip(-1)
    tail = tail / tail[torch.arange(N), first][:, None]
    after = torch.cat([tail[:, 1:], tail.new_zeros(N, 1)], 1)
    open_ = (c[None] >= first[:, None]) & (c[None] <= ny * nx - n[:, None])
    expected = (tail ** n[:, None] - after ** n[:, None]) * open_
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.equal(law > 0, open_)
    assert torch.allclose(law, expected, rtol=1e-3, atol=1e-6), (law - expected).abs().max()
    # the even pacing's law is far from it: the test measures the profile, not the pacing
    family, even = _model(**FACTORISED)
    family.initialise_from_data({"model": even}, [epical_showers(100, seed=5)])
    _zero_heads(even)
    with torch.no_grad():
        lp_even = torch.log_softmax(even.pixel_row_logits(torch.zeros(N, 32), row, prev_row, prev_col, n), -1)
    # (the last token, with two pixel rows open, is nearly the same under both)
    assert (lp_even.exp() - lp_y.exp()).abs().sum(-1)[:3].min() > 0.5


@pytest.mark.parametrize("head", [{}, FACTORISED], ids=["flat", "factorised"])
def test_generation_with_a_zero_network_draws_each_layer_from_its_profile(head):
    """With every learned logit at zero, generation places a layer's pixels as draws from its fitted
    profile: as concentrated in the core as the training showers and centred where they are, while
    the even pacing spreads them over the layer. With the factorised head the profile is constant on
    tiles of 4 x 4 pixels, so the core is measured on the central 16 x 16 pixels (4 x 4 whole tiles)."""
    showers = epical_showers(200, seed=6)
    layer, cell = showers.columns["layer"].astype(np.int64), showers.columns["cell"].astype(np.int64)
    nx = GEOMETRY.nx

    def core_share(lay, cells):
        r, c = cells // nx, cells % nx
        half = 8 if head else 6
        return float(((np.abs(r - 31.5) < half) & (np.abs(c - 31.5) < half)).mean())

    out = {}
    for key in (False, True):
        family, model = _model(cell_profile=key, **head)
        family.initialise_from_data({"model": model}, [showers])
        _zero_heads(model)
        model.eval()
        out[key] = epical_sample(model, 8000.0, 20, seed=5)
    np.testing.assert_array_equal(out[True].hits_per_event, out[False].hits_per_event)  # the same laws
    data = core_share(3, cell[layer == 3])
    for key, batch in out.items():
        cells = batch.columns["cell"][batch.columns["layer"] == 3].astype(np.int64)
        share = core_share(3, cells)
        if key:
            assert abs(share - data) < 0.1, (share, data)
            assert abs((cells // nx).mean() - (cell[layer == 3] // nx).mean()) < 1.0
        else:
            assert share < data / 3, (share, data)


def test_fit_cell_profile_recovers_a_profile_on_its_basis():
    """Counts drawn from a profile on the basis give back its coefficients (up to the softmax's constant);
    a layer without pixels keeps the uniform profile."""
    _, model = _model(cell_profile=True)
    basis = model.cell_basis
    truth = torch.zeros(2, basis.shape[1])
    truth[0, :4] = torch.tensor([3.0, 2.0, 1.0, 0.5])
    truth[0, -1] = 1.5  # a slope along y
    q = torch.softmax(truth @ basis.T, -1)
    counts = torch.zeros(2, basis.shape[0], dtype=torch.float64)
    counts[0] = torch.as_tensor(np.random.default_rng(0).multinomial(200_000, q[0].double().numpy()))
    a, nll = fit_cell_profile(counts, basis)
    fitted = torch.softmax(a @ basis.T, -1)
    assert torch.allclose(fitted[0], q[0], atol=2e-4), (fitted[0] - q[0]).abs().max()
    assert torch.equal(a[1], torch.zeros_like(a[1])) and np.isfinite(nll)


def test_cell_profile_settings_are_checked():
    raw = epical_run_config(layer_counts=True, cell_profile=True)
    with pytest.raises(ConfigError, match="cell_profile.*cell_field: true"):
        config_from_dict(raw)
    for head in ("flat", "factorised"):  # either pixel head carries the profile
        raw["model"] |= {"cell_field": True, "pixel_head": head}
        assert config_from_dict(raw).model.cell_profile
