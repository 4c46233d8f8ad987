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


def _noise(model, n: int, seed: int) -> dict[str, torch.Tensor]:
    """Every noise input of `model.sample` for n showers: uniforms for `*_u`, normals otherwise."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.rand if k.endswith("_u") else torch.randn)((n, *s), generator=gen)
            for k, s in model.noise_shapes().items()}


def test_voxels_sum_to_the_sampled_layer_energies(family):
    fam, model = family
    n = 16
    e_inc = torch.full((n,), 2e4)
    cond = NORM({"incident_energy": e_inc.double()})
    noise = _noise(model, n, seed=1)
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


def test_rings_hold_the_voxels_of_one_layer_and_radius():
    from uhg.models.calo_layers_family import voxel_rings

    ring = voxel_rings(G).numpy()
    assert ring.shape == (G.n_cells,)
    offsets = np.asarray(G.layer_offsets)
    layer = np.searchsorted(offsets, np.arange(G.n_cells), side="right") - 1
    radius = np.concatenate([np.hypot(*G.cell_centers(lay)) for lay in G.active_layers])
    n_r = sum(G.layer_shape(lay)[1] for lay in G.active_layers)
    assert set(ring.tolist()) == set(range(n_r))
    for r in range(n_r):
        sel = ring == r
        assert len(set(layer[sel].tolist())) == 1 and np.ptp(radius[sel]) < 1e-6 * max(radius[sel].max(), 1)
        assert sel.sum() == G.layer_shape(int(layer[sel][0]))[0]  # one voxel per alpha bin


def test_ring_correlated_noise_is_the_equicorrelated_gaussian():
    from uhg.models.calo_layers import VoxelShareVae

    torch.manual_seed(0)
    ring = torch.tensor([0, 0, 0, 1, 1, 2])
    vae = VoxelShareVae(6, 1, 2, 8, ring).double()
    b = 5
    x, mu = torch.randn(b, 6, dtype=torch.float64), torch.randn(b, 6, dtype=torch.float64)
    log_sigma = 0.3 * torch.randn(b, 6, dtype=torch.float64)
    rho = torch.rand(b, 3, dtype=torch.float64) * 0.9
    hit = torch.rand(b, 6) < 0.7
    hit[0] = True
    hit[1, :3] = False  # an empty ring contributes nothing
    got = vae.gauss_nll(x, hit.double(), mu, log_sigma, rho)
    for i in range(b):
        idx = torch.nonzero(hit[i]).flatten()
        if len(idx) == 0:
            assert float(got[i]) == 0.0
            continue
        sig = log_sigma[i, idx].exp()
        same = ring[idx][:, None] == ring[idx][None, :]
        corr = torch.where(same, rho[i, ring[idx]][:, None].expand(-1, len(idx)), torch.zeros(()).double())
        corr = corr + torch.diag(1 - torch.diagonal(corr))
        cov = corr * sig[:, None] * sig[None, :]
        ref = -torch.distributions.MultivariateNormal(mu[i, idx], cov).log_prob(x[i, idx])
        torch.testing.assert_close(got[i], ref)
    # without rho: the independent Gaussians
    indep = vae.gauss_nll(x, hit.double(), mu, log_sigma, None)
    ref = -(torch.distributions.Normal(mu, log_sigma.exp()).log_prob(x) * hit).sum(-1)
    torch.testing.assert_close(indep, ref)
    # sampled noise: variance sigma^2, correlation rho within a ring, none across rings
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    r = torch.tensor([[0.8, 0.3, 0.5]], dtype=torch.float64).expand(n, -1)
    ls = torch.zeros(n, 6, dtype=torch.float64)
    eps = vae.noise(ls, r, torch.randn(n, 6, generator=gen, dtype=torch.float64),
                    torch.randn(n, 3, generator=gen, dtype=torch.float64))
    c = torch.corrcoef(eps.T)
    assert torch.allclose(eps.var(0), torch.ones(6, dtype=torch.float64), atol=0.02)
    assert abs(float(c[0, 1]) - 0.8) < 0.01 and abs(float(c[3, 4]) - 0.3) < 0.01 and abs(float(c[0, 3])) < 0.01


def test_ring_correlated_family_samples_and_trains(one_torch_thread):
    from uhg.sim.calo import simulate_calo_showers
    from uhg.sparse.torch_hits import TorchHits
    from uhg.train.engine import PlainEngine

    torch.manual_seed(0)
    fam = build_family(G, CaloLayersConfig(hidden_dim=64, latent_dim=4, law_hidden=32, ring_correlation=True), NORM)
    model = fam.build_modules()["model"]
    assert "ring_eps" in model.noise_shapes()
    data = simulate_calo_showers(G, 64, seed=3, energy_min=1e3, energy_max=1e5)
    fam.initialise_from_data({"model": model}, [data])
    engine = PlainEngine(model, torch.optim.Adam(model.parameters(), lr=1e-3), 5.0)
    hits = TorchHits.from_batch(data)
    first = fam.train_step({"model": engine}, hits, 0)["loss"]
    for step in range(1, 30):
        last = fam.train_step({"model": engine}, hits, step)["loss"]
    assert np.isfinite(first) and last < first
    e = torch.tensor([2e3, 3e4], dtype=torch.float64)
    two = fam.sample(model.eval(), {"incident_energy": e}, [4, 5])
    one = fam.sample(model, {"incident_energy": e[1:]}, [5])
    s = two.slice(1, 2)
    assert np.array_equal(s.columns["cell"], one.columns["cell"]) and np.allclose(s.columns["value"], one.columns["value"])


def test_share_cap_is_the_training_maximum_and_bounds_tail_draws(one_torch_thread):
    from uhg.sim.calo import simulate_calo_showers
    from uhg.sparse.torch_hits import TorchHits

    torch.manual_seed(0)
    fam = build_family(G, CaloLayersConfig(hidden_dim=64, latent_dim=4, law_hidden=32, share_cap=True), NORM)
    model = fam.build_modules()["model"].eval()
    data = simulate_calo_showers(G, 64, seed=3, energy_min=1e3, energy_max=1e5)
    fam.initialise_from_data({"model": model}, [data.take(np.arange(32)), data.take(np.arange(32, 64))])
    dense = TorchHits.from_batch(data).calo_dense(G.layer_offsets, G.n_cells).double()
    e_layer = model.layer_energies(dense)
    share = (dense / e_layer[:, model.voxel_layer].clamp_min(1e-30)).max(0).values
    expected = torch.log(share.clamp_min(model.cfg.share_floor)).float()
    torch.testing.assert_close(model.log_share_hi, expected, rtol=1e-5, atol=1e-5)
    # every voxel hit and drawn far into its upper tail: each lands on its cap, so within a layer
    # the voxels share the energy in proportion to their caps
    n = 4
    e_inc = torch.full((n,), 3e4)
    cond = NORM({"incident_energy": e_inc.double()})
    noise = _noise(model, n, seed=2)
    noise["voxel_u"] = torch.zeros(n, G.n_cells)
    noise["voxel_eps"] = torch.full((n, G.n_cells), 1e3)
    voxels = model.sample(e_inc, cond, noise)
    cap = model.log_share_hi.exp()
    per_layer = torch.zeros(model.n_layers).index_add_(0, model.voxel_layer, cap)
    want = (cap / per_layer[model.voxel_layer]) * model.layer_energies(voxels)[:, model.voxel_layer]
    torch.testing.assert_close(voxels, want, rtol=1e-4, atol=1e-4)
    uncapped = build_family(G, CaloLayersConfig(hidden_dim=64, latent_dim=4, law_hidden=32), NORM)
    assert "log_share_hi" not in uncapped.build_modules()["model"].state_dict()


def _briefly_trained(share_noise: str, **options):
    """(family, model, training showers, their TorchHits): a small model trained 30 steps on 400 DS1 showers."""
    from uhg.sim.calo import simulate_calo_showers
    from uhg.sparse.torch_hits import TorchHits
    from uhg.train.engine import PlainEngine

    torch.manual_seed(0)
    cfg = CaloLayersConfig(hidden_dim=64, latent_dim=4, law_hidden=32, share_noise=share_noise, **options)
    fam = build_family(G, cfg, NORM)
    model = fam.build_modules()["model"]
    data = simulate_calo_showers(G, 400, seed=4, energy_min=1e3, energy_max=1e5)
    fam.initialise_from_data({"model": model}, [data])
    engine = PlainEngine(model, torch.optim.Adam(model.parameters(), lr=1e-3), 5.0)
    hits = TorchHits.from_batch(data)
    for step in range(30):
        fam.train_step({"model": engine}, hits, step)
    return fam, model, data, hits


def test_empirical_share_noise_follows_the_training_residuals(one_torch_thread):
    """`share_noise: empirical`: after training, each voxel's log-share noise is drawn from the
    quantiles of its standardised residuals in training showers, through the same normals."""
    from uhg.models.calo_layers import RESIDUAL_LEVELS, RESIDUAL_MIN_HITS

    fam, model, data, hits = _briefly_trained("empirical")
    cfg = fam.cfg
    normal_q = model.residual_q.clone()
    # before the fit the map is the normal's own quantile function (identity in the bulk)
    z = torch.linspace(-1.5, 1.5, 7)[None, :].expand(1, -1)
    mapped = model.empirical_noise(torch.nn.functional.pad(z, (0, G.n_cells - 7)))[0, :7]
    torch.testing.assert_close(mapped, z[0], atol=0.02, rtol=0)

    fitted = fam.finalise_from_data(model, [data.slice(0, 200), data.slice(200, 400)])
    assert model.training and fitted["residual_voxels_own_quantiles"] > 0
    # an independent computation of one well-hit voxel's residual quantiles
    model.eval()
    voxels = hits.calo_dense(G.layer_offsets, G.n_cells).float()
    e_inc = hits.conditions["incident_energy"].float()
    cond = NORM(hits.conditions)
    e_layer = model.layer_energies(voxels)
    y = model.normalise(model.log_layer(e_layer, e_inc))
    log_share = torch.log((voxels / e_layer[:, model.voxel_layer].clamp_min(1e-30)).clamp_min(cfg.share_floor))
    hit = voxels > 0
    with torch.no_grad():
        ctx = torch.cat([cond, y], -1)
        mu_z = model.vae.encode(log_share, hit, ctx)[0]
        _, mu, log_sigma, _ = model.vae.decode(mu_z, ctx)
    v = int(hit.sum(0).argmax())
    assert int(hit[:, v].sum()) >= RESIDUAL_MIN_HITS
    resid = ((log_share[:, v] - mu[:, v]) / log_sigma[:, v].exp())[hit[:, v]]
    levels = (torch.arange(RESIDUAL_LEVELS) + 0.5) / RESIDUAL_LEVELS
    torch.testing.assert_close(model.residual_q[v], torch.quantile(resid, levels), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(model.residual_q, normal_q)
    # sampled standard normals come out with the fitted quantiles
    n = 64_000
    draws = model.empirical_noise(torch.randn(n, G.n_cells, generator=torch.Generator().manual_seed(2)))[:, v]
    q = torch.quantile(draws, levels[4:-4])
    torch.testing.assert_close(q, model.residual_q[v, 4:-4], atol=0.05 * float(resid.std()), rtol=0)
    # and the showers still carry exactly the layer energies of stage 1
    noise = _noise(model, 8, seed=1)
    e8 = torch.full((8,), 2e4)
    c8 = NORM({"incident_energy": e8.double()})
    out = model.sample(e8, c8, noise)
    y8 = model.law.sample(c8, noise["law_u"], noise["law_eps"], model.y_lo, model.y_hi)
    frac = (y8 * model.y_std + model.y_mean).exp() - cfg.layer_floor
    torch.testing.assert_close(model.layer_energies(out), torch.where(frac < cfg.layer_floor, 0.0, frac) * e8[:, None],
                               rtol=1e-4, atol=1e-3)
    # the sampling path uses the fitted quantiles: the Gaussian draw of the same noise differs
    model.cfg = cfg.model_copy(update={"share_noise": "gaussian"})
    assert not torch.allclose(model.sample(e8, c8, noise), out)


def test_mixture_latent_prior_draws_latents_where_the_encoder_puts_training_showers(one_torch_thread):
    """`latent_prior: mixture`: frozen while the VAE trains, then fitted to draws of the encoder's
    q(z | shower) of training showers; generation decodes latents drawn from it. The encoder is
    shifted here so that its latents sit far from the unit normal, as the aggregate posterior of
    a trained VAE can."""
    fam, model, data, hits = _briefly_trained("gaussian", latent_prior="mixture", prior_steps=400)
    untouched = {k: v.clone() for k, v in model.prior.state_dict().items()}
    for step in range(3):  # the training step leaves the prior alone
        fam.train_step({"model": _family_engine(model)}, hits, step)
    assert all(torch.equal(v, model.prior.state_dict()[k]) for k, v in untouched.items())
    assert "prior_u" in model.noise_shapes()
    with torch.no_grad():
        model.vae.encoder[-1].bias[:4] += torch.tensor([3.0, -2.0, 0.0, 1.5])
    fitted = fam.finalise_from_data(model, [data.slice(0, 200), data.slice(200, 400)])
    # held-out posterior means are far more likely under the fitted prior than the unit normal
    assert fitted["latent_heldout_logp_prior"] > fitted["latent_heldout_logp_unit"] + 4.0, fitted
    model.eval()
    voxels = hits.calo_dense(G.layer_offsets, G.n_cells).float()
    e_inc = hits.conditions["incident_energy"].float()
    cond = NORM(hits.conditions)
    with torch.no_grad():
        mu_z, logvar_z, ctx = model.encode_latents(voxels, e_inc, cond)
        gen = torch.Generator().manual_seed(5)
        reps = 20
        posterior = (mu_z + torch.randn(reps, *mu_z.shape, generator=gen) * (0.5 * logvar_z).exp()).flatten(0, 1)
        drawn = model.prior.sample(ctx.repeat(reps, 1), torch.rand(reps * len(ctx), 1, generator=gen),
                                   torch.randn(reps * len(ctx), 4, generator=gen))
    torch.testing.assert_close(drawn.mean(0), posterior.mean(0), atol=0.15 * float(posterior.std(0).max()), rtol=0)
    torch.testing.assert_close(drawn.std(0), posterior.std(0), rtol=0.2, atol=0.02)
    # generation draws the latent from the prior: same noise, different showers than the unit normal
    noise = _noise(model, 8, seed=1)
    e8 = torch.full((8,), 2e4)
    c8 = NORM({"incident_energy": e8.double()})
    out = model.sample(e8, c8, noise)
    prior = model.prior
    del model.prior
    assert "prior_u" not in model.noise_shapes()
    assert not torch.allclose(model.sample(e8, c8, noise), out)
    model.prior = prior
    torch.testing.assert_close(model.layer_energies(out).sum(-1), model.layer_energies(model.sample(e8, c8, noise)).sum(-1))


def _family_engine(model):
    """A plain engine with the family's optimiser (which leaves frozen parameters out)."""
    from uhg.config.schema import TrainConfig
    from uhg.train.calo_layers_family import CaloLayersFamily
    from uhg.train.engine import PlainEngine

    fam = build_family(G, model.cfg, NORM)
    assert isinstance(fam, CaloLayersFamily)
    opt = fam.build_optimizer("model", model, TrainConfig(steps=1, batch_size=8))
    assert all(p.requires_grad for group in opt.param_groups for p in group["params"])
    return PlainEngine(model, opt, 5.0)


@pytest.mark.slow
def test_training_exports_the_fitted_share_noise(tmp_path, world_of_one):
    """`uhg train` fits the empirical log-share noise after the last step and exports it."""
    from uhg.config import load_config
    from uhg.models.generator import Generator
    from uhg.train.hooks import TrainHooks
    from uhg.train.loop import train

    path = tmp_path / "calo.yaml"
    path.write_text(f"""
name: calo_tiny
seed: 3
geometry: ds1-photons
data:
  store: {tmp_path / "calo.zarr"}
  simulate: {{n_events: 64, part_size: 32, seed: 5, energy_min: 1000.0, energy_max: 100000.0}}
  validation_fraction: 0.25
  validation_events: 4
model: {{family: calo_layers, law_hidden: 16, latent_dim: 4, hidden_dim: 32, share_noise: empirical}}
train: {{steps: 3, batch_size: 8, checkpoint_every: 0, validate_every: 0, log_every: 1}}
tracking: {{enabled: false}}
""")
    result = train(load_config(path, [f"output_dir={tmp_path / 'run'}"]), hooks=TrainHooks())
    q = Generator.load(result.export).module.residual_q
    levels = (torch.arange(q.shape[1], dtype=torch.float64) + 0.5) / q.shape[1]
    normal_q = torch.distributions.Normal(0.0, 1.0).icdf(levels).float()
    assert bool(torch.isfinite(q).all()) and bool((q.diff(dim=1) >= 0).all())
    assert float((q - normal_q).abs().max()) > 0.1  # fitted, not the normal it starts from
    plain = train(load_config(path, [f"output_dir={tmp_path / 'plain'}", "model.share_noise=gaussian"]),
                  hooks=TrainHooks())
    assert not hasattr(Generator.load(plain.export).module, "residual_q")
    mixed = train(load_config(path, [f"output_dir={tmp_path / 'mixed'}", "model.share_noise=empirical_correlated"]),
                  hooks=TrainHooks())
    mix = Generator.load(mixed.export).module.noise_mix
    assert bool(torch.isfinite(mix).all()) and not torch.allclose(mix, torch.eye(mix.shape[1]).expand_as(mix))
    with_prior = train(load_config(path, [f"output_dir={tmp_path / 'prior'}", "model.latent_prior=mixture",
                                          "model.prior_steps=20"]), hooks=TrainHooks())
    loaded = Generator.load(with_prior.export)
    showers = loaded.generate({"incident_energy": np.array([5e3, 5e4])}, seed=1)
    assert hasattr(loaded.module, "prior") and len(showers) == 2
    # the run's final validation describes the export (the prior fitted), not the model before the fit
    from uhg.sparse.torch_hits import TorchHits
    from uhg.train.loop import prepare_data

    prior_cfg = load_config(path, [f"output_dir={tmp_path / 'prior'}", "model.latent_prior=mixture"])
    data = prepare_data(prior_cfg, 0, 1)
    batch = TorchHits.from_batch(data.events(data.validation_ids(prior_cfg.data.validation_events)))
    trainer = build_family(loaded.geometry, prior_cfg.model, loaded.family.condition_norm)
    export_metrics = trainer.validation_metrics({trainer.generator_name: loaded.module}, batch)
    # the metrics of generated showers (the loss terms draw the encoder's noise from the global RNG)
    drawn = {f"val_{k}": v for k, v in export_metrics.items() if "loss" not in k and "nll" not in k}
    assert {k: with_prior.validation[k] for k in drawn} == pytest.approx(drawn)


def test_correlated_empirical_noise_has_the_residuals_within_layer_correlation(one_torch_thread):
    """`share_noise: empirical_correlated`: the fitted mixing gives each layer's noise the
    correlation of the training residuals' normal scores, and every voxel keeps a standard normal
    (so its own quantiles) before the quantile map."""
    from scipy.stats import norm


    fam, model, data, hits = _briefly_trained("empirical_correlated")
    cfg = fam.cfg
    # before the fit: independent voxels
    x = torch.randn(4, G.n_cells, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(model.correlate(x), x)
    fitted = fam.finalise_from_data(model, [data])
    assert fitted["residual_mean_abs_correlation"] > 0.0
    # an independent computation of the correlation of the two most-hit voxels of layer 1
    model.eval()
    voxels = hits.calo_dense(G.layer_offsets, G.n_cells).float()
    e_layer = model.layer_energies(voxels)
    y = model.normalise(model.log_layer(e_layer, hits.conditions["incident_energy"].float()))
    log_share = torch.log((voxels / e_layer[:, model.voxel_layer].clamp_min(1e-30)).clamp_min(cfg.share_floor))
    hit = voxels > 0
    with torch.no_grad():
        ctx = torch.cat([NORM(hits.conditions), y], -1)
        mu_z = model.vae.encode(log_share, hit, ctx)[0]
        _, mu, log_sigma, _ = model.vae.decode(mu_z, ctx)
    resid = ((log_share - mu) / log_sigma.exp()).numpy()
    layer1 = np.flatnonzero(model.voxel_layer.numpy() == 1)
    a, b = layer1[np.argsort(-hit[:, layer1].sum(0).numpy())[:2]]
    scores = {}
    for v in (a, b):
        rows = np.flatnonzero(hit[:, v].numpy())
        ranks = np.argsort(np.argsort(resid[rows, v]))
        scores[v] = dict(zip(rows, norm.ppf((ranks + 0.5) / len(rows)), strict=True))
    both = sorted(set(scores[a]) & set(scores[b]))
    sa, sb = np.array([scores[a][i] for i in both]), np.array([scores[b][i] for i in both])
    want = float((sa * sb).sum() / np.sqrt((sa * sa).sum() * (sb * sb).sum()))
    assert abs(want) > 0.1  # the test needs a correlated pair
    # standard normals through the fitted mixing: unit variance, and that correlation
    draws = model.correlate(torch.randn(40_000, G.n_cells, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(draws.std(0), torch.ones(G.n_cells), atol=0.03, rtol=0)
    got = float(torch.corrcoef(draws[:, [a, b]].T)[0, 1])
    assert abs(got - want) < 0.05, (got, want)
    # voxels of different layers stay independent
    other = int(np.flatnonzero(model.voxel_layer.numpy() == 2)[0])
    assert abs(float(torch.corrcoef(draws[:, [a, other]].T)[0, 1])) < 0.03
    # the ring correlation would mix the same normals twice
    with pytest.raises(ValueError, match="ring_correlation"):
        CaloLayersConfig(share_noise="empirical_correlated", ring_correlation=True)


def test_drawn_empty_layer_voxel_follows_the_hit_probabilities(family):
    fam, _ = family
    model = fam.build_modules()["model"]
    n = 20000
    gen = torch.Generator().manual_seed(5)
    p_hit = torch.rand(1, G.n_cells, generator=gen).expand(n, -1)
    empty = torch.ones(n, model.n_layers, dtype=torch.bool)
    u = ((torch.arange(n) + 0.5) / n)[:, None].expand(-1, model.n_layers)
    chosen = model.draw_voxel(p_hit, empty, u)
    per_layer = torch.zeros(n, model.n_layers, dtype=torch.long).index_add_(1, model.voxel_layer, chosen.long())
    assert bool((per_layer == 1).all())
    freq = chosen.double().mean(0)
    p = p_hit[0].double()
    want = p / torch.zeros(model.n_layers, dtype=torch.float64).index_add_(0, model.voxel_layer, p)[model.voxel_layer]
    torch.testing.assert_close(freq, want, atol=1.5 / n, rtol=0)


def test_layers_without_a_sampled_hit_keep_their_energy_in_one_voxel(one_torch_thread):
    """With no hit Bernoulli firing, every layer that the law gives energy holds it in one voxel:
    always the same one for 'most_likely', one drawn per shower for 'drawn'; the other draws of a
    seed are the same for both."""
    n = 64
    cells_used = {}
    for mode in ("most_likely", "drawn"):
        torch.manual_seed(0)
        fam = build_family(G, CaloLayersConfig(hidden_dim=64, latent_dim=4, law_hidden=32, empty_layer_voxel=mode), NORM)
        model = fam.build_modules()["model"].eval()
        e_inc = torch.full((n,), 2e4)
        cond = NORM({"incident_energy": e_inc.double()})
        one = _noise(model, 1, seed=3)
        noise = {k: v.expand(n, *v.shape[1:]).clone() for k, v in one.items()}
        noise["voxel_u"] = torch.ones(n, G.n_cells)
        if mode == "drawn":
            noise["empty_u"] = torch.rand(n, model.n_layers, generator=torch.Generator().manual_seed(4))
            assert list(model.noise_shapes())[-1] == "empty_u"
        voxels = model.sample(e_inc, cond, noise)
        hits = torch.zeros(n, model.n_layers, dtype=torch.long).index_add_(1, model.voxel_layer, (voxels > 0).long())
        e_layer = model.layer_energies(voxels)
        assert bool((hits == (e_layer > 0).long()).all())
        big = int(torch.bincount(model.voxel_layer).argmax())
        assert bool((e_layer[:, big] > 0).all())
        cells_used[mode] = torch.unique(torch.nonzero(voxels[:, model.voxel_layer == big])[:, 1]).numel()
    assert cells_used["most_likely"] == 1 and cells_used["drawn"] > 5
