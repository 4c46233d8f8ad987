"""Training data for the loop: store preparation (simulate when missing) and the run's view of
the one loader, `uhg.data.loader.HitDataset` (split rule, step-pure batch order across epochs,
rank sharding, compact batches). This module adds only what comes from the run: the stores,
`data.validation_fraction`, the seed, the micro-batch and the world, and `data.on_corrupt`.

Every consumer takes its events from here: the training steps (`step_ids`), the laws fitted
before the first step (training events), the validation of `train.validate_every` and the
held-out sample of the end-of-run evaluation (both the first validation events in event-number
order, `validation_ids`), and the condition ranges (training events).

With `data.on_corrupt: skip`, parts of the stores that cannot be read (a corrupt or missing
chunk, damaged part metadata) are found before training and left out on every rank, so the
training and validation events, and with them the batch order, are the same on every rank and
again on resume (as long as the stores do not change). The split is by planned event number,
so leaving a part out moves no other event between training and validation.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uhg.config.schema import RunConfig, SimulateConfig
from uhg.data.hits import HitBatch
from uhg.data.layout import part_range
from uhg.data.loader import HitDataset
from uhg.errors import ConfigError, StoreError

log = logging.getLogger(__name__)


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
    """The run's events: `dataset` (split "train", this rank's step stream) and the validation
    events of the same split rule."""

    dataset: HitDataset
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
        found = _unreadable_parts(stores, rank, world) if cfg.data.on_corrupt == "skip" else {}
        skipped = 0
        for k, p in found:
            start, stop = part_range(stores[k].attrs, p)
            skipped += stop - start
        if sum(len(s) for s in stores) - skipped == 0:
            raise StoreError(f"data.store: none of the {skipped} events of {', '.join(str(s.path) for s in stores)} "
                             "can be read (data.on_corrupt=skip left out every part; see the warnings above)")
        exclude: dict[int, list[int]] = {}
        for k, p in found:
            exclude.setdefault(k, []).append(p)
        dataset = HitDataset(cfg.data.store, cfg.batch_size_for(world), split="train",
                             val_fraction=cfg.data.validation_fraction, seed=cfg.seed, rank=rank, world_size=world,
                             geometry=cfg.geometry, exclude=exclude)
        data = cls(dataset, skipped)
        if data.n_train < 1:
            raise ConfigError(f"data.store: {data.n_events} events leave none for training (validation_fraction "
                              f"{cfg.data.validation_fraction})")
        if cfg.evaluate.final and data.n_validation == 0:
            raise ConfigError(f"data.validation_fraction: {cfg.data.validation_fraction} holds out none of the "
                              f"{data.n_events} events, and evaluate.final needs held-out events; raise it")
        dataset.preload()  # in-memory data: a damaged chunk stops the run before its first step
        return data

    @property
    def stores(self) -> list:
        return self.dataset.stores

    @property
    def n_events(self) -> int:
        return len(self.dataset.is_val)

    @property
    def train_ids(self) -> np.ndarray:
        """Global event numbers of the training events, ascending."""
        return self.dataset.events

    @property
    def n_train(self) -> int:
        return len(self.dataset.events)

    @property
    def n_validation(self) -> int:
        return self.n_events - self.n_train

    def validation_ids(self, limit: int | None = None) -> np.ndarray:
        """The first `limit` validation events (global event numbers, ascending): what every
        validation pass and the end-of-run evaluation use."""
        return self.dataset.split_events("val")[:limit]

    def condition_ranges(self, names: list[str]) -> dict[str, tuple[float, float]]:
        """(min, max) of each condition over the training events."""
        out = {}
        for name in names:
            for s in self.stores:
                if name not in s.conditions:
                    raise ConfigError(f"model.conditions: {name!r} is not a condition of store {s.path} "
                                      f"(it has {', '.join(s.condition_names) or 'none'})")
                bad = np.flatnonzero(~np.isfinite(s.conditions[name]))
                if len(bad):  # one NaN would make the normalisation, and so every step, NaN
                    raise StoreError(f"store {s.path}: condition {name!r} of event {int(bad[0])} is "
                                     f"{float(s.conditions[name][bad[0]])} ({len(bad)} non-finite values); "
                                     "the store is corrupt, rewrite the parts holding them")
            v = self.dataset.conditions(name)[self.train_ids]
            out[name] = (float(v.min()), float(v.max()))
        return out

    def events(self, ids: np.ndarray) -> HitBatch:
        """Events with global numbers `ids`, in that order, with the public hit columns."""
        return self.dataset.hits(ids)


def _unreadable_parts(stores: list, rank: int, world: int) -> dict[tuple[int, int], str]:
    """Read every part once (rank r reads parts r, r + world, ... of all stores) and share what the
    ranks found: {(store position, part): the reader's error}, the same on every rank. Rank 0 logs
    each part left out with the error (store, part, array, chunk)."""
    parts = [(k, p) for k, s in enumerate(stores) for p in s.parts]
    found: dict[tuple[int, int], str] = {}
    for k, p in parts[rank::world]:
        try:
            stores[k].read_part_channels(p)
        except StoreError as err:
            found[(k, p)] = str(err)
    if world > 1:
        import torch.distributed as dist

        everyone: list = [None] * world
        dist.all_gather_object(everyone, found)
        found = {key: message for f in everyone for key, message in f.items()}
    if rank == 0:
        for k, p in sorted(found):
            start, stop = part_range(stores[k].attrs, p)
            log.warning("data.on_corrupt=skip: leaving out part %d (events %d-%d) of store %s: %s",
                        p, start, stop - 1, stores[k].path, found[(k, p)])
    return dict(sorted(found.items()))
