"""Distances on known distributions: identical -> 0, disjoint -> maximal, known shifts."""

import numpy as np
import pytest
from scipy import stats

from uhg.eval import distances
from uhg.eval.compare import draws, mean_abs_rel_error
from uhg.eval.features import weighted_correlation


def test_separation_power_of_hand_made_histograms():
    assert distances.separation_power(np.array([1.0, 0.0]), np.array([0.5, 0.5])) == pytest.approx(
        0.5 * (0.25 / 1.5 + 0.25 / 0.5))
    assert distances.separation_power(np.array([3.0, 1.0]), np.array([6.0, 2.0])) == 0.0  # normalised first
    assert distances.separation_power(np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 2.0])) == 1.0


def test_identical_samples_have_zero_distance():
    x = np.random.default_rng(0).normal(size=2000)
    b = distances.common_binning([x, x])
    assert distances.separation_power_samples(x, x, b) == 0.0
    assert distances.wasserstein1(x, x) == 0.0
    assert distances.ks_statistic(x, x) == 0.0


def test_disjoint_samples_are_fully_separated():
    rng = np.random.default_rng(1)
    u, v = rng.uniform(0, 1, 3000), rng.uniform(5, 6, 3000)
    for scale in ("linear", "log"):
        b = distances.common_binning([u + 0.01, v], scale)
        assert distances.separation_power_samples(u + 0.01, v, b) == pytest.approx(1.0)
    assert distances.ks_statistic(u, v) == 1.0
    assert distances.wasserstein1(u, v) == pytest.approx(5.0, abs=0.05)


def test_same_distribution_is_close_and_shift_is_measured():
    rng = np.random.default_rng(2)
    a, b, c = rng.normal(0, 1, 20000), rng.normal(0, 1, 20000), rng.normal(1, 1, 20000)
    bins = distances.common_binning([a, b, c])
    assert distances.separation_power_samples(a, b, bins) < 0.003
    assert distances.separation_power_samples(a, c, bins) > 0.15
    assert distances.wasserstein1(a, c) == pytest.approx(1.0, abs=0.05)
    assert distances.ks_statistic(a, b) < 0.03
    # the two-sample KS statistic agrees with scipy's (unweighted)
    assert distances.ks_statistic(a[:500], c[:700]) == pytest.approx(stats.ks_2samp(a[:500], c[:700]).statistic)


def test_integer_weights_equal_repeated_values():
    rng = np.random.default_rng(3)
    u, v = rng.integers(0, 20, 300).astype(float), rng.integers(3, 25, 400).astype(float)
    w = rng.integers(0, 3, 300).astype(float)
    repeated = np.repeat(u, w.astype(int))
    assert distances.ks_statistic(u, v, w) == pytest.approx(distances.ks_statistic(repeated, v))
    assert distances.wasserstein1(u, v, w) == pytest.approx(distances.wasserstein1(repeated, v))
    bins = distances.common_binning([u, v], "integer")
    assert np.allclose(bins.edges[1:] - bins.edges[:-1], 1.0)
    assert distances.separation_power_samples(u, v, bins, w) == pytest.approx(
        distances.separation_power_samples(repeated, v, bins))


def test_out_of_range_values_land_in_edge_bins():
    b = distances.Binning(np.array([0.0, 1.0, 2.0]))
    assert np.allclose(b.histogram(np.array([-5.0, 0.5, 2.0, 9.0])), [0.5, 0.5])


def test_resampling_halves_are_disjoint_and_bootstraps_have_the_right_size():
    for d in draws(101, 30, None, 3, seed=0):
        assert d.a.sum() == 50 and d.b.sum() == 30 and d.g.sum() == 30
        assert not np.any((d.a > 0) & (d.b > 0))
    for d in draws(100, 40, 60, 2, seed=0):
        assert d.a.sum() == 100 and d.b.sum() == 40 and d.g.sum() == 40


def test_profile_error_and_weighted_correlation():
    assert mean_abs_rel_error(np.array([1.1, 1.8, 5.0]), np.array([1.0, 2.0, 0.0])) == pytest.approx(0.1)
    x = np.random.default_rng(4).normal(size=(500, 1))
    values = np.hstack([x, 2 * x + 1, -x])
    corr = weighted_correlation(values, np.ones(500))
    assert corr[0, 1] == pytest.approx(1.0) and corr[0, 2] == pytest.approx(-1.0)
