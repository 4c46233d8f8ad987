"""Classifier two-sample test on real simulated PXD events."""

import pytest

from uhg.eval.classifier import MIN_EVENTS, add_classifier_rows, classifier_auc
from uhg.eval.compare import Comparison
from uhg.eval.features_pxd import pxd_features
from uhg.geometry import get_geometry
from uhg.sim.pxd_background import simulate_pxd_background

G = get_geometry("pxd-tiny")


@pytest.fixture(scope="module")
def samples():
    def feats(n, seed, lum):
        return pxd_features(simulate_pxd_background(G, n, seed, luminosity=lum), G)

    return feats(300, 1, 4e35), feats(300, 2, 4e35), feats(300, 3, 1.6e36)


def test_auc_is_one_half_for_one_simulator_and_near_one_for_four_times_the_luminosity(samples):
    a, b, c = samples
    for name in ("high_level", "low_level"):
        same = classifier_auc(a.vectors[name], b.vectors[name], seed=0)
        different = classifier_auc(a.vectors[name], c.vectors[name], seed=0)
        assert same.n_test == 180 and same.n_train == 300
        assert abs(same.auc - 0.5) < 0.1, name
        assert different.auc > 0.95, name


def test_classifier_rows_carry_value_and_floor_and_skip_small_samples(samples):
    a, b, c = samples
    comparison = Comparison()
    add_classifier_rows(comparison, a, c, b, n_repeats=2, vectors=("high_level",))
    row = comparison.get("classifier_high_level", "roc_auc")
    assert row.value > 0.95 and abs(row.floor - 0.5) < 0.1 and row.value_std >= 0
    small = pxd_features(simulate_pxd_background(G, MIN_EVENTS - 1, 9, luminosity=4e35), G)
    comparison = Comparison()
    add_classifier_rows(comparison, a, small, n_repeats=1)
    assert not comparison.rows
    assert [s.feature for s in comparison.skipped] == ["classifier_high_level", "classifier_low_level"]
    assert f">= {MIN_EVENTS} events" in comparison.skipped[0].reason
