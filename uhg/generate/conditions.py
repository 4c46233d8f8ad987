"""Conditions of generated events: what `uhg generate` and `uhg overlay` hand the generator,
and how a store declares them.

Units: `uhg.data.hits.CONDITION_UNITS`. Beam currents and beta_y* a PXD generator needs but the
user did not give follow from the luminosity through the SuperKEKB machine scenario the
generator was trained on, as its export records it (the design scenario when it does not;
`with_beam_currents`). `range_warnings` says how far requested conditions lie outside the
training range.
Calorimeter energies are drawn per event from the event's own stream (`condition_rng`), so a
store is identical for the same seed however it is split into parts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from uhg.data.hits import CONDITION_UNITS
from uhg.errors import ConditionError, ConfigError

BEAM_CURRENTS = ("her_current", "ler_current")
MACHINE_CONDITIONS = (*BEAM_CURRENTS, "beta_y_star")
"""PXD conditions that follow from the luminosity in a machine scenario when not given."""


def with_beam_currents(given: Mapping[str, Any], needed: Iterable[str],
                       machine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`given` plus the beam currents (A) and beta_y* (mm) among `needed` that it lacks, from its
    luminosity (cm^-2 s^-1; a scalar or per-event array, returned in the same shape) in the
    machine scenario `machine` (a `uhg.sim.pxd_machine.MachineScenario` as a dict, e.g. the one
    an export records; None: the design scenario)."""
    out = dict(given)
    wanted = [n for n in MACHINE_CONDITIONS if n in set(needed) and n not in out]
    if wanted and "luminosity" in out:
        from uhg.sim.pxd_machine import MachineScenario, load_scenario

        scenario = MachineScenario.model_validate(machine) if machine else load_scenario()
        lum = out["luminosity"]
        derived = scenario.conditions(lum)
        scalar = np.ndim(lum) == 0
        out |= {k: float(derived[k]) if scalar else np.asarray(derived[k], np.float64) for k in wanted}
    return out


def range_warnings(condition_norm: Mapping[str, Any], values: Mapping[str, float | tuple[float, float]]) -> list[str]:
    """How far each requested condition lies outside the model's training range.

    `condition_norm`: the export's `condition_norm` (names, log, center, scale); `values`:
    {name: value or (min, max)} in physical units. One message per condition outside the range,
    e.g. "luminosity 2.4e+36 is 3x the training maximum 8e+35 ...": a count or response law
    extrapolates as its fitted form does, which the training data cannot confirm there."""
    out = []
    for name, lg, c, s in zip(condition_norm["names"], condition_norm["log"], condition_norm["center"],
                              condition_norm["scale"], strict=True):
        if name not in values or not lg:
            continue
        lo, hi = math.exp(c - s), math.exp(c + s)
        v = values[name]
        v_lo, v_hi = (v, v) if isinstance(v, (int, float)) else v
        if v_hi > hi * (1 + 1e-6):
            out.append(f"{name} {v_hi:.4g} is {v_hi / hi:.3g}x the training maximum {hi:.4g} (training range "
                       f"{lo:.4g} .. {hi:.4g}; {math.log(v_hi / hi) / (2 * s):.2f} training widths beyond it in log): "
                       "the model extrapolates there")
        if v_lo < lo * (1 - 1e-6):
            out.append(f"{name} {v_lo:.4g} is {v_lo / lo:.3g}x the training minimum {lo:.4g} (training range "
                       f"{lo:.4g} .. {hi:.4g}; {math.log(lo / v_lo) / (2 * s):.2f} training widths below it in log): "
                       "the model extrapolates there")
    return out


def condition_specs(conditions: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Store declaration {name: {min, max, unit}} covering the given per-event values."""
    return {n: {"min": float(np.min(v)), "max": float(np.max(v)), "unit": CONDITION_UNITS.get(n, "")}
            for n, v in conditions.items()}


def condition_rng(seed: int, index: int) -> np.random.Generator:
    """Stream for the conditions of generated event `index` (independent of its noise stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 4, int(index)], spawn_key=(1,)))


def event_conditions(generator, start: int, stop: int, seed: int, luminosity: float | None = None,
                     energy_min: float | None = None, energy_max: float | None = None,
                     machine: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """{name: (stop-start,) float64} conditions of events start..stop-1 (PXD: the luminosity and
    what follows from it in the machine scenario `machine`, see `with_beam_currents`)."""
    n = stop - start
    names = generator.condition_names
    if generator.kind == "pixel":
        if luminosity is None:
            raise ConditionError("a PXD generator needs --luminosity (cm^-2 s^-1)")
        if luminosity <= 0:
            raise ConditionError(f"--luminosity must be positive, got {luminosity}")
        conds = with_beam_currents({"luminosity": np.full(n, float(luminosity))}, MACHINE_CONDITIONS, machine)
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


def load_conditions(path: str | os.PathLike, n_events: int) -> dict[str, np.ndarray]:
    """Per-event conditions from a file: JSON/YAML {name: value or list of n_events values}
    or NPZ {name: (n_events,) array}. Returns {name: (n_events,) float64}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"conditions file {path} does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                raw: dict[str, Any] = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:  # ValueError: object arrays, i.e. pickles, are refused
            raise ConfigError(f"conditions file {path}: not a plain numeric .npz ({err})") from None
    elif path.suffix in (".json", ".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(path.read_text()) if path.suffix != ".json" else json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ConfigError(f"conditions file {path}: expected a mapping name -> value(s), got {type(raw).__name__}")
    else:
        raise ConfigError(f"conditions file {path}: expected .json, .yaml or .npz")
    out = {}
    for name, values in raw.items():
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ConditionError(f"conditions file {path}: {name!r} is not numeric") from err
        if arr.ndim == 0:
            arr = np.full(n_events, float(arr))
        if arr.shape != (n_events,):
            raise ConditionError(f"conditions file {path}: {name!r} has shape {arr.shape}; expected a scalar "
                                 f"or ({n_events},) for {n_events} events")
        if not np.all(np.isfinite(arr)):
            raise ConditionError(f"conditions file {path}: {name!r} has non-finite values")
        out[str(name)] = arr
    return out


def cli_conditions(info: dict[str, Any], n_events: int, seed: int, *, conditions_file: str | os.PathLike | None = None,
                   luminosity: float | None = None, energy_min: float | None = None,
                   energy_max: float | None = None) -> dict[str, np.ndarray]:
    """Per-event conditions for `uhg generate` with the model described by `info`
    (`uhg.generate.distributed.describe_model`): from a file (JSON/YAML/NPZ, see
    `load_conditions`; beam currents and beta_y* the model needs are derived from the
    luminosity in its training scenario), else from the command line (`event_conditions`)."""
    from types import SimpleNamespace

    from uhg.geometry import get_geometry

    if conditions_file is not None:
        if luminosity is not None or energy_min is not None or energy_max is not None:
            raise ConfigError("--conditions FILE replaces --luminosity / --energy-min / --energy-max; give one or the other")
        return with_beam_currents(load_conditions(conditions_file, n_events), info["conditions"], info.get("machine"))
    shape = SimpleNamespace(condition_names=info["conditions"], kind=get_geometry(info["geometry"]).kind)
    return event_conditions(shape, 0, n_events, seed, luminosity, energy_min, energy_max, info.get("machine"))
