"""PXD background simulator: calibration targets at L_CAL (DESIGN.md section 4), luminosity
scaling, determinism under any split into parts, intra-event correlations, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from uhg.errors import ConditionError, GeometryError
from uhg.geometry import get_geometry
from uhg.sim import L_CAL, SENSOR_OCCUPANCY, simulate_pxd_background
from uhg.sim.pxd_machine import currents_for_luminosity, luminosity_for_currents

MINI = get_geometry("pxd-mini")
TINY = get_geometry("pxd-tiny")


@pytest.fixture(scope="module")
def mini_cal():
    """300 pxd-mini events at the calibration point (~330k fired pixels)."""
    return simulate_pxd_background(MINI, 300, seed=11)


def _occupancy_per_image(batch, geometry) -> np.ndarray:
    """(n_events, 40) fraction of fired pixels per sensor image."""
    idx = batch.event_index() * geometry.n_sensors + batch.columns["sensor"]
    counts = np.bincount(idx, minlength=len(batch) * geometry.n_sensors)
    return counts.reshape(len(batch), geometry.n_sensors) / geometry.pixels_per_sensor


def test_per_sensor_and_overall_occupancy_match_the_targets(mini_cal):
    occ = _occupancy_per_image(mini_cal, MINI).mean(axis=0)
    rel = np.abs(occ / SENSOR_OCCUPANCY - 1)
    assert rel.mean() < 0.06, rel
    assert rel.max() < 0.20, rel
    assert occ.mean() == pytest.approx(0.0090, rel=0.03)
    layer1, layer2 = occ[:16], occ[16:]
    assert layer1.mean() > 2 * layer2.mean()  # inner layer sees more background
    assert layer2[0::2].mean() > layer2[1::2].mean()  # forward sensors above backward ones


def test_charge_spectrum_matches_the_targets(mini_cal):
    adc = mini_cal.columns["value"].astype(np.int64)
    assert adc.min() >= 7 and adc.max() == 255  # threshold and 8-bit saturation
    hist = np.bincount(adc, minlength=256)
    assert np.argmax(hist) in (7, 8)  # peak just above threshold
    assert adc.mean() == pytest.approx(22.1, rel=0.05)
    q50, q90, q99, q999 = np.quantile(adc, [0.5, 0.9, 0.99, 0.999])
    assert abs(q50 - 17.5) <= 1.5
    assert abs(q90 - 35.5) <= 3.0
    assert abs(q99 - 114.5) <= 12
    assert abs(q999 - 177.5) <= 25
    inner = mini_cal.columns["sensor"] < 16
    assert adc[inner].mean() < adc[~inner].mean()


def test_per_image_occupancy_spread_on_the_full_pxd():
    pxd = get_geometry("pxd")
    batch = simulate_pxd_background(pxd, 8, seed=5)
    assert 60_000 < batch.hits_per_event.mean() < 80_000
    q05, q50, q95 = np.quantile(_occupancy_per_image(batch, pxd), [0.05, 0.5, 0.95])
    assert q05 == pytest.approx(0.0041, abs=0.0005)
    assert q50 == pytest.approx(0.0060, abs=0.0006)
    assert q95 == pytest.approx(0.0168, abs=0.0015)


def test_occupancy_grows_faster_than_luminosity():
    low = simulate_pxd_background(MINI, 80, seed=2, luminosity=L_CAL)
    high = simulate_pxd_background(MINI, 80, seed=3, luminosity=2 * L_CAL)
    ratio = high.n_hits / low.n_hits
    assert ratio > 2.1
    # and far less at early-running luminosity: O(1e2-1e3) fired pixels on the full PXD
    early = simulate_pxd_background(get_geometry("pxd"), 2, seed=1, luminosity=1.4e34)
    assert 100 < early.hits_per_event.mean() < 5000


def test_machine_model_currents_grow_faster_than_sqrt_luminosity():
    her, ler = currents_for_luminosity(np.array([L_CAL, 2 * L_CAL]))
    assert her[0] == pytest.approx(2.6) and ler[0] == pytest.approx(3.6)
    assert ler[1] / ler[0] > np.sqrt(2)
    assert luminosity_for_currents(her, ler) == pytest.approx([L_CAL, 2 * L_CAL])


def test_events_do_not_depend_on_the_split():
    whole = simulate_pxd_background(TINY, 7, seed=4, luminosity=3e35, luminosity_max=2e36)
    again = simulate_pxd_background(TINY, 7, seed=4, luminosity=3e35, luminosity_max=2e36)
    parts = [simulate_pxd_background(TINY, n, seed=4, first_event=first, luminosity=3e35, luminosity_max=2e36)
             for first, n in ((0, 3), (3, 1), (4, 3))]
    from uhg.data.hits import HitBatch

    joined = HitBatch.concat(parts)
    for other in (again, joined):
        assert np.array_equal(whole.offsets, other.offsets)
        for k in ("sensor", "row", "col", "value"):
            assert np.array_equal(whole.columns[k], other.columns[k])
        for k in ("luminosity", "her_current", "ler_current"):
            assert np.array_equal(whole.conditions[k], other.conditions[k])
    other_seed = simulate_pxd_background(TINY, 7, seed=5)
    assert not np.array_equal(other_seed.offsets, whole.offsets)


def test_hits_are_sorted_unique_and_inside_the_sensors():
    batch = simulate_pxd_background(MINI, 5, seed=9)
    key = ((batch.columns["sensor"].astype(np.int64) * MINI.rows + batch.columns["row"]) * MINI.cols
           + batch.columns["col"])
    for i in range(len(batch)):
        k = key[batch.offsets[i]:batch.offsets[i + 1]]
        assert np.all(np.diff(k) > 0)
    assert batch.columns["row"].max() < MINI.rows and batch.columns["col"].max() < MINI.cols


def test_luminosity_range_and_conditions():
    batch = simulate_pxd_background(TINY, 200, seed=1, luminosity=1e34, luminosity_max=1e36)
    lum = batch.conditions["luminosity"]
    assert lum.min() >= 1e34 and lum.max() <= 1e36
    # log-uniform: about half the events below the geometric mean
    assert 0.38 < np.mean(lum < 1e35) < 0.62
    her, ler = currents_for_luminosity(lum)
    assert np.allclose(batch.conditions["her_current"], her) and np.allclose(batch.conditions["ler_current"], ler)
    fixed = simulate_pxd_background(TINY, 3, seed=1, her_current=1.0, ler_current=1.5)
    assert np.all(fixed.conditions["her_current"] == 1.0) and np.all(fixed.conditions["ler_current"] == 1.5)
    assert np.all(fixed.conditions["luminosity"] == L_CAL)


def test_neighbouring_sensors_are_correlated(mini_cal):
    occ = _occupancy_per_image(mini_cal, MINI)
    corr = np.corrcoef(occ.T)
    # layer 1, same side: curlers tie ladders next to each other in phi, not those 180 deg apart
    adjacent = [corr[2 * lad + side, 2 * ((lad + 1) % 8) + side] for lad in range(8) for side in (0, 1)]
    opposite = [corr[2 * lad + side, 2 * ((lad + 4) % 8) + side] for lad in range(4) for side in (0, 1)]
    assert np.mean(adjacent) > 0.12
    assert np.mean(adjacent) > np.mean(opposite) + 0.05


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"luminosity": -1.0}, ConditionError, "luminosity must be a positive"),
    ({"luminosity": 0.0}, ConditionError, "luminosity must be a positive"),
    ({"luminosity": 1e35, "luminosity_max": 1e34}, ConditionError, "luminosity_max"),
    ({"her_current": 1.0}, ConditionError, "both beam currents"),
    ({"her_current": 1.0, "ler_current": -2.0}, ConditionError, "ler_current must be a positive"),
    ({"n_events": -3}, ConditionError, "non-negative integer"),
])
def test_bad_input_is_a_clear_error(kwargs, error, text):
    n_events = kwargs.pop("n_events", 1)
    with pytest.raises(error, match=text):
        simulate_pxd_background(TINY, n_events, seed=0, **kwargs)


def test_calorimeter_geometry_is_rejected():
    with pytest.raises(GeometryError, match="pixel geometry"):
        simulate_pxd_background(get_geometry("ds2"), 1, seed=0)


def test_zero_events_give_an_empty_batch():
    batch = simulate_pxd_background(TINY, 0, seed=0)
    assert len(batch) == 0 and batch.n_hits == 0 and set(batch.conditions) == {"luminosity", "her_current", "ler_current", "beta_y_star"}
