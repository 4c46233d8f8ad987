"""Charge of PXD clusters by cluster size, for one or more stores: per size, the fraction of
clusters, the mean and standard deviation of the cluster charge, the mean normal score of its
pixels' charges (ranks among all pixels of the store) and size x the variance of that mean
(about 1 when the charges of a cluster's pixels are independent, above 1 when they rise and fall
together, below 1 when they share a fixed total). For every store after the first, also the
separation power of its cluster-charge spectrum against the first store's, of all clusters and of
each size alone (the evaluation's binning: 50 bins equal in log charge over both samples).

    python tools/pxd_cluster_charge.py ref.zarr gen.zarr [--events 1000]

Says whether a cluster-charge spectrum misses by the charge a pixel gets at its place in a
cluster (the mean scores by size), by charge sharing (the variances), by the mix of sizes or by
the shape of the spectrum within a size (the separation power by size).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.special import ndtri
from scipy.stats import rankdata

SIZES = (1, 2, 3, 4, 5, 6, 8)


def main() -> None:
    from uhg.data.reader import open_store
    from uhg.eval.distances import common_binning, separation_power
    from uhg.eval.features_pxd import pixel_clusters

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--events", type=int, default=1000)
    args = ap.parse_args()
    first = None
    for path in args.stores:
        store = open_store(path)
        batch = store.read(0, min(args.events, len(store)))
        labels, n = pixel_clusters(batch, store.geometry)
        charge = batch.columns["value"].astype(np.float64)
        size = np.bincount(labels, minlength=n)
        total = np.bincount(labels, weights=charge, minlength=n)
        score = ndtri((rankdata(charge) - 0.5) / len(charge))
        mean_score = np.bincount(labels, weights=score, minlength=n) / np.maximum(size, 1)
        print(f"{path}: {len(batch)} events, mean pixel charge {charge.mean():.2f} ADU, "
              f"cluster charge {total.mean():.1f} +- {total.std():.1f} ADU")
        for s in SIZES:
            sel = size == s
            if sel.sum() < 2:
                continue
            print(f"  size {s}: fraction {sel.mean():.3f}  charge {total[sel].mean():6.1f} +- {total[sel].std():5.1f} ADU"
                  f"  mean score {mean_score[sel].mean():+.3f}  size x var(mean score) {s * mean_score[sel].var():.2f}")
        if first is None:
            first = (total, size)
            continue
        binning = common_binning([first[0], total], "log")
        by_size = "  ".join(f"{s}: {separation_power(binning.histogram(total[size == s]), binning.histogram(first[0][first[1] == s])):.4f}"
                            for s in SIZES)
        print(f"  cluster charge SP against {args.stores[0]}: all {separation_power(binning.histogram(total), binning.histogram(first[0])):.4f}"
              f"; by size {by_size}")


if __name__ == "__main__":
    main()
