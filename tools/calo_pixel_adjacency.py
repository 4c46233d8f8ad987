"""How often a fired pixel of a digital pixel calorimeter (epical) touches another fired pixel of its
layer: the fraction of fired pixels whose left neighbour fired, and whose upper neighbour fired, in a
generated sample against a reference, with the floor between two independent references.

    python tools/calo_pixel_adjacency.py REF.zarr REF2.zarr GEN.zarr [EVENTS]

The cell field of the hit transformer is smooth over a layer; these fractions show whether a
model makes the pixels of a shower touch as often as the simulation does (model.cell_neighbours).
"""

from __future__ import annotations

import sys

import numpy as np

from uhg.data import open_store


def adjacency(path: str, n: int) -> tuple[float, float, int]:
    """(fraction with the left neighbour fired, fraction with the upper neighbour fired, pixels)."""
    store = open_store(path)
    g = store.geometry
    if getattr(g, "layout", None) != "cartesian":
        raise SystemExit(f"{path}: geometry {g.name!r} has no pixel grid")
    batch = store.read(0, min(n, len(store)))
    cells_per_layer = g.ny * g.nx
    cell = batch.columns["cell"].astype(np.int64)
    event = np.repeat(np.arange(len(batch)), batch.hits_per_event)
    key = event * (g.n_layers * cells_per_layer) + cell  # unique per shower, layer and pixel
    fired = np.zeros(0, dtype=np.int64) if not len(key) else np.unique(key)
    x, y = (cell % cells_per_layer) % g.nx, (cell % cells_per_layer) // g.nx
    left = (x > 0) & np.isin(key - 1, fired)
    up = (y > 0) & np.isin(key - g.nx, fired)
    return float(left.mean()), float(up.mean()), len(key)


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    n = int(argv[3]) if len(argv) > 3 else 2000
    (rl, ru, rn), (fl, fu, fn), (gl, gu, gn) = (adjacency(p, n) for p in argv[:3])
    print(f"| sample | pixels | left neighbour fired | upper neighbour fired |")
    print("|---|---|---|---|")
    print(f"| reference | {rn} | {rl:.4f} | {ru:.4f} |")
    print(f"| second reference (floor) | {fn} | {fl:.4f} ({fl / rl - 1:+.1%}) | {fu:.4f} ({fu / ru - 1:+.1%}) |")
    print(f"| generated | {gn} | {gl:.4f} ({gl / rl - 1:+.1%}) | {gu:.4f} ({gu / ru - 1:+.1%}) |")


if __name__ == "__main__":
    main(sys.argv[1:])
