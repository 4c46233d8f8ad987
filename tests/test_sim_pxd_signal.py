"""PXD signal simulator: tracks from the IP cross both layers with one cluster per sensor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uhg.errors import ConditionError
from uhg.geometry import get_geometry
from uhg.sim import simulate_pxd_signal

PXD = get_geometry("pxd")


def _sensor_phi(index: int) -> float:
    return PXD.sensors[index].phi_rad


def test_single_tracks_cross_both_layers_at_similar_azimuth():
    batch = simulate_pxd_signal(PXD, 40, seed=3, tracks_min=1, tracks_max=1)
    assert np.all(batch.conditions["n_tracks"] == 1)
    for event in batch:
        sensors = np.unique(event.sensor)
        layers = [PXD.sensors[s].layer for s in sensors]
        assert sorted(layers) == [1, 2], sensors  # one sensor in each layer
        inner, outer = sensors
        dphi = abs(math.remainder(_sensor_phi(inner) - _sensor_phi(outer), 2 * math.pi))
        assert dphi < math.radians(45)  # stiff tracks: the outer hit lies behind the inner one
        assert 1 <= len(event) <= 2 * 12  # two small clusters
        assert np.all(event.value >= 7)


def test_track_count_and_determinism():
    batch = simulate_pxd_signal(PXD, 12, seed=1, tracks_min=2, tracks_max=6)
    n = batch.conditions["n_tracks"]
    assert n.min() >= 2 and n.max() <= 6
    # about one cluster of ~2-4 pixels per track and layer
    per_track = batch.hits_per_event / n
    assert 2 < per_track.mean() < 16
    parts = [simulate_pxd_signal(PXD, 6, seed=1, first_event=f, tracks_min=2, tracks_max=6) for f in (0, 6)]
    assert np.array_equal(np.concatenate([p.columns["col"] for p in parts]), batch.columns["col"])
    assert np.array_equal(np.concatenate([p.conditions["n_tracks"] for p in parts]), n)


def test_signal_works_on_scaled_geometries():
    tiny = get_geometry("pxd-tiny")
    batch = simulate_pxd_signal(tiny, 5, seed=2, tracks_min=3, tracks_max=3)
    assert batch.columns["row"].max() < tiny.rows and batch.columns["col"].max() < tiny.cols
    assert np.all(batch.hits_per_event > 0)


def test_bad_track_range():
    with pytest.raises(ConditionError, match="tracks_min"):
        simulate_pxd_signal(PXD, 1, seed=0, tracks_min=5, tracks_max=2)
