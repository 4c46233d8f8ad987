"""Training data for the loop: store preparation (simulate when missing), train/validation
split, and a resumable, rank-sharded batch order.

The batch order is a pure function of (seed, step): global position p = (step - 1) * G + r * B
+ j (G events per step over all ranks, B per rank) maps to event perm_e[p mod N] of the
permutation of epoch e = p // N. Resuming at step s therefore needs nothing but s, and every
rank reads disjoint events of the same global batch.

With `data.on_corrupt: skip`, parts of the stores that cannot be read (a corrupt or missing
chunk, damaged part metadata) are found before training and left out on every rank, so the
training and validation events, and with them the batch order, are the same on every rank and
again on resume (as long as the stores do not change).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uhg.config.schema import RunConfig, SimulateConfig
from uhg.data.hits import HitBatch
from uhg.errors import ConfigError, StoreError

log = logging.getLogger(__name__)

# Datasets up to this many hits are held in memory (mini configs); larger ones are read per event.
IN_MEMORY_HITS = 50_000_000


def _simulate_part(geometry_name: str, sim: dict, start: int, stop: int) -> HitBatch:
    from uhg.geometry import get_geometry

    geometry = get_geometry(geometry_name)
    if geometry.kind == "pixel":
        from uhg.sim.pxd_background import simulate_pxd_background

        from uhg.sim.pxd_machine import MachineScenario

        return simulate_pxd_background(geometry, stop - start, sim["seed"], first_event=start,
                                       luminosity=sim["luminosity_min"], luminosity_max=sim["luminosity_max"],
                                       scenario=MachineScenario.model_validate(sim["machine"]))
    from uhg.sim.calo import simulate_calo_showers

    return simulate_calo_showers(geometry, stop - start, sim["seed"], first_event=start,
                                 energy_min=sim["energy_min"], energy_max=sim["energy_max"])


def simulate_store(path: Path, geometry_name: str, sim: SimulateConfig, progress: bool = True) -> None:
    """Create and fill `path` with the reference simulator (resumes a partial store)."""
    from uhg.data.parallel import fill_store
    from uhg.data.writer import create_store
    from uhg.geometry import get_geometry

    geometry = get_geometry(geometry_name)
    if geometry.kind == "pixel":
        if sim.luminosity_min is None:
            raise ConfigError("data.simulate.luminosity_min is required for a pixel geometry")
        from uhg.sim.pxd_machine import CONDITION_UNITS, load_scenario

        lmax = sim.luminosity_max if sim.luminosity_max is not None else sim.luminosity_min
        scenario = load_scenario(sim.machine)
        ends = scenario.conditions([sim.luminosity_min, lmax])
        conditions = {k: {"min": float(v.min()), "max": float(v.max()), "unit": CONDITION_UNITS[k]} for k, v in ends.items()}
        settings = {"seed": sim.seed, "luminosity_min": sim.luminosity_min, "luminosity_max": lmax,
                    "machine": scenario.model_dump(mode="json")}
        kind = "pixel"
    else:
        if sim.energy_min is None or sim.energy_max is None:
            raise ConfigError("data.simulate.energy_min and energy_max are required for a calorimeter geometry")
        conditions = {"incident_energy": {"min": sim.energy_min, "max": sim.energy_max, "unit": "MeV"}}
        settings = {"seed": sim.seed, "energy_min": sim.energy_min, "energy_max": sim.energy_max}
        kind = "calo"
    create_store(path, kind, geometry_name, sim.n_events, sim.part_size, conditions=conditions,
                 attributes={"simulator": "uhg.sim", **settings}, seed=sim.seed)
    fill_store(path, functools.partial(_simulate_part, geometry_name, settings), workers=sim.workers,
               desc=f"simulating {path.name}", progress=progress)


@dataclass
class TrainingData:
    """Events of the run's stores, split into a training and a validation range."""

    stores: list
    n_events: int
    n_train: int
    cache: HitBatch | None
    skipped_events: int = 0
    """Events left out because their part could not be read (data.on_corrupt=skip)."""

    @classmethod
    def open(cls, cfg: RunConfig, rank: int = 0, world: int = 1) -> TrainingData:
        """Open the run's stores. Collective when `world` > 1 and data.on_corrupt is skip: every
        rank of the process group must call it."""
        from uhg.data.reader import open_store

        stores = []
        for p in cfg.data.store:
            try:
                stores.append(open_store(p, geometry=cfg.geometry))
            except StoreError as err:
                raise StoreError(f"data.store: {err}") from None
        skipped = _exclude_unreadable_parts(stores, rank, world) if cfg.data.on_corrupt == "skip" else 0
        n = sum(len(s) for s in stores)
        if n == 0:
            raise StoreError(f"data.store: none of the {skipped} events of {', '.join(str(s.path) for s in stores)} "
                             "can be read (data.on_corrupt=skip left out every part; see the warnings above)")
        n_val = int(math.floor(n * cfg.data.validation_fraction))
        if n - n_val < 1:
            raise ConfigError(f"data.store: {n} events leave none for training (validation_fraction "
                              f"{cfg.data.validation_fraction})")
        total_hits = sum(int(s.part_n_hits().sum()) for s in stores)
        cache = HitBatch.concat([b for s in stores for b in s.iter_batches()]) if total_hits <= IN_MEMORY_HITS else None
        return cls(stores, n, n - n_val, cache, skipped)

    @property
    def n_validation(self) -> int:
        return self.n_events - self.n_train

    def condition_ranges(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """(min, max) of each condition over the training events."""
        out = {}
        for name in names:
            values = []
            for s in self.stores:
                if name not in s.conditions:
                    raise ConfigError(f"model.conditions: {name!r} is not a condition of store {s.path} "
                                      f"(it has {', '.join(s.condition_names) or 'none'})")
                bad = np.flatnonzero(~np.isfinite(s.conditions[name]))
                if len(bad):  # one NaN would make the normalisation, and so every step, NaN
                    raise StoreError(f"store {s.path}: condition {name!r} of event {int(bad[0])} is "
                                     f"{float(s.conditions[name][bad[0]])} ({len(bad)} non-finite values); "
                                     "the store is corrupt, rewrite the parts holding them")
                values.append(s.conditions[name])
            v = np.concatenate(values)[: self.n_train]
            out[name] = (float(v.min()), float(v.max()))
        return out

    def events(self, indices: np.ndarray) -> HitBatch:
        """Events at dataset positions `indices`, in that order."""
        if self.cache is not None:
            return HitBatch.concat([self.cache.slice(int(i), int(i) + 1) for i in indices])
        events = []
        starts = np.cumsum([0] + [len(s) for s in self.stores])
        for i in indices:
            k = int(np.searchsorted(starts, i, side="right") - 1)
            events.append(self.stores[k][int(i - starts[k])])
        return HitBatch.from_events(self.stores[0].kind, events)

    def validation_indices(self, limit: int) -> np.ndarray:
        return np.arange(self.n_train, min(self.n_events, self.n_train + limit))


def _exclude_unreadable_parts(stores: list, rank: int, world: int) -> int:
    """Read every part once (rank r reads parts r, r + world, ... of all stores), share what the
    ranks found and leave the unreadable parts out of every rank's stores. Rank 0 logs each left-out
    part with the reader's error (store, part, array, chunk). Returns the number of events left out."""
    from uhg.data.layout import part_range

    parts = [(k, p) for k, s in enumerate(stores) for p in s.parts]
    found: dict[tuple[int, int], str] = {}
    for k, p in parts[rank::world]:
        try:
            stores[k].read_part(p)
        except StoreError as err:
            found[(k, p)] = str(err)
    if world > 1:
        import torch.distributed as dist

        everyone: list = [None] * world
        dist.all_gather_object(everyone, found)
        found = {key: message for f in everyone for key, message in f.items()}
    skipped = 0
    for k, p in sorted(found):
        start, stop = part_range(stores[k].attrs, p)
        skipped += stop - start
        if rank == 0:
            log.warning("data.on_corrupt=skip: leaving out part %d (events %d-%d) of store %s: %s",
                        p, start, stop - 1, stores[k].path, found[(k, p)])
    for k, store in enumerate(stores):
        store.exclude_parts(p for kk, p in found if kk == k)
    return skipped


def batch_indices(step: int, rank: int, world_size: int, batch_size: int, n_train: int, seed: int) -> np.ndarray:
    """Dataset positions of rank `rank`'s events in 1-based `step` (see module docstring)."""
    g = batch_size * world_size
    pos = (step - 1) * g + rank * batch_size + np.arange(batch_size)
    epochs, within = np.divmod(pos, n_train)
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        perm = _epoch_permutation(int(seed), int(e), int(n_train))
        sel = epochs == e
        out[sel] = perm[within[sel]]
    return out


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n_train: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A, epoch])).permutation(n_train)
