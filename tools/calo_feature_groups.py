"""Which high-level features the cls-high classifier separates on: the DNN classifier of `uhg eval`
trained on one group of the cls-high columns at a time (layer energies, lateral centres, lateral
widths, sparsity and hit counts, all features of one layer), each group with log10 E_inc, and on
all columns but one group. Also prints, per layer, the spread of the centre of energy and the
mean width of both samples (the lateral shape the voxel stage makes).

    python tools/calo_feature_groups.py --reference REF.zarr --generated GEN.zarr [--events 10000]

A group whose AUC alone is near the full AUC is what the classifier uses; the "all but" column
shows whether the rest still separates without it.
"""

from __future__ import annotations

import argparse

import numpy as np


def groups(names: list[str], active: list[int]) -> dict[str, list[str]]:
    """Named sets of cls-high column names (without the incident energy, always added)."""
    out = {
        "layer energies, response, depth": [n for n in names if n.startswith("log_energy") or n in (
            "response", "shower_depth", "shower_depth_width")],
        "centres (x, y, r)": [n for n in names if n.startswith("centre_")],
        "widths (x, y, r)": [n for n in names if n.startswith("width_")],
        "sparsity, hits": [n for n in names if n.startswith("sparsity") or n == "log_hits"],
    }
    for lay in active:
        out[f"all features of layer {lay}"] = [n for n in names if n.endswith(f"_layer{lay}")]
    return out


def lateral_table(f_ref, f_gen, active: list[int]) -> str:
    rows = ["| layer | std centre x ref / gen [mm] | std centre y ref / gen [mm] | mean width x ref / gen [mm] |",
            "|---|---|---|---|"]
    def stat(fs, name, lay, fn):
        return fn(fs.distributions[f"{name}_layer{lay}"].values)

    for lay in active:
        cells = [f"{stat(f_ref, n, lay, fn):.3f} / {stat(f_gen, n, lay, fn):.3f}"
                 for n, fn in (("centre_x", np.std), ("centre_y", np.std), ("width_x", np.mean))]
        rows.append(f"| {lay} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    import torch

    from uhg.data import open_store
    from uhg.eval.classifier import classifier_auc
    from uhg.eval.features_calo import calo_features, high_level_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True)
    ap.add_argument("--generated", required=True)
    ap.add_argument("--events", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-all-but", action="store_true", help="only the one-group classifiers")
    a = ap.parse_args()
    torch.set_num_threads(1)

    stores = [open_store(p) for p in (a.reference, a.generated)]
    g = stores[0].geometry
    f_ref, f_gen = (calo_features(s.read(0, min(a.events, len(s))), g) for s in stores)
    active = list(g.active_layers)
    print(lateral_table(f_ref, f_gen, active), flush=True)

    names = high_level_names(g)
    x_ref, x_gen = f_ref.vectors["high_level"], f_gen.vectors["high_level"]

    def auc(cols: list[str]) -> float:
        idx = [names.index("log_incident_energy")] + [names.index(c) for c in cols]
        return classifier_auc(x_ref[:, idx], x_gen[:, idx], seed=a.seed, method="dnn").auc

    print(f"\nall cls-high columns: AUC {auc(names[1:]):.3f}\n", flush=True)
    print("| features (with log10 E_inc) | AUC on these alone | AUC on all but these |\n|---|---|---|", flush=True)
    for name, cols in groups(names, active).items():
        rest = "-" if a.no_all_but else f"{auc([c for c in names[1:] if c not in cols]):.3f}"
        print(f"| {name} | {auc(cols):.3f} | {rest} |", flush=True)


if __name__ == "__main__":
    main()
