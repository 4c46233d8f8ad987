"""A/B of what the layer-energy law of `calo_layers` models (`model.layer_target`), on the law
alone: for each target, the law of a fresh `CaloLayersModel` is standardised and trained on the
layer energies of a training store exactly as in a full training (same network, optimiser, batch
and clipping; the voxel VAE, which does not feed the law, is left out), then sampled at the
incident energies of a reference store. Prints, against that reference and with the floor of a
second reference beside them, the two metrics of `uhg eval` that the layer energies alone fix:
the energy per layer (mean relative error of the mean profile) and the resolution vs energy
(sigma/mean of E_dep/E_inc in the same 8 log bins of E_inc, mean relative error over the bins),
plus the per-layer and per-bin values they average.

    python tools/calo_layer_law_ab.py --train data/ds1_photons_24k.zarr --reference REF1.zarr \
        --reference2 REF2.zarr [--steps 4000] [--targets layers,total_shares,total_shares+bernoulli+skip] \
        [--ema-decay 0.999]

A target `T+bernoulli` is target T with `model.empty_layers: bernoulli`, `T+skip` with
`model.law_condition_skip: true` (both: `T+bernoulli+skip`), `T+log_linear`, `T+log_quadratic` or
`T+power_floor` with that `model.deposit_spread`. With `--extrapolate-energies` each law is also
sampled at those fixed energies (beyond the training range: the zero-shot protocol of `uhg eval
extrapolate`), against two samples simulated there (seeds `--extrapolate-seed` and +1, the second
the floor): mean response, resolution (std / mean of E_dep / E_inc) and mean shower depth
(energy-weighted layer depth in X0), the three observables of that protocol that the layer
energies alone fix. Per layer it also prints,
per E_inc bin over reference 1: the fraction of empty showers, and the mean and the standard
deviation of E_layer / E_inc.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    from uhg.config.calo_layers import CaloLayersConfig
    from uhg.data import open_store
    from uhg.eval.compare import binned_edges, binned_stats, mean_abs_rel_error
    from uhg.eval.features import Binned
    from uhg.models.common import EMA, ConditionNorm
    from uhg.sparse.torch_hits import TorchHits
    from uhg.train.calo_layers_family import CaloLayersFamily

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--reference2", required=True)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="layers,total_shares")
    ap.add_argument("--components", type=int, default=8, help="model.law_components")
    ap.add_argument("--hidden", type=int, default=128, help="model.law_hidden")
    ap.add_argument("--law-fit-steps", type=int, default=0,
                    help="then the after-training law fit of `model.law_fit_steps` on every training shower")
    ap.add_argument("--cosine", action="store_true", help="learning rate decayed to 0 over the steps (cosine)")
    ap.add_argument("--extrapolate-energies", default="", help="MeV, comma-separated: fixed test energies")
    ap.add_argument("--extrapolate-events", type=int, default=2000)
    ap.add_argument("--extrapolate-seed", type=int, default=301)
    ap.add_argument("--ema-decay", type=float, default=0.0,
                    help="sample with an EMA of the law's weights (as `model.ema_decay` exports them)")
    a = ap.parse_args()
    torch.set_num_threads(1)

    train = open_store(a.train)
    geometry = train.geometry

    def layers_of(batch):
        dense = TorchHits.from_batch(batch).calo_dense(geometry.layer_offsets, geometry.n_cells).double()
        return dense, torch.as_tensor(batch.conditions["incident_energy"], dtype=torch.float64)

    train_batch = train.read(0, len(train))
    dense_train, e_train = layers_of(train_batch)
    refs = [layers_of(open_store(p).read(0, a.events)) for p in (a.reference, a.reference2)]
    norm = ConditionNorm.from_ranges({"incident_energy": (float(e_train.min()), float(e_train.max()))},
                                     ["incident_energy"])

    def resolution_and_profile(e_layer: np.ndarray, e_inc: np.ndarray):
        return e_layer.mean(0), Binned("response", "E_inc", "E_dep/E_inc", e_inc, e_layer.sum(1) / e_inc)

    results, extrapolated = {}, {}
    for target in a.targets.split(","):
        torch.manual_seed(a.seed)
        layer_target, *options = target.split("+")
        spread = [o for o in options if o in ("log_linear", "log_quadratic", "power_floor")]
        cfg = CaloLayersConfig(layer_target=layer_target, empty_layers="bernoulli" if "bernoulli" in options else "floor",
                               law_condition_skip="skip" in options, law_components=a.components, law_fit_steps=a.law_fit_steps,
                               law_hidden=a.hidden, deposit_spread=spread[0] if spread else "network")
        fam = CaloLayersFamily(geometry, cfg, norm)
        model = fam.build_modules()["model"]
        stats = train.read(0, min(cfg.fit_events, len(train)))
        fam.initialise_from_data({"model": model}, [stats])
        e_layer_train = model.layer_energies(dense_train.float())
        t_train = model.law_input(e_layer_train, e_train.float())
        c_train = norm({"incident_energy": e_train})
        opt = torch.optim.AdamW(model.law.parameters(), lr=a.lr)
        gen = torch.Generator().manual_seed(a.seed)
        ema = EMA(model.law, a.ema_decay) if a.ema_decay > 0 else None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.steps) if a.cosine else None
        start = time.time()
        for step in range(a.steps):
            idx = torch.randint(len(t_train), (a.batch_size,), generator=gen)
            loss = -model.law.log_prob(t_train[idx], c_train[idx]).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.law.parameters(), 5.0)
            opt.step()
            if sched is not None:
                sched.step()
            if ema is not None:
                ema.update(model.law)
            if (step + 1) % 1000 == 0:
                with torch.no_grad():
                    full = -model.law.log_prob(t_train[:4096], c_train[:4096]).mean()
                print(f"{target}: step {step + 1} nll {float(full):.3f} ({time.time() - start:.0f} s)", flush=True)
        if a.law_fit_steps:
            print(f"{target}: after-training fit {model.fit_law(dense_train.float(), e_train.float(), c_train)}", flush=True)
        if ema is not None:
            model.law.load_state_dict(ema.state_dict(), strict=False)
        e_ref = refs[0][1]
        noise = torch.Generator().manual_seed(a.seed + 1)
        u = torch.rand(len(e_ref), model.n_law, generator=noise)
        eps = torch.randn(len(e_ref), model.n_law, generator=noise)
        with torch.no_grad():
            _, e_layer = model.sample_layers(e_ref.float(), norm({"incident_energy": e_ref}), u, eps)
        results[target] = e_layer.double().numpy()
        if a.extrapolate_energies:
            extrapolated[target] = {}
            for energy in (float(x) for x in a.extrapolate_energies.split(",")):
                e_fix = torch.full((a.extrapolate_events,), energy, dtype=torch.float64)
                u = torch.rand(len(e_fix), model.n_law, generator=noise)
                eps = torch.randn(len(e_fix), model.n_law, generator=noise)
                with torch.no_grad():
                    _, e_layer = model.sample_layers(e_fix.float(), norm({"incident_energy": e_fix}), u, eps)
                extrapolated[target][energy] = e_layer.double().numpy()

    if extrapolated:
        print_extrapolation(extrapolated, geometry, model, layers_of, a)
    e_inc = refs[0][1].numpy()
    ref_layers = [model.layer_energies(d.float()).double().numpy() for d, _ in refs]
    prof_ref, bin_ref = resolution_and_profile(ref_layers[0], e_inc)
    edges = binned_edges([refs[0][1].numpy(), refs[1][1].numpy()], True)
    _, reso_ref = binned_stats(bin_ref, edges, np.ones(len(e_inc)), bin_ref.min_events_per_bin)
    rows = {"reference 2 (floor)": (ref_layers[1], refs[1][1].numpy()), **{k: (v, e_inc) for k, v in results.items()}}
    print(f"\nresolution per E_inc bin (edges {np.round(edges / 1000, 1).tolist()} GeV), reference 1: "
          + " ".join(f"{r:.4f}" for r in reso_ref))
    print("mean energy per layer, reference 1 [MeV]: " + " ".join(f"{m:.1f}" for m in prof_ref) + "\n")
    print("| sample | energy per layer MRE | relative error per layer | resolution vs energy MRE | "
          "resolution per bin / reference |\n|---|---|---|---|---|")
    for name, (e_layer, e) in rows.items():
        prof, binned = resolution_and_profile(e_layer, e)
        _, reso = binned_stats(binned, edges, np.ones(len(e)), binned.min_events_per_bin)
        print(f"| {name} | {mean_abs_rel_error(prof, prof_ref):.4f} | "
              + " ".join(f"{x:+.3f}" for x in (prof - prof_ref) / prof_ref)
              + f" | {mean_abs_rel_error(reso, reso_ref):.4f} | " + " ".join(f"{x:.2f}" for x in reso / reso_ref) + " |")
    # where in each layer's distribution the mean goes wrong: quantiles of E_layer / E_inc over the
    # reference's, and the mean per E_inc bin over the reference's
    levels = (0.5, 0.9, 0.99, 0.999)
    frac_ref = ref_layers[0] / e_inc[:, None]
    q_ref = np.quantile(frac_ref, levels, axis=0)
    idx = np.clip(np.searchsorted(edges, e_inc, side="right") - 1, 0, len(edges) - 2)
    m_ref = np.stack([frac_ref[idx == b].mean(0) for b in range(len(edges) - 1)])
    s_ref = np.stack([frac_ref[idx == b].std(0) for b in range(len(edges) - 1)])
    z_ref = np.stack([(frac_ref[idx == b] <= 0).mean(0) for b in range(len(edges) - 1)])
    print("\nper layer: fraction of empty showers per E_inc bin, reference 1")
    for k in range(frac_ref.shape[1]):
        print(f"  layer index {k}: " + " ".join(f"{x:.3f}" for x in z_ref[:, k]))
    print(f"\nper layer: quantiles {levels} of E_layer/E_inc, and mean and standard deviation of E_layer/E_inc "
          "per E_inc bin, and fraction of empty showers per bin minus reference 1's, over reference 1")
    for name, (e_layer, e) in rows.items():
        frac = e_layer / e[:, None]
        q = np.quantile(frac, levels, axis=0) / np.where(q_ref > 0, q_ref, np.nan)
        i = np.clip(np.searchsorted(edges, e, side="right") - 1, 0, len(edges) - 2)
        m = np.stack([frac[i == b].mean(0) for b in range(len(edges) - 1)]) / m_ref
        sd = np.stack([frac[i == b].std(0) for b in range(len(edges) - 1)]) / s_ref
        z = np.stack([(frac[i == b] <= 0).mean(0) for b in range(len(edges) - 1)]) - z_ref
        for k in range(frac.shape[1]):
            print(f"  {name}, layer index {k}: quantiles " + " ".join(f"{x:.2f}" for x in q[:, k])
                  + " | mean per bin " + " ".join(f"{x:.2f}" for x in m[:, k])
                  + " | std per bin " + " ".join(f"{x:.2f}" for x in sd[:, k])
                  + " | empty per bin " + " ".join(f"{x:+.2f}" for x in z[:, k]))


def print_extrapolation(extrapolated, geometry, model, layers_of, a) -> None:
    """Per fixed energy: mean response, resolution and mean shower depth of each law's samples and of
    the second simulated sample, relative to the first."""
    from uhg.sim.calo import simulate_calo_showers

    active = list(geometry.active_layers)
    depth_mid = np.array([0.5 * sum(geometry.layer_depth_x0[lay]) for lay in active])

    def observables(e_layer: np.ndarray, energy: float) -> np.ndarray:
        r = e_layer.sum(1) / energy
        has = r > 0
        depth = (e_layer[has] @ depth_mid) / e_layer[has].sum(1)
        return np.array([r.mean(), r.std() / r.mean(), depth.mean()])

    print("\nfixed energies: mean response / resolution / mean shower depth, relative to simulated sample 1 "
          f"(seed {a.extrapolate_seed}; {a.extrapolate_events} showers per sample)\n")
    print("| E_inc | sample 1: response, resolution, depth [X0] | sample 2 (floor) | "
          + " | ".join(extrapolated) + " |\n|---|---|---|" + "---|" * len(extrapolated))
    for energy in next(iter(extrapolated.values())):
        sims = []
        for k in range(2):
            batch = simulate_calo_showers(geometry, a.extrapolate_events, a.extrapolate_seed + k,
                                          energies=np.full(a.extrapolate_events, energy))
            dense, _ = layers_of(batch)
            sims.append(observables(model.layer_energies(dense.float()).double().numpy(), energy))
        cells = [sims[1]] + [observables(v[energy], energy) for v in extrapolated.values()]
        print(f"| {energy / 1e3:.0f} GeV | {sims[0][0]:.4f}, {sims[0][1]:.5f}, {sims[0][2]:.2f} | "
              + " | ".join(" / ".join(f"{100 * (c[i] / sims[0][i] - 1):+.1f} %" for i in range(3)) for c in cells)
              + " |", flush=True)


if __name__ == "__main__":
    main()
