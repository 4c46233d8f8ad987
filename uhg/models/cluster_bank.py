"""Banks of the encoded pixel charges of training clusters, keyed by a cluster class (the GAN's
shape; the hit transformer's (shape, charge class)), from which a generated cluster of that
class takes the charges of one real cluster: the charge split between a cluster's pixels (one
large pixel, small edge pixels) is what the data have, not a product of per-pixel laws.

`fit_cluster_bank` builds the flat bank from training pixels; `bank_offsets` picks a cluster of
each generated one's class (of its own unit where the bank holds some) by a uniform.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class ClusterBank(NamedTuple):
    """A fitted bank: `values` the kept clusters' codes, flat (by key, then unit with `per_unit`,
    each cluster's pixels in bit order); per key `count` clusters starting at pixel `start`; with
    `per_unit`, (n_units, n_keys) `unit_count` clusters of each unit and its `unit_first` (in
    clusters from the key's start), else None."""

    values: np.ndarray
    count: np.ndarray
    start: np.ndarray
    unit_count: np.ndarray | None
    unit_first: np.ndarray | None


def fit_cluster_bank(key: np.ndarray, cluster: np.ndarray, bit: np.ndarray, code: np.ndarray, unit: np.ndarray,
                     n_keys: int, capacity: int, n_units: int | None = None) -> ClusterBank:
    """The encoded charges of training clusters, each cluster's pixels in bit order, grouped by
    key; every m-th cluster of each key is kept (input order: spread over the fit events and their
    conditions; at least one per key), m the smallest that fits `capacity` pixels. (One cap per
    shape instead kept 217 clusters of every shape of pxd-mini, the single pixel's included: its
    charge missed by 1.7 ADU.) `key`, `cluster`, `bit`, `code`: key, cluster, position in the
    cluster and encoded charge of every training pixel (every cluster of a key has the same
    pixels); `unit`: the unit of every cluster (indexed by `cluster`). With `n_units` the kept
    clusters of each key are ordered by unit, and each unit's first and count are returned."""
    order = np.lexsort((bit, cluster))
    cluster, code = cluster[order], code[order]
    first = np.flatnonzero(np.r_[True, cluster[1:] != cluster[:-1]])
    size = np.diff(np.r_[first, len(cluster)])
    shape = key[order][first]
    k = n_keys
    n = np.bincount(shape, minlength=k)
    n_pix = np.bincount(shape, size, minlength=k) / np.maximum(n, 1)  # every cluster of a key has its pixels
    lo, hi = 1, max(int(n.max()), 1)
    if (-(-n // hi) * n_pix).sum() > capacity:
        raise ValueError(f"the cluster bank's {capacity} pixels hold less than one training cluster of every key "
                         f"({int((n_pix * (n > 0)).sum())} pixels): raise it")
    while lo < hi:  # the smallest step m whose clusters fit
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if (-(-n // mid) * n_pix).sum() <= capacity else (mid + 1, hi)
    by_shape = np.argsort(shape, kind="stable")
    rank = np.empty(len(shape), np.int64)
    rank[by_shape] = np.arange(len(shape)) - np.repeat(np.r_[0, np.cumsum(n)[:-1]], n)
    chosen = by_shape[rank[by_shape] % lo == 0]  # by key, input order within
    units = None
    if n_units is not None:  # by key, then unit, input order within
        units = unit[cluster[first[chosen]]]
        order = np.lexsort((np.arange(len(chosen)), units, shape[chosen]))
        chosen, units = chosen[order], units[order]
    starts = np.repeat(first[chosen], size[chosen])
    within = np.arange(len(starts)) - np.repeat(np.r_[0, np.cumsum(size[chosen])[:-1]], size[chosen])
    values = code[starts + within]
    count = np.bincount(shape[chosen], minlength=k)
    start = np.r_[0, np.cumsum(count * n_pix.round().astype(np.int64))[:-1]]
    if n_units is None:
        return ClusterBank(values, count, start, None, None)
    kept_shape = shape[chosen]
    within_shape = np.arange(len(chosen)) - np.r_[0, np.cumsum(count)[:-1]][kept_shape]
    per_unit = np.zeros((n_units, k), np.int64)
    np.add.at(per_unit, (units, kept_shape), 1)
    first_of = np.full((n_units, k), len(chosen), np.int64)
    np.minimum.at(first_of, (units, kept_shape), within_shape)
    return ClusterBank(values, count, start, per_unit, np.where(per_unit > 0, first_of, 0))


def bank_offsets(key: torch.Tensor, u: torch.Tensor, pixels: torch.Tensor, count: torch.Tensor, start: torch.Tensor,
                 unit: torch.Tensor | None = None, unit_count: torch.Tensor | None = None,
                 unit_first: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) long: the bank position of the first pixel of the cluster each of N generated ones of
    `key` takes, picked by its uniform `u` (N,) among the bank's clusters of that key (of its own
    `unit`, where `unit_count` holds some); `pixels` (N,) long: pixels per cluster of its key.
    `count`, `start`, `unit_count`, `unit_first`: a `ClusterBank`'s, as float buffers (exact below
    2^24). A key without clusters picks position `start` of its key (check `count` first)."""
    n = count[key].round().long().clamp_min(1)
    first = torch.zeros_like(n)
    if unit is not None:
        own = unit_count[unit, key].round().long()
        first = torch.where(own > 0, unit_first[unit, key].round().long(), first)
        n = torch.where(own > 0, own, n)
    pick = torch.minimum((u.double() * n).long(), n - 1)
    return start[key].round().long() + (first + pick) * pixels
