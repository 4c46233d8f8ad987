"""The layer-energy calorimeter model: showers carry exactly the layer energies of stage 1, do
not depend on the batch they are generated in, and the family refuses geometries it cannot model."""

import numpy as np
import pytest
import torch

from uhg.config.calo_layers import CaloLayersConfig
from uhg.errors import ConfigError
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.train.family import build_family

G = get_geometry("ds1-photons")
NORM = ConditionNorm.from_ranges({"incident_energy": (1e3, 1e5)}, ["incident_energy"])


@pytest.fixture
def family(one_torch_thread):
    torch.manual_seed(0)
    fam = build_family(G, CaloLayersConfig(hidden_dim=64, latent_dim=4, law_hidden=32), NORM)
    return fam, fam.build_modules()["model"].eval()


def test_voxels_sum_to_the_sampled_layer_energies(family):
    fam, model = family
    n = 16
    e_inc = torch.full((n,), 2e4)
    cond = NORM({"incident_energy": e_inc.double()})
    gen = torch.Generator().manual_seed(1)
    noise = {k: (torch.rand if k.endswith("_u") else torch.randn)((n, *s), generator=gen)
             for k, s in model.noise_shapes().items()}
    voxels = model.sample(e_inc, cond, noise)
    y = model.law.sample(cond, noise["law_u"], noise["law_eps"], model.y_lo, model.y_hi)
    frac = (y * model.y_std + model.y_mean).exp() - model.cfg.layer_floor
    expected = torch.where(frac < model.cfg.layer_floor, 0.0, frac) * e_inc[:, None]
    assert voxels.shape == (n, G.n_cells) and bool((voxels >= 0).all())
    torch.testing.assert_close(model.layer_energies(voxels), expected, rtol=1e-4, atol=1e-3)


def test_a_shower_depends_on_its_seed_only(family):
    fam, model = family
    e = torch.tensor([1e3, 5e3, 8e4], dtype=torch.float64)
    three = fam.sample(model, {"incident_energy": e}, [7, 8, 9])
    one = fam.sample(model, {"incident_energy": e[1:2]}, [8])
    assert len(three) == 3 and three.kind == "calo"
    s, o = three.slice(1, 2), one
    assert np.array_equal(s.columns["cell"], o.columns["cell"]) and np.allclose(s.columns["value"], o.columns["value"])


def test_training_loss_is_finite_and_decreases(family):
    from uhg.sim.calo import simulate_calo_showers
    from uhg.sparse.torch_hits import TorchHits
    from uhg.train.engine import PlainEngine

    fam, model = family
    model.train()
    data = simulate_calo_showers(G, 64, seed=3, energy_min=1e3, energy_max=1e5)
    fam.initialise_from_data({"model": model}, [data])
    engine = PlainEngine(model, torch.optim.Adam(model.parameters(), lr=1e-3), 5.0)
    hits = TorchHits.from_batch(data)
    first = fam.train_step({"model": engine}, hits, 0)["loss"]
    for step in range(1, 40):
        last = fam.train_step({"model": engine}, hits, step)["loss"]
    assert np.isfinite(first) and last < first
    # the law's support is the training range of the standardised log layer energies
    y = model.normalise(model.log_layer(model.layer_energies(hits.calo_dense(G.layer_offsets, G.n_cells)),
                                        hits.conditions["incident_energy"].float()))
    torch.testing.assert_close(model.y_lo, y.min(0).values)
    torch.testing.assert_close(model.y_hi, y.max(0).values)
    cond = NORM({"incident_energy": torch.full((256,), 5e4, dtype=torch.float64)})
    wide = model.law.sample(cond, torch.rand(256, model.n_layers), 50 * torch.randn(256, model.n_layers),
                            model.y_lo, model.y_hi)
    assert bool(((wide >= model.y_lo) & (wide <= model.y_hi)).all())


def test_refuses_pixel_and_digital_geometries():
    cfg = CaloLayersConfig()
    with pytest.raises(ConfigError, match="analog calorimeter"):
        build_family(get_geometry("pxd-tiny"), cfg, NORM)
    with pytest.raises(ConfigError, match="analog calorimeter"):
        build_family(get_geometry("epical-mini"), cfg, NORM)
    with pytest.raises(ConfigError, match="must contain 'incident_energy'"):
        build_family(G, CaloLayersConfig(conditions=["luminosity"]), NORM)
