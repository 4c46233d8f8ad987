"""Reading a uhg store: `open_store(path) -> Store` (layout in `uhg.data.layout`; writing in `uhg.data.writer`).

A `Store` keeps the root attributes and the list of committed parts; event data is read one
whole part at a time (all arrays of a part in one concurrent zarr call) and the last parts
read are cached, so sequential access and iteration read every part once.
"""

from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from uhg.data.hits import EXTRA_COLUMNS, HitBatch
from uhg.data.layout import (
    PARTS,
    jsonable,
    missing_parts,
    part_name,
    part_range,
    read_attrs,
    zarr_module,
)
from uhg.errors import GeometryError, StoreError
from uhg.sparse.dense import columns_from_channel, dense_event, n_channels


def open_store(path: str | os.PathLike, allow_incomplete: bool = False, geometry: Any = None,
               cache_parts: int = 2) -> Store:
    """Open a store for reading.

    Raises StoreError if `path` is missing, not a uhg store, of another schema, or has missing
    parts (unless `allow_incomplete`, which exposes only the committed parts' events);
    GeometryError if `geometry` (name or object) is given and differs from the store's.
    """
    return Store(path, allow_incomplete=allow_incomplete, geometry=geometry, cache_parts=cache_parts)


class Store:
    """Read access to a committed store. Events are indexed 0..len-1 over committed parts;
    `event_ids` maps them to the planned event numbers (identical when the store is complete)."""

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False, geometry: Any = None,
                 cache_parts: int = 2):
        self.path = Path(path)
        self.attrs: dict[str, Any] = read_attrs(self.path)
        self.kind: str = self.attrs["kind"]
        from uhg.geometry import get_geometry

        try:
            self.geometry = get_geometry(self.attrs["geometry"])
        except GeometryError as err:
            raise GeometryError(f"store {self.path}: {err}") from err
        # keys the geometry gained since the store was written are fine; changed ones are not
        now, then = jsonable(self.geometry.to_dict()), self.attrs["geometry_spec"]
        changed = [k for k in then if k in now and now[k] != then[k]]
        if changed:
            detail = "; ".join(f"{k}: store {str(then[k])[:60]}, now {str(now[k])[:60]}" for k in changed[:3])
            raise GeometryError(f"store {self.path} was written for another version of geometry "
                                f"{self.geometry.name!r} ({detail})")
        if geometry is not None:
            wanted = geometry if isinstance(geometry, str) else geometry.name
            if wanted != self.geometry.name:
                raise GeometryError(f"store {self.path} holds geometry {self.geometry.name!r}, not {wanted!r}")
        missing = missing_parts(self.path)
        if missing and not allow_incomplete:
            raise StoreError(f"store {self.path} is incomplete: {len(missing)} of {self.attrs['n_parts']} parts "
                             f"missing ({_ranges(missing)}); rerun the writer to complete it")
        self._cache: OrderedDict[int, HitBatch] = OrderedDict()
        self._cache_parts = max(1, cache_parts)
        self._use_parts(sorted(set(range(self.attrs["n_parts"])) - set(missing)))

    def _use_parts(self, parts: list[int]) -> None:
        self.parts: list[int] = parts
        sizes = [part_range(self.attrs, p)[1] - part_range(self.attrs, p)[0] for p in self.parts]
        self._part_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._conditions: dict[str, np.ndarray] | None = None
        self._n_hits: np.ndarray | None = None

    def exclude_parts(self, parts: Iterable[int]) -> None:
        """Leave committed `parts` out of this Store (e.g. parts found unreadable): events are
        renumbered over the remaining parts as for an incomplete store; `event_ids` keeps the
        planned event numbers."""
        drop = set(parts)
        if drop - set(self.parts):
            raise ValueError(f"store {self.path}: parts {sorted(drop - set(self.parts))} are not readable parts")
        for p in drop:
            self._cache.pop(p, None)
        self._use_parts([p for p in self.parts if p not in drop])

    # -- sizes and metadata
    def __len__(self) -> int:
        return int(self._part_starts[-1])

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, kind={self.kind!r}, geometry={self.geometry.name!r}, events={len(self)})"

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.attrs["n_parts"]

    @property
    def condition_names(self) -> list[str]:
        return list(self.attrs["conditions"])

    @property
    def event_ids(self) -> np.ndarray:
        """(len,) int64 planned event number of each readable event."""
        return np.concatenate([np.arange(*part_range(self.attrs, p)) for p in self.parts] or [np.zeros(0, np.int64)])

    @property
    def conditions(self) -> dict[str, np.ndarray]:
        """{name: (len,) float64} per-event conditions of all readable events."""
        if self._conditions is None:
            names = [f"conditions/{n}" for n in self.condition_names]
            per_part = [self._read_arrays(p, names) for p in self.parts] if names else []
            self._conditions = {n: np.concatenate([c[f"conditions/{n}"] for c in per_part]) if per_part
                                else np.zeros(0) for n in self.condition_names}
        return self._conditions

    def part_n_hits(self) -> np.ndarray:
        """(n_readable_parts,) hits per committed part, from part metadata (no chunk reads; cached)."""
        if self._n_hits is None:
            self._n_hits = np.array([self._part_meta(p)["n_hits"] for p in self.parts], dtype=np.int64)
        return self._n_hits

    def _part_meta(self, part: int) -> dict[str, Any]:
        where = self._part_path(part)
        try:
            meta = json.loads((where / "zarr.json").read_text())["attributes"]
            n_hits = meta["n_hits"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise StoreError(f"store {self.path}: cannot read the metadata of part {part} ({where}): {err}") from err
        if not isinstance(n_hits, int) or isinstance(n_hits, bool) or n_hits < 0:
            raise StoreError(f"store {self.path}: corrupt metadata of part {part} ({where / 'zarr.json'}): "
                             f"'n_hits' is {n_hits!r}")
        return meta

    # -- reading
    def _part_path(self, part: int) -> Path:
        return self.path / PARTS / part_name(part)

    def read_part(self, part: int) -> HitBatch:
        """All events of committed part `part` (cached: sequential access reads each part once)."""
        if part in self._cache:
            self._cache.move_to_end(part)
            return self._cache[part]
        batch = self._load_part(part)
        self._cache[part] = batch
        while len(self._cache) > self._cache_parts:
            self._cache.popitem(last=False)
        return batch

    def _load_part(self, part: int) -> HitBatch:
        meta = self._part_meta(part)
        names = ["channel", "value", "event_offsets", *self.attrs["extra_columns"],
                 *(f"conditions/{n}" for n in self.condition_names)]
        arrays = self._read_arrays(part, names)
        channel, value, offsets = arrays["channel"], arrays["value"], arrays["event_offsets"]
        start, stop = part_range(self.attrs, part)
        ok = (len(offsets) == stop - start + 1 and offsets[0] == 0 and offsets[-1] == len(channel) == len(value)
              == meta.get("n_hits") and np.all(offsets[1:] >= offsets[:-1]))
        if not ok:
            raise StoreError(f"store {self.path}, part {part}: arrays are inconsistent (event_offsets of "
                             f"length {len(offsets)} ending at {offsets[-1] if len(offsets) else None}, "
                             f"{len(channel)} channels, {len(value)} values, {meta.get('n_hits')} hits recorded)")
        short = [name for name in names[3:] if arrays[name].shape != (
            stop - start if name.startswith("conditions/") else len(channel),)]
        if short:
            raise StoreError(f"store {self.path}, part {part}: array {short[0]!r} has shape {arrays[short[0]].shape}, "
                             f"expected ({stop - start if short[0].startswith('conditions/') else len(channel)},) "
                             "(corrupt array metadata?)")
        if len(channel) and int(channel.max()) >= n_channels(self.geometry):
            raise StoreError(f"store {self.path}, part {part}: array 'channel' holds index {int(channel.max())} "
                             f"beyond the {n_channels(self.geometry)} channels of {self.geometry.name!r}")
        cols = columns_from_channel(self.kind, channel, self.geometry)
        cols["value"] = value
        for name in self.attrs["extra_columns"]:
            cols[name] = arrays[name]
        conds = {n: arrays[f"conditions/{n}"] for n in self.condition_names}
        return HitBatch(self.kind, cols, offsets, conds)

    def _read_arrays(self, part: int, names: list[str]) -> dict[str, np.ndarray]:
        """Read whole arrays of a part concurrently in one call into zarr's event loop (one
        thread hand-off per part instead of several per array)."""
        from zarr.api.asynchronous import open_array
        from zarr.core.sync import sync

        where = self._part_path(part)

        async def one(name: str):
            arr = await open_array(store=str(where / name), mode="r", zarr_format=3)
            return arr, await arr.getitem(slice(None))

        async def everything():
            import asyncio

            return await asyncio.gather(*(one(n) for n in names), return_exceptions=True)

        out = {}
        for name, result in zip(names, sync(everything()), strict=True):
            label = f"store {self.path}, part {part}, array {name!r}"
            if isinstance(result, BaseException):
                if not (where / name / "zarr.json").is_file():
                    raise StoreError(f"{label} is missing ({where / name})") from result
                try:
                    arr = zarr_module().open_array(where / name, mode="r")
                except Exception as err:
                    raise StoreError(f"{label} is unreadable: {err}") from err
                self._check_chunks(arr, where / name, label)
                bad = self._find_bad_chunk(arr, math.ceil(arr.shape[0] / arr.chunks[0]))
                raise StoreError(f"{label}: chunk c/{bad} is corrupt ({result})") from result
            arr, data = result
            self._check_chunks(arr, where / name, label)
            out[name] = data
        return out

    @staticmethod
    def _check_chunks(arr, array_dir: Path, label: str) -> None:
        """zarr reads a missing chunk as fill values; every chunk of a uhg part must exist."""
        n_chunks = math.ceil(arr.shape[0] / arr.chunks[0]) if arr.shape[0] else 0
        for c in range(n_chunks):
            if not (array_dir / "c" / str(c)).is_file():
                raise StoreError(f"{label}: chunk c/{c} is missing ({array_dir / 'c' / str(c)})")

    @staticmethod
    def _find_bad_chunk(arr, n_chunks: int) -> int | str:
        step = arr.chunks[0]
        for c in range(n_chunks):
            try:
                arr[c * step:(c + 1) * step]
            except Exception:
                return c
        return "?"

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"event {i} out of range for store {self.path} with {n} events")
        i %= n
        k = int(np.searchsorted(self._part_starts, i, side="right") - 1)
        return self.parts[k], i - int(self._part_starts[k])

    def __getitem__(self, i: int):
        part, j = self._locate(int(i))
        return self.read_part(part).event(j)

    def __iter__(self) -> Iterator:
        for part in self.parts:
            yield from self.read_part(part)

    def iter_batches(self) -> Iterator[HitBatch]:
        """One HitBatch per committed part, in order (the fastest way through a store)."""
        for part in self.parts:
            yield self.read_part(part)

    def read(self, start: int = 0, stop: int | None = None) -> HitBatch:
        """Events start..stop-1 (readable-event numbering) as one HitBatch."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range {start}..{stop} outside 0..{len(self)} of store {self.path}")
        if start == stop:
            return self._empty()
        k0 = int(np.searchsorted(self._part_starts, start, side="right") - 1)
        k1 = int(np.searchsorted(self._part_starts, stop - 1, side="right") - 1)
        pieces = []
        for k in range(k0, k1 + 1):
            lo = max(start, int(self._part_starts[k])) - int(self._part_starts[k])
            hi = min(stop, int(self._part_starts[k + 1])) - int(self._part_starts[k])
            pieces.append(self.read_part(self.parts[k]).slice(lo, hi))
        return pieces[0] if len(pieces) == 1 else HitBatch.concat(pieces)

    def take(self, indices: np.ndarray) -> HitBatch:
        """Events at `indices` (any order) as one HitBatch; reads each needed part once."""
        indices = np.asarray(indices, dtype=np.int64)
        k = np.searchsorted(self._part_starts, indices, side="right") - 1
        pieces, where = [], []
        for kk in np.unique(k):
            sel = np.flatnonzero(k == kk)
            pieces.append(self.read_part(self.parts[kk]).take(indices[sel] - self._part_starts[kk]))
            where.append(sel)
        if not pieces:
            return self._empty()
        batch = pieces[0] if len(pieces) == 1 else HitBatch.concat(pieces)
        order = np.argsort(np.concatenate(where), kind="stable")
        return batch if len(pieces) == 1 else batch.take(order)

    def _empty(self) -> HitBatch:
        empty = HitBatch.empty(self.kind, self.condition_names)
        extra = {k: np.zeros(0, EXTRA_COLUMNS[k]) for k in self.attrs["extra_columns"]}
        return HitBatch(self.kind, empty.columns | extra, empty.offsets, empty.conditions)

    # -- views
    def dense(self, i: int) -> np.ndarray:
        """Dense view of event i: (n_sensors, rows, cols) uint8 or (n_cells,) float32."""
        return dense_event(self[i], self.geometry)

    def torch(self, start: int = 0, stop: int | None = None):
        """Events start..stop-1 as `uhg.sparse.torch_hits.TorchHits`."""
        from uhg.sparse.torch_hits import TorchHits

        return TorchHits.from_batch(self.read(start, stop))

    def sparse(self, i: int):
        """Event i as a torch sparse COO tensor: (n_sensors, rows, cols) ADC or (n_cells,) MeV."""
        hits = self.torch(i % len(self), i % len(self) + 1)
        g = self.geometry
        if self.kind == "pixel":
            return hits.pixel_sparse(g.n_sensors, g.rows, g.cols)[0]
        import torch

        lo = torch.as_tensor(np.asarray(g.layer_offsets), dtype=torch.int64)
        idx = (lo[hits.columns["layer"]] + hits.columns["cell"]).unsqueeze(0)
        return torch.sparse_coo_tensor(idx, hits.columns["value"], (g.n_cells,)).coalesce()


def _ranges(indices: list[int], limit: int = 8) -> str:
    """'0-3, 7, 9-12' for a sorted index list (first `limit` runs)."""
    runs: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    text = ", ".join(runs[:limit])
    return f"parts {text}" + (", ..." if len(runs) > limit else "")
