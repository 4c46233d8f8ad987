"""Which cls-high columns a generated calorimeter sample misses: the separation power (common bins of
the three samples) and KS of every high-level feature, generated against the reference and the floor
between two independent references, ranked by the excess over the floor; then the mean excess per
kind of feature (centre_y over the layers, ...).

    python tools/calo_feature_separation.py REF.zarr REF2.zarr GEN.zarr [EVENTS]
"""

from __future__ import annotations

import collections
import sys

import numpy as np

from uhg.data import open_store
from uhg.eval.features_calo import calo_features, high_level_names
from uhg.eval.distances import common_binning, separation_power_samples, ks_statistic

ref, ref2, gen = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 2000
stores = [open_store(p) for p in (ref, ref2, gen)]
g = stores[0].geometry
fs = [calo_features(s.read(0, min(n, len(s))), g) for s in stores]
names = high_level_names(g)
X = [f.vectors["high_level"] for f in fs]
rows = []
for i, nm in enumerate(names):
    a, b, c = X[0][:, i], X[1][:, i], X[2][:, i]
    binning = common_binning([a, b, c])
    sp_g = separation_power_samples(a, c, binning); sp_f = separation_power_samples(a, b, binning)
    rows.append((sp_g - sp_f, nm, sp_g, sp_f, ks_statistic(a, c), ks_statistic(a, b), c.mean() - a.mean(), a.std()))
rows.sort(reverse=True)
print("| feature | SP gen | SP floor | KS gen | KS floor | (mean gen - mean ref) / std ref |")
print("|---|---|---|---|---|---|")
for d, nm, spg, spf, ksg, ksf, dm, sd in rows[:30]:
    print(f"| {nm} | {spg:.4f} | {spf:.4f} | {ksg:.3f} | {ksf:.3f} | {dm / max(sd, 1e-12):+.3f} |")
grp = collections.defaultdict(list)
for d, nm, *_ in rows:
    grp[nm.split("_layer")[0]].append(d)
print("\nmean SP excess over the floor per feature kind:")
for k, v in sorted(grp.items(), key=lambda kv: -np.mean(kv[1])):
    print(f"  {k}: {np.mean(v):.4f} over {len(v)} columns, max {max(v):.4f}")
