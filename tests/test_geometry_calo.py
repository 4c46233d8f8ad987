"""Calorimeter geometries: CaloChallenge voxel counts and order, cell indexing, EPICAL pixel grid."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from uhg.errors import GeometryError
from uhg.geometry import get_geometry
from uhg.geometry.calo import CALO_VARIANTS, calo_geometry


@pytest.mark.parametrize(("name", "voxels", "layers"), [
    ("ds1-photons", 368, 24), ("ds1-pions", 533, 24), ("ds2", 6480, 45), ("ds3", 40500, 45),
])
def test_calochallenge_voxel_counts(name, voxels, layers):
    g = get_geometry(name)
    assert g.kind == "calo"
    assert g.n_cells == voxels
    assert g.n_layers == layers
    assert g.layer_offsets.dtype == np.int64
    assert g.layer_offsets.shape == (layers + 1,)
    assert g.layer_offsets[0] == 0 and g.layer_offsets[-1] == voxels
    assert np.array_equal(np.diff(g.layer_offsets), g.cells_per_layer)


def test_ds2_ds3_layer_structure():
    assert get_geometry("ds2").layer_shape(0) == (16, 9)
    assert get_geometry("ds3").layer_shape(44) == (50, 18)
    ds1 = get_geometry("ds1-photons")
    assert ds1.active_layers == (0, 1, 2, 3, 12)
    assert ds1.cells_per_layer[4] == 0
    assert ds1.layer_shape(1) == (10, 16)


def test_epical_channels():
    full, mini = get_geometry("epical"), get_geometry("epical-mini")
    assert full.n_cells == 24 * 1024 * 1024 >= 10_000_000
    assert full.readout == "digital"
    assert math.isclose(full.pitch_x_mm, 0.02924) and math.isclose(full.pitch_y_mm, 0.02688)
    assert mini.n_cells == 24 * 64 * 64
    # same physical size, coarser pixels
    assert math.isclose(mini.nx * mini.pitch_x_mm, full.nx * full.pitch_x_mm)
    assert math.isclose(mini.ny * mini.pitch_y_mm, full.ny * full.pitch_y_mm)


def _calochallenge_centres(g):
    """Voxel centres enumerated like the CaloChallenge XMLHandler: layer, then alpha, then radius."""
    rows = []
    for layer in range(g.n_layers):
        edges = g.r_edges_mm[layer]
        n_r, n_a = len(edges) - 1, g.n_alpha[layer]
        if n_r == 0:
            continue
        alpha_edges = np.linspace(-math.pi, math.pi, n_a + 1)
        for j in range(n_a):
            a = 0.5 * (alpha_edges[j] + alpha_edges[j + 1])
            for i in range(n_r):
                r = 0.5 * (edges[i] + edges[i + 1])
                rows.append((layer, r * math.cos(a), r * math.sin(a)))
    return np.array(rows)


@pytest.mark.parametrize("name", ["ds1-photons", "ds1-pions", "ds2", "ds3"])
def test_voxel_order_matches_calochallenge(name):
    g = get_geometry(name)
    centres = _calochallenge_centres(g)
    assert len(centres) == g.n_cells
    layer = centres[:, 0].astype(np.int64)
    cell = g.cell_index(layer, centres[:, 1], centres[:, 2])
    assert np.all(cell >= 0)
    assert np.array_equal(g.layer_offsets[layer] + cell, np.arange(g.n_cells))
    # cell_centers gives the same centres in the same order
    for lay in g.active_layers:
        x, y = g.cell_centers(lay)
        sel = layer == lay
        np.testing.assert_allclose(x, centres[sel, 1], atol=1e-9)
        np.testing.assert_allclose(y, centres[sel, 2], atol=1e-9)


def test_known_points_land_in_known_voxels():
    ds2 = get_geometry("ds2")  # 16 alpha x 9 radial bins of 4.65 mm
    # r = 7 mm -> radial bin 1; alpha = +0.1 rad -> bin floor((0.1 + pi) / (2 pi / 16)) = 8
    x, y = 7 * math.cos(0.1), 7 * math.sin(0.1)
    assert ds2.cell_index(10, x, y) == 8 * 9 + 1
    # alpha just above -pi is alpha bin 0, just below +pi the last one
    assert ds2.cell_index(3, -20.0, -1e-6) == 0 * 9 + 4
    assert ds2.cell_index(3, -20.0, 1e-6) == 15 * 9 + 4
    # beyond the last radial edge (41.85 mm): outside
    assert ds2.cell_index(0, 41.9, 0.0) == -1
    ds1 = get_geometry("ds1-photons")
    # layer 1: 10 alpha x 16 radial bins, edges 0,2,4,...; r = 3 mm -> bin 1; alpha 0.1 -> bin 5
    assert ds1.cell_index(1, 3 * math.cos(0.1), 3 * math.sin(0.1)) == 5 * 16 + 1
    # layer 0 has one alpha bin: every direction maps to the same radial bin (edges 0,5,10,30,...)
    assert ds1.cell_index(0, np.array([20.0, -20.0, 0.0]), np.array([0.0, 0.0, -20.0])).tolist() == [2, 2, 2]
    # layers without voxels never hold a cell
    assert ds1.cell_index(5, 1.0, 1.0) == -1
    # vectorised over layers
    out = ds2.cell_index(np.array([0, 44, 45, -1]), np.array([1.0, 1.0, 1.0, 1.0]), np.zeros(4))
    assert out.tolist() == [8 * 9 + 0, 8 * 9 + 0, -1, -1]


def test_epical_pixel_indexing():
    g = get_geometry("epical-mini")
    x, y = g.cell_centers(7)
    assert x.shape == (64 * 64,)
    assert np.array_equal(g.cell_index(7, x, y), np.arange(64 * 64))
    # cell = row * nx + col, row along y: the pixel just above-right of the centre
    eps = 1e-6
    assert g.cell_index(0, eps, eps) == 32 * 64 + 32
    assert g.cell_index(0, -eps, -eps) == 31 * 64 + 31
    half_x = g.nx * g.pitch_x_mm / 2
    assert g.cell_index(0, half_x + eps, 0.0) == -1
    full = get_geometry("epical")
    assert full.cell_index(23, 0.5 * full.pitch_x_mm + eps, eps) == 512 * 1024 + 512


def test_material_constants_are_physical():
    ds2 = get_geometry("ds2")
    # 2 x (1.4 mm W + 0.3 mm Si) per readout layer: ~0.8 X0, 45 layers ~ 36 X0
    assert 0.78 < ds2.layer_depth_x0[0][1] < 0.83
    assert 35 < ds2.layer_depth_x0[-1][1] < 37.5
    assert 9.3 < ds2.moliere_radius_mm < 11.5  # W: 9.33 mm, diluted by Si
    assert 7.5 < ds2.critical_energy_mev < 9.0
    assert 0.01 < ds2.sampling_fraction < 0.04
    assert 0.14 < ds2.stochastic_term < 0.20
    assert ds2.threshold_mev == pytest.approx(15.15e-3)
    assert get_geometry("ds3").threshold_mev == pytest.approx(15.15e-3)
    assert get_geometry("ds1-photons").particle == "photon"


def test_to_dict_is_json_and_names_resolve():
    for name in CALO_VARIANTS:
        g = calo_geometry(name)
        d = json.loads(json.dumps(g.to_dict()))
        assert d["name"] == name and d["kind"] == "calo" and d["n_cells"] == g.n_cells
        assert get_geometry(name) is g
    with pytest.raises(GeometryError, match="ds2"):
        get_geometry("ds4")
    with pytest.raises(GeometryError):
        calo_geometry("nope")
