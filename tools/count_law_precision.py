"""Is a cluster-token transformer's per-sensor count law biased at one luminosity, or only as
precise as its training events allow?

    python tools/count_law_precision.py --config configs/pxd_transformer_mini.yaml [--events 16000]
        [--luminosity 8e35] [--shrink 100 1000 10000] [--draws 1000] [--set model.count_dispersion=constant]

Fits the count law exactly as `uhg train` starts it (the same training events, shape vocabulary,
held-out choice of the per-unit ridge and bootstrap refits; no network is trained: at
`model.law_lr: 0` the exported law is this fit), simulates `--events` reference events at
`--luminosity` (seed 311, not a training seed) and prints, per sensor, the law's mean tokens
against the reference's: the rms of the miss, the rms spread of the law's bootstrap refits on
resampled training events (its statistical precision), the reference's own rms noise, and
chi2/ndf of the miss against both (about 1: the miss is the fit's noise; well above 1: a bias).
`--shrink` refits the law with those fixed ridge strengths and prints the same miss for each
(what the held-out choice, `uhg.models.laws.choose_shrink`, trades). `--draws N`: the law's own
draws (tokens per sensor of N events, as generation draws them before any token is placed) against
the first N reference events: the classifier AUC on the 40 per-sensor counts
(`uhg.eval.classifier.classifier_auc`; floor: the next N reference events), the mean per-sensor
variance ratio and the spread of the event's total; what the count law alone gives the low-level
classifier's occupancy and cluster blocks.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from uhg.config.loading import load_config
from uhg.eval.classifier import classifier_auc
from uhg.geometry import get_geometry
from uhg.models.common import ConditionNorm
from uhg.models.laws import count_law_loss, fit_law
from uhg.models.transformer_clusters import encode_clusters
from uhg.models.transformer_sampling import counter_uniform
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.train.family import build_family
from uhg.train.loop import _initialise_from_data, prepare_data, seed_everything

REFERENCE_SEED = 311
CHUNK = 500


def reference_tokens(model, family, geometry, n: int, luminosity: float, machine: str):
    """(n, U) tokens per sensor of `n` simulated events, and their normalised conditions."""
    counts, conds = [], []
    for lo in range(0, n, CHUNK):
        part = simulate_pxd_background(geometry, min(CHUNK, n - lo), seed=REFERENCE_SEED * 1000 + lo,
                                       luminosity=luminosity, scenario=machine)
        t = encode_clusters(part, model.layout, model.shape_vocab(), model.config.cluster_charge_bins)
        counts.append(t.lengths.view(-1, model.layout.n_units).double().numpy())
        conds.append(family.condition_norm({k: torch.as_tensor(np.asarray(v, np.float64))
                                            for k, v in part.conditions.items()}))
    return np.concatenate(counts), torch.cat(conds)


def law_mean(law, cond: torch.Tensor, params=None) -> np.ndarray:
    with torch.no_grad():
        return law.mean(cond.to(law.positions.dtype), params).double().numpy().mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a cluster-token transformer run config with multiplicity: count")
    ap.add_argument("--events", type=int, default=16000, help="reference events at --luminosity")
    ap.add_argument("--luminosity", type=float, default=8e35)
    ap.add_argument("--shrink", type=float, nargs="*", default=[], help="also refit with these ridge strengths")
    ap.add_argument("--draws", type=int, default=0, help="compare N events of the law's draws (needs 2N --events)")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    if 2 * args.draws > args.events:
        ap.error(f"--draws {args.draws} needs --events >= {2 * args.draws}")
    if cfg.model.family != "transformer" or cfg.model.token != "cluster" or cfg.model.multiplicity != "count":
        ap.error(f"{args.config}: needs a cluster-token transformer with multiplicity: count")
    t0 = time.time()
    data = prepare_data(cfg, 0, 1)
    norm = ConditionNorm.from_ranges(data.condition_ranges(cfg.model.conditions), cfg.model.conditions)
    geometry = get_geometry(cfg.geometry)
    family = build_family(geometry, cfg.model, norm)
    seed_everything(cfg.seed)
    modules = family.build_modules()
    fitted = _initialise_from_data(family, modules, data)
    model, law = modules["model"], modules["model"].counts
    print(f"law fitted to {data.n_train} training events in {time.time() - t0:.0f} s: ridge strength "
          f"{fitted['law_shrink']:g}, {len(law.bootstrap)} bootstrap refits")
    machine = cfg.data.simulate.machine if cfg.data.simulate is not None else "design"
    ref, cond = reference_tokens(model, family, geometry, args.events, args.luminosity, machine)
    tokens = ref.mean(0)
    ref_sd = ref.std(0, ddof=1) / np.sqrt(len(ref)) / tokens
    mean = law_mean(law, cond)
    miss = mean / tokens - 1
    layer = np.array([s.layer for s in geometry.sensors])
    print(f"{args.events} reference events at {args.luminosity:g} ({machine}): {tokens.sum():.1f} tokens per event")
    print("| | rms over sensors | MRE | mean |")
    print("|---|---|---|---|")
    print(f"| law vs reference, per sensor | {100 * np.sqrt(np.mean(miss ** 2)):.2f} % | {100 * np.mean(np.abs(miss)):.2f} % | "
          f"{100 * miss.mean():+.2f} % (layer 1 {100 * miss[layer == 1].mean():+.2f} %, layer 2 "
          f"{100 * miss[layer == 2].mean():+.2f} %) |")
    print(f"| reference's own noise | {100 * np.sqrt(np.mean(ref_sd ** 2)):.2f} % | | |")
    chi2 = f"chi2/ndf against the reference's noise alone {np.mean(miss ** 2 / ref_sd ** 2):.2f}"
    if len(law.bootstrap) > 1:
        boot = np.stack([law_mean(law, cond, law._unflatten(b)) for b in law.bootstrap])
        boot_sd = boot.std(0, ddof=1) / mean
        print(f"| spread of the law's bootstrap refits | {100 * np.sqrt(np.mean(boot_sd ** 2)):.2f} % | | |")
        chi2 += f", against it and the refits' spread {np.mean(miss ** 2 / (ref_sd ** 2 + boot_sd ** 2)):.2f}"
    print(chi2)
    print("per sensor, law / reference - 1 [%]:", " ".join(f"{100 * x:+.1f}" for x in miss))
    if args.draws:
        n, U = args.draws, model.layout.n_units
        keys = torch.arange(n, dtype=torch.int64) + 10**6
        with torch.no_grad():
            drawn, _ = law.sample(counter_uniform(keys.repeat_interleave(U), torch.arange(U).repeat(n), -1, 0),
                                  counter_uniform(keys, torch.full_like(keys, U), -1, 0)[:, None],
                                  cond[:n].to(law.positions.dtype), 10**6)
        g, a, b = drawn.view(n, U).double().numpy(), ref[:n], ref[n:2 * n]
        print(f"law's draws, {n} events vs reference (floor: reference 2, {n} events): per-sensor counts "
              f"classifier AUC {classifier_auc(a, g, seed=1).auc:.3f} (floor {classifier_auc(a, b, seed=2).auc:.3f}); "
              f"per-sensor variance / reference's {np.mean(g.var(0) / a.var(0)):.3f} (floor {np.mean(b.var(0) / a.var(0)):.3f}); "
              f"sd of the event's tokens {g.sum(1).std():.1f} (reference {a.sum(1).std():.1f}, reference 2 {b.sum(1).std():.1f})")
    if args.shrink:
        counts, conds = [], []
        ids = data.train_ids[family.fit_sample(data.n_train)]
        for lo in range(0, len(ids), 256):
            b = data.events(ids[lo:lo + 256])
            t = encode_clusters(b, model.layout, model.shape_vocab(), model.config.cluster_charge_bins)
            counts.append(t.lengths.view(-1, model.layout.n_units).double())
            conds.append(family.condition_norm({k: torch.as_tensor(np.asarray(v, np.float64))
                                                for k, v in b.conditions.items()}).double())
        n, c = torch.cat(counts), torch.cat(conds)
        print("| ridge strength | law vs reference: rms | MRE | mean |")
        print("|---|---|---|---|")
        for strength in args.shrink:
            refit = copy.deepcopy(law)
            fit_law(refit, lambda m, k=strength: count_law_loss(m, n, c, k))
            d = law_mean(refit, cond) / tokens - 1
            print(f"| {strength:g} | {100 * np.sqrt(np.mean(d ** 2)):.2f} % | {100 * np.mean(np.abs(d)):.2f} % | {100 * d.mean():+.2f} % |")


if __name__ == "__main__":
    main()
