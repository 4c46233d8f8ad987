"""Hierarchical layer counts of the hit transformer on a digital calorimeter (model.layer_split):
each shower's pixel total from a one-unit count law, split over the layers by a learned share law
(uhg.models.laws.LayerShareLaw), so that the total keeps the data's shower-to-shower spread beyond
the training range, which the sum of per-layer draws does not."""

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
from uhg.models.laws import SHARE_CURVATURE_GRID, CountLaw, LayerShareLaw, fit_count_law, fit_share_law
from uhg.models.transformer_sampling import generate_tokens, sample_events
from uhg.seeding import event_seed
from uhg.sim.calo import simulate_calo_showers
from uhg.sparse.torch_hits import TorchHits
from uhg.train.family import build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = (1000.0, 16000.0)
NORM = ConditionNorm.from_ranges({"incident_energy": TRAIN}, ["incident_energy"])


def _per_layer(batch, n_layers: int) -> np.ndarray:
    idx = batch.event_index() * n_layers + batch.columns["layer"].astype(np.int64)
    return np.bincount(idx, minlength=len(batch) * n_layers).reshape(len(batch), n_layers)


def _cond(batch) -> torch.Tensor:
    return NORM({"incident_energy": torch.as_tensor(batch.conditions["incident_energy"])}).double()


@pytest.fixture(scope="module")
def showers():
    return simulate_calo_showers(get_geometry("epical-mini"), 600, seed=4, energy_min=TRAIN[0], energy_max=TRAIN[1])


def test_split_total_keeps_the_spread_of_the_pixel_total_at_five_times_the_training_top(showers):
    """Fitted to showers of 1-16 GeV, the total law + share law draw at 80 GeV a pixel total whose
    std / mean is within 1.6x that of simulated 80 GeV showers (and layers that add up to it);
    the per-layer law's sum of 24 correlated draws is more than 4x too broad there."""
    g = get_geometry("epical-mini")
    n = torch.as_tensor(_per_layer(showers, g.n_layers)).double()
    cond = _cond(showers)
    ref = _per_layer(simulate_calo_showers(g, 200, seed=9, energy_min=80000.0, energy_max=80000.0), g.n_layers)
    ref_spread = ref.sum(1).std() / ref.sum(1).mean()
    B = 200
    at = NORM({"incident_energy": torch.full((B,), 80000.0)}).double()
    gen = torch.Generator().manual_seed(3)
    total_law = CountLaw(1, 1, sum(g.cells_per_layer), "unit_quadratic").double()
    fit_count_law(total_law, n.sum(1, keepdim=True), cond)
    shares = LayerShareLaw(g.n_layers, 1).double()
    fit_share_law(shares, n, cond)
    totals, _ = total_law.sample(torch.rand(B, generator=gen, dtype=torch.float64),
                                 torch.rand(B, 1, generator=gen, dtype=torch.float64), at, 1 << 20)
    split = shares.sample(totals, at, torch.rand(B, 2 * g.n_layers, generator=gen, dtype=torch.float64),
                          torch.tensor(g.cells_per_layer)).numpy()
    assert np.array_equal(split.sum(1), totals.numpy())
    spread = split.sum(1).std() / split.sum(1).mean()
    assert spread < 1.6 * ref_spread, (spread, ref_spread)
    assert abs(split.sum(1).mean() / ref.sum(1).mean() - 1) < 0.1
    layered = CountLaw(g.n_layers, 1, list(g.cells_per_layer), "unit_quadratic", factors=2).double()
    fit_count_law(layered, n, cond)
    draws, _ = layered.sample(torch.rand(B * g.n_layers, generator=gen, dtype=torch.float64),
                              torch.rand(B, 2, generator=gen, dtype=torch.float64), at, 1 << 20)
    summed = draws.view(B, -1).sum(1).double()
    assert float(summed.std() / summed.mean()) > 4 * ref_spread


def test_share_law_likelihood_is_a_normalised_split():
    """With the depth factor off and a huge concentration the share law is a multinomial: its
    probabilities of every split of 3 pixels over 3 layers add up to 1 and match the multinomial's."""
    law = LayerShareLaw(3, 1).double()
    with torch.no_grad():
        law.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
        law.depth.zero_()
        law.log_concentration.fill_(14.0)
    splits = torch.tensor([[a, b, 3 - a - b] for a in range(4) for b in range(4 - a)], dtype=torch.float64)
    cond = torch.zeros(len(splits), 1, dtype=torch.float64)
    with torch.no_grad():
        p = law.log_prob(splits, cond).exp()
    assert abs(float(p.sum()) - 1) < 1e-3
    q = torch.softmax(law.bias.detach(), 0)
    multinomial = torch.exp(torch.lgamma(torch.tensor(4.0)) - torch.lgamma(splits + 1).sum(1) + (splits * q.log()).sum(1))
    torch.testing.assert_close(p, multinomial, rtol=2e-3, atol=1e-6)
    # with a depth factor the probabilities still add up to 1
    with torch.no_grad():
        law.depth.copy_(torch.tensor([-0.8, 0.0, 0.8]))
        law.log_concentration.fill_(1.0)
        assert abs(float(law.log_prob(splits, cond).exp().sum()) - 1) < 1e-6


@pytest.mark.slow
def test_share_means_put_the_laws_pixels_per_layer_where_the_datas_are(showers):
    """Fitted to 1-16 GeV showers, the share law's expected pixels per layer summed over those
    showers (its mean shares times each shower's total) are the data's within 0.5 % in every layer
    with share_means; the likelihood fit alone leaves at least one layer more than 2 % off."""
    g = get_geometry("epical-mini")
    n = torch.as_tensor(_per_layer(showers, g.n_layers)).double()
    cond = _cond(showers)
    data = n.sum(0)
    keep = data > 100  # layers with enough pixels for a per-cent comparison
    off = {}
    for means in (False, True):
        law = LayerShareLaw(g.n_layers, 1).double()
        fit_share_law(law, n, cond, means=means)
        with torch.no_grad():
            expected = (law.mean_shares(cond) * n.sum(1, keepdim=True)).sum(0)
        off[means] = float((expected[keep] / data[keep] - 1).abs().max())
    assert off[True] < 0.005, off
    assert off[False] > 0.02, off


def _synthetic_split(curvature: list[float], n: int, pixels: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (n, 4), cond (n, 1)): `pixels` per shower dealt over four layers with shares
    softmax(b x + c x^2), b = (1, 0.5, 0, -0.5), c = `curvature`, x uniform in [-1, 1]."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, n)
    counts = np.stack([rng.multinomial(pixels, q) for q in _true_shares(curvature, x)])
    return torch.as_tensor(counts).double(), torch.as_tensor(x)[:, None]


def _true_shares(curvature: list[float], x: np.ndarray) -> np.ndarray:
    logits = np.outer(x, [1.0, 0.5, 0.0, -0.5]) + np.outer(x * x, curvature)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.mark.slow
def test_share_curvature_forward_keeps_the_curvature_the_upper_range_confirms():
    """share_curvature "forward": shares that bend in x (the upper half of the range confirms the
    bend a fit to the lower half finds) keep their curvature: the weakest ridges are chosen and the
    fitted curvatures are the data's."""
    counts, cond = _synthetic_split([1.5, 0.0, -1.5, 0.0], 2000, 300)
    law = LayerShareLaw(4, 1).double()
    out = fit_share_law(law, counts, cond, means=True, curvature="forward")
    assert out["law_share_curvature_ridge"] < SHARE_CURVATURE_GRID[1], out
    c = law.curvature.detach()[:, 0]
    assert float(((c - c.mean()) - torch.tensor([1.5, 0.0, -1.5, 0.0])).abs().max()) < 0.3, c


@pytest.mark.slow
def test_share_curvature_forward_does_not_carry_noise_beyond_the_range():
    """Shares straight in x, from few sparse showers: the free curvatures are noise, multiplied by
    x^2 beyond the range; forward validation chooses a ridge, and at x = 2.2 (5x the top of a
    1-16 GeV range) the mean shares are closer to the true ones than the free fit's."""
    counts, cond = _synthetic_split([0.0, 0.0, 0.0, 0.0], 400, 20, seed=1)
    at = torch.full((1, 1), 2.2, dtype=torch.float64)
    truth = torch.as_tensor(_true_shares([0.0] * 4, np.array([2.2])))
    error, chosen = {}, None
    for curvature in ("free", "forward"):
        law = LayerShareLaw(4, 1).double()
        out = fit_share_law(law, counts, cond, means=True, curvature=curvature)
        chosen = out.get("law_share_curvature_ridge", chosen)
        with torch.no_grad():
            error[curvature] = float((law.mean_shares(at) / truth - 1).abs().mean())
    assert chosen > 0, chosen
    assert error["forward"] < error["free"], error


def test_share_means_needs_layer_split():
    with pytest.raises(ValueError, match="share_means.*layer_split"):
        TransformerConfig(conditions=["incident_energy"], multiplicity="count", layer_counts=True, share_means=True)


def test_share_curvature_needs_layer_split_and_a_known_value():
    with pytest.raises(ValueError, match="share_curvature.*layer_split"):
        TransformerConfig(conditions=["incident_energy"], multiplicity="count", layer_counts=True,
                          share_curvature="forward")
    raw = {"name": "x", "geometry": "epical-mini", "data": {"store": "unused.zarr"}, "train": {"steps": 1, "batch_size": 2},
           "model": {"family": "transformer", "conditions": ["incident_energy"], "multiplicity": "count",
                     "layer_counts": True, "layer_split": True, "share_curvature": "cubic"}}
    with pytest.raises(ConfigError, match="share_curvature"):
        config_from_dict(raw)
    with pytest.raises(ValueError, match="curvature must be one of"):
        fit_share_law(LayerShareLaw(3, 1), torch.ones(4, 3), torch.zeros(4, 1), curvature="cubic")


def test_layer_split_needs_layer_counts():
    raw = {"name": "x", "geometry": "epical-mini", "data": {"store": "unused.zarr"}, "train": {"steps": 1, "batch_size": 2},
           "model": {"family": "transformer", "conditions": ["incident_energy"], "multiplicity": "count",
                     "layer_split": True}}
    with pytest.raises(ConfigError, match="layer_split.*layer_counts"):
        config_from_dict(raw)


@pytest.mark.slow
def test_split_model_generates_the_drawn_split_and_trains(showers):
    """The transformer with layer_split fits both laws from the training showers, places exactly
    the split it drew in every layer (the same showers whatever the pass size), and trains."""
    from uhg.config.schema import TrainConfig
    from uhg.train.engine import PlainEngine

    g = get_geometry("epical-mini")
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=2, latent_dim=0, conditions=["incident_energy"],
                            multiplicity="count", count_bootstrap=0, max_hits=8192, layer_counts=True,
                            layer_split=True, count_law="unit_quadratic", pace_prior=True)
    family = build_family(g, cfg, NORM)
    torch.manual_seed(0)
    modules = family.build_modules()
    family.initialise_from_data(modules, [showers.slice(0, 300)])
    model = modules["model"].eval()
    assert len(model.counts.positions) == 1 and model.shares is not None
    e_inc = np.array([2000.0, 8000.0, 40000.0])
    cond = family.condition_norm({"incident_energy": torch.as_tensor(e_inc)})
    seeds = [event_seed(5, i, "generate") for i in range(3)]
    gen = generate_tokens(model, cond, seeds, max_hits=8192)
    assert gen.n_capped == 0 and torch.equal(gen.lengths, gen.targets)
    batch = sample_events(model, cond, seeds, {"incident_energy": e_inc}, max_hits=8192)
    assert _per_layer(batch, g.n_layers).sum() == int(gen.targets.sum())
    again = sample_events(model, cond, seeds, {"incident_energy": e_inc}, batch_events=1, max_hits=8192)
    np.testing.assert_array_equal(again.columns["cell"], batch.columns["cell"])
    np.testing.assert_array_equal(again.columns["layer"], batch.columns["layer"])
    model.train()
    engines = {k: PlainEngine(m, family.build_optimizer(k, m, TrainConfig(steps=2, batch_size=4, lr=3e-3)), 1.0)
               for k, m in modules.items()}
    out = family.train_step(engines, TorchHits.from_batch(showers.slice(0, 4)), 0)
    assert math.isfinite(float(out["loss"])) and out["nll_share"] > 0 and out["nll_row"] == 0.0


def _share_law(bias: list[float]) -> LayerShareLaw:
    """A share law of four layers with these share logits, no depth spread and concentration 20."""
    law = LayerShareLaw(4, 1).double()
    with torch.no_grad():
        law.bias.copy_(torch.tensor(bias))
        law.depth.zero_()
        law.log_concentration.fill_(math.log(20.0))
    return law


def test_share_law_draws_a_dirichlet_multinomial_from_uniforms():
    """The split is a function of the shower's uniforms (as every law's draws in generation: the
    counter-based ones), adds up to the total, and has the Dirichlet-multinomial's mean and
    variance: N p_l and N p_l (1 - p_l) (N + kappa) / (1 + kappa)."""
    law = _share_law([0.5, 1.0, 0.0, -1.0])
    B, N = 20000, 300
    cond = torch.zeros(B, 1, dtype=torch.float64)
    totals = torch.full((B,), N)
    u = torch.rand(B, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    split = law.sample(totals, cond, u, torch.full((4,), 10**6))
    assert torch.equal(split, law.sample(totals, cond, u, torch.full((4,), 10**6)))
    assert torch.equal(split.sum(1), totals)
    p = torch.softmax(law.bias.detach(), 0).numpy()
    n = split.double().numpy()
    np.testing.assert_allclose(n.mean(0), N * p, rtol=0.02)
    np.testing.assert_allclose(n.var(0), N * p * (1 - p) * (N + 20.0) / 21.0, rtol=0.06)
    with pytest.raises(ValueError, match="uniforms"):
        law.sample(totals[:3], cond[:3], u[:3, :5], torch.full((4,), 10**6))


def test_a_layer_whose_share_underflows_draws_nothing_and_the_rest_stay_random():
    """A layer whose share logit is far below the others (its Dirichlet parameter exactly 0, as far
    beyond the range) draws no pixels, and the other layers keep their Dirichlet spread rather than
    every shower falling back to the mean shares."""
    law = _share_law([0.5, 1.0, 0.0, -900.0])
    B, N = 2000, 300
    u = torch.rand(B, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    split = law.sample(torch.full((B,), N), torch.zeros(B, 1, dtype=torch.float64), u, torch.full((4,), 10**6))
    n = split.double().numpy()
    assert (n[:, 3] == 0).all() and (n.sum(1) == N).all()
    p = torch.softmax(law.bias.detach()[:3], 0).numpy()
    np.testing.assert_allclose(n[:, :3].var(0), N * p * (1 - p) * (N + 20.0) / 21.0, rtol=0.15)
