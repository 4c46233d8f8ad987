"""Per-layer count law of the hit transformer on a digital calorimeter (model.layer_counts): the
law draws the hits of every layer, generation places exactly that many in each layer, training
no longer predicts the layer, and the longitudinal profile follows the law beyond the training
range; the multi-factor copula (model.count_factors)."""

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
from uhg.models.laws import CountLaw, factor_log_density, one_factor_log_density
from uhg.models.transformer_sampling import generate_tokens, sample_events
from uhg.seeding import event_seed
from uhg.sim.calo import simulate_calo_showers
from uhg.sparse.torch_hits import TorchHits
from uhg.train.family import build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = (1000.0, 16000.0)


def _seeds(seed: int, n: int) -> list[int]:
    return [event_seed(seed, i, "generate") for i in range(n)]


def _per_layer(batch, n_layers: int) -> np.ndarray:
    idx = batch.event_index() * n_layers + batch.columns["layer"].astype(np.int64)
    return np.bincount(idx, minlength=len(batch) * n_layers).reshape(len(batch), n_layers)


def _family(layer_counts: bool, **kw):
    g = get_geometry("epical-mini")
    cfg = TransformerConfig(d_model=32, n_layers=1, n_heads=2, latent_dim=0, conditions=["incident_energy"],
                            multiplicity="count", count_bootstrap=0, max_hits=8192, layer_counts=layer_counts, **kw)
    return g, build_family(g, cfg, ConditionNorm.from_ranges({"incident_energy": TRAIN}, ["incident_energy"]))


@pytest.fixture(scope="module")
def showers():
    return simulate_calo_showers(get_geometry("epical-mini"), 300, seed=4, energy_min=TRAIN[0], energy_max=TRAIN[1])


@pytest.mark.slow
def test_longitudinal_profile_follows_the_layer_law_beyond_the_training_range(showers):
    """Fitted to showers of 1-16 GeV, an untrained network with the per-layer law generates at
    32 GeV the mean depth (hit-weighted layer) of simulated 32 GeV showers, and every layer holds
    exactly the hits the law drew for it. With one count per shower the untrained network
    chooses the layers itself and the depth is far off."""
    g = get_geometry("epical-mini")
    ref = _per_layer(simulate_calo_showers(g, 200, seed=9, energy_min=32000.0, energy_max=32000.0), g.n_layers)
    layers = np.arange(g.n_layers)
    ref_depth = float(((ref * layers).sum(1) / ref.sum(1)).mean())
    n = 4
    e_inc = np.full(n, 32000.0)
    for layered in (True, False):
        _, family = _family(layered)
        torch.manual_seed(0)
        modules = family.build_modules()
        family.initialise_from_data(modules, [showers])
        model = modules["model"].eval()
        cond = family.condition_norm({"incident_energy": torch.as_tensor(e_inc)})
        gen = generate_tokens(model, cond, _seeds(2, n), max_hits=8192)
        per_layer = torch.zeros(n, g.n_layers, dtype=torch.long)
        t = torch.arange(gen.rows.shape[1])[None]
        per_layer.scatter_add_(1, gen.rows, (t < gen.lengths[:, None]).long())
        depth = float(((per_layer * torch.arange(g.n_layers)).sum(1) / per_layer.sum(1)).mean())
        if layered:
            assert torch.equal(gen.lengths, gen.targets)
            drawn = model.counts.mean(cond).detach()
            assert abs(float(drawn.sum(1).mean()) / ref.sum(1).mean() - 1) < 0.15
            assert abs(depth - ref_depth) < 0.6, (depth, ref_depth)
        else:
            assert abs(depth - ref_depth) > 2.0, (depth, ref_depth)


@pytest.mark.slow
def test_generation_places_exactly_the_drawn_hits_of_every_layer(showers):
    g, family = _family(True, pace_prior=True)
    torch.manual_seed(1)
    modules = family.build_modules()
    family.initialise_from_data(modules, [showers])
    model = modules["model"].eval()
    n = 3
    e_inc = np.array([2000.0, 8000.0, 16000.0])
    cond = family.condition_norm({"incident_energy": torch.as_tensor(e_inc)})
    batch = sample_events(model, cond, _seeds(5, n), {"incident_energy": e_inc}, max_hits=8192)
    gen = generate_tokens(model, cond, _seeds(5, n), max_hits=8192)
    assert gen.n_capped == 0 and torch.equal(gen.lengths, gen.targets)
    counts = _per_layer(batch, g.n_layers)
    assert counts.sum() == int(gen.targets.sum())
    # cells within a layer sorted and unique: the room kept for the layer's remaining hits never runs out
    flat = batch.columns["layer"].astype(np.int64) * 4096 + batch.columns["cell"]
    for e in range(n):
        f = flat[batch.offsets[e]:batch.offsets[e + 1]]
        assert np.all(np.diff(f) > 0)
    # split-independent: the same events whatever the pass size
    again = sample_events(model, cond, _seeds(5, n), {"incident_energy": e_inc}, batch_events=1, max_hits=8192)
    np.testing.assert_array_equal(again.columns["cell"], batch.columns["cell"])


def test_training_drops_the_layer_prediction_and_learns_the_cells(showers):
    from uhg.config.schema import TrainConfig
    from uhg.train.engine import PlainEngine

    _, family = _family(True, pace_prior=True)
    torch.manual_seed(0)
    modules = family.build_modules()
    family.initialise_from_data(modules, [showers])
    engines = {k: PlainEngine(m, family.build_optimizer(k, m, TrainConfig(steps=2, batch_size=4, lr=3e-3)), 1.0)
               for k, m in modules.items()}
    for step in range(2):
        out = family.train_step(engines, TorchHits.from_batch(showers.slice(4 * step, 4 * step + 4)), step)
        assert math.isfinite(float(out["loss"])) and out["nll_row"] == 0.0 and out["nll_col"] > 0
    assert float(modules["model"].pace_weight.detach()) != 1.0


def test_several_copula_factors_keep_marginals_and_match_one_factor():
    """K factors: the density of one factor equals the one-factor Woodbury density; draws keep
    each unit's NB marginal, and two factors carry an anti-correlation between units that one
    factor with these loadings could not (early against late layers of a shower)."""
    lam = torch.tensor([0.5, -0.3, 0.7], dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(factor_log_density(y, lam[:, None]), one_factor_log_density(y, lam))
    law = CountLaw(4, 1, [4096] * 4, "power", factors=2).double()
    with torch.no_grad():
        law.bias.fill_(math.log(50 / 4046))
        law.log_dispersion.fill_(math.log(30.0))
        law.factor_loading.copy_(torch.tensor([[0.8, 0.8], [0.8, 0.8], [0.8, -0.8], [0.8, -0.8]]))
    B = 20000
    gen = torch.Generator().manual_seed(1)
    n, _ = law.sample(torch.rand(B * 4, generator=gen, dtype=torch.float64),
                      torch.rand(B, 2, generator=gen, dtype=torch.float64), torch.zeros(B, 1, dtype=torch.float64),
                      1 << 20)
    n = n.view(B, 4).double()
    assert torch.allclose(n.mean(0), torch.full((4,), 50.0, dtype=torch.float64), rtol=0.03)
    var = 50 + 50**2 / 30
    assert torch.allclose(n.var(0), torch.full((4,), var, dtype=torch.float64), rtol=0.08)
    corr = torch.corrcoef(n.T)
    assert corr[0, 1] > 0.4 and abs(corr[0, 2]) < 0.05  # scores correlate by (0.64 + 0.64) / 2.28 and 0


def test_layer_counts_settings_are_checked():
    raw = {"name": "x", "geometry": "pxd-tiny", "data": {"store": "unused.zarr"}, "train": {"steps": 1, "batch_size": 2},
           "model": {"family": "transformer", "layer_counts": True}}
    with pytest.raises(ConfigError, match="layer_counts.*multiplicity=count"):
        config_from_dict(raw)
    cfg = TransformerConfig(conditions=["luminosity"], multiplicity="count", layer_counts=True)
    with pytest.raises(ConfigError, match="layer_counts.*pixel detector"):
        build_family(get_geometry("pxd-tiny"), cfg, ConditionNorm.from_ranges({"luminosity": (1.0, 2.0)}, ["luminosity"]))


def test_shipped_epical_config_draws_a_layer_profile_that_holds_beyond_the_range():
    """configs/epical_transformer_mini.yaml fits a pixel-total law and a per-layer share law to the
    training showers (layer_split), and its mean pixels per layer at 2x the training top (the
    total's mean times the mean shares) stay close to simulated showers there."""
    from pathlib import Path

    from uhg.config.loading import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "epical_transformer_mini.yaml", [])
    g = get_geometry(cfg.geometry)
    family = build_family(g, cfg.model, ConditionNorm.from_ranges({"incident_energy": TRAIN}, ["incident_energy"]))
    torch.manual_seed(0)
    modules = family.build_modules()
    family.initialise_from_data(modules, [simulate_calo_showers(g, 1500, seed=6, energy_min=TRAIN[0],
                                                                energy_max=TRAIN[1])])
    model = modules["model"]
    assert len(model.counts.positions) == 1 and model.shares is not None
    ref = _per_layer(simulate_calo_showers(g, 200, seed=9, energy_min=32000.0, energy_max=32000.0), g.n_layers)
    cond = family.condition_norm({"incident_energy": torch.tensor([32000.0])})
    with torch.no_grad():
        mean = (model.counts.mean(cond) * model.shares.mean_shares(cond.to(model.shares.bias.dtype)))[0].double().numpy()
    target = ref.mean(0)
    mre = float(np.mean(np.abs(mean / target - 1)))
    assert mre < 0.2, mre
    layers = np.arange(g.n_layers)
    assert abs((mean * layers).sum() / mean.sum() / ((target * layers).sum() / target.sum()) - 1) < 0.04
