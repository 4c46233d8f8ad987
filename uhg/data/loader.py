"""PyTorch loading of sparse stores: batches of `CompactHits`, sharded, shuffled, resumable.
The one data path of uhg: `uhg train` reads its batches, validation and held-out events
through `HitDataset` (`uhg.train.data.TrainingData` only adds the run's configuration).

    loader = make_loader(["train.zarr"], batch_size=32, split="train", seed=0,
                         rank=rank, world_size=world_size, num_workers=2)
    for epoch in range(n_epochs):
        for batch in loader:         # CompactHits (or (CompactHits, dense) with densify=True)
            hits = batch.widen(geometry, device)   # TorchHits on the device that uses them
            ...
        # loader.state_dict() -> {"epoch", "position", ...}; load_state_dict() resumes exactly

The order is a pure function of (seed, split, rank, world_size) and the epoch or step:
1. events are selected by the split rule (`split_mask`, the one rule of uhg): event `e` of a
   store is in "val" when splitmix64(e, split_seed, store salt) / 2**64 < val_fraction, else in
   "train". `e` is the planned event number, so leaving parts out does not move other events
   between the splits;
2. each epoch shuffles them (a permutation seeded by (seed, epoch)); stores read part by part
   are shuffled by blocks (part order, then events within a part) so each part is read once;
3. the epochs' orders, one after the other, form one stream; global batch k (0-based) is its
   positions k*G .. (k+1)*G-1 (G = batch_size * world_size), of which rank r takes positions
   k*G + r + world_size*j, j < batch_size: disjoint and covering;
4. `step_ids(step)` is rank r's part of global batch step-1 of the stream (training: batches
   run across epoch ends, and a step needs nothing but its number to be read again on resume);
   `plan(epoch)` cuts one epoch alone into batches by the same rule (the loader's epochs; with
   drop_last every rank gets the same number of full batches); DataLoader worker w builds
   batches w, w+W, ..., which the DataLoader returns in order, so the sequence does not depend
   on num_workers.
Workers are started with forkserver or spawn, never fork (zarr's I/O thread deadlocks);
`StepReader` reads training steps ahead on threads instead of processes.

Batches travel in the store's own compact form (uint32 channel index + uint8 ADC value: 5 bytes
per pixel hit, against 28 for int64/float32 columns), from the decoded part through the gather
and the worker-to-trainer hand-off; `CompactHits.widen` splits the channel into columns on the
device. `compact=False` widens in the loader instead (the TorchHits of earlier versions).
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from uhg.data.hits import ChannelBatch, HitBatch
from uhg.data.reader import Store, open_store
from uhg.errors import ConditionError, ConfigError, GeometryError
from uhg.sparse.dense import columns_from_channel, n_channels
from uhg.sparse.torch_hits import CompactHits

IN_MEMORY_MAX_HITS = 50_000_000  # ~0.3 GB of compact columns: below this a dataset holds whole stores
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


def store_salt(store: Store) -> int:
    """A per-store constant of the split: a hash of what the store was made from (its seed and
    its producer's attributes), so two stores of different seeds hold out different event
    numbers, and a store written again from the same plan, or moved, holds out the same ones."""
    made_from = {"seed": store.attrs.get("provenance", {}).get("seed"), "attributes": store.attrs.get("attributes", {})}
    return zlib.crc32(json.dumps(made_from, sort_keys=True, default=str).encode())


def to_hits(batch: ChannelBatch, geometry: Any) -> HitBatch:
    """The public columns (`sensor`/`row`/`col` or `layer`/`cell`) of a compact batch."""
    return HitBatch(batch.kind, columns_from_channel(batch.kind, batch.channel, geometry) | batch.columns,
                    batch.offsets, batch.conditions)


class HitDataset(IterableDataset):
    """Batches of events from one or more stores of the same kind and geometry.

    Yields `CompactHits` of up to `batch_size` events (`TorchHits` with `compact=False`), or
    `(hits, dense)` with `densify=True` (dense: (B, n_sensors, rows, cols) or (B, n_cells) float32).
    `split` is None (all events), "train" or "val" (see module docstring). `geometry` (a name)
    makes opening a store of another geometry an error; `exclude` maps a store's position in
    `stores` to committed parts left out (parts found unreadable: `uhg.train.data`).
    Events are numbered globally: store k's events (over its kept parts) follow those of
    stores 0..k-1; `events` holds the selected split's global numbers in ascending order.
    """

    def __init__(self, stores: str | os.PathLike | Sequence[str | os.PathLike], batch_size: int, *,
                 split: str | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, densify: bool = False, in_memory: bool | None = None,
                 compact: bool = True, geometry: str | None = None,
                 exclude: Mapping[int, Sequence[int]] | None = None):
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
        self.drop_last, self.densify, self.compact = drop_last, densify, compact
        self.geometry_name, self.exclude = geometry, {int(k): sorted(v) for k, v in (exclude or {}).items() if v}
        self.epoch, self.start_batch = 0, 0

        opened = self._open()
        first = opened[0]
        for s in opened[1:]:
            if s.kind != first.kind or s.geometry.name != first.geometry.name:
                raise GeometryError(f"store {s.path} ({s.kind}, {s.geometry.name}) cannot be mixed with "
                                    f"{first.path} ({first.kind}, {first.geometry.name})")
            if set(s.condition_names) != set(first.condition_names):
                raise ConditionError(f"store {s.path} has conditions {s.condition_names}, "
                                     f"{first.path} has {first.condition_names}")
        self.kind, self.geometry = first.kind, first.geometry
        if n_channels(self.geometry) > 2**31:  # CompactHits carries channels as int32
            raise GeometryError(f"{self.geometry.name}: {n_channels(self.geometry)} channels exceed the loader's 2**31")
        self._store_starts = np.concatenate([[0], np.cumsum([len(s) for s in opened])]).astype(np.int64)
        self._part_starts = [s._part_starts for s in opened]
        self.is_val = np.concatenate([split_mask(s.event_ids, split_seed, store_salt(s), val_fraction)
                                      for s in opened])
        """(n,) bool over all global events: in the validation split."""
        self.events = self.split_events(split)
        total_hits = sum(int(s.part_n_hits().sum()) for s in opened)
        self.in_memory = total_hits <= IN_MEMORY_MAX_HITS if in_memory is None else bool(in_memory)
        self._stores: list[Store] | None = opened
        self._memory: list[ChannelBatch] | None = None
        self._parts: OrderedDict[tuple[int, int], ChannelBatch] = OrderedDict()
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def _open(self) -> list[Store]:
        opened = [open_store(p, geometry=self.geometry_name) for p in self.paths]
        for k, parts in self.exclude.items():
            opened[k].exclude_parts(parts)
        return opened

    @property
    def stores(self) -> list[Store]:
        """This process's open stores (with the excluded parts left out)."""
        with self._lock:
            if self._stores is None:
                self._stores = self._open()
            return self._stores

    def split_events(self, split: str | None) -> np.ndarray:
        """Global numbers of the events of `split` ("train", "val" or None: all), ascending."""
        if split is None:
            return np.arange(len(self.is_val), dtype=np.int64)
        return np.flatnonzero(self.is_val if split == "val" else ~self.is_val).astype(np.int64)

    def conditions(self, name: str) -> np.ndarray:
        """(n,) float64 condition `name` of every global event."""
        return np.concatenate([s.conditions[name] for s in self.stores])

    # -- the plan
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.events
        with self._lock:
            if epoch in self._orders:
                return self._orders[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        if self.in_memory:
            order = self.events[rng.permutation(len(self.events))]
        else:  # block shuffle: parts in random order, events shuffled within each part
            store_of = np.searchsorted(self._store_starts, self.events, side="right") - 1
            local = self.events - self._store_starts[store_of]
            part_of = np.empty(len(self.events), np.int64)
            n_parts = 0
            for k, starts in enumerate(self._part_starts):
                sel = store_of == k
                part_of[sel] = n_parts + np.searchsorted(starts, local[sel], side="right") - 1
                n_parts += len(starts) - 1
            part_rank = rng.permutation(max(n_parts, 1))[part_of]
            order = self.events[np.lexsort([rng.random(len(self.events)), part_rank])]
        with self._lock:
            self._orders[epoch] = order
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return order

    def plan(self, epoch: int | None = None) -> list[np.ndarray]:
        """This rank's batches of global event numbers for `epoch` (default: current)."""
        order = self._order(self.epoch if epoch is None else epoch)
        mine = order[self.rank::self.world_size]
        if self.drop_last:
            per_rank = len(order) // self.world_size
            mine = mine[:per_rank - per_rank % self.batch_size]
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def step_ids(self, step: int) -> np.ndarray:
        """Global event numbers of this rank's batch of 1-based `step` of the endless stream of
        epochs (module docstring): a pure function of the step, the same after a resume."""
        n = len(self.events)
        if n == 0:
            raise ConfigError(f"no {self.split or 'selected'} events to draw batches from in {', '.join(self.paths)}")
        pos = (step - 1) * self.batch_size * self.world_size + self.rank + self.world_size * np.arange(self.batch_size)
        epochs, within = np.divmod(pos, n)
        out = np.empty(self.batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._order(int(e))[within[sel]]
        return out

    def __len__(self) -> int:
        return len(self.plan())

    # -- reading
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stores"] = state["_memory"] = None  # workers open their own handles
        state["_parts"], state["_orders"] = OrderedDict(), OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def preload(self) -> None:
        """Read every kept part now (in-memory datasets; a no-op otherwise): a damaged chunk
        is then reported before the first batch."""
        if self.in_memory:
            self._memory_batches()

    def _memory_batches(self) -> list[ChannelBatch]:
        stores = self.stores
        with self._lock:
            if self._memory is None:
                self._memory = [ChannelBatch.concat([s.read_part_channels(p) for p in s.parts]) if s.parts else
                                ChannelBatch(s.kind, np.zeros(0, np.uint32), {"value": np.zeros(0)},
                                             np.zeros(1, np.int64), {n: np.zeros(0) for n in s.condition_names})
                                for s in stores]
            return self._memory

    def _part(self, k: int, index: int) -> ChannelBatch:
        """Part `index` (position among the kept parts) of store k, decoded; the last two kept.
        Safe from several threads (a part two threads ask for at once may be decoded twice)."""
        key = (k, index)
        with self._lock:
            if key in self._parts:
                self._parts.move_to_end(key)
                return self._parts[key]
        store = self.stores[k]
        batch = store.read_part_channels(store.parts[index])
        with self._lock:
            self._parts[key] = batch
            while len(self._parts) > 2:
                self._parts.popitem(last=False)
        return batch

    def _take(self, k: int, local: np.ndarray) -> ChannelBatch:
        if self.in_memory:
            return self._memory_batches()[k].take(local)
        part_of = np.searchsorted(self._part_starts[k], local, side="right") - 1
        pieces, where = [], []
        for p in np.unique(part_of):
            sel = np.flatnonzero(part_of == p)
            pieces.append(self._part(k, int(p)).take(local[sel] - self._part_starts[k][p]))
            where.append(sel)
        return _merge(pieces, where)

    def read(self, global_ids: np.ndarray) -> ChannelBatch:
        """Events `global_ids` (any order, any split) as one compact batch in that order."""
        global_ids = np.asarray(global_ids, dtype=np.int64)
        store_of = np.searchsorted(self._store_starts, global_ids, side="right") - 1
        local = global_ids - self._store_starts[store_of]
        pieces, where = [], []
        for k in np.unique(store_of):
            sel = np.flatnonzero(store_of == k)
            pieces.append(self._take(int(k), local[sel]))
            where.append(sel)
        return _merge(pieces, where)

    def hits(self, global_ids: np.ndarray) -> HitBatch:
        """Events `global_ids` with the public columns (law fits, validation, evaluation)."""
        return to_hits(self.read(global_ids), self.geometry)

    def make_batch(self, global_ids: np.ndarray):
        hits = CompactHits.from_channels(self.read(global_ids))
        dense = None
        if self.densify:
            g = self.geometry
            dense = hits.dense(n_channels(g))
            dense = dense.view(len(hits), g.n_sensors, g.rows, g.cols) if self.kind == "pixel" else dense
        if not self.compact:
            hits = hits.widen(self.geometry)
        return hits if dense is None else (hits, dense)

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        batches = self.plan()
        for k in range(self.start_batch + worker, len(batches), n_workers):
            yield self.make_batch(batches[k])


def _merge(pieces: list[ChannelBatch], where: list[np.ndarray]) -> ChannelBatch:
    """Pieces gathered for positions `where` of a batch, back in batch order."""
    if len(pieces) == 1:
        return pieces[0]
    return ChannelBatch.concat(pieces).take(np.argsort(np.concatenate(where), kind="stable"))


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
    """A resumable loader of CompactHits batches (TorchHits with compact=False); `dataset_options`
    go to `HitDataset`."""
    return HitLoader(HitDataset(stores, batch_size, **dataset_options), num_workers=num_workers,
                     start_method=start_method, pin_memory=pin_memory)


class StepReader:
    """This rank's batch of each training step (`HitDataset.step_ids`), as `CompactHits`, read up
    to `ahead` steps ahead by a background thread (store reads and zstd decoding release the
    GIL; a thread, not a process: nothing forks, and nothing is pickled); 0 = read inside the
    step. The batch of a step does not depend on `ahead`."""

    def __init__(self, dataset: HitDataset, last_step: int, ahead: int = 0):
        from concurrent.futures import ThreadPoolExecutor

        if ahead < 0:
            raise ConfigError(f"read-ahead must be >= 0 steps, got {ahead}")
        self.dataset, self.last_step, self.ahead = dataset, last_step, ahead
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uhg-loader") if ahead else None
        self.pending: dict[int, Any] = {}

    def _read(self, step: int) -> CompactHits:
        return self.dataset.make_batch(self.dataset.step_ids(step))

    def get(self, step: int) -> CompactHits:
        if self.pool is None:
            return self._read(step)
        for s in range(step, min(step + self.ahead, self.last_step) + 1):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(self._read, s)
        return self.pending.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
