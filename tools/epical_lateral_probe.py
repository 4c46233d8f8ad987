"""Where a digital pixel calorimeter model places its pixels, layer by layer: generated against
simulated showers, the mean pixels per layer, the mean lateral width per layer and the hit density
in each ring of `uhg eval`'s lateral profile (generated / reference), then the same over all layers.

    uhg sim calo --geometry epical-mini --energy-min 1000 --energy-max 16000 --events 400 --seed 55 --out ref.zarr
    python tools/epical_lateral_probe.py --reference ref.zarr --conditions-out ref_cond.npz
    uhg generate --model runs/NAME/export --events 400 --conditions ref_cond.npz --seed 7 --batch-size 400 --out gen.zarr
    python tools/epical_lateral_probe.py --reference ref.zarr --generated gen.zarr
"""

from __future__ import annotations

import argparse

import numpy as np

from uhg.data.reader import open_store
from uhg.eval.features_calo import LATERAL_RING_EDGES_MM, calo_features


def profile_means(store) -> dict[str, np.ndarray]:
    fs = calo_features(store.read(), store.geometry)
    return {name: np.asarray(fs.profiles[name].values, dtype=np.float64).mean(0)
            for name in ("energy_per_layer", "width_per_layer", "lateral_density_per_layer")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="store of simulated showers")
    ap.add_argument("--generated", help="store of generated showers at the reference's energies")
    ap.add_argument("--conditions-out", help="write the reference's incident energies here (for uhg generate --conditions)")
    args = ap.parse_args()
    ref = open_store(args.reference)
    if args.conditions_out:
        np.savez(args.conditions_out, incident_energy=ref.conditions["incident_energy"])
        print(f"wrote {len(ref)} incident energies to {args.conditions_out}")
    if not args.generated:
        return
    gen = open_store(args.generated)
    r, g = profile_means(ref), profile_means(gen)
    n_rings = len(LATERAL_RING_EDGES_MM) - 1
    d_r, d_g = r["lateral_density_per_layer"].reshape(-1, n_rings), g["lateral_density_per_layer"].reshape(-1, n_rings)
    rings = " ".join(f"{a:g}-{b:g}mm" for a, b in zip(LATERAL_RING_EDGES_MM[:-1], LATERAL_RING_EDGES_MM[1:], strict=True))
    print(f"showers: reference {len(ref)}, generated {len(gen)}")
    print(f"layer | pixels ref, gen | width ref, gen [mm] (gen / ref) | density gen / ref in rings {rings}")
    with np.errstate(divide="ignore", invalid="ignore"):
        for lay in range(len(d_r)):
            w_r, w_g = r["width_per_layer"][lay], g["width_per_layer"][lay]
            print(f"{lay:5d} | {r['energy_per_layer'][lay]:6.1f} {g['energy_per_layer'][lay]:6.1f} | "
                  f"{w_r:5.2f} {w_g:5.2f} ({w_g / w_r:.3f}) | " + " ".join(f"{x:6.3f}" for x in d_g[lay] / d_r[lay]))
        hits = r["energy_per_layer"]
        print("all layers, density gen / ref per ring:", " ".join(f"{x:.3f}" for x in d_g.sum(0) / d_r.sum(0)))
        print(f"mean width gen / ref, weighted by the reference's pixels per layer: "
              f"{(g['width_per_layer'] / r['width_per_layer'] * hits).sum() / hits.sum():.3f}")


if __name__ == "__main__":
    main()
