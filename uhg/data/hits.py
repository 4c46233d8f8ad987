"""Sparse events: the currency between simulators, stores, loaders, models and evaluation.

A `HitBatch` holds many events as flat per-hit columns plus `offsets` (n_events + 1), the
layout the Zarr store uses on disk. Cost is proportional to the number of hits, never to the
number of channels. One event is a `PixelEvent` or a `CaloEvent`.

Columns and units
- pixel detectors: `sensor` (uint8, index in the geometry's canonical order), `row` (uint16,
  r-phi), `col` (uint16, z), `value` (uint8, ADC charge in ADU).
- calorimeters: `layer` (uint16), `cell` (uint32, index within the layer), `value` (float32,
  deposited energy in MeV).
Conditions are float64 per event, in the units of `CONDITION_UNITS`: `luminosity`
(cm^-2 s^-1), `her_current`, `ler_current` (A), `beta_y_star` (mm), `incident_energy` (MeV), ...
Within an event, hits are sorted by (sensor, row, col) or (layer, cell), and unique.

Optional extra columns (`EXTRA_COLUMNS`) may ride along with either kind: `origin` (uint8) marks
where an overlay hit came from: 1 = signal only, 2 = background only, 3 = both (charges added).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PIXEL_COLUMNS: dict[str, np.dtype] = {
    "sensor": np.dtype("uint8"),
    "row": np.dtype("uint16"),
    "col": np.dtype("uint16"),
    "value": np.dtype("uint8"),
}
CALO_COLUMNS: dict[str, np.dtype] = {
    "layer": np.dtype("uint16"),
    "cell": np.dtype("uint32"),
    "value": np.dtype("float32"),
}
COLUMNS = {"pixel": PIXEL_COLUMNS, "calo": CALO_COLUMNS}
EXTRA_COLUMNS: dict[str, np.dtype] = {"origin": np.dtype("uint8")}
"""Optional per-hit columns a batch may carry besides those of its kind."""
ORIGIN_SIGNAL, ORIGIN_BACKGROUND, ORIGIN_BOTH = 1, 2, 3
CONDITION_UNITS = {"luminosity": "cm^-2 s^-1", "her_current": "A", "ler_current": "A", "beta_y_star": "mm",
                   "incident_energy": "MeV"}
"""Unit of each known event condition, as stores declare it and reports print it."""


@dataclass
class PixelEvent:
    """One readout of a pixel detector: fired pixels and the event's conditions."""

    sensor: np.ndarray
    row: np.ndarray
    col: np.ndarray
    value: np.ndarray
    conditions: dict[str, float] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    """Optional extra hit columns (`EXTRA_COLUMNS`), e.g. `origin` of overlay hits."""

    def __len__(self) -> int:
        return len(self.value)


@dataclass
class CaloEvent:
    """One calorimeter shower: cells with deposited energy (MeV) and the event's conditions."""

    layer: np.ndarray
    cell: np.ndarray
    value: np.ndarray
    conditions: dict[str, float] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    """Optional extra hit columns (`EXTRA_COLUMNS`), e.g. `origin` of overlay hits."""

    def __len__(self) -> int:
        return len(self.value)


Event = PixelEvent | CaloEvent


SLICE_GATHER_HITS = 64
"""Mean hits per gathered event from which events are copied slice by slice (see gather_events)."""


def gather_events(columns: Mapping[str, np.ndarray], offsets: np.ndarray,
                  idx: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The hits of events `idx` (in that order, repeats allowed) of each of `columns` (a batch with
    `offsets`), and the offsets of the gathered batch. Events with many hits (full-size PXD events:
    thousands) are copied one contiguous slice each, 10-25x faster than indexing every hit with a
    position array; events with few hits, where a Python loop per event would cost more, with one
    position array."""
    lo, hi = offsets[idx], offsets[idx + 1]
    out = np.zeros(len(idx) + 1, np.int64)
    np.cumsum(hi - lo, out=out[1:])
    if out[-1] < SLICE_GATHER_HITS * len(idx):
        # hit k of output event j sits at offsets[idx[j]] + (k - out[j])
        pos = np.repeat(lo - out[:-1], hi - lo) + np.arange(out[-1], dtype=np.int64)
        return {k: v[pos] for k, v in columns.items()}, out
    gathered = {k: np.empty(out[-1], v.dtype) for k, v in columns.items()}
    for j, (a, b) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        for k, v in columns.items():
            gathered[k][out[j]:out[j + 1]] = v[a:b]
    return gathered, out


@dataclass
class ChannelBatch:
    """Events as the store keeps them: flat channel indices (uint32, `uhg.sparse.dense.channel_index`),
    `value` in the store's dtype and any extra columns, with offsets and conditions as in `HitBatch`.
    5 bytes per pixel hit: what the torch loader gathers and ships, widening only where hits are used."""

    kind: str
    channel: np.ndarray
    columns: dict[str, np.ndarray]  # "value" and extra columns, each (n_hits,)
    offsets: np.ndarray
    conditions: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_hits(self) -> int:
        return len(self.channel)

    def take(self, indices: Sequence[int] | np.ndarray) -> ChannelBatch:
        """Events at `indices` (any order) as a new batch: copies, or views when the indices are
        one ascending run (what an unshuffled loader asks for)."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
            lo, hi = self.offsets[idx[0]], self.offsets[idx[-1] + 1]
            return ChannelBatch(self.kind, self.channel[lo:hi], {k: v[lo:hi] for k, v in self.columns.items()},
                                self.offsets[idx[0]:idx[-1] + 2] - lo,
                                {k: v[idx[0]:idx[-1] + 1] for k, v in self.conditions.items()})
        hits, offsets = gather_events({"channel": self.channel, **self.columns}, self.offsets, idx)
        channel = hits.pop("channel")
        return ChannelBatch(self.kind, channel, hits, offsets, {k: v[idx] for k, v in self.conditions.items()})

    @classmethod
    def concat(cls, batches: Sequence[ChannelBatch]) -> ChannelBatch:
        counts = np.concatenate([np.diff(b.offsets) for b in batches])
        return cls(batches[0].kind, np.concatenate([b.channel for b in batches]),
                   {k: np.concatenate([b.columns[k] for b in batches]) for k in batches[0].columns},
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   {k: np.concatenate([b.conditions[k] for b in batches]) for k in batches[0].conditions})


@dataclass
class HitBatch:
    """Events `0..n-1` as flat hit columns; event i owns hits `offsets[i]:offsets[i+1]`."""

    kind: str
    columns: dict[str, np.ndarray]
    offsets: np.ndarray
    conditions: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in COLUMNS:
            raise ValueError(f"kind must be one of {sorted(COLUMNS)}, got {self.kind!r}")
        spec = COLUMNS[self.kind]
        extras = [k for k in EXTRA_COLUMNS if k in self.columns]
        if set(self.columns) != set(spec) | set(extras):
            raise ValueError(f"{self.kind} hits need columns {sorted(spec)} (optionally {sorted(EXTRA_COLUMNS)}), "
                             f"got {sorted(self.columns)}")
        self.columns = {k: np.asarray(self.columns[k], dtype=spec[k]) for k in spec} | {
            k: np.asarray(self.columns[k], dtype=EXTRA_COLUMNS[k]) for k in extras}
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        n_hits = self.n_hits
        if any(len(v) != n_hits for v in self.columns.values()):
            raise ValueError("hit columns have different lengths")
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != n_hits:
            raise ValueError(f"offsets must run from 0 to the number of hits ({n_hits})")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing")
        self.conditions = {k: np.asarray(v, dtype=np.float64) for k, v in self.conditions.items()}
        for k, v in self.conditions.items():
            if v.shape != (len(self),):
                raise ValueError(f"condition {k!r} has shape {v.shape}, expected ({len(self)},)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_hits(self) -> int:
        return len(self.columns["value"])

    @property
    def extra_columns(self) -> list[str]:
        """Names of the optional extra columns this batch carries (see `EXTRA_COLUMNS`)."""
        return [k for k in self.columns if k not in COLUMNS[self.kind]]

    @property
    def hits_per_event(self) -> np.ndarray:
        return np.diff(self.offsets)

    def event(self, i: int) -> Event:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        cols = {k: self.columns[k][lo:hi] for k in COLUMNS[self.kind]}
        extra = {k: self.columns[k][lo:hi] for k in self.extra_columns}
        conds = {k: float(v[i]) for k, v in self.conditions.items()}
        return (PixelEvent if self.kind == "pixel" else CaloEvent)(**cols, conditions=conds, extra=extra)

    def __iter__(self):
        for i in range(len(self)):
            yield self.event(i)

    def slice(self, start: int, stop: int) -> HitBatch:
        """Events start..stop-1 as a new batch (views into the same memory)."""
        lo, hi = self.offsets[start], self.offsets[stop]
        return HitBatch(
            self.kind,
            {k: v[lo:hi] for k, v in self.columns.items()},
            self.offsets[start : stop + 1] - lo,
            {k: v[start:stop] for k, v in self.conditions.items()},
        )

    def take(self, indices: Sequence[int] | np.ndarray) -> HitBatch:
        """Events at `indices` (any order, repeats allowed) as a new batch: copies, or views
        (`slice`) when the indices are one ascending run."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and idx[-1] - idx[0] == len(idx) - 1 and np.all(np.diff(idx) == 1):
            return self.slice(int(idx[0]), int(idx[-1]) + 1)
        columns, offsets = gather_events(self.columns, self.offsets, idx)
        return HitBatch(self.kind, columns, offsets, {k: v[idx] for k, v in self.conditions.items()})

    def event_index(self) -> np.ndarray:
        """(n_hits,) int64: the event each hit belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.hits_per_event)

    @classmethod
    def concat(cls, batches: Sequence[HitBatch]) -> HitBatch:
        if not batches:
            raise ValueError("cannot concatenate zero batches")
        kind = batches[0].kind
        if any(b.kind != kind for b in batches):
            raise ValueError("cannot concatenate pixel and calorimeter hits")
        names = set(batches[0].conditions)
        if any(set(b.conditions) != names for b in batches):
            raise ValueError("batches have different condition names")
        columns = list(batches[0].columns)
        if any(set(b.columns) != set(columns) for b in batches):
            raise ValueError("batches have different extra hit columns")
        counts = np.concatenate([b.hits_per_event for b in batches])
        return cls(
            kind,
            {k: np.concatenate([b.columns[k] for b in batches]) for k in columns},
            np.concatenate([[0], np.cumsum(counts)]),
            {k: np.concatenate([b.conditions[k] for b in batches]) for k in names},
        )

    @classmethod
    def from_events(cls, kind: str, events: Iterable[Event]) -> HitBatch:
        events = list(events)
        names = list(COLUMNS[kind])
        counts = [len(e) for e in events]
        cond_names = sorted(events[0].conditions) if events else []
        extras = [k for k in EXTRA_COLUMNS if events and all(k in e.extra for e in events)]
        return cls(
            kind,
            {k: np.concatenate([getattr(e, k) for e in events]) if events else np.zeros(0) for k in names}
            | {k: np.concatenate([e.extra[k] for e in events]) for k in extras},
            np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]),
            {k: np.array([e.conditions[k] for e in events]) for k in cond_names},
        )

    @classmethod
    def empty(cls, kind: str, condition_names: Iterable[str] = ()) -> HitBatch:
        return cls(kind, {k: np.zeros(0, d) for k, d in COLUMNS[kind].items()}, np.zeros(1, np.int64),
                   {k: np.zeros(0) for k in condition_names})

    def sorted(self) -> HitBatch:
        """Hits sorted within each event by (sensor, row, col) or (layer, cell)."""
        keys = ["sensor", "row", "col"] if self.kind == "pixel" else ["layer", "cell"]
        # lexsort's last key is the primary one: event first, then the detector keys in order.
        order = np.lexsort([self.columns[k] for k in reversed(keys)] + [self.event_index()])
        return HitBatch(self.kind, {k: v[order] for k, v in self.columns.items()}, self.offsets.copy(),
                        dict(self.conditions))
