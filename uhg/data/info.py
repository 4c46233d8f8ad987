"""Summary of a store: what `uhg data info` prints (as a table or as JSON).

Everything is computed from the committed parts in one sequential pass (one read per part), so
it also works on a store that is still being written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from uhg.data.layout import PARTIAL, PARTS, missing_parts
from uhg.data.reader import open_store

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _stats(x: np.ndarray) -> dict[str, float | None]:
    if len(x) == 0:
        return {"mean": None, "std": None, "min": None, "max": None} | {f"q{int(q * 100):02d}": None for q in QUANTILES}
    qs = np.quantile(x, QUANTILES)
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())} | {
        f"q{int(q * 100):02d}": float(v) for q, v in zip(QUANTILES, qs, strict=True)}


def disk_usage(path: Path) -> dict[str, int]:
    """Bytes on disk of committed parts, split by array kind (hits, offsets, conditions, metadata)."""
    usage = {"hits": 0, "event_offsets": 0, "conditions": 0, "metadata": 0}
    for dirpath, _, files in os.walk(path):
        rel = Path(dirpath).relative_to(path).parts
        if rel[:1] != (PARTS,):
            continue
        for f in files:
            size = os.path.getsize(os.path.join(dirpath, f))
            if f == "zarr.json":
                usage["metadata"] += size
            elif "conditions" in rel:
                usage["conditions"] += size
            elif "event_offsets" in rel:
                usage["event_offsets"] += size
            else:
                usage["hits"] += size
    return usage


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able summary: events, parts, hits per event, occupancy (pixel) or energy (calo)
    per sensor/layer, conditions, size on disk, bytes per hit and compression."""
    path = Path(path)
    store = open_store(path, allow_incomplete=True)
    attrs, geom = store.attrs, store.geometry
    missing = missing_parts(path)
    counts, per_unit, per_unit_value = [], None, None
    n_units = geom.n_sensors if store.kind == "pixel" else geom.n_layers
    per_unit = np.zeros(n_units, np.int64)
    per_unit_value = np.zeros(n_units, np.float64)
    value_sum = []
    for batch in store.iter_batches():
        counts.append(batch.hits_per_event)
        unit = batch.columns["sensor" if store.kind == "pixel" else "layer"]
        per_unit += np.bincount(unit, minlength=n_units)
        per_unit_value += np.bincount(unit, weights=batch.columns["value"], minlength=n_units)
        value_sum.append(np.add.reduceat(batch.columns["value"].astype(np.float64), batch.offsets[:-1])
                         if batch.n_hits else np.zeros(len(batch)))
        # reduceat gives the next event's first value for empty events: zero them
        value_sum[-1][batch.hits_per_event == 0] = 0.0
    hits = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    sums = np.concatenate(value_sum) if value_sum else np.zeros(0)
    n_events, n_hits = len(store), int(hits.sum())
    usage = disk_usage(path)
    disk = sum(usage.values())
    out: dict[str, Any] = {
        "path": str(path),
        "schema": attrs["schema"],
        "kind": store.kind,
        "geometry": geom.name,
        "n_channels": int(geom.n_channels),
        "events": n_events,
        "events_planned": attrs["n_events"],
        "parts": {"total": attrs["n_parts"], "complete": len(store.parts), "missing": missing,
                  "part_size": attrs["part_size"],
                  # temporary parts: being written now, or left by a killed writer (removed
                  # by the next create_store of the same plan on the writer's host)
                  "in_progress": len(os.listdir(path / PARTIAL)) if (path / PARTIAL).is_dir() else 0},
        "hits": n_hits,
        "hits_per_event": _stats(hits.astype(np.float64)),
        "conditions": {
            name: {"declared_min": spec["min"], "declared_max": spec["max"], "unit": spec["unit"]}
            | {k: v for k, v in _stats(store.conditions[name]).items() if k in ("mean", "min", "max")}
            for name, spec in attrs["conditions"].items()},
        "disk_bytes": disk,
        "disk_bytes_by_kind": usage,
        "bytes_per_hit": disk / n_hits if n_hits else None,
        "hit_bytes_per_hit": usage["hits"] / n_hits if n_hits else None,
        "compression": attrs["encoding"],
        "provenance": attrs.get("provenance", {}),
        "attributes": attrs.get("attributes", {}),
    }
    norm = max(n_events, 1)
    if store.kind == "pixel":
        occ = per_unit / norm / geom.pixels_per_sensor
        layers = sorted({s.layer for s in geom.sensors})
        out["occupancy"] = n_hits / norm / geom.n_channels
        out["occupancy_per_sensor"] = {s.name: float(occ[s.index]) for s in geom.sensors}
        out["occupancy_per_layer"] = {
            str(layer): float(np.mean([occ[s.index] for s in geom.sensors if s.layer == layer])) for layer in layers}
        out["adc_per_event"] = _stats(sums)
    else:
        out["energy_per_event_mev"] = _stats(sums)
        out["energy_per_layer_mev"] = [float(v) for v in per_unit_value / norm]
        out["hits_per_layer"] = [float(v) for v in per_unit / norm]
    return out
