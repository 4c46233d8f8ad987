"""Count and response laws of the hit transformer (model.multiplicity: count, model.count_exponents,
model.response_model): maximum-likelihood fits that extrapolate as the law does, exact counts
in generation, event-wide count fluctuations, showers scaled to the drawn response, batch-split
independence and config errors naming the key."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uhg.config.loading import config_from_dict
from uhg.config.transformer import TransformerConfig
from uhg.errors import ConfigError
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.transformer import HitTransformer
from uhg.models.transformer_laws import CountLaw, ResponseLaw, fit_law, nb_quantile
from uhg.models.transformer_sampling import counter_uniform, generate_tokens, sample_events
from uhg.models.transformer_tokens import layout_for_geometry
from uhg.seeding import event_seed
from uhg.train.family import build_family


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _seeds(seed: int, n: int, first: int = 0) -> list[int]:
    return [event_seed(seed, first + i, "generate") for i in range(n)]


def _pixel_model(**kw) -> HitTransformer:
    torch.manual_seed(3)
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=2, latent_dim=4, conditions=["luminosity"],
                            multiplicity="count", **kw)
    return HitTransformer(cfg, layout_for_geometry(get_geometry("pxd-tiny"), n_energy_bins=16),
                          condition_log_scale=math.log(2.0)).eval()


def test_sum_of_powers_fitted_in_range_predicts_twice_the_range():
    """Counts whose mean is a l + b l^2 (l = L / L_max) observed for l in [0.25, 1]: the law
    with exponents [1, 2] fitted there predicts the mean at l = 2 within 8% (the split between
    the two powers is what 2000 events leave uncertain); one power law with a fitted exponent
    misses it by more than twice that."""
    rng = np.random.default_rng(0)
    P, n_units, events = 100_000, 3, 2000  # a large grid: no saturation in the truth either
    a, b = np.array([20.0, 5.0, 40.0]), np.array([10.0, 25.0, 2.0])
    lum = np.exp(rng.uniform(math.log(0.25), math.log(1.0), events))
    mean = a[None] * lum[:, None] + b[None] * lum[:, None] ** 2
    counts = torch.tensor(rng.negative_binomial(50.0, 50.0 / (50.0 + mean)), dtype=torch.float64)
    norm = ConditionNorm.from_ranges({"l": (0.25, 1.0)}, ["l"])
    cond = norm({"l": torch.tensor(lum)}).double()
    at_2x = norm({"l": torch.tensor([2.0])}).double()
    truth = 2 * a + 4 * b
    errors = {}
    for exponents in ([1.0, 2.0], None):
        law = CountLaw(n_units, 1, P, exponents, norm.scale[0])
        fit_law(law, lambda m: -m.marginal_log_prob(counts, cond).mean())
        predicted = law.double().mean(at_2x)[0].detach().numpy()
        errors[str(exponents)] = np.abs(predicted / truth - 1)
    assert errors["[1.0, 2.0]"].max() < 0.08, errors
    assert errors["None"].max() > 2 * errors["[1.0, 2.0]"].max(), errors


def test_count_draws_follow_the_law_and_share_event_fluctuations():
    law = CountLaw(n_units=6, n_cond=1, positions=768)
    with torch.no_grad():
        law.bias.fill_(math.log(40 / 728))  # mean 40 hits of 768
        law.log_dispersion.fill_(math.log(10.0))
    cond = torch.zeros(4000, 1)
    keys = torch.tensor(_seeds(1, 4000), dtype=torch.int64)
    units = torch.arange(6).repeat(4000)
    u_unit = counter_uniform(keys.repeat_interleave(6), units, -1, 0)
    u_event = counter_uniform(keys, torch.full_like(keys, 6), -1, 0)
    for loading, corr_range in ((0.0, (-0.06, 0.06)), (0.9, (0.6, 0.9))):
        with torch.no_grad():
            law.loading.fill_(math.atanh(loading))
        n, capped = law.sample(u_unit, u_event, cond, cap=768)
        n = n.view(4000, 6).double().numpy()
        assert capped == 0
        # NB(40, r=10): variance 40 + 160 = 200; every unit keeps its marginal whatever the loading
        assert abs(n.mean() - 40) < 0.6 and abs(n.var() / 200 - 1) < 0.1
        corr = np.corrcoef(n.T)[np.triu_indices(6, 1)]
        assert corr_range[0] < corr.mean() < corr_range[1]


def test_copula_loadings_are_recovered_from_counts():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((2000, 1))
    latent = 0.7 * g + math.sqrt(1 - 0.49) * rng.standard_normal((2000, 4))
    counts = torch.tensor(np.floor(30 * np.exp(0.4 * latent)), dtype=torch.float64)
    law = CountLaw(4, 0, 768)
    cond = torch.zeros(2000, 0, dtype=torch.float64)
    fit_law(law, lambda m: -m.marginal_log_prob(counts, cond).mean())
    y = law.scores(counts, cond.float()).double()
    fit_law(law, lambda m: -m.copula_log_prob(y).mean())
    assert np.allclose(law.loadings().detach().numpy(), 0.7, atol=0.08)


def test_nb_quantile_is_exact_at_the_cdf_steps_and_clamped():
    mean, r = torch.tensor([3.0]), torch.tensor([2.0])
    # P(0) = (r / (r + mean))^r = 0.16
    assert int(nb_quantile(torch.tensor([0.159]), mean, r, torch.tensor([100]))) == 0
    assert int(nb_quantile(torch.tensor([0.161]), mean, r, torch.tensor([100]))) == 1
    assert int(nb_quantile(torch.tensor([0.9999]), torch.tensor([500.0]), r, torch.tensor([7]))) == 7


def test_generation_places_exactly_the_drawn_hits_even_near_a_full_grid():
    model = _pixel_model()
    with torch.no_grad():
        model.counts.bias.fill_(2.0)  # 88% of each 16 x 48 sensor
        model.counts.log_dispersion.fill_(8.0)
    g = generate_tokens(model, torch.zeros(2, 1), _seeds(0, 2), max_hits=768)
    assert g.targets is not None and g.n_capped == 0
    assert torch.equal(g.lengths, g.targets) and float(g.targets.double().mean()) > 600
    # hits stay sorted and unique: the room kept for the remaining hits never runs out
    flat = g.rows * 48 + g.cols
    for s in range(len(g.lengths)):
        n = int(g.lengths[s])
        assert bool((flat[s, 1:n] > flat[s, :n - 1]).all())
    with torch.no_grad():
        model.counts.bias.fill_(-3.0)
    small = generate_tokens(model, torch.zeros(3, 1), _seeds(1, 3), max_hits=768)
    assert torch.equal(small.lengths, small.targets) and 0 < float(small.targets.double().mean()) < 100


def test_count_model_is_bit_identical_for_any_batch_split():
    model = _pixel_model(count_exponents=[1.0, 2.0])
    n = 5
    cond = torch.linspace(-1, 2, n)[:, None]
    lum = {"luminosity": np.geomspace(2e35, 1.6e36, n)}
    whole = sample_events(model, cond, _seeds(7, n), lum, batch_events=n, max_hits=256)
    assert whole.n_hits > 100
    for batch_events in (1, 2):
        split = sample_events(model, cond, _seeds(7, n), lum, batch_events=batch_events, max_hits=256)
        np.testing.assert_array_equal(split.offsets, whole.offsets)
        for k in whole.columns:
            np.testing.assert_array_equal(split.columns[k], whole.columns[k])


def test_showers_are_scaled_to_the_drawn_response():
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=2, latent_dim=0, conditions=["incident_energy"],
                            energy_reference="incident", multiplicity="count", response_model=True)
    layout = layout_for_geometry(get_geometry("ds1-photons"), 32, energy_reference="incident",
                                 energy_min_fraction=1e-9, energy_max_fraction=1.0)
    model = HitTransformer(cfg, layout).eval()
    with torch.no_grad():
        model.counts.bias.fill_(-1.0)
        model.response.m0.fill_(math.log(0.9))
        model.response.m.fill_(0.05)  # response grows with energy
        model.response.s0.fill_(math.log(0.02))
    n = 6
    e_inc = np.geomspace(1e3, 1.6e5, n)
    cond = torch.tensor(np.log(e_inc / 4e3) / math.log(4.0), dtype=torch.float32)[:, None]
    seeds = _seeds(3, n)
    batch = sample_events(model, cond, seeds, {"incident_energy": e_inc})
    sums = np.bincount(batch.event_index(), weights=batch.columns["value"].astype(np.float64), minlength=n)
    u = counter_uniform(torch.tensor(seeds), torch.zeros(n, dtype=torch.int64), -2, 0)
    expected = model.response.sample(u, cond).detach().numpy()
    np.testing.assert_allclose(sums / e_inc, expected, rtol=1e-5)
    assert np.all(np.abs(np.log(expected) - (math.log(0.9) + 0.05 * cond[:, 0].numpy())) < 0.1)


def test_initialise_from_data_fits_the_laws_to_training_events():
    from uhg.sim.calo import simulate_calo_showers

    g = get_geometry("ds1-photons")
    showers = simulate_calo_showers(g, 200, seed=4, energy_min=1000.0, energy_max=16000.0)
    raw = {"name": "x", "geometry": "ds1-photons", "data": {"store": "unused.zarr"}, "train": {"steps": 1, "batch_size": 2},
           "model": {"family": "transformer", "conditions": ["incident_energy"], "d_model": 32, "n_layers": 1,
                     "n_heads": 2, "latent_dim": 0, "energy_reference": "incident", "multiplicity": "count",
                     "response_model": True}}
    cfg = config_from_dict(raw)
    norm = ConditionNorm.from_ranges({"incident_energy": (1000.0, 16000.0)}, ["incident_energy"])
    family = build_family(g, cfg.model, norm)
    modules = family.build_modules()
    idx = family.fit_sample(len(showers))
    fitted = family.initialise_from_data(modules, (showers.take(idx[i:i + 64]) for i in range(0, len(idx), 64)))
    assert set(fitted) == {"law_count_nll", "law_copula_nll", "law_response_nll"}
    model = modules["model"]
    e = showers.conditions["incident_energy"]
    cond = norm({"incident_energy": torch.tensor(e)})
    predicted = model.counts.mean(cond)[:, 0].detach().numpy()
    assert abs(predicted.mean() / showers.hits_per_event.mean() - 1) < 0.02
    mu, _ = model.response.params(cond)
    e_dep = np.bincount(showers.event_index(), weights=showers.columns["value"].astype(np.float64), minlength=200)
    assert abs(float(mu.detach().mean()) - np.log(e_dep / e).mean()) < 0.01


@pytest.mark.parametrize(("model", "match"), [
    ({"count_exponents": [1.0, 2.0]}, "count_exponents.*multiplicity: count"),
    ({"multiplicity": "count", "count_exponents": [1.0], "conditions": ["luminosity", "her_current"]},
     "exactly one condition"),
    ({"response_model": True, "conditions": ["luminosity"]}, "response_model.*incident_energy"),
])
def test_law_settings_are_checked(model, match):
    raw = {"name": "x", "geometry": "pxd-tiny", "data": {"store": "unused.zarr"}, "train": {"steps": 1, "batch_size": 2},
           "model": {"family": "transformer", **model}}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(raw)


def test_response_model_on_a_pixel_detector_is_refused():
    raw = {"name": "x", "geometry": "pxd-tiny", "data": {"store": "unused.zarr"}, "train": {"steps": 1, "batch_size": 2},
           "model": {"family": "transformer", "conditions": ["incident_energy"], "response_model": True}}
    cfg = config_from_dict(raw)
    norm = ConditionNorm.from_ranges({"incident_energy": (1e3, 1e4)}, ["incident_energy"])
    with pytest.raises(ConfigError, match="response_model is for calorimeters"):
        build_family(get_geometry("pxd-tiny"), cfg.model, norm)
