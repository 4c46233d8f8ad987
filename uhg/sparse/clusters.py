"""Pixel clusters: connected components of fired pixels, on sparse hits.

One implementation shared by the evaluation (cluster size and charge spectra) and the hit
transformer's cluster tokens, so both see the same clusters.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

# 8-connectivity: each pixel looks at 4 of its 8 neighbours, the other 4 look back at it.
_NEIGHBOUR_STEPS = ((0, 1), (1, -1), (1, 0), (1, 1))


def connected_pixels(image: np.ndarray, row: np.ndarray, col: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of fired pixels within each image.

    image, row, col: (n,) integer arrays, one per unique fired pixel (image = event x sensor
    index, any order); rows, cols: the sensor grid. Returns (labels, n_clusters): labels (n,)
    int64 in 0..n_clusters-1. Works on a sorted key per hit and a sparse adjacency graph, so the
    cost is O(n log n) whatever the sensor size.
    """
    n = len(row)
    if n == 0:
        return np.zeros(0, np.int64), 0
    row = np.asarray(row, dtype=np.int64)
    col = np.asarray(col, dtype=np.int64)
    key = (np.asarray(image, dtype=np.int64) * rows + row) * cols + col
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    src, dst = [], []
    for dr, dc in _NEIGHBOUR_STEPS:
        inside = (row + dr < rows) & (col + dc >= 0) & (col + dc < cols)
        target = key + dr * cols + dc
        pos = np.searchsorted(sorted_key, target)
        pos_clipped = np.minimum(pos, n - 1)
        hit = inside & (pos < n) & (sorted_key[pos_clipped] == target)
        src.append(np.nonzero(hit)[0])
        dst.append(order[pos_clipped[hit]])
    src = np.concatenate(src)
    dst = np.concatenate(dst)
    graph = sparse.coo_matrix((np.ones(len(src), np.int8), (src, dst)), shape=(n, n))
    n_clusters, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64), int(n_clusters)
