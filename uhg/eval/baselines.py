"""Naive baselines for zero-shot extrapolation: what you get without a model.

Both start from events at the highest training condition (x_train, as a training sample would
hold them) and assume the detector response scales linearly with the condition, r = x / x_train:

- pixel detectors (and digital calorimeters): overlay. Event i of the baseline is the sum of
  floor(r) training events plus a random fraction r - floor(r) of the clusters of one more;
  charges of a pixel hit twice add and saturate (uhg.sparse.overlay.merge_overlay). Occupancy
  then grows like the luminosity, while real beam background grows faster (beam currents rise
  with luminosity), which is what a model has to learn.
- analog calorimeters: scaling. Showers at E_train with every cell energy multiplied by
  E / E_train: right mean response by construction, but the shower shape (depth grows like
  ln E) and the relative resolution (~ 1/sqrt(E)) stay those of E_train.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from uhg.data.hits import COLUMNS, HitBatch


def overlay_baseline(sample: Callable[[int, int], HitBatch], geometry, ratio: float, n_events: int,
                     rng: np.random.Generator) -> HitBatch:
    """`n_events` events, each an overlay of `ratio` training events (fractional part: a random
    subset of clusters / hits of one extra event). `sample(n, first_event)` returns training
    events."""
    whole = int(math.floor(ratio))
    frac = ratio - whole
    n_layers = whole + (1 if frac > 1e-9 else 0)
    result: HitBatch | None = None
    for k in range(n_layers):
        layer = sample(n_events, k * n_events)
        if k == whole:  # the fractional layer
            layer = thin(layer, geometry, frac, rng)
        result = layer if result is None else _merge(result, layer, geometry)
    if result is None:  # ratio 0: no hits at all
        return thin(sample(n_events, 0), geometry, 0.0, rng)
    return result


def thin(batch: HitBatch, geometry, keep: float, rng: np.random.Generator) -> HitBatch:
    """Keep each cluster (pixel detectors) or hit (calorimeters) with probability `keep`."""
    if batch.kind == "pixel":
        from uhg.eval.features_pxd import pixel_clusters

        labels, n = pixel_clusters(batch, geometry)
        mask = (rng.random(n) < keep)[labels] if n else np.zeros(0, bool)
    else:
        mask = rng.random(batch.n_hits) < keep
    return select_hits(batch, mask)


def select_hits(batch: HitBatch, mask: np.ndarray) -> HitBatch:
    counts = np.bincount(batch.event_index()[mask], minlength=len(batch))
    return HitBatch(batch.kind, {k: batch.columns[k][mask] for k in COLUMNS[batch.kind]},
                    np.concatenate([[0], np.cumsum(counts)]), dict(batch.conditions))


def _merge(a: HitBatch, b: HitBatch, geometry) -> HitBatch:
    if a.kind == "pixel":
        from uhg.sparse.overlay import merge_overlay

        merged = merge_overlay(a, b, geometry)
        return HitBatch("pixel", {k: merged.columns[k] for k in COLUMNS["pixel"]}, merged.offsets, dict(a.conditions))
    # digital calorimeter: a cell fires once however many showers cross it
    n = len(a)
    ev = np.concatenate([a.event_index(), b.event_index()])
    layer = np.concatenate([a.columns["layer"], b.columns["layer"]]).astype(np.int64)
    cell = np.concatenate([a.columns["cell"], b.columns["cell"]]).astype(np.int64)
    value = np.concatenate([a.columns["value"], b.columns["value"]])
    key = (ev * geometry.n_layers + layer) * (int(cell.max(initial=0)) + 1) + cell
    uniq, first = np.unique(key, return_index=True)
    counts = np.bincount(ev[first], minlength=n)
    return HitBatch("calo", {"layer": layer[first], "cell": cell[first], "value": np.minimum(value[first], 1.0)
                             if getattr(geometry, "readout", "analog") == "digital" else value[first]},
                    np.concatenate([[0], np.cumsum(counts)]), dict(a.conditions))


def scale_baseline(batch: HitBatch, factor: float) -> HitBatch:
    """Calorimeter showers with every cell energy multiplied by `factor` (incident energy too)."""
    conds = dict(batch.conditions)
    if "incident_energy" in conds:
        conds["incident_energy"] = conds["incident_energy"] * factor
    cols = dict(batch.columns)
    cols["value"] = (batch.columns["value"].astype(np.float64) * factor).astype(np.float32)
    return HitBatch(batch.kind, {k: cols[k] for k in COLUMNS[batch.kind]}, batch.offsets, conds)
