"""Which per-event features tell a PXD generator's events from simulated ones.

    python tools/pxd_classifier_features.py --model runs/NAME/export --events 1000 --luminosity 8e35

Simulates two independent reference samples (seeds --seed and --seed + 1) at one luminosity,
generates as many events at the same conditions, and prints, for the classifier inputs of
`uhg.eval.features_pxd` (the high-level vector and the three 40-sensor blocks of the low-level
vector): the classifier AUC of each group (`uhg.eval.classifier.classifier_auc`, floor = the two
reference samples), the one-feature AUC of every high-level feature (max(AUC, 1 - AUC) of the
feature's value, floor beside it) with its mean and spread in both samples, the AUC without each
high-level feature, and token-level cluster statistics (fraction and mean charge per cluster
size). A diagnosis tool: the figures say where a model differs, not how good it is overall
(that is `uhg eval`).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

HIGH_LEVEL = ["log_hits", "occ_layer1", "occ_layer2", "mean_charge", "std_charge", "log_clusters",
              "mean_cluster_size", "mean_cluster_charge"]
LOW_LEVEL = ["occupancy", "mean_charge", "clusters"]


def one_feature_auc(a: np.ndarray, b: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b])
    return max(auc, 1.0 - auc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="generator export directory (pxd-mini or pxd)")
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--luminosity", type=float, default=8e35)
    ap.add_argument("--seed", type=int, default=202, help="reference seed (the second reference uses seed + 1); "
                    "must not be a seed of the training store")
    ap.add_argument("--generate-seed", type=int, default=7)
    ap.add_argument("--save", default=None, help="also write the three samples' classifier vectors to this .npz")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from uhg.eval.classifier import classifier_auc
    from uhg.eval.features_pxd import pxd_features
    from uhg.models.generator import Generator
    from uhg.sim.pxd_background import simulate_pxd_background

    gen = Generator.load(args.model)
    g = gen.family.geometry
    ref = simulate_pxd_background(g, args.events, args.seed, luminosity=args.luminosity)
    ref2 = simulate_pxd_background(g, args.events, args.seed + 1, luminosity=args.luminosity)
    fake = gen.generate(dict(ref.conditions), seed=args.generate_seed, batch_size=100)
    f = {k: pxd_features(b, g) for k, b in (("ref", ref), ("ref2", ref2), ("gen", fake))}
    print(f"{args.events} events at {args.luminosity:g}: hits/event reference {ref.hits_per_event.mean():.1f}, "
          f"generated {fake.hits_per_event.mean():.1f}")
    a, b, c = (f[k].vectors["high_level"] for k in ("ref", "ref2", "gen"))
    print(f"high level: AUC {classifier_auc(a, c, seed=1).auc:.3f} (floor {classifier_auc(a, b, seed=2).auc:.3f})")
    for i, name in enumerate(HIGH_LEVEL):
        keep = [j for j in range(a.shape[1]) if j != i]
        print(f"  {name:20s} one-feature AUC {one_feature_auc(a[:, i], c[:, i]):.3f} "
              f"(floor {one_feature_auc(a[:, i], b[:, i]):.3f})  mean {a[:, i].mean():.4g} -> {c[:, i].mean():.4g}  "
              f"std {a[:, i].std():.3g} -> {c[:, i].std():.3g}  AUC without it "
              f"{classifier_auc(a[:, keep], c[:, keep], seed=1).auc:.3f}")
    a, b, c = (f[k].vectors["low_level"] for k in ("ref", "ref2", "gen"))
    n = g.n_sensors
    print(f"low level: AUC {classifier_auc(a, c, seed=1).auc:.3f} (floor {classifier_auc(a, b, seed=2).auc:.3f})")
    for j, name in enumerate(LOW_LEVEL):
        cols = slice(n * j, n * (j + 1))
        rel = (c[:, cols].mean(0) - a[:, cols].mean(0)) / np.maximum(a[:, cols].mean(0), 1e-12)
        rest = [k for k in range(a.shape[1]) if not n * j <= k < n * (j + 1)]
        print(f"  {name:20s} block AUC {classifier_auc(a[:, cols], c[:, cols], seed=1).auc:.3f} "
              f"(floor {classifier_auc(a[:, cols], b[:, cols], seed=2).auc:.3f})  per-sensor mean rel. diff "
              f"{rel.mean():+.3f} (min {rel.min():+.3f}, max {rel.max():+.3f})  AUC without the block "
              f"{classifier_auc(a[:, rest], c[:, rest], seed=1).auc:.3f}")
    if args.save:
        np.savez(args.save, **{f"{k}_{v}": f[k].vectors[v] for k in f for v in ("high_level", "low_level")})
    size_r, size_g = (f[k].distributions["cluster_size"].values for k in ("ref", "gen"))
    q_r, q_g = (f[k].distributions["cluster_charge"].values for k in ("ref", "gen"))
    for s in (1, 2, 3, 4, 6):
        print(f"  clusters of {s} pixels: fraction {np.mean(size_r == s):.4f} -> {np.mean(size_g == s):.4f}, "
              f"mean charge {q_r[size_r == s].mean():.1f} -> {q_g[size_g == s].mean():.1f} ADU")
    # The rare large clusters set much of the event-to-event spread of the mean cluster size
    size_2 = f["ref2"].distributions["cluster_size"].values
    print("  clusters of >= 17 / >= 30 pixels (reference, second reference, generated): "
          + ", ".join(f"{np.mean(x >= 17):.5f} / {np.mean(x >= 30):.5f}" for x in (size_r, size_2, size_g))
          + "; largest " + " / ".join(str(int(x.max(initial=0))) for x in (size_r, size_2, size_g)))


if __name__ == "__main__":
    main()
