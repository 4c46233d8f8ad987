"""`uhg generate` in one process: a generator export -> a standard Zarr store.

Conditions per event: a fixed luminosity (PXD; beam currents from the machine model when the
generator needs them) or an incident energy log-uniform in [energy_min, energy_max] (MeV),
drawn from the event's own stream, so the store is identical for the same seed however it
is split.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from uhg.errors import ConditionError


def condition_rng(seed: int, index: int) -> np.random.Generator:
    """Stream for the conditions of generated event `index` (independent of its noise stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 4, int(index)], spawn_key=(1,)))


def event_conditions(generator, start: int, stop: int, seed: int, luminosity: float | None = None,
                     energy_min: float | None = None, energy_max: float | None = None) -> dict[str, np.ndarray]:
    """{name: (stop-start,) float64} conditions of events start..stop-1."""
    n = stop - start
    names = generator.condition_names
    if generator.kind == "pixel":
        if luminosity is None:
            raise ConditionError("a PXD generator needs --luminosity (cm^-2 s^-1)")
        if luminosity <= 0:
            raise ConditionError(f"--luminosity must be positive, got {luminosity}")
        from uhg.sim.pxd_machine import currents_for_luminosity

        her, ler = currents_for_luminosity(np.full(n, float(luminosity)))
        conds = {"luminosity": np.full(n, float(luminosity)), "her_current": np.asarray(her, np.float64) * np.ones(n),
                 "ler_current": np.asarray(ler, np.float64) * np.ones(n)}
    else:
        if energy_min is None or energy_max is None:
            raise ConditionError("a calorimeter generator needs --energy-min and --energy-max (MeV)")
        if not 0 < energy_min <= energy_max:
            raise ConditionError(f"need 0 < energy-min <= energy-max (MeV), got {energy_min}, {energy_max}")
        lo, hi = math.log(energy_min), math.log(energy_max)
        e = np.array([math.exp(condition_rng(seed, i).uniform(lo, hi)) if hi > lo else energy_min
                      for i in range(start, stop)])
        conds = {"incident_energy": e}
    missing = [k for k in names if k not in conds]
    if missing:
        raise ConditionError(f"the generator needs condition(s) {', '.join(missing)} that uhg generate cannot set")
    return conds


def generate_store(model: str | Path, n_events: int, out: str | Path, seed: int = 0, batch_size: int = 16,
                   part_size: int | None = None, luminosity: float | None = None, energy_min: float | None = None,
                   energy_max: float | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Generate `n_events` into a new store at `out`; returns {events, seconds, ms_per_event, path}.
    Parts hold a multiple of `batch_size` events so micro-batches never straddle parts."""
    from tqdm.auto import tqdm

    from uhg.data.store import create_store, missing_parts, part_range, read_attrs, write_part
    from uhg.models.generator import Generator

    if n_events < 1:
        raise ConditionError(f"--events must be >= 1, got {n_events}")
    generator = Generator.load(model, device=device)
    if part_size is None:
        part_size = max(batch_size, (max(1, min(n_events, 1000)) // batch_size) * batch_size)
    ranges = {}
    if generator.kind == "pixel":
        c = event_conditions(generator, 0, 1, seed, luminosity=luminosity)
        ranges = {"luminosity": {"min": float(luminosity), "max": float(luminosity), "unit": "cm^-2 s^-1"},
                  "her_current": {"min": float(c["her_current"][0]), "max": float(c["her_current"][0]), "unit": "A"},
                  "ler_current": {"min": float(c["ler_current"][0]), "max": float(c["ler_current"][0]), "unit": "A"}}
    else:
        event_conditions(generator, 0, 0, seed, energy_min=energy_min, energy_max=energy_max)
        ranges = {"incident_energy": {"min": float(energy_min), "max": float(energy_max), "unit": "MeV"}}
    out = Path(out)
    create_store(out, generator.kind, generator.geometry.name, n_events, part_size, conditions=ranges,
                 attributes={"generator": str(Path(model).resolve()), "family": generator.family.name,
                             "generator_run": generator.sidecar.get("run"), "generator_step": generator.sidecar.get("step"),
                             "batch_size": batch_size},
                 seed=seed)
    attrs = read_attrs(out)
    todo = missing_parts(out)
    t0 = time.perf_counter()
    done = 0
    with tqdm(total=sum(part_range(attrs, p)[1] - part_range(attrs, p)[0] for p in todo), unit="ev",
              desc="generating", disable=not progress) as bar:
        for p in todo:
            start, stop = part_range(attrs, p)
            conds = event_conditions(generator, start, stop, seed, luminosity, energy_min, energy_max)
            batch = generator.generate(conds, seed=seed, first_event=start, batch_size=batch_size)
            write_part(out, p, batch)
            done += stop - start
            bar.update(stop - start)
    seconds = time.perf_counter() - t0
    return {"events": done, "seconds": seconds, "ms_per_event": 1000 * seconds / max(done, 1), "path": str(out)}
