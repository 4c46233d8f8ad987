"""The after-training fit of the voxel-share VAE (`model.vae_fit_steps`): the VAE alone trained
further on the fit showers with a decaying learning rate, the layer-energy law untouched, the
residual quantiles fitted to the refitted decoder."""

import torch
from calo_law import finalise_fresh
from calo_law import small_ds1_family as _family

from uhg.config.loading import load_config
from uhg.geometry import get_geometry
from uhg.sim.calo import simulate_calo_showers


def test_vae_fit_trains_the_vae_alone_after_training(one_torch_thread):
    g = get_geometry("ds1-photons")
    showers = simulate_calo_showers(g, 400, seed=23, energy_min=1e3, energy_max=1e5)
    results = [finalise_fresh(_family(vae_fit_steps=steps), showers, "vae.") for steps in (0, 120, 120)]
    (off, off_moved, _, _, _), (on, on_moved, on_kept, on_rng, vae1), (_, _, _, _, vae2) = results
    assert off == {} and not off_moved
    assert on_moved and on_kept and on_rng
    # held-out showers (one in ten): the fit generalises, it does not only memorise
    assert on["vae_fit_heldout_loss_after"] < on["vae_fit_heldout_loss_before"] - 10.0, on
    assert all(torch.equal(vae1[k], vae2[k]) for k in vae1)  # seeded: the same fit twice


def test_vae_fit_comes_before_the_residual_quantiles(one_torch_thread):
    """The residual quantiles describe the decoder that is exported: fitted after the VAE fit,
    they equal those fitted afresh to the refitted model."""
    g = get_geometry("ds1-photons")
    showers = simulate_calo_showers(g, 300, seed=24, energy_min=1e3, energy_max=1e5)
    family = _family(vae_fit_steps=60, share_noise="empirical")
    torch.manual_seed(0)
    model = family.build_modules()["model"]
    family.initialise_from_data({"model": model}, [showers])
    family.finalise_from_data(model, [showers])
    fitted_q = model.residual_q.clone()
    voxels, e_inc, cond = family.dense_showers(model, [showers])
    with torch.no_grad():
        model.fit_residual_quantiles(voxels, e_inc, cond)
    assert torch.allclose(fitted_q, model.residual_q)


def test_shipped_ds1_config_refits_its_vae_and_fits_its_latent_prior():
    cfg = load_config("configs/calo_layers_ds1.yaml")
    assert cfg.model.vae_fit_steps > 0
    assert cfg.model.latent_prior == "mixture"
