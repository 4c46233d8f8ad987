"""A short training of every shipped calorimeter config moves the per-layer energy profile of
generated showers toward the simulated showers (energy-weighted L1 distance of the mean energy
per layer, against showers of a disjoint seed)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from uhg.config.loading import load_config
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.seeding import event_seed
from uhg.sim.calo import simulate_calo_showers
from uhg.sparse.torch_hits import TorchHits
from uhg.train.engine import PlainEngine
from uhg.train.family import build_family

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# config -> (training showers, steps); small enough for a test, long enough to learn the profile.
# calo_transformer_mini (measured, distance from 0.375 untrained): 0.079 after 50 steps, 0.052
# after 100, 0.034 after 150 (14.9 / 22.6 / 31.4 s), the bound 0.187.
# epical_transformer_mini's profile is its layer laws', fitted before any step (below): its steps
# only have to show that training keeps it (measured: distance 0.0354 after 10 steps and after 40,
# bound 0.078; 40 steps took 100 s on the 2-core VM, 10 steps 36 s)
SHORT = {"calo_layers_ds1.yaml": (600, 600), "calo_transformer_mini.yaml": (300, 50), "calo_gan_mini.yaml": (200, 150),
         "epical_transformer_mini.yaml": (200, 10)}
# fraction of the untrained profile distance that the short training must get below. The layer
# law of calo_layers_ds1 (layer_target: total_shares) starts closer, its standardised deposited
# fraction and shares put an untrained model at distance 0.18 (measured: 0.18 -> 0.133 after 300
# steps, -> 0.119 after 600)
SHRINK = {"calo_layers_ds1.yaml": 0.7}
# showers of the lower part of the config's energy range only: the pixel calorimeter's 1-16 GeV
# fire up to ~1100 pixels, a token each, too long a sequence for a short CPU test
ENERGY_MAX = {"epical_transformer_mini.yaml": 4000.0}
# GPU-sized: minutes per step on a 2-core CPU and ~8 GB for the full transformer, so their short
# training is not a CPU test (they share the family code of the mini configs; test_config validates them)
GPU_SIZED = {"calo_transformer.yaml", "calo_gan.yaml"}
# too slow for this test on a 2-core CPU: calo_layers_ds2 trains at 0.64-1.55 steps/s (6480 voxels;
# docs/results.md), and the ds1 model of the same family needs ~300 steps to move its profile
# (above), 3-8 min; its 45-layer model is tested in test_calo_layers_ds2.py, and its law's
# short training moving the profile in the ds2 test at the end of this file
CPU_SLOW = {"calo_layers_ds2.yaml"}
# the full 25 M-channel pixel calorimeter: its layer profile is the count laws' (as for the mini
# config above, which covers the family's short training); its factorised pixel head trains and
# generates full-geometry showers in tests/test_transformer_factorised.py
FACTORISED = {"epical_transformer.yaml"}


def test_every_shipped_calorimeter_config_is_covered():
    shipped = {p.name for pattern in ("calo_*.yaml", "epical_*.yaml") for p in CONFIGS.glob(pattern)}
    assert shipped == set(SHORT) | GPU_SIZED | CPU_SLOW | FACTORISED


def layer_profile(batch, g) -> np.ndarray:
    """Mean energy per layer (MeV)."""
    layer = batch.columns["layer"].astype(np.int64)
    return np.bincount(layer, weights=batch.columns["value"].astype(np.float64), minlength=g.n_layers) / len(batch)


def profile_distance(fake, real, g) -> float:
    f, r = layer_profile(fake, g), layer_profile(real, g)
    return float(np.abs(f - r).sum() / r.sum())


# measured: 150 steps of the calorimeter GAN on 200 DS2 showers do not halve the distance
# (docs/calorimeter.md, "GAN on DS2 showers": its longitudinal profile is still too deep)
GAN_TOO_DEEP = pytest.mark.xfail(strict=True, reason="the calorimeter GAN's short training does not fix its too deep "
                                 "longitudinal profile")


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=GAN_TOO_DEEP) if "gan" in n else n for n in sorted(SHORT)])
def test_short_training_moves_the_layer_profile_toward_the_data(name, one_torch_thread):
    n_train, steps = SHORT[name]
    cfg = load_config(CONFIGS / name, [f"train.steps={steps}"])
    g = get_geometry(cfg.geometry)
    sim = cfg.data.simulate
    e_max = ENERGY_MAX.get(name, sim.energy_max)
    train = simulate_calo_showers(g, n_train, seed=11, energy_min=sim.energy_min, energy_max=e_max)
    real = simulate_calo_showers(g, 200, seed=12, energy_min=sim.energy_min, energy_max=e_max)
    norm = ConditionNorm.from_ranges({"incident_energy": (sim.energy_min, e_max)}, cfg.model.conditions)
    family = build_family(g, cfg.model, norm)
    torch.manual_seed(0)
    modules = family.build_modules()
    fit = family.fit_sample(n_train) if hasattr(family, "fit_sample") else []
    if len(fit):  # as the training loop: a family that wants no events has no data-driven start
        family.initialise_from_data(modules, [train.take(fit)])
    # the modules' own optimisers without DeepSpeed: the profile test is about the model, not the engine
    engines = {name: PlainEngine(m, family.build_optimizer(name, m, cfg.train), cfg.train.gradient_clipping)
               for name, m in modules.items()}
    conds = {"incident_energy": torch.as_tensor(real.conditions["incident_energy"])}
    seeds = [event_seed(5, i, "generate") for i in range(len(real))]
    generator = modules[family.generator_name]

    def distance() -> float:
        generator.eval()
        d = profile_distance(family.sample(generator, conds, seeds), real, g)
        generator.train()
        return d

    # a per-layer count law fixes the profile before any step (below): the untrained distance is
    # only the other configs' yardstick, and an untrained generation of 200 showers is not free
    laws = getattr(cfg.model, "layer_counts", False)
    before = None if laws else distance()
    rng = np.random.default_rng(0)
    batch = cfg.train.batch_size
    for step in range(steps):
        family.train_step(engines, TorchHits.from_batch(train.take(rng.choice(n_train, batch, replace=False))), step)
    after = distance()
    if laws:
        # a per-layer count law: the profile is the law's, fitted in the data-driven start (before
        # any step); the short training must keep it within 3.5x the distance between two simulated
        # samples. Measured (epical, laws fitted to these 200 showers): the law's expected profile is
        # at 2.1x that distance (0.048 against 0.022), its draws for 200 showers at 1.5-3.1x over four
        # seed sets, with the share law's numpy draws before as with its counter-based draws now
        real2 = simulate_calo_showers(g, 200, seed=13, energy_min=sim.energy_min, energy_max=e_max)
        floor = profile_distance(real2, real, g)
        assert after < 3.5 * floor, (name, after, floor)
    else:
        assert after < SHRINK.get(name, 0.5) * before, (name, before, after)


@pytest.mark.slow
def test_short_law_fit_of_the_ds2_config_moves_the_layer_profile_toward_the_data(one_torch_thread):
    # calo_layers_ds2 is too slow for the whole-model test above; its showers carry exactly the
    # layer energies of its law (tests/test_calo_layers_ds2.py), so the law's own short training
    # (the after-training fit, `law_fit_steps`) is what moves their profile. Measured (distance
    # 0.398 before the fit, bound half of it): 0.361 after 50 steps, 0.270 after 100, 0.202 after
    # 150, 0.155 after 200, 0.102 after 300 (each with its own cosine-decayed rate)
    cfg = load_config(CONFIGS / "calo_layers_ds2.yaml", ["model.law_fit_steps=200"])
    g = get_geometry(cfg.geometry)
    sim = cfg.data.simulate
    train = simulate_calo_showers(g, 600, seed=11, energy_min=sim.energy_min, energy_max=sim.energy_max)
    real = simulate_calo_showers(g, 400, seed=12, energy_min=sim.energy_min, energy_max=sim.energy_max)
    norm = ConditionNorm.from_ranges({"incident_energy": (sim.energy_min, sim.energy_max)}, cfg.model.conditions)
    family = build_family(g, cfg.model, norm)
    torch.manual_seed(0)
    model = family.build_modules()["model"]
    family.initialise_from_data({"model": model}, [train])
    voxels, e_inc, cond = family.dense_showers(model, [train])
    e_real = torch.as_tensor(real.conditions["incident_energy"], dtype=torch.float32)
    c_real = norm({"incident_energy": e_real})
    gen = torch.Generator().manual_seed(5)
    u, eps = torch.rand(len(e_real), model.n_law, generator=gen), torch.randn(len(e_real), model.n_law, generator=gen)
    real_profile = model.layer_energies(family.dense_showers(model, [real])[0]).double().mean(0)

    def distance() -> float:
        profile = model.sample_layers(e_real, c_real, u, eps)[1].double().mean(0)
        return float((profile - real_profile).abs().sum() / real_profile.sum())

    before = distance()
    model.fit_law(voxels, e_inc, cond)
    after = distance()
    assert after < 0.5 * before, (before, after)
