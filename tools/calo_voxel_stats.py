"""Per-voxel view of the calorimeter voxel classifier's input (cls-low: every voxel's energy over
the incident energy): per layer, the hit probability, the mean and the spread across showers of
E_voxel / E_inc of each sample against the reference.

    python tools/calo_voxel_stats.py --reference REF.zarr --samples REF2.zarr GEN.zarr [...] --geometry ds1-photons

Hit probability: the mean absolute difference over the voxels hit in more than 1 % of the
reference showers, over their mean hit probability. Mean and spread: each voxel's relative error,
weighted by its mean energy in the reference (the spread's signed: + is too wide).
"""

from __future__ import annotations

import argparse

import numpy as np


def voxel_vectors(path: str, geometry) -> np.ndarray:
    """(showers, voxels) E_voxel / E_inc of a store (the cls-low input without log10 E_inc)."""
    from uhg.data import open_store
    from uhg.eval.features_calo import calo_features

    store = open_store(path)
    return calo_features(store.read(0, len(store)), geometry).vectors["low_level"][:, 1:]


def main() -> None:
    from uhg.geometry import get_geometry

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True)
    ap.add_argument("--samples", nargs="+", required=True)
    ap.add_argument("--geometry", required=True)
    a = ap.parse_args()
    g = get_geometry(a.geometry)
    ref = voxel_vectors(a.reference, g)
    off = g.layer_offsets
    layers = [lay for lay in range(len(off) - 1) if off[lay + 1] > off[lay]]
    print("sample | layer: hit probability error, mean error, spread error (signed)")
    for path in a.samples:
        v = voxel_vectors(path, g)
        parts = []
        for lay in layers:
            sl = slice(off[lay], off[lay + 1])
            hit_r, hit_v = (ref[:, sl] > 0).mean(0), (v[:, sl] > 0).mean(0)
            mean_r, mean_v = ref[:, sl].mean(0), v[:, sl].mean(0)
            std_r, std_v = ref[:, sl].std(0), v[:, sl].std(0)
            w = mean_r / mean_r.sum()
            seen = hit_r > 0.01
            hit = np.abs(hit_v - hit_r)[seen].mean() / hit_r[seen].mean()
            mean = (w * np.abs(mean_v / np.maximum(mean_r, 1e-12) - 1)).sum()
            spread = (w * (std_v / np.maximum(std_r, 1e-12) - 1)).sum()
            parts.append(f"L{lay} {hit:.3f} {mean:.3f} {spread:+.3f}")
        print(path, "|", " | ".join(parts))


if __name__ == "__main__":
    main()
