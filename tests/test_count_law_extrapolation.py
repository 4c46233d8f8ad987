"""The pooled count law beyond its training range: forward validation (fit on the lower part of
the range, scored on the upper part) chooses its ridges, and its per-sensor pattern, pooled over
the units, beats the naive overlay of training-maximum events on a machine scenario whose
occupancy grows more slowly than the luminosity (the simulator's events, not the law's family)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uhg.models.laws import (CURVATURE_GRID, CountLaw, choose_forward, fit_count_law, forward_score, forward_split,
                             strongest_within_noise)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_forward_split_holds_out_the_top_of_the_range():
    """Conditions that move together (currents with the luminosity, a beam size against it): the
    held-out half is the busiest half along their main direction, whatever the signs of the
    columns, and the direction's sign follows the counts (occupancy falling with a condition
    holds out its low end). Constant conditions have no direction."""
    g = torch.Generator().manual_seed(0)
    t = torch.rand(400, generator=g, dtype=torch.float64) * 2 - 1
    cond = torch.stack([t, 0.5 * t, -t], 1)
    for sign in (1.0, -1.0):
        counts = torch.poisson(10 * torch.exp(sign * t)[:, None].repeat(1, 3), generator=g)
        fit, out = forward_split(counts, cond)
        assert len(out) == 200 and len(fit) == 200
        assert set(fit.tolist()).isdisjoint(out.tolist())
        if sign > 0:
            assert float(t[out].min()) >= float(t[fit].max())
        else:
            assert float(t[out].max()) <= float(t[fit].min())
    assert forward_split(counts, torch.zeros(400, 3, dtype=torch.float64)) is None
    assert forward_split(counts, torch.zeros(400, 0, dtype=torch.float64)) is None


def _convex(n: int, units: int, t: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of two processes, one linear and one quadratic in a luminosity L = 2^t (a factor 4
    over the range -1..1), with a different pattern over the units each: in log L the mean bends
    upwards, more at the units the quadratic process dominates."""
    g = torch.Generator().manual_seed(seed)
    lum = torch.exp(math.log(2.0) * t)
    linear = 8.0 * torch.linspace(1.0, 2.0, units, dtype=torch.float64)
    quadratic = 8.0 * torch.linspace(2.0, 0.5, units, dtype=torch.float64)
    mean = linear[None] * lum[:, None] + quadratic[None] * lum[:, None] ** 2
    return torch.poisson(mean.expand(n, -1) if len(t) == 1 else mean, generator=g), mean


@pytest.mark.slow
def test_forward_validation_keeps_a_bend_that_continues_beyond_the_range():
    """Counts whose log-mean bends upwards across the training range (a process quadratic in L
    growing over a linear one): forward validation keeps the curvature (no ridge on it) because
    the lower half's fit that bends predicts the upper half better, and the law predicts each
    unit's mean at 2x the top within 5 % and the total at 3x within 5 %, where a power law per
    unit misses the total by more than 20 %."""
    g = torch.Generator().manual_seed(1)
    t = torch.rand(3000, generator=g, dtype=torch.float64) * 2 - 1
    counts, _ = _convex(3000, 10, t, seed=2)
    x = t[:, None]
    law = CountLaw(10, 1, 3072, "pooled").double()
    # the fit's curvature ridge is choose_forward's choice (choose_pooled), reported by the fit
    assert fit_count_law(law, counts, x)["law_curvature_ridge"] == CURVATURE_GRID[0]
    straight = CountLaw(10, 1, 3072, "power").double()
    fit_count_law(straight, counts, x)
    for factor in (2.0, 3.0):
        at = torch.tensor([[1.0 + 2 * math.log(factor) / math.log(4.0)]], dtype=torch.float64)
        _, truth = _convex(1, 10, at[:, 0], seed=3)
        with torch.no_grad():
            pred, power = law.mean(at)[0], straight.mean(at)[0]
        if factor == 2.0:
            assert float((pred / truth[0] - 1).abs().max()) < 0.05, pred / truth[0]
        else:
            assert abs(float(pred.sum() / truth.sum()) - 1) < 0.05, float(pred.sum() / truth.sum())
            assert float(power.sum() / truth.sum()) < 0.8


def test_forward_score_leaves_out_units_empty_over_the_held_out_part():
    """Forward validation scores each unit's relative error over the upper part of the range; a unit
    with no counts there has none, and must not decide the ridges alone (a clamped denominator gave it
    an error of 1e20): the score is the other units'."""
    predicted = torch.tensor([11.0, 18.0, 0.3], dtype=torch.float64)
    observed = torch.tensor([10.0, 20.0, 0.0], dtype=torch.float64)
    assert forward_score(predicted, observed) == pytest.approx((0.1**2 + 0.1**2) / 2)
    assert forward_score(predicted[2:], observed[2:]) == 0.0


def test_the_strongest_ridge_within_the_noise_of_the_best_is_chosen():
    """Candidates ordered strongest ridge first, each scored on the same held-out items: a weaker
    ridge whose mean loss beats a stronger one's by less than one standard error of their paired
    difference does not displace it; one that beats it by more does."""
    noise = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    strong = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert strongest_within_noise([strong, strong - 0.1 + noise]) == 0  # 0.1 better, paired se 0.58
    assert strongest_within_noise([strong, strong - 0.1 + 0.01 * noise]) == 1  # paired se 0.006
    assert strongest_within_noise([strong + 1, strong, strong - 0.1 + noise]) == 1
    assert strongest_within_noise([strong]) == 0


def _clusters(batch) -> np.ndarray:
    """(N, 40) clusters (8-connected pixels) per sensor of pxd-mini events: what the count law draws."""
    from uhg.eval.features_pxd import clusters_per_image
    from uhg.geometry import get_geometry

    return clusters_per_image(batch, get_geometry("pxd-mini"))


@pytest.fixture(scope="module")
def luminosity_dominated_training():
    """4000 pxd-mini events of luminosity-dominated in 2e35-8e35, simulated with seed 1 as the
    training stores are (two tests fit laws to them)."""
    from uhg.geometry import get_geometry
    from uhg.sim.pxd_background import simulate_pxd_background

    return simulate_pxd_background(get_geometry("pxd-mini"), 4000, seed=1, luminosity=2e35, luminosity_max=8e35,
                                   scenario="luminosity-dominated")


@pytest.mark.slow
def test_pooled_law_beats_the_overlay_per_sensor_on_luminosity_dominated(luminosity_dominated_training):
    """luminosity-dominated (occupancy ~ L^0.95, clusters ~ L^0.89 as they start to merge):
    the pooled law fitted to the clusters per sensor of 4000 training events in 2e35-8e35 (seed 1,
    as the training stores) predicts each sensor's mean cluster count at 2x and 3x the top closer
    than the naive overlay of two / three training-maximum events: rms over the 40 sensors of the
    relative error, less the reference's own noise. The quadratic law (per-unit slopes on their
    own, a curvature fitted in range) misses by 4.9 / 9.4 % there against the overlay's 3.8 / 5.7 %
    (docs/results.md)."""
    from uhg.eval.baselines import overlay_baseline
    from uhg.geometry import get_geometry
    from uhg.models.common import ConditionNorm
    from uhg.sim.pxd_background import simulate_pxd_background
    from uhg.sim.pxd_machine import CONDITIONS

    machine = "luminosity-dominated"
    g = get_geometry("pxd-mini")
    train = luminosity_dominated_training
    norm = ConditionNorm.from_ranges({k: (float(v.min()), float(v.max())) for k, v in train.conditions.items()},
                                     list(CONDITIONS))
    law = CountLaw(g.n_sensors, len(CONDITIONS), g.pixels_per_sensor, "pooled").double()
    fit_count_law(law, torch.as_tensor(_clusters(train)).double(),
                  norm({k: torch.as_tensor(v) for k, v in train.conditions.items()}).double())

    def rms(mean: np.ndarray, truth: np.ndarray, noise2: np.ndarray) -> float:
        return float(np.sqrt(max(np.mean((mean / truth - 1) ** 2) - np.mean(noise2), 0.0)))

    # 500 reference and overlay events at each factor (1000 before; the reference's noise is taken
    # off both errors). Measured on three seed sets of 500 (the first these): the law 2.0 / 1.7 /
    # 1.4 % at 2x against the overlay's 4.6 / 3.9 / 2.4 %, 3.0 / 2.5 / 1.6 % at 3x against 5.8 / 5.5 /
    # 4.2 % (with 1000: 1.6 against 3.9 %, 2.6 against 5.6 %).
    for factor in (2.0, 3.0):
        ref = simulate_pxd_background(g, 500, seed=101, luminosity=factor * 8e35, scenario=machine)
        base = overlay_baseline(lambda m, off: simulate_pxd_background(g, m, 104, first_event=off, luminosity=8e35,
                                                                       scenario=machine),
                                g, factor, 500, np.random.default_rng([104, 0]))
        c_ref, c_base = _clusters(ref), _clusters(base)
        truth, noise2 = c_ref.mean(0), c_ref.var(0) / len(c_ref) / c_ref.mean(0) ** 2
        with torch.no_grad():
            pred = law.mean(norm({k: torch.as_tensor(v) for k, v in ref.conditions.items()}).double()).mean(0).numpy()
        law_err = rms(pred, truth, noise2)
        overlay_err = rms(c_base.mean(0), truth, noise2 + c_base.var(0) / len(c_base) / truth ** 2)
        assert law_err < overlay_err, (factor, law_err, overlay_err)


@pytest.mark.slow
def test_forward_validation_chooses_no_curvature_from_the_gans_census_on_luminosity_dominated(
        luminosity_dominated_training):
    """The PXD GAN fits its count law to the clusters that fit its shape window (all but 0.04 % of
    the 8-connected clusters of luminosity-dominated). On those of 4000 training events in 2e35-8e35
    (seed 1, as the training stores) the curvature with ridge 1e5 scored lowest on the upper half
    by 1.0e-4, within one paired standard error (3.2e-5 against the best, 8.2e-5 for the power law
    with per-unit ridge 3000), and the lowest score alone kept it: the law was +3.4 % / +7.0 % high
    at 2x / 3x the top, where the same law on all clusters (power law chosen) is +1.1 % / +2.7 %
    (docs/results.md). The strongest ridges within the noise choose the power law here too."""
    from uhg.geometry import get_geometry
    from uhg.models.common import ConditionNorm
    from uhg.sim.pxd_machine import CONDITIONS
    from uhg.train.gan_family import cluster_shape_keys

    g = get_geometry("pxd-mini")
    train = luminosity_dominated_training
    _, sensors, events = cluster_shape_keys(train, g)
    census = torch.zeros(len(train), g.n_sensors, dtype=torch.float64)
    census.index_put_((torch.as_tensor(events), torch.as_tensor(sensors)), torch.ones(len(events), dtype=torch.float64),
                      accumulate=True)
    norm = ConditionNorm.from_ranges({k: (float(v.min()), float(v.max())) for k, v in train.conditions.items()},
                                     list(CONDITIONS))
    law = CountLaw(g.n_sensors, len(CONDITIONS), g.pixels_per_sensor, "pooled").double()
    cond = norm({k: torch.as_tensor(v) for k, v in train.conditions.items()}).double()
    assert choose_forward(law, census, cond)[1] == CURVATURE_GRID[-1]


def test_a_transformer_fits_the_pooled_law_from_its_training_events():
    """model.count_law: pooled in a hit transformer: the fitted start chooses both ridges, the law
    predicts the training events' mean hits per event, and its pooled slope and bootstrap
    refits travel in the state dict (a reload predicts the same)."""
    from uhg.config.loading import config_from_dict
    from uhg.geometry import get_geometry
    from uhg.models.common import ConditionNorm
    from uhg.sim.pxd_background import simulate_pxd_background
    from uhg.train.family import build_family

    g = get_geometry("pxd-tiny")
    events = simulate_pxd_background(g, 160, seed=3, luminosity=2e35, luminosity_max=8e35)
    raw = {"name": "x", "geometry": "pxd-tiny", "data": {"store": "unused.zarr"}, "train": {"steps": 1, "batch_size": 2},
           "model": {"family": "transformer", "conditions": ["luminosity"], "d_model": 32, "n_layers": 1, "n_heads": 2,
                     "latent_dim": 0, "multiplicity": "count", "count_law": "pooled", "count_bootstrap": 2}}
    cfg = config_from_dict(raw)
    norm = ConditionNorm.from_ranges({"luminosity": (2e35, 8e35)}, ["luminosity"])
    family = build_family(g, cfg.model, norm)
    modules = family.build_modules()
    idx = family.fit_sample(len(events))
    fitted = family.initialise_from_data(modules, (events.take(idx[i:i + 64]) for i in range(0, len(idx), 64)))
    assert {"law_shrink", "law_curvature_ridge"} <= set(fitted)
    law = modules["model"].counts
    assert law.form == "pooled" and law.bootstrap.shape[0] == 2
    state = modules["model"].state_dict()
    assert "counts.level_slope" in state
    cond = norm({"luminosity": torch.as_tensor(events.conditions["luminosity"])})
    with torch.no_grad():
        before = law.mean(cond).sum(1)
    reloaded = family.build_modules()["model"]
    reloaded.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(reloaded.counts.mean(cond).sum(1), before)
    hits = float(events.hits_per_event.mean())  # hit tokens: the law counts the hits of each sensor
    assert abs(float(before.mean()) / hits - 1) < 0.05, (float(before.mean()), hits)



@pytest.mark.slow
def test_pooled_law_lets_per_unit_slopes_through_that_the_level_does_not_explain():
    """Units at one level whose counts grow with different slopes (nothing for the level-linked
    slope to carry): the per-unit ridge chosen on held-out events is below its strongest, and
    the law predicts every unit at 2x the top within 10 % (at the strongest ridge the slopes,
    0.2 to 1.2, would be pulled towards their mean: tens of percent off)."""
    from uhg.models.laws import POOLED_SHRINK_GRID

    gen = torch.Generator().manual_seed(2)
    n, units = 3000, 12
    x = torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 - 1
    slopes = 0.7 + 0.5 * torch.linspace(-1, 1, units, dtype=torch.float64)
    counts = torch.poisson(20.0 * torch.exp(x * slopes[None]), generator=gen)
    law = CountLaw(units, 1, 3072, "pooled").double()
    # the fit's per-unit ridge is choose_pooled's choice, reported by the fit
    shrink = fit_count_law(law, counts, x)["law_shrink"]
    assert shrink < POOLED_SHRINK_GRID[-1], shrink
    at = torch.tensor([[2.0]], dtype=torch.float64)
    with torch.no_grad():
        rel = law.mean(at)[0] / (20.0 * torch.exp(2.0 * slopes)) - 1
    assert float(rel.abs().max()) < 0.10, rel


def test_shift_level_moves_every_unit_by_its_shift_and_keeps_its_slope():
    """A level moved after the fit (the GAN's overlap and merge corrections) adds the shift to each
    unit's log-odds at every condition: in the pooled form a unit's level also sets part of its
    slope, which must stay at the fit."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(50, 2, generator=g, dtype=torch.float64) * 4 - 2
    delta = torch.randn(6, generator=g, dtype=torch.float64) * 0.3
    for form in ("power", "powers", "quadratic", "pooled", "unit_quadratic"):
        law = CountLaw(6, 2, 3072, form).double()
        with torch.no_grad():
            for p in law.mean_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        before = law.eta(x)
        law.shift_level(delta)
        assert torch.allclose(law.eta(x) - before, delta[None].expand(50, 6), atol=1e-12), form
        law.shift_level(0.25)  # one number for every unit
        assert torch.allclose(law.eta(x) - before, (delta + 0.25)[None].expand(50, 6), atol=1e-12), form
