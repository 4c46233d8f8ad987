"""Which per-event feature tells generated PXD events from the reference: the AUC of each
high-level classifier feature alone (rank test, 0.5 = indistinguishable, folded to >= 0.5) and
the mean / max over sensors of the low-level ones, with the mean of each sample.

    python tools/pxd_feature_auc.py --reference ref.zarr --generated gen.zarr [--events 1000]
    python tools/pxd_feature_auc.py --reference train.zarr --luminosity-bins 2e35,4e35,8.1e35

With --luminosity-bins, the mean of each high-level feature of the reference's events in each
luminosity bin instead (how the features move over a training range).

The classifier two-sample test of `uhg eval` gives one AUC for all features together; this says
which of them carries it. Run it on two reference samples for the floor.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import rankdata

HIGH_LEVEL = ["log hits", "occupancy layer 1", "occupancy layer 2", "mean charge", "charge std",
              "log clusters", "mean cluster size", "charge per cluster"]
LOW_LEVEL = ["occupancy", "mean charge", "clusters"]


def auc(a: np.ndarray, b: np.ndarray) -> float:
    ranks = rankdata(np.concatenate([a, b]))
    value = (ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b))
    return max(value, 1 - value)


def main() -> None:
    from uhg.data.reader import open_store
    from uhg.eval.features_pxd import pxd_features

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--generated")
    ap.add_argument("--events", type=int, default=1000, help="at most this many events of each store")
    ap.add_argument("--luminosity-bins", help="comma-separated bin edges (cm^-2 s^-1): feature means per bin")
    args = ap.parse_args()
    if args.luminosity_bins:
        by_luminosity(open_store(args.reference), [float(x) for x in args.luminosity_bins.split(",")], args.events)
        return
    if not args.generated:
        ap.error("--generated is required (unless --luminosity-bins)")
    ref, gen = open_store(args.reference), open_store(args.generated)
    n = min(len(ref), len(gen), args.events)
    fr, fg = pxd_features(ref.read(0, n), ref.geometry), pxd_features(gen.read(0, n), gen.geometry)
    hr, hg = fr.vectors["high_level"], fg.vectors["high_level"]
    for i, name in enumerate(HIGH_LEVEL):
        print(f"{name:20s} AUC {auc(hr[:, i], hg[:, i]):.3f}  reference {hr[:, i].mean():.4g}  generated {hg[:, i].mean():.4g}")
    lr, lg = fr.vectors["low_level"], fg.vectors["low_level"]
    per = lr.shape[1] // len(LOW_LEVEL)
    for j, name in enumerate(LOW_LEVEL):
        a = [auc(lr[:, j * per + k], lg[:, j * per + k]) for k in range(per)]
        print(f"per sensor {name:10s} AUC mean {np.mean(a):.3f} max {np.max(a):.3f}")


def by_luminosity(store, edges: list[float], events: int) -> None:
    from uhg.eval.features_pxd import pxd_features

    n = min(len(store), events)
    batch = store.read(0, n)
    high = pxd_features(batch, store.geometry).vectors["high_level"]
    lum = batch.conditions["luminosity"]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        on = (lum >= lo) & (lum < hi)
        means = "  ".join(f"{name} {high[on, i].mean():.4g}" for i, name in enumerate(HIGH_LEVEL))
        print(f"{lo:.3g}-{hi:.3g} ({int(on.sum())} events)  {means}")


if __name__ == "__main__":
    main()
