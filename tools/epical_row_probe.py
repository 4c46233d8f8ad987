"""Where a digital pixel calorimeter model puts a layer's pixels along the pixel rows (the order in
which it places them): for each store, per layer, the mean over showers of the mean pixel row of
the layer's pixels, of its first and its last pixel, and the same mean row by the layer's pixel
count (1, 2, 3, 4-5, 6-9, 10-19, 20-39, 40-79). Stores at the same energies, e.g. two references
and the generated showers of `uhg generate --conditions`:

    python tools/epical_row_probe.py ref56.zarr ref57.zarr gen.zarr --events 2000 --layers 3
"""

from __future__ import annotations

import argparse

import numpy as np

from uhg.data.reader import open_store

COUNT_BINS = ((1, 2), (2, 3), (3, 4), (4, 6), (6, 10), (10, 20), (20, 40), (40, 80))


def layer_rows(path: str, n: int, layers: int) -> list[list[np.ndarray]]:
    """rows[layer][shower]: the sorted pixel rows of the layer's pixels in each of the first n showers."""
    store = open_store(path)
    batch = store.read(0, min(n, len(store)))
    nx = store.geometry.nx
    layer, cell, off = batch.columns["layer"].astype(np.int64), batch.columns["cell"].astype(np.int64), batch.offsets
    out: list[list[np.ndarray]] = [[] for _ in range(layers)]
    for i in range(len(off) - 1):
        lay, c = layer[off[i]:off[i + 1]], cell[off[i]:off[i + 1]]
        for j in range(layers):
            out[j].append(np.sort(c[lay == j]) // nx)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stores", nargs="+", help="stores of showers (the first is the reference)")
    ap.add_argument("--events", type=int, default=2000, help="first showers of each store")
    ap.add_argument("--layers", type=int, default=3, help="layers 0 .. this - 1")
    args = ap.parse_args()
    rows = {path: layer_rows(path, args.events, args.layers) for path in args.stores}
    for j in range(args.layers):
        print(f"layer {j}")
        for path, per_layer in rows.items():
            fired = [r for r in per_layer[j] if len(r)]
            by_count = []
            for lo, hi in COUNT_BINS:
                sel = [r.mean() for r in fired if lo <= len(r) < hi]
                if sel:
                    by_count.append(f"{lo}-{hi - 1}: {np.mean(sel):.2f} ({len(sel)})" if hi - lo > 1
                                    else f"{lo}: {np.mean(sel):.2f} ({len(sel)})")
            print(f"  {path}: pixels {np.mean([len(r) for r in per_layer[j]]):.1f}, mean row "
                  f"{np.mean([r.mean() for r in fired]):.2f}, first {np.mean([r[0] for r in fired]):.2f}, "
                  f"last {np.mean([r[-1] for r in fired]):.2f}; mean row by pixel count: " + ", ".join(by_count))


if __name__ == "__main__":
    main()
