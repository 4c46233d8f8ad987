"""The layer-energy model at the size of CaloChallenge dataset 2 (45 layers, 6480 voxels) as the
shipped config builds it: it trains, fits its per-voxel share noise and latent prior, and generates showers whose
layers carry the law's energies, every shower in the geometry's 6480 cells."""

from pathlib import Path

import numpy as np
import pytest
import torch

from uhg.config.loading import load_config
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.sim.calo import simulate_calo_showers
from uhg.sparse.torch_hits import TorchHits
from uhg.train.engine import PlainEngine
from uhg.train.family import build_family

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "calo_layers_ds2.yaml"


@pytest.fixture(scope="module")
def trained():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    g = get_geometry(cfg.geometry)
    sim = cfg.data.simulate
    norm = ConditionNorm.from_ranges({"incident_energy": (sim.energy_min, sim.energy_max)}, cfg.model.conditions)
    # the shipped model; its latent prior and its law fitted after training with fewer steps (96
    # showers here, not 12 000)
    family = build_family(g, cfg.model.model_copy(update={"prior_steps": 300, "law_fit_steps": 100}), norm)
    torch.manual_seed(0)
    model = family.build_modules()["model"]
    data = simulate_calo_showers(g, 96, seed=21, energy_min=sim.energy_min, energy_max=sim.energy_max)
    family.initialise_from_data({"model": model}, [data])
    engine = PlainEngine(model, family.build_optimizer("model", model, cfg.train), cfg.train.gradient_clipping)
    hits = TorchHits.from_batch(data)
    losses = [family.train_step({"model": engine}, hits, step)["loss"] for step in range(8)]
    fitted = family.finalise_from_data(model, [data.slice(0, 48), data.slice(48, 96)])
    yield g, family, model.eval(), data, losses, fitted
    torch.set_num_threads(before)


def test_the_shipped_ds2_model_has_every_layer_and_voxel(trained):
    g, family, model, _, _, _ = trained
    assert (g.n_layers, g.n_cells) == (45, 6480)
    assert model.n_layers == 45 and model.n_voxels == 6480 and model.n_law == 46
    assert torch.equal(torch.bincount(model.voxel_layer), torch.full((45,), 144))


def test_the_shipped_ds2_model_trains_and_fits_its_share_noise(trained):
    _, _, model, _, losses, fitted = trained
    # and its latent prior: the encoder's latents of held-out showers are likelier under it than
    # under the unit normal the VAE's KL term pulls towards
    assert model.cfg.latent_prior == "mixture" and "prior_u" in model.noise_shapes()
    assert fitted["latent_heldout_logp_prior"] > fitted["latent_heldout_logp_unit"], fitted
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    # most voxels are hit often enough in 96 showers to get their own residual quantiles
    assert 0 < fitted["residual_voxels_own_quantiles"] < model.n_voxels
    assert bool(torch.isfinite(model.residual_q).all())
    assert fitted["law_fit_nll_after"] < fitted["law_fit_nll_before"], fitted
    assert bool((model.residual_q.diff(dim=1) >= 0).all())


def test_ds2_showers_carry_the_law_layer_energies(trained):
    g, family, model, data, _, _ = trained
    n = 12
    e_inc = torch.as_tensor(np.geomspace(1e3, 1e5, n), dtype=torch.float32)
    cond = family.condition_norm({"incident_energy": e_inc.double()})
    gen = torch.Generator().manual_seed(4)
    noise = {k: (torch.rand if k.endswith("_u") else torch.randn)((n, *s), generator=gen)
             for k, s in model.noise_shapes().items()}
    voxels = model.sample(e_inc, cond, noise)
    _, e_layer = model.sample_layers(e_inc, cond, noise["law_u"], noise["law_eps"])
    assert model.cfg.empty_layer_voxel == "drawn" and list(noise)[-1] == "empty_u"
    assert voxels.shape == (n, 6480) and bool((voxels >= 0).all())
    torch.testing.assert_close(model.layer_energies(voxels), e_layer, rtol=1e-4, atol=1e-3)
    # the deposit is bounded by the training showers' deposited fractions (the law's support)
    frac = voxels.sum(-1) / e_inc
    train_frac = data.columns["value"].astype(np.float64)
    per_shower = np.bincount(np.repeat(np.arange(len(data)), np.diff(data.offsets)), weights=train_frac,
                             minlength=len(data)) / data.conditions["incident_energy"]
    assert float(frac.max()) <= per_shower.max() * (1 + 1e-3) and float(frac.min()) >= per_shower.min() * (1 - 1e-3)
    # the family's sparse output: fired cells only, all within the geometry
    showers = family.sample(model, {"incident_energy": e_inc.double()}, list(range(n)))
    assert len(showers) == n
    assert int(showers.columns["layer"].max()) < 45 and int(showers.columns["cell"].max()) < 144
    assert bool((showers.columns["value"] > 0).all())
