"""Which part of the layer-energy model the CaloChallenge classifiers see: showers of a trained
`calo_layers` export against reference showers, (a) as generated, (b) with each layer's energy
shuffled among showers of similar incident energy (same marginals per layer, no layer-to-layer
correlation: what an independent per-layer law would give), (c) with the voxel shares of the
VAE but every shower's layer energies replaced by the reference-sample mean profile at its energy
(no fluctuations). Prints the DNN classifier AUC (cls-high, cls-low) of each.

    python tools/calo_layers_ablation.py --model runs/calo_layers_ds1/export --reference REF.zarr [--events 10000]
"""

from __future__ import annotations

import argparse

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
    with torch.no_grad():
        y = model.law.sample(cond, noise["law_u"], noise["law_eps"], model.y_lo, model.y_hi)
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
        variants = {"as generated": y, "layer energies shuffled (no correlations)": y_shuf,
                    "mean layer profile (no fluctuations)": y_mean}
        f_ref = calo_features(ref, g)
        print("| variant | cls-high AUC | cls-low AUC |\n|---|---|---|")
        for name, yy in variants.items():
            dense = model.sample(e32, cond, noise, y=yy)
            f = calo_features(dense_to_hits(dense.numpy(), e_inc.numpy(), g), g)
            aucs = [classifier_auc(f_ref.vectors[v], f.vectors[v], seed=0, method="dnn").auc
                    for v in ("high_level", "low_level")]
            print(f"| {name} | {aucs[0]:.3f} | {aucs[1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
