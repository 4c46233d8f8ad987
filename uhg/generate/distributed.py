"""Distributed batch generation: a generator export (or MLflow model) -> a sparse event store.

`run_generate` writes N generated events at given conditions into a store, one part per work
item, with Ray actors that each hold one loaded generator (`uhg.generate.ray_pool`). Event j
draws its randomness from `event_seed(seed, j, "generate")` (inside `Generator.generate`), and
every part is produced by one `generate` call over exactly its events, so the store is
byte-identical for 1 or K workers, across reruns and after a resume.

The helpers here (`describe_model`, `open_generator`, `GeneratorSource`) are shared with
overlays (`uhg.generate.overlay`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uhg.data.hits import HitBatch
from uhg.errors import CheckpointError, ConditionError, ConfigError
from uhg.generate.ray_pool import PartResult, RayOptions, RunReport, run_parts

CONDITION_UNITS = {"luminosity": "cm^-2 s^-1", "her_current": "A", "ler_current": "A", "incident_energy": "MeV"}


def condition_specs(conditions: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Store declaration {name: {min, max, unit}} covering the given per-event values."""
    return {n: {"min": float(np.min(v)), "max": float(np.max(v)), "unit": CONDITION_UNITS.get(n, "")}
            for n, v in conditions.items()}


def model_id(path: str | os.PathLike) -> str:
    """Content id of an export folder: sha256 over its files' names and bytes (first 16 hex).
    Independent of where the export was downloaded to, so a resume recognises the same model."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def describe_model(reference: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Resolve `reference` (export folder, `models:/name@alias`, `runs:/...`) on this machine
    and read its sidecar (`generator.json`; no weights are loaded here). MLflow references are
    downloaded into `cache_dir` (default: a new temporary folder).

    Returns {reference, path, id, geometry (name), conditions (names the generator needs)}.
    Raises ConfigError when the reference names nothing, CheckpointError when it is no export.
    """
    from uhg.tracking.models import resolve_model_uri

    path = resolve_model_uri(reference, cache_dir=cache_dir).resolve()
    sidecar = path / "generator.json"
    if not sidecar.is_file():
        raise CheckpointError(f"model {reference!r} ({path}) is not a generator export: no generator.json "
                              "(export one with `uhg train` or `uhg.train.export.export_generator`)")
    try:
        meta = json.loads(sidecar.read_text())
        geometry, conditions = str(meta["geometry"]), list(meta["condition_norm"]["names"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"model {reference!r}: {sidecar} is not a valid generator sidecar ({err})") from err
    return {"reference": str(reference), "path": str(path), "id": model_id(path), "geometry": geometry,
            "conditions": conditions}


def open_generator(path: str | os.PathLike, device: str = "cpu"):
    """Load a generator export for inference on `device` ("cpu" or "cuda")."""
    from uhg.models.generator import Generator

    return Generator.load(path, device=device)


class GeneratorSource:
    """Generated events at fixed conditions: events(start, stop) are events start..stop-1 of
    the run with `seed` (each from `event_seed(seed, j, "generate")`)."""

    def __init__(self, generator: Any, conditions: dict[str, float], seed: int, batch_size: int) -> None:
        self.generator, self.conditions, self.seed, self.batch_size = generator, conditions, seed, batch_size

    def events(self, start: int, stop: int, conditions: dict[str, np.ndarray] | None = None) -> HitBatch:
        import torch

        n = stop - start
        conds = conditions if conditions is not None else {k: np.full(n, v) for k, v in self.conditions.items()}
        # No autograd bookkeeping: at full PXD resolution it costs ~40% more memory per event.
        with torch.inference_mode():
            return self.generator.generate(conds, seed=self.seed, first_event=start, batch_size=self.batch_size)


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


@dataclass
class GenerateJob:
    """One generation run, as sent to every worker: events of part p are generated by one
    `Generator.generate` call with the part's conditions."""

    model_path: str
    out: str
    seed: int
    conditions: dict[str, np.ndarray] = field(default_factory=dict)
    batch_size: int = 16

    def open(self, device: str) -> None:
        from uhg.data.store import read_attrs

        self._attrs = read_attrs(self.out)
        self._source = GeneratorSource(open_generator(self.model_path, device), {}, self.seed, self.batch_size)

    def write_part(self, part: int) -> PartResult:
        from uhg.data.store import part_range, write_part

        start, stop = part_range(self._attrs, part)
        t0 = time.perf_counter()
        batch = self._source.events(start, stop, {k: v[start:stop] for k, v in self.conditions.items()})
        t1 = time.perf_counter()
        write_part(self.out, part, batch)
        return PartResult(part, len(batch), batch.n_hits, {"generate": t1 - t0, "write": time.perf_counter() - t1})


def plan_generate(model: str | dict[str, Any], out: str | os.PathLike, n_events: int,
                  conditions: dict[str, np.ndarray], *,
                  seed: int = 0, part_size: int = 64, batch_size: int = 16,
                  overwrite: bool = False) -> tuple[GenerateJob, list[int], dict[int, int]]:
    """Check the model and conditions, create (or reopen, to resume) the store. Returns the
    job, the parts still to write and the events of every part."""
    from uhg.data.store import create_store, missing_parts, part_range, read_attrs

    if n_events < 1:
        raise ConfigError(f"--events must be at least 1, got {n_events}")
    info = model if isinstance(model, dict) else describe_model(model)
    model = info["reference"]
    missing = [n for n in info["conditions"] if n not in conditions]
    if missing:
        raise ConditionError(f"model {model!r} needs conditions {info['conditions']}; missing {missing}")
    # Conditions the model does not use (e.g. beam currents) pass through to the store.
    out_path = Path(out).resolve()
    provenance = {"model": info["reference"], "model_id": info["id"], "seed": int(seed),
                  "event_seed": "event_seed(seed, event index, 'generate')", "batch_size": int(batch_size)}
    create_store(out_path, "pixel" if _is_pixel(info["geometry"]) else "calo", info["geometry"], n_events,
                 part_size, conditions=condition_specs(conditions), attributes={"generated": provenance},
                 overwrite=overwrite, seed=int(seed))
    attrs = read_attrs(out_path)
    sizes = {p: part_range(attrs, p)[1] - part_range(attrs, p)[0] for p in range(attrs["n_parts"])}
    job = GenerateJob(info["path"], str(out_path), int(seed), {k: np.asarray(v, np.float64) for k, v in conditions.items()},
                      batch_size)
    return job, missing_parts(out_path), sizes


def _is_pixel(geometry_name: str) -> bool:
    from uhg.geometry import get_geometry

    return get_geometry(geometry_name).kind == "pixel"


def run_generate(model: str | dict[str, Any], out: str | os.PathLike, n_events: int, conditions: dict[str, np.ndarray], *,
                 ray_options: RayOptions | None = None, device: str = "cpu", **plan_args: Any) -> RunReport:
    """Generate `n_events` events into the store `out`, in this process (on `device`) when
    `ray_options` is None, else on Ray actors (see `plan_generate` for the other arguments)."""
    with tempfile.TemporaryDirectory(prefix="uhg-model-") as cache:  # MLflow downloads live for the run only
        info = model if isinstance(model, dict) else describe_model(model, cache_dir=cache)
        job, parts, sizes = plan_generate(info, out, n_events, conditions, **plan_args)
        return run_parts(job, parts, sizes, ray_options=ray_options, description="generate", device=device)


def cli_conditions(info: dict[str, Any], n_events: int, seed: int, *, conditions_file: str | os.PathLike | None = None,
                   luminosity: float | None = None, energy_min: float | None = None,
                   energy_max: float | None = None) -> dict[str, np.ndarray]:
    """Per-event conditions for `uhg generate --distributed` with the model described by
    `info` (`describe_model`): from a file (JSON/YAML/NPZ, see
    `load_conditions`; beam currents the model needs are derived from the luminosity), else
    exactly those `uhg generate` uses in one process (`uhg.generate.single.event_conditions`),
    so both paths write the same events."""
    from types import SimpleNamespace

    from uhg.generate.single import event_conditions
    from uhg.geometry import get_geometry

    if conditions_file is not None:
        if luminosity is not None or energy_min is not None or energy_max is not None:
            raise ConfigError("--conditions FILE replaces --luminosity / --energy-min / --energy-max; give one or the other")
        conds = load_conditions(conditions_file, n_events)
        wanted = [n for n in ("her_current", "ler_current") if n in info["conditions"] and n not in conds]
        if wanted and "luminosity" in conds:
            from uhg.sim.pxd_machine import currents_for_luminosity

            her, ler = currents_for_luminosity(conds["luminosity"])
            conds |= {k: np.asarray(v, np.float64) for k, v in (("her_current", her), ("ler_current", ler)) if k in wanted}
        return conds
    shape = SimpleNamespace(condition_names=info["conditions"], kind=get_geometry(info["geometry"]).kind)
    return event_conditions(shape, 0, n_events, seed, luminosity, energy_min, energy_max)


def default_part_size(n_events: int, batch_size: int) -> int:
    """Events per part of `uhg generate`: a multiple of `batch_size`, about 1000 events."""
    return max(batch_size, (max(1, min(n_events, 1000)) // batch_size) * batch_size)
