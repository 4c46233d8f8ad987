"""Writing a uhg store: `create_store` plans it, `write_part` commits one part atomically
(layout in `uhg.data.layout`; reading in `uhg.data.reader`)."""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uhg.data.hits import COLUMNS, EXTRA_COLUMNS, HitBatch
from uhg.data.layout import (
    CHUNK_ELEMENTS,
    ENCODING,
    PARTIAL,
    PARTS,
    SCHEMA,
    UNITS,
    codecs_for,
    jsonable,
    part_name,
    part_range,
    read_attrs,
    zarr_module,
)
from uhg.errors import ConditionError, GeometryError, StoreError
from uhg.sparse.dense import channel_index, check_in_geometry


class PartExistsError(StoreError):
    """The part is committed already (by an earlier run or a concurrent writer)."""


def _resolve_geometry(geometry: Any):
    from uhg.geometry import get_geometry

    if isinstance(geometry, str):
        return get_geometry(geometry)
    known = get_geometry(geometry.name)
    if known.to_dict() != geometry.to_dict():
        raise GeometryError(f"geometry object {geometry.name!r} differs from the registered geometry of that name")
    return known


def _check_conditions(conditions: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    from uhg.paths import check_name

    out = {}
    for name, spec in conditions.items():
        # each condition is stored as the array parts/<part>/conditions/<name>
        check_name(name, "condition name", ConditionError, identifier=True)
        try:
            lo, hi, unit = float(spec["min"]), float(spec["max"]), str(spec["unit"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConditionError(f"condition {name!r} needs numeric 'min', 'max' and a 'unit', got {spec!r}") from err
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ConditionError(f"condition {name!r} has range [{lo}, {hi}]; need finite min <= max")
        out[str(name)] = {"min": lo, "max": hi, "unit": unit}
    return out


def _plan(path: Path, kind: str, geometry: Any, n_events: int, part_size: int,
          conditions: Mapping[str, Mapping[str, Any]], attributes: Mapping[str, Any] | None,
          extra_columns: Sequence[str] = ()) -> dict:
    if kind not in COLUMNS:
        raise StoreError(f"store {path}: kind must be one of {sorted(COLUMNS)}, got {kind!r}")
    geom = _resolve_geometry(geometry)
    if geom.kind != kind:
        raise GeometryError(f"store {path}: geometry {geom.name!r} is a {geom.kind} geometry, not {kind}")
    if int(n_events) != n_events or n_events < 0:
        raise StoreError(f"store {path}: n_events must be a non-negative integer, got {n_events!r}")
    if int(part_size) != part_size or part_size < 1:
        raise StoreError(f"store {path}: part_size must be a positive integer, got {part_size!r}")
    unknown = sorted(set(extra_columns) - set(EXTRA_COLUMNS))
    if unknown:
        raise StoreError(f"store {path}: unknown extra hit columns {unknown}; known: {sorted(EXTRA_COLUMNS)}")
    return jsonable({
        "schema": SCHEMA,
        "kind": kind,
        "geometry": geom.name,
        "geometry_spec": geom.to_dict(),
        "units": UNITS[kind],
        "conditions": _check_conditions(conditions),
        "extra_columns": {k: str(EXTRA_COLUMNS[k]) for k in extra_columns},
        "n_events": int(n_events),
        "part_size": int(part_size),
        "n_parts": math.ceil(n_events / part_size),
        "encoding": ENCODING,
        "attributes": dict(attributes or {}),
    })


PLAN_KEYS = ("schema", "kind", "geometry", "geometry_spec", "conditions", "extra_columns", "n_events", "part_size",
             "attributes")


def _provenance(seed: int | None) -> dict[str, Any]:
    from uhg import __version__

    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
        "uhg_version": __version__,
        "seed": seed,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
    }


def create_store(path: str | os.PathLike, kind: str, geometry: Any, n_events: int, part_size: int,
                 conditions: Mapping[str, Mapping[str, Any]] | None = None,
                 attributes: Mapping[str, Any] | None = None, overwrite: bool = False,
                 seed: int | None = None, extra_columns: Sequence[str] = ()) -> Path:
    """Create an empty store planned for `n_events` events in parts of `part_size`.

    `geometry` is a geometry name or object; `conditions` declares each per-event condition as
    {name: {"min", "max", "unit"}}; `attributes` is JSON-able metadata of the producer
    (simulator settings, ...); `extra_columns` names optional per-hit columns every part
    carries (`uhg.data.hits.EXTRA_COLUMNS`, e.g. "origin"). Re-creating an existing store with the same plan (kind,
    geometry, events, part size, conditions, attributes, seed) resumes it; a different plan
    raises StoreError unless `overwrite` (which deletes the old store). Returns the path.
    """
    path = Path(path)
    plan = _plan(path, kind, geometry, n_events, part_size, conditions or {}, attributes, extra_columns)
    plan["provenance"] = _provenance(seed)
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()  # an empty directory made by the caller is no store yet
    if path.exists():
        if overwrite:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            old = read_attrs(path)
            old_seed = old.get("provenance", {}).get("seed")
            diff = [k for k in PLAN_KEYS if old.get(k) != plan[k]] + (["seed"] if old_seed != seed else [])
            if diff:
                raise StoreError(f"store {path} exists with a different plan ({', '.join(diff)} differ); "
                                 "use a new path or overwrite it")
            _remove_stale_partials(path)
            return path
    zarr = zarr_module()
    root = zarr.open_group(path, mode="w", zarr_format=3, attributes=plan)
    root.create_group(PARTS)
    return path


def _check_batch(path: Path, attrs: Mapping[str, Any], part_index: int, batch: HitBatch, geom: Any) -> None:
    start, stop = part_range(attrs, part_index)
    where = f"store {path}, part {part_index} (events {start}..{stop - 1})"
    if batch.kind != attrs["kind"]:
        raise StoreError(f"{where}: got {batch.kind} hits for a {attrs['kind']} store")
    if len(batch) != stop - start:
        raise StoreError(f"{where}: got {len(batch)} events, expected {stop - start}")
    if set(batch.extra_columns) != set(attrs["extra_columns"]):
        raise StoreError(f"{where}: extra hit columns {sorted(batch.extra_columns)} differ from the declared "
                         f"{sorted(attrs['extra_columns'])}")
    declared = attrs["conditions"]
    if set(batch.conditions) != set(declared):
        raise ConditionError(f"{where}: conditions {sorted(batch.conditions)} differ from the declared {sorted(declared)}")
    for name, spec in declared.items():
        v = batch.conditions[name]
        bad = np.flatnonzero(~((v >= spec["min"]) & (v <= spec["max"])))
        if len(bad):
            j = bad[0]
            raise ConditionError(f"{where}: condition {name!r} of event {start + j} is {float(v[j])!r} {spec['unit']}, "
                                 f"outside the declared range [{spec['min']}, {spec['max']}]")
    problem = check_in_geometry(batch.kind, batch.columns, geom)
    if problem:
        raise GeometryError(f"{where}: {problem}")


def _remove_stale_partials(path: Path) -> None:
    """Delete temporary parts left by killed writers on this host (their pid is gone)."""
    tmp = path / PARTIAL
    if not tmp.is_dir():
        return
    host = socket.gethostname()
    for entry in os.listdir(tmp):
        bits = entry.split(".")
        if len(bits) >= 4 and bits[1] == host and bits[2].isdigit() and not _pid_alive(int(bits[2])):
            shutil.rmtree(tmp / entry, ignore_errors=True)
    try:
        tmp.rmdir()
    except OSError:
        pass  # other writers are busy in it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_tmp_dir(path: Path, part_index: int) -> Path:
    name = f"{part_name(part_index)}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    for _ in range(5):
        # Another writer removes `.partial` when it is empty: between our two mkdirs (the second
        # finds no parent), or between mkdir finding `.partial` there and pathlib's check that it
        # is a directory (FileExistsError for a directory that is gone).
        try:
            (path / PARTIAL).mkdir(exist_ok=True)
            (path / PARTIAL / name).mkdir()
            return path / PARTIAL / name
        except (FileNotFoundError, FileExistsError):
            continue
    raise StoreError(f"store {path}: cannot create a temporary directory for part {part_index}")


def write_part(path: str | os.PathLike, part_index: int, batch: HitBatch, overwrite: bool = False) -> None:
    """Write events of part `part_index` atomically; `batch` must hold exactly its events.

    Hits are sorted within each event; duplicate channels in one event are an error. Raises
    StoreError if the part is already committed (unless `overwrite`), ConditionError for
    conditions outside the declared ranges, GeometryError for hits outside the geometry.
    """
    path = Path(path)
    attrs = read_attrs(path)
    if not 0 <= part_index < attrs["n_parts"]:
        raise StoreError(f"store {path}: part index {part_index} outside 0..{attrs['n_parts'] - 1}")
    final = path / PARTS / part_name(part_index)
    if final.exists() and not overwrite:
        raise PartExistsError(f"store {path}: part {part_index} is already written")
    geom = _resolve_geometry(attrs["geometry"])
    _check_batch(path, attrs, part_index, batch, geom)

    channel = channel_index(batch.kind, batch.columns, geom)
    order = np.lexsort([channel, batch.event_index()])
    channel, value = channel[order], batch.columns["value"][order]
    same = (np.diff(channel) == 0) & (np.diff(batch.event_index()) == 0)
    if same.any():
        hit = int(np.flatnonzero(same)[0])
        ev = int(np.searchsorted(batch.offsets, hit, side="right") - 1)
        raise StoreError(f"store {path}, part {part_index}: event {part_range(attrs, part_index)[0] + ev} "
                         f"has two hits in channel {int(channel[hit])}")

    start, stop = part_range(attrs, part_index)
    tmp = _make_tmp_dir(path, part_index)
    try:
        zarr = zarr_module()
        codecs = codecs_for(attrs["kind"])
        group = zarr.open_group(tmp, mode="w", zarr_format=3, attributes={
            "part": part_index, "first_event": start, "n_events": stop - start, "n_hits": int(len(channel))})
        _write_array(group, "channel", channel.astype(np.uint32), codecs["channel"])
        _write_array(group, "value", value, codecs["value"])
        for name in attrs["extra_columns"]:
            _write_array(group, name, batch.columns[name][order], codecs["extra"])
        _write_array(group, "event_offsets", batch.offsets.astype(np.int64), codecs["event_offsets"])
        cond = group.create_group("conditions")
        for name in attrs["conditions"]:
            _write_array(cond, name, batch.conditions[name], codecs["condition"])
        if overwrite and final.exists():
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)  # the commit: the part appears complete or not at all
        except OSError as err:
            if final.exists():
                raise PartExistsError(f"store {path}: part {part_index} was committed by another writer") from err
            raise
    except OSError as err:  # disk full, quota, permissions, vanished mount
        raise StoreError(f"store {path}, part {part_index}: cannot write ({err.strerror or err}); the part was not "
                         "committed and the committed parts are intact. Fix the cause and rerun: only missing "
                         "parts are written") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            (path / PARTIAL).rmdir()
        except OSError:
            pass


def _write_array(group, name: str, data: np.ndarray, codecs: dict[str, Any]) -> None:
    chunk = max(1, min(len(data), CHUNK_ELEMENTS))
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(chunk,),
                             config={"write_empty_chunks": True}, fill_value=0, **codecs)
    if len(data):
        arr[:] = data
