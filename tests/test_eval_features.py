"""PXD and calorimeter features on hand-made events with known answers."""

import numpy as np
import pytest

from uhg.data.hits import CaloEvent, HitBatch, PixelEvent
from uhg.errors import ConditionError, GeometryError
from uhg.eval.features_calo import calo_features, cell_xy, high_level_names
from uhg.eval.features_pxd import (
    clusters_per_image,
    hit_positions,
    per_image,
    pixel_clusters,
    pxd_features,
)
from uhg.geometry import get_geometry

PXD = get_geometry("pxd-tiny")  # 40 sensors x 16 x 48 pixels


def pixel_event(hits, lum=1e35):
    """hits: list of (sensor, row, col, adc)."""
    s, r, c, v = (np.array(x) for x in zip(*hits, strict=True)) if hits else ([], [], [], [])
    return PixelEvent(np.asarray(s), np.asarray(r), np.asarray(c), np.asarray(v), {"luminosity": lum})


def batch_of(*events):
    return HitBatch.from_events("pixel", events).sorted()


def test_clusters_of_known_shapes_use_8_connectivity_within_one_sensor_image():
    ev0 = pixel_event([
        (0, 0, 0, 10), (0, 0, 1, 20), (0, 1, 2, 30),  # L-shape touching diagonally: one cluster of 3
        (0, 5, 5, 40), (0, 5, 7, 50),                  # a gap of one column: two clusters
        (0, 10, 47, 60), (0, 11, 0, 70),               # adjacent in memory order, not on the sensor
        (1, 0, 0, 80),                                 # same pixel as above, other sensor
    ])
    ev1 = pixel_event([(0, 0, 0, 9), (0, 1, 1, 11), (0, 2, 2, 13), (0, 3, 3, 15)])  # diagonal line, other event
    b = batch_of(ev0, ev1)
    labels, n = pixel_clusters(b, PXD)
    assert n == 7
    fs = pxd_features(b, PXD)
    sizes = fs.distributions["cluster_size"]
    charges = fs.distributions["cluster_charge"]
    got = sorted(zip(sizes.event.tolist(), sizes.values.tolist(), charges.values.tolist(), strict=True))
    assert got == [(0, 1, 40), (0, 1, 50), (0, 1, 60), (0, 1, 70), (0, 1, 80), (0, 3, 60), (1, 4, 48)]
    assert fs.distributions["clusters_per_event"].values.tolist() == [6, 1]
    # per (event, sensor) image: hits, clusters and summed charge
    hits, clusters, charge = per_image(b, PXD), clusters_per_image(b, PXD), per_image(b, PXD, "value")
    assert hits.shape == clusters.shape == (2, PXD.n_sensors)
    assert (hits[0, :2].tolist(), hits[1, :2].tolist(), hits.sum()) == ([7, 1], [4, 0], 12)
    assert (clusters[0, :2].tolist(), clusters[1, :2].tolist(), clusters.sum()) == ([5, 1], [1, 0], 7)
    assert (charge[0, :2].tolist(), charge[1, 0]) == ([280, 80], 48)


def test_occupancy_per_sensor_layer_and_image():
    pixels = PXD.pixels_per_sensor
    ev0 = pixel_event([(0, r, 0, 20) for r in range(8)] + [(20, 0, c, 30) for c in range(4)])
    ev1 = pixel_event([(39, 3, 3, 7)])
    fs = pxd_features(batch_of(ev0, ev1), PXD)
    occ = fs.profiles["occupancy_per_sensor"].values
    assert occ.shape == (2, 40)
    assert occ[0, 0] == pytest.approx(100 * 8 / pixels) and occ[0, 20] == pytest.approx(100 * 4 / pixels)
    assert occ[1, 39] == pytest.approx(100 / pixels) and occ.sum() == pytest.approx(100 * 13 / pixels)
    layer = fs.profiles["occupancy_per_layer"].values
    assert layer[0] == pytest.approx([100 * 8 / (16 * pixels), 100 * 4 / (24 * pixels)])
    assert fs.distributions["occupancy_per_image"].values.shape == (80,)
    assert fs.distributions["hits_per_event"].values.tolist() == [12, 1]
    assert sorted(fs.distributions["charge"].values.tolist()) == sorted([20] * 8 + [30] * 4 + [7])
    # occupancy vs phi / z: a hit lands in its own layer's profile only (event 1: one hit, layer 2)
    for lay, ev1_hits in ((1, 0), (2, 1)):
        for coord in ("phi", "z"):
            prof = fs.profiles[f"occupancy_vs_{coord}_layer{lay}"]
            assert np.all(prof.values >= 0)
            assert np.count_nonzero(prof.values[0]) >= 1
            assert np.count_nonzero(prof.values[1]) == ev1_hits
    assert fs.vectors["low_level"].shape == (2, 120)
    assert fs.vectors["high_level"].shape[0] == 2


def test_hit_positions_follow_sensor_phi_and_z():
    g = get_geometry("pxd-mini")
    s = g.sensor_index("1.3.1")  # layer 1, ladder 3 at phi = 90 deg, forward (z > 0)
    b = batch_of(pixel_event([(s, g.rows // 2, g.cols - 1, 10), (s, 0, 0, 10)]))
    phi, z = hit_positions(b, g)
    assert phi == pytest.approx([np.pi / 2] * 2, abs=0.5)
    assert z.max() > z.min() and np.all(z > 0)


def test_sensor_correlation_matrix_of_hand_made_events():
    events = []
    for k in range(1, 41):
        m = k % 7 + 1
        hits = [(0, r, 0, 10) for r in range(m)] + [(1, r, 0, 10) for r in range(m)] + [(2, r, 0, 10) for r in range(8 - m)]
        events.append(pixel_event(hits))
    fs = pxd_features(batch_of(*events), PXD)
    corr = fs.correlations["sensor_occupancy_correlation"]
    from uhg.eval.features import weighted_correlation

    c = weighted_correlation(corr.values, np.ones(40))
    assert c[0, 1] == pytest.approx(1.0) and c[0, 2] == pytest.approx(-1.0) and c[5, 6] == 0.0


def test_pixel_hits_outside_the_geometry_are_refused():
    with pytest.raises(GeometryError, match="sensor 40"):
        pxd_features(batch_of(pixel_event([(40, 0, 0, 10)])), PXD)


CALO = get_geometry("ds1-photons")


def test_calo_features_of_a_hand_made_shower():
    lay = CALO.active_layers[1]
    n_cells = CALO.cells_per_layer[lay]
    x, y = CALO.cell_centers(lay)
    cells = np.array([0, n_cells - 1])
    e0 = CaloEvent(np.array([lay, lay]), cells, np.array([300.0, 100.0]), {"incident_energy": 1000.0})
    lay2 = CALO.active_layers[2]
    e1 = CaloEvent(np.array([lay2]), np.array([0]), np.array([50.0]), {"incident_energy": 100.0})
    b = HitBatch.from_events("calo", [e0, e1])
    fs = calo_features(b, CALO)
    assert fs.distributions["response"].values == pytest.approx([0.4, 0.5])
    assert fs.distributions["hits_per_event"].values.tolist() == [2, 1]
    cx = fs.distributions[f"centre_x_layer{lay}"]
    assert cx.event.tolist() == [0]
    assert cx.values[0] == pytest.approx(0.75 * x[0] + 0.25 * x[-1])
    wx = fs.distributions[f"width_x_layer{lay}"].values[0]
    assert wx == pytest.approx(np.sqrt(0.75 * x[0] ** 2 + 0.25 * x[-1] ** 2 - (0.75 * x[0] + 0.25 * x[-1]) ** 2))
    active = list(CALO.active_layers)
    e_layer = fs.profiles["energy_per_layer"].values
    assert e_layer[0, active.index(lay)] == 400.0 and e_layer[1, active.index(lay2)] == 50.0
    sparsity = fs.profiles["sparsity_per_layer"].values
    assert sparsity[0, active.index(lay)] == pytest.approx(2 / n_cells)
    depth = fs.distributions["shower_depth"].values
    mid = [0.5 * sum(CALO.layer_depth_x0[i]) for i in (lay, lay2)]
    assert depth == pytest.approx(mid)
    assert sorted(fs.distributions["cell_energy"].values.tolist()) == [50.0, 100.0, 300.0]
    low = fs.vectors["low_level"]
    assert low.shape == (2, CALO.n_cells + 1)
    assert low[0, 1 + CALO.layer_offsets[lay]] == pytest.approx(0.3)
    assert np.allclose(cell_xy(CALO, np.array([lay]), np.array([0])), (x[:1], y[:1]))
    # the cls-high columns by name: one per column, and each holds the feature it names
    names = high_level_names(CALO)
    high = fs.vectors["high_level"]
    assert len(names) == len(set(names)) == high.shape[1]
    assert high[0, names.index(f"centre_x_layer{lay}")] == pytest.approx((0.75 * x[0] + 0.25 * x[-1]) / 100)
    assert high[0, names.index(f"width_x_layer{lay}")] == pytest.approx(wx / 100, rel=1e-5)
    assert high[1, names.index(f"log_energy_layer{lay2}")] == pytest.approx(np.log10(50.0))
    assert high[0, names.index(f"sparsity_layer{lay}")] == pytest.approx(2 / n_cells)
    assert high[1, names.index("log_incident_energy")] == pytest.approx(2.0)
    assert high[0, names.index("response")] == pytest.approx(0.4)


def test_calo_features_need_the_incident_energy():
    b = HitBatch.from_events("calo", [CaloEvent(np.array([0]), np.array([0]), np.array([1.0]), {})])
    with pytest.raises(ConditionError, match="incident_energy"):
        calo_features(b, CALO)


def test_large_calorimeters_feed_radial_rings_to_the_classifier():
    g = get_geometry("epical-mini")
    b = HitBatch.from_events("calo", [CaloEvent(np.array([0, 3]), np.array([0, 2080]), np.array([1.0, 1.0]),
                                                {"incident_energy": 2000.0})])
    fs = calo_features(b, g)
    assert fs.vectors["low_level"].shape == (1, 1 + g.n_layers * 16)
    assert fs.distributions["response"].values[0] == pytest.approx(1.0)  # 2 hits / 2 GeV


def test_lateral_hit_density_of_a_fully_fired_layer_is_the_pixel_density_in_every_ring():
    # the outer rings reach past the sensor's edge: their area is the sensor's part of them, so a
    # layer whose every pixel fired reads 1 / pixel area everywhere; other layers read 0
    g = get_geometry("epical-mini")
    cells = np.arange(g.cells_per_layer[5])
    b = HitBatch.from_events("calo", [CaloEvent(np.full(len(cells), 5), cells, np.ones(len(cells)),
                                                {"incident_energy": 5000.0})])
    profile = calo_features(b, g).profiles["lateral_density_per_layer"]
    density = profile.values.reshape(g.n_layers, -1)
    np.testing.assert_allclose(density[5], 1.0 / (g.pitch_x_mm * g.pitch_y_mm))
    assert np.all(np.delete(density, 5, axis=0) == 0)
    assert profile.columns[5 * density.shape[1]] == "5:0-1"


def test_validation_metrics_are_zero_for_identical_batches_and_see_a_shift():
    from uhg.eval.quick import validation_metrics

    events = [pixel_event([(s, r, c, 10 + r) for s in (0, 5, 30) for r in range(k % 4 + 1) for c in (0, 7)])
              for k in range(12)]
    ref = batch_of(*events)
    same = validation_metrics(ref, ref, PXD)
    assert same["occupancy_rel_diff"] == 0 and same["charge_sp"] == 0 and same["occupancy_per_sensor_mre"] == 0
    doubled = batch_of(*[pixel_event([(s, r, c, 10 + r) for s in (0, 5, 30) for r in range(2 * (k % 4 + 1))
                                      for c in (0, 7)]) for k in range(12)])
    shifted = validation_metrics(ref, doubled, PXD)
    assert shifted["occupancy_rel_diff"] == pytest.approx(1.0) and shifted["charge_sp"] > 0.05
    calo = HitBatch.from_events("calo", [CaloEvent(np.array([0]), np.array([0]), np.array([e]), {"incident_energy": 1e3})
                                         for e in (900.0, 950.0, 1000.0)])
    assert validation_metrics(calo, calo, CALO)["response_rel_diff"] == 0
