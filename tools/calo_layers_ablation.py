"""Which part of the layer-energy model the CaloChallenge classifiers see: showers of a trained
`calo_layers` export against reference showers, (a) as generated, (b) with each layer's energy
shuffled among showers of similar incident energy (same marginals per layer, no layer-to-layer
correlation: what an independent per-layer law would give), (c) with the voxel shares of the
VAE but every shower's layer energies replaced by the reference-sample mean profile at its energy
(no fluctuations). Prints the DNN classifier AUC (cls-high, cls-low) of each.

With `--stage voxels` the variants are of the voxel stage instead, all with the same layer
energies and noise: (a) as generated, (b) the within-ring correlation of the log-share noise set
to zero (independent voxels with the same widths; models trained with `ring_correlation`), (c)
and (d) the per-voxel noise scaled by 0.5 and 0 (`share_temperature`; other scales with
`--temperatures`), and with `--train STORE`
(e) every voxel's share of its layer capped at the largest share that voxel has in 4000 training
showers (then renormalised: a tail draw of an outer voxel's log-normal noise cannot pull the
centre of energy beyond what the data ever did), and (f) the log-share noise of every voxel drawn
from the quantiles of its standardised residuals in those training showers (`share_noise:
empirical`, fitted to this model; the normal's quantiles are mapped, so the same draws), (g) and
(h) the reference showers' own layer energies with the prior latent, and with the latent at the
encoder's posterior mean of each reference shower (is it the latent or the voxel noise that
spreads the centre?). Each row also gives the spread of the centre of
energy in x per layer (reference in the header) and, summed over the layers, the mean width in x
and the mean fraction of cells hit relative to the reference's. A model with `latent_prior:
mixture` draws its latents from that prior in every variant but the posterior one.

    python tools/calo_layers_ablation.py --model runs/calo_layers_ds1/export --reference REF.zarr [--events 10000]
        [--stage layers|voxels] [--high-only] [--temperatures 0.5,0] [--train TRAIN.zarr]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch


def main() -> None:
    from uhg.data import open_store
    from uhg.data.calochallenge import dense_to_hits
    from uhg.eval.classifier import classifier_auc
    from uhg.eval.features_calo import calo_features
    from uhg.models.generator import Generator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--stage", choices=("layers", "voxels"), default="layers")
    ap.add_argument("--high-only", action="store_true", help="only the cls-high classifier")
    ap.add_argument("--temperatures", type=lambda v: [float(x) for x in v.split(",")], default=[0.5, 0.0],
                    help="comma-separated voxel-noise scales of the cooled variants (--stage voxels)")
    ap.add_argument("--train", help="training store: adds the capped-share variant (--stage voxels)")
    a = ap.parse_args()
    torch.set_num_threads(1)

    store = open_store(a.reference)
    ref = store.read(0, min(a.events, len(store)))
    gen = Generator.load(a.model)
    fam, model, g = gen.family, gen.module, gen.family.geometry
    e_inc = torch.as_tensor(ref.conditions["incident_energy"])
    cond = fam.condition_norm({"incident_energy": e_inc})
    rng = torch.Generator().manual_seed(a.seed)
    noise = {k: (torch.rand if k.endswith("_u") else torch.randn)((len(e_inc), *s), generator=rng)
             for k, s in model.noise_shapes().items()}
    e32 = e_inc.float()
    posterior_z = None  # set with --train (the posterior-latent variant)
    with torch.no_grad():
        y, _ = model.sample_layers(e32, cond, noise["law_u"], noise["law_eps"])
        # (b) shuffle each layer's value among showers in 20 log-energy bins
        log_e = np.log(e_inc.numpy())
        bins = np.digitize(log_e, np.linspace(log_e.min(), log_e.max(), 21)[1:-1])
        y_shuf = y.clone()
        prng = np.random.default_rng(a.seed)
        for b in np.unique(bins):
            idx = np.flatnonzero(bins == b)
            for layer in range(y.shape[1]):
                y_shuf[idx, layer] = y[prng.permutation(idx), layer]
        # (c) mean profile of the reference per energy bin, as normalised log layer energies
        from uhg.sparse.torch_hits import TorchHits

        dense_ref = TorchHits.from_batch(ref).calo_dense(g.layer_offsets, g.n_cells)
        frac = (model.layer_energies(dense_ref) / e32[:, None]).numpy()
        y_mean = torch.empty_like(y)
        for b in np.unique(bins):
            idx = np.flatnonzero(bins == b)
            y_mean[idx] = model.normalise(torch.log(torch.as_tensor(frac[idx].mean(0)) + model.cfg.layer_floor))
        f_ref = calo_features(ref, g)
        active = list(g.active_layers)

        def centre_spread(fs) -> str:
            return " ".join(f"{np.std(fs.distributions[f'centre_x_layer{lay}'].values):.2f}" for lay in active)

        def summed_mean(fs, feature: str) -> float:
            return sum(float(np.mean(fs.distributions[f"{feature}_layer{lay}"].values)) for lay in active)

        def excess(fs) -> str:
            """Summed over the layers, the mean width in x and the mean fraction of cells hit
            relative to the reference's."""
            return " | ".join(f"{summed_mean(fs, k) / summed_mean(f_ref, k) - 1:+.0%}" for k in ("width_x", "sparsity"))

        if a.stage == "layers":
            variants = {"as generated": (y, model), "layer energies shuffled (no correlations)": (y_shuf, model),
                        "mean layer profile (no fluctuations)": (y_mean, model)}
        else:
            variants = {"as generated": (y, model)}
            if model.vae.n_rings:
                rho = model.vae.decode(noise["z"], torch.cat([cond, y], -1))[3].mean(0)
                ring_layer = torch.zeros(model.vae.n_rings, dtype=torch.long).scatter_(
                    0, model.vae.voxel_ring, model.voxel_layer)
                print("learned within-ring correlation, range over the rings of each layer: " + ", ".join(
                    f"layer {lay} {float(rho[ring_layer == i].min()):.2f}-{float(rho[ring_layer == i].max()):.2f}"
                    for i, lay in enumerate(active)))
                no_rho = copy.deepcopy(model)
                decode = no_rho.vae.decode

                def decode_independent(z, ctx, decode=decode):
                    hit, mu, log_sigma, rho = decode(z, ctx)
                    return hit, mu, log_sigma, torch.zeros_like(rho)

                no_rho.vae.decode = decode_independent
                variants["ring correlation set to 0 (independent voxel noise)"] = (y, no_rho)
            for t in a.temperatures:
                cooled = copy.deepcopy(model)
                cooled.cfg = cooled.cfg.model_copy(update={"share_temperature": t})
                variants[f"voxel noise x {t}"] = (y, cooled)
        vectors = ("high_level",) if a.high_only else ("high_level", "low_level")
        print(f"std of centre x per layer {active} [mm], reference: {centre_spread(f_ref)}\n")
        print("| variant | " + " | ".join(f"cls-{v.split('_')[0]} AUC" for v in vectors)
              + " | width x | cells hit | std centre x per layer [mm] |\n|---|" + "---|" * len(vectors) + "---|---|---|")
        cap = None
        if a.stage == "voxels" and a.train:
            train = open_store(a.train)
            dense_train = TorchHits.from_batch(train.read(0, min(4000, len(train)))).calo_dense(g.layer_offsets, g.n_cells)
            cap = (dense_train / model.layer_energies(dense_train)[:, model.voxel_layer].clamp_min(1e-30)).max(0).values
            variants["shares capped at the training maximum per voxel"] = (y, model)
            empirical = copy.deepcopy(model)
            empirical.cfg = empirical.cfg.model_copy(update={"share_noise": "empirical"})
            train_e = torch.as_tensor(train.read(0, min(4000, len(train))).conditions["incident_energy"])
            fitted = empirical.fit_residual_quantiles(dense_train.float(), train_e.float(),
                                                      fam.condition_norm({"incident_energy": train_e}))
            print(f"residuals of the training showers: skewness {fitted['residual_skewness']:.2f}, "
                  f"{int(fitted['residual_voxels_own_quantiles'])} voxels with their own quantiles\n")
            variants["empirical residual noise per voxel (share_noise: empirical)"] = (y, empirical)
            # the latent at the encoder's posterior mean of each reference shower, with that shower's
            # own layer energies: does the prior latent or the voxel noise spread the centre?
            y_ref = model.normalise(model.log_layer(model.layer_energies(dense_ref.float()), e32))
            hit_ref = dense_ref > 0
            log_share_ref = torch.log((dense_ref.float() / model.layer_energies(dense_ref.float())[:, model.voxel_layer]
                                       .clamp_min(1e-30)).clamp_min(model.cfg.share_floor))
            mu_z = model.vae.encode(log_share_ref, hit_ref, torch.cat([cond, y_ref], -1))[0]
            posterior_z = mu_z
            for tag, yy in (("prior latent", y_ref), ("posterior latent", y_ref)):
                variants[f"{tag}, reference layer energies"] = (yy, model)
        for name, (yy, m) in variants.items():
            dense = m.sample(e32, cond, noise, y=yy, z=posterior_z if name.startswith("posterior") else None)
            if name.startswith("shares capped"):
                e_layer = model.layer_energies(dense)[:, model.voxel_layer]
                share = torch.minimum(dense / e_layer.clamp_min(1e-30), cap)
                per_layer = model.layer_energies(share)[:, model.voxel_layer]
                dense = share / per_layer.clamp_min(1e-30) * e_layer
            f = calo_features(dense_to_hits(dense.numpy(), e_inc.numpy(), g), g)
            aucs = [classifier_auc(f_ref.vectors[v], f.vectors[v], seed=0, method="dnn").auc for v in vectors]
            print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in aucs) + f" | {excess(f)} | {centre_spread(f)} |",
                  flush=True)


if __name__ == "__main__":
    main()
