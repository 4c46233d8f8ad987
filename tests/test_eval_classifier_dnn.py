"""The calorimeter classifier (the CaloChallenge kind of DNN) on real simulated showers: two
samples of one simulator are indistinguishable, a 10% change of one layer's energy is seen in
voxels (cls-low) and in high-level features (cls-high)."""

import numpy as np
import pytest

from uhg.eval.classifier import classifier_auc, classifier_for
from uhg.eval.classifier_dnn import DnnSettings, dnn_scores
from uhg.eval.features_calo import calo_features
from uhg.geometry import get_geometry
from uhg.sim.calo import simulate_calo_showers

G = get_geometry("ds1-photons")


@pytest.fixture(scope="module")
def showers(one_torch_thread):
    def sample(seed, n=1500):
        return simulate_calo_showers(G, n, seed, energy_min=1e3, energy_max=1e5)

    a, b, c = sample(1), sample(2), sample(3)
    layer = list(G.active_layers)[2]
    value = c.columns["value"].copy()
    value[c.columns["layer"] == layer] *= 1.10
    c.columns["value"] = value
    return calo_features(a, G), calo_features(b, G), calo_features(c, G)


@pytest.mark.slow
def test_dnn_sees_a_ten_percent_layer_energy_change_and_not_a_second_sample(showers):
    a, b, c = showers
    assert classifier_for("calo") == "dnn" and classifier_for("pixel") == "trees"
    for name, floor_max, value_min in (("low_level", 0.56, 0.68), ("high_level", 0.56, 0.8)):
        same = classifier_auc(a.vectors[name], b.vectors[name], seed=0, method="dnn")
        changed = classifier_auc(a.vectors[name], c.vectors[name], seed=0, method="dnn")
        assert same.n_train == 1800 and same.n_test == 600
        assert abs(same.auc - 0.5) < floor_max - 0.5, name
        assert changed.auc > value_min, name


def test_dnn_scores_learn_a_shifted_gaussian_and_keep_the_global_rng(one_torch_thread):
    import torch

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (400, 3)), rng.normal(0.8, 1, (400, 3))])
    y = np.repeat([0.0, 1.0], 400)
    perm = rng.permutation(800)
    x, y = x[perm], y[perm]
    state = torch.get_rng_state()
    s1, = dnn_scores(x[:500], y[:500], x[500:650], y[500:650], [x[650:]], seed=3, settings=DnnSettings(width=32))
    s2, = dnn_scores(x[:500], y[:500], x[500:650], y[500:650], [x[650:]], seed=3, settings=DnnSettings(width=32))
    assert torch.equal(state, torch.get_rng_state())  # the caller's torch RNG is untouched
    assert np.array_equal(s1, s2)  # the seed fixes the result
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[650:], s1) > 0.8  # a shift of 0.8 sigma in 3 dimensions: AUC ~0.86
    with pytest.raises(ValueError, match="classifier method must be one of"):
        classifier_auc(x, x, method="bdt")
