"""PyTorch loading of sparse stores: batches of `TorchHits`, sharded, shuffled, resumable.

    loader = make_loader(["train.zarr"], batch_size=32, split="train", seed=0,
                         rank=rank, world_size=world_size, num_workers=2)
    for epoch in range(n_epochs):
        for hits in loader:          # TorchHits (or (TorchHits, dense) with densify=True)
            ...
        # loader.state_dict() -> {"epoch", "position", ...}; load_state_dict() resumes exactly

The plan of an epoch is a pure function of (seed, epoch, split, rank, world_size):
1. events are selected by the split rule: event `e` of a store is in "val" when
   splitmix64(e, split_seed, store salt) / 2**64 < val_fraction, else in "train";
2. they are shuffled (a permutation seeded by (seed, epoch)); stores read part by part are
   shuffled by blocks (part order, then events within a part) so each part is read once;
3. rank r takes every world_size-th event starting at r (disjoint, covering; with
   drop_last, every rank gets the same number of full batches);
4. the rank's events are cut into batches; DataLoader worker w builds batches w, w+W, ...,
   which the DataLoader returns in order, so the sequence does not depend on num_workers.
Workers are started with forkserver or spawn, never fork (zarr's I/O thread deadlocks).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from uhg.data.hits import HitBatch
from uhg.data.reader import Store, open_store
from uhg.errors import ConditionError, ConfigError, GeometryError
from uhg.sparse.torch_hits import TorchHits

IN_MEMORY_MAX_HITS = 50_000_000  # ~0.3 GB of columns: below this a worker holds whole stores
_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (a well-mixed hash of each value)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_mask(event_ids: np.ndarray, split_seed: int, salt: int, val_fraction: float) -> np.ndarray:
    """(n,) bool: True for events in the validation split (deterministic per event id)."""
    key = np.uint64((split_seed * 0x9E3779B1 + salt) & _MASK64)
    with np.errstate(over="ignore"):
        h = splitmix64(splitmix64(event_ids.astype(np.uint64) ^ key))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction


def _store_salt(store: Store) -> int:
    """A per-store constant that survives moving the store (its provenance)."""
    return zlib.crc32(json.dumps(store.attrs.get("provenance", {}), sort_keys=True).encode())


class HitDataset(IterableDataset):
    """Batches of events from one or more stores of the same kind and geometry.

    Yields `TorchHits` of up to `batch_size` events, or `(TorchHits, dense)` with
    `densify=True` (dense: (B, n_sensors, rows, cols) or (B, n_cells) float32).
    `split` is None (all events), "train" or "val" (see module docstring).
    """

    def __init__(self, stores: str | os.PathLike | Sequence[str | os.PathLike], batch_size: int, *,
                 split: str | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, densify: bool = False, in_memory: bool | None = None):
        paths = [stores] if isinstance(stores, (str, os.PathLike)) else list(stores)
        if not paths:
            raise ConfigError("the loader needs at least one store")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if split not in (None, "train", "val"):
            raise ConfigError(f"split must be None, 'train' or 'val', got {split!r}")
        if not 0 <= val_fraction <= 1:
            raise ConfigError(f"val_fraction must lie in [0, 1], got {val_fraction}")
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ConfigError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        self.paths = [str(Path(p)) for p in paths]
        self.batch_size, self.split, self.val_fraction, self.split_seed = batch_size, split, val_fraction, split_seed
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.drop_last, self.densify = drop_last, densify
        self.epoch, self.start_batch = 0, 0

        opened = [open_store(p) for p in self.paths]
        first = opened[0]
        for s in opened[1:]:
            if s.kind != first.kind or s.geometry.name != first.geometry.name:
                raise GeometryError(f"store {s.path} ({s.kind}, {s.geometry.name}) cannot be mixed with "
                                    f"{first.path} ({first.kind}, {first.geometry.name})")
            if set(s.condition_names) != set(first.condition_names):
                raise ConditionError(f"store {s.path} has conditions {s.condition_names}, "
                                     f"{first.path} has {first.condition_names}")
        self.kind, self.geometry = first.kind, first.geometry
        # global event numbering: store k's local events follow those of stores 0..k-1
        self._store_starts = np.concatenate([[0], np.cumsum([len(s) for s in opened])]).astype(np.int64)
        self._part_starts = [s._part_starts for s in opened]
        selected = []
        for k, s in enumerate(opened):
            local = np.arange(len(s), dtype=np.int64)
            if split is not None:
                val = split_mask(s.event_ids, split_seed, _store_salt(s), val_fraction)
                local = local[val if split == "val" else ~val]
            selected.append(local + self._store_starts[k])
        self.events = np.concatenate(selected)
        total_hits = sum(int(s.part_n_hits().sum()) for s in opened)
        self.in_memory = total_hits <= IN_MEMORY_MAX_HITS if in_memory is None else bool(in_memory)
        self._stores: list[Store] | None = None
        self._memory: list[HitBatch] | None = None

    # -- the plan
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.events
        rng = np.random.default_rng([self.seed, epoch])
        if self.in_memory:
            return self.events[rng.permutation(len(self.events))]
        # block shuffle: parts in random order, events shuffled within each part
        store_of = np.searchsorted(self._store_starts, self.events, side="right") - 1
        local = self.events - self._store_starts[store_of]
        part_of = np.empty(len(self.events), np.int64)
        n_parts = 0
        for k, starts in enumerate(self._part_starts):
            sel = store_of == k
            part_of[sel] = n_parts + np.searchsorted(starts, local[sel], side="right") - 1
            n_parts += len(starts) - 1
        part_rank = rng.permutation(max(n_parts, 1))[part_of]
        return self.events[np.lexsort([rng.random(len(self.events)), part_rank])]

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of global event indices for `epoch` (default: current)."""
        order = self._order(self.epoch if epoch is None else epoch)
        mine = order[self.rank::self.world_size]
        if self.drop_last:
            per_rank = len(order) // self.world_size
            mine = mine[:per_rank - per_rank % self.batch_size]
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def __len__(self) -> int:
        return len(self.plan())

    # -- reading
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stores"] = state["_memory"] = None  # workers open their own handles
        return state

    def _read(self, global_ids: np.ndarray) -> HitBatch:
        if self._stores is None:
            self._stores = [open_store(p, cache_parts=2) for p in self.paths]
        store_of = np.searchsorted(self._store_starts, global_ids, side="right") - 1
        local = global_ids - self._store_starts[store_of]
        if self.in_memory and self._memory is None:
            self._memory = [s.read() for s in self._stores]
        pieces, where = [], []
        for k in np.unique(store_of):
            sel = np.flatnonzero(store_of == k)
            source = self._memory[k] if self.in_memory else self._stores[k]
            pieces.append(source.take(local[sel]))
            where.append(sel)
        if len(pieces) == 1:
            return pieces[0]
        return HitBatch.concat(pieces).take(np.argsort(np.concatenate(where), kind="stable"))

    def make_batch(self, global_ids: np.ndarray):
        hits = TorchHits.from_batch(self._read(global_ids))
        if not self.densify:
            return hits
        g = self.geometry
        if self.kind == "pixel":
            return hits, hits.pixel_dense(g.n_sensors, g.rows, g.cols)
        return hits, hits.calo_dense(g.layer_offsets, g.n_cells)

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        batches = self.plan()
        for k in range(self.start_batch + worker, len(batches), n_workers):
            yield self.make_batch(batches[k])


def _context(start_method: str):
    """The multiprocessing context for loader workers. The forkserver imports torch, zarr and
    this module once (it computes nothing, so no thread exists to break); every worker then
    forks from it in milliseconds instead of importing torch again as a spawned worker does."""
    import multiprocessing as mp

    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(["uhg.data.loader"])
    return ctx


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the loader's workers share the cores with training


class HitLoader:
    """A DataLoader over a HitDataset that knows its position: `state_dict()` after any batch and
    `load_state_dict()` in a new process continue with exactly the next batch."""

    def __init__(self, dataset: HitDataset, num_workers: int = 0, start_method: str = "forkserver",
                 pin_memory: bool = False, prefetch_factor: int = 2):
        if start_method not in ("forkserver", "spawn"):
            raise ConfigError(f"start_method must be 'forkserver' or 'spawn' (fork deadlocks zarr), got {start_method!r}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.num_workers, self.start_method = dataset, num_workers, start_method
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def __iter__(self) -> Iterator:
        ds = self.dataset
        ds.set_epoch(self.epoch)
        ds.start_batch = self.position
        extra: dict[str, Any] = {}
        if self.num_workers:
            extra = {"multiprocessing_context": _context(self.start_method), "prefetch_factor": self.prefetch_factor,
                     "worker_init_fn": _worker_init}
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory, **extra)
        for batch in loader:
            self.position += 1
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        return {"epoch": self.epoch, "position": self.position, "seed": ds.seed, "split": ds.split,
                "batch_size": ds.batch_size, "rank": ds.rank, "world_size": ds.world_size,
                "n_events": int(len(ds.events))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "split", "batch_size", "rank", "world_size", "n_events"):
            if state.get(key) != mine[key]:
                raise ConfigError(f"loader state was saved with {key}={state.get(key)!r}, this loader has "
                                  f"{key}={mine[key]!r}; resuming would not continue the same sequence")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def make_loader(stores: str | os.PathLike | Sequence[str | os.PathLike], batch_size: int, *,
                num_workers: int = 0, start_method: str = "forkserver", pin_memory: bool = False,
                **dataset_options: Any) -> HitLoader:
    """A resumable loader of TorchHits batches; `dataset_options` go to `HitDataset`."""
    return HitLoader(HitDataset(stores, batch_size, **dataset_options), num_workers=num_workers,
                     start_method=start_method, pin_memory=pin_memory)
