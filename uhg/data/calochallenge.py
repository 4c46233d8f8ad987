"""CaloChallenge 2022 HDF5 files <-> sparse calorimeter stores.

The CaloChallenge format is one HDF5 file with two datasets:
- `incident_energies`: (N, 1) incident particle energy in MeV;
- `showers`: (N, n_voxels) deposited energy per voxel in MeV, voxels ordered (layer, alpha,
  radial) and flattened, i.e. voxel = layer_offsets[layer] + cell in uhg's calorimeter geometry.
The published files are float32. A store keeps the non-zero voxels as float32 hits and the
incident energy as the float64 condition `incident_energy`, and remembers the source dtypes,
so import followed by export gives back the same numbers in the same dtypes. float64 showers
are accepted only when every value is exactly a float32 (otherwise pass `allow_rounding`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np

from uhg.data.hits import HitBatch
from uhg.errors import GeometryError, StoreError

ENERGY_CONDITION = "incident_energy"
DEFAULT_PART_SIZE = 1000


def _open_h5(file: Path):
    import h5py

    if not file.is_file():
        raise StoreError(f"CaloChallenge file {file} does not exist")
    try:
        return h5py.File(file, "r")
    except OSError as err:
        raise StoreError(f"{file} is not a readable HDF5 file: {err}") from err


def _check_layout(file: Path, h5, geometry) -> tuple[int, np.dtype, np.dtype]:
    """(n_events, showers dtype, incident_energies dtype) after checking shapes against `geometry`."""
    for name in ("incident_energies", "showers"):
        if name not in h5:
            raise StoreError(f"{file}: dataset {name!r} is missing (found {sorted(h5.keys())}); "
                             "a CaloChallenge file holds 'incident_energies' (N, 1) and 'showers' (N, voxels)")
    showers, energies = h5["showers"], h5["incident_energies"]
    n = showers.shape[0] if showers.ndim else 0
    if showers.ndim != 2 or showers.shape[1] != geometry.n_cells:
        raise GeometryError(f"{file}: dataset 'showers' has shape {showers.shape}, expected (N, {geometry.n_cells}) "
                            f"for geometry {geometry.name!r}")
    if energies.shape not in ((n, 1), (n,)):
        raise StoreError(f"{file}: dataset 'incident_energies' has shape {energies.shape}, expected ({n}, 1)")
    for name, ds in (("showers", showers), ("incident_energies", energies)):
        if ds.dtype.kind != "f":
            raise StoreError(f"{file}: dataset {name!r} has dtype {ds.dtype}, expected float32 or float64")
    return n, showers.dtype, energies.dtype


def dense_to_hits(showers: np.ndarray, incident_energy: np.ndarray, geometry) -> HitBatch:
    """(B, n_voxels) energies and (B,) incident energies -> HitBatch of the non-zero voxels."""
    ev, vox = np.nonzero(showers)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(ev, minlength=len(showers)), dtype=np.int64)])
    layer = np.searchsorted(geometry.layer_offsets, vox, side="right") - 1
    return HitBatch("calo", {"layer": layer, "cell": vox - geometry.layer_offsets[layer],
                             "value": showers[ev, vox].astype(np.float32)},
                    offsets, {ENERGY_CONDITION: incident_energy.astype(np.float64)})


def _read_part(file: str, geometry_name: str, allow_rounding: bool, start: int, stop: int) -> HitBatch:
    """Events start..stop-1 of the file as hits (module level: runs in worker processes)."""
    from uhg.geometry import get_geometry

    geometry = get_geometry(geometry_name)
    with _open_h5(Path(file)) as h5:
        showers = h5["showers"][start:stop]
        energies = np.asarray(h5["incident_energies"][start:stop]).reshape(-1)
    if showers.dtype != np.float32:
        rounded = showers.astype(np.float32)
        lossy = rounded.astype(showers.dtype) != showers
        if lossy.any() and not allow_rounding:
            e, v = np.argwhere(lossy)[0]
            raise StoreError(f"{file}: dataset 'showers' ({showers.dtype}) value {showers[e, v]!r} of event "
                             f"{start + e}, voxel {v} is not exactly a float32; stores keep float32 energies "
                             "(pass allow_rounding / --allow-rounding to accept float32 rounding)")
        showers = rounded
    return dense_to_hits(showers, energies, geometry)


def import_calochallenge(file: str | os.PathLike, geometry: str, out: str | os.PathLike,
                         part_size: int = DEFAULT_PART_SIZE, workers: int = 1, allow_rounding: bool = False,
                         overwrite: bool = False, progress: bool = True) -> int:
    """Import a CaloChallenge HDF5 file into a calorimeter store at `out`; returns N.

    Streams `part_size` showers at a time (files are GBs); rerunning resumes an interrupted
    import. Raises GeometryError when the voxel count does not match `geometry`.
    """
    from uhg.data.parallel import fill_store
    from uhg.data.store import create_store
    from uhg.geometry import get_geometry

    file = Path(file)
    geom = get_geometry(geometry)
    if geom.kind != "calo":
        raise GeometryError(f"geometry {geometry!r} is a {geom.kind} detector, not a calorimeter")
    with _open_h5(file) as h5:
        n, showers_dtype, energies_dtype = _check_layout(file, h5, geom)
        energies = np.asarray(h5["incident_energies"][:], dtype=np.float64).reshape(-1)
    if n and not np.all(np.isfinite(energies)):
        raise StoreError(f"{file}: dataset 'incident_energies' holds non-finite values")
    lo, hi = (float(energies.min()), float(energies.max())) if n else (0.0, 0.0)
    create_store(out, "calo", geom.name, n, part_size,
                 conditions={ENERGY_CONDITION: {"min": lo, "max": hi, "unit": "MeV"}},
                 attributes={"source": "CaloChallenge HDF5", "source_file": file.name,
                             "showers_dtype": str(showers_dtype), "incident_energies_dtype": str(energies_dtype),
                             "float32_rounding": bool(allow_rounding and showers_dtype != np.float32)},
                 overwrite=overwrite)
    make_part = functools.partial(_read_part, str(file.resolve()), geom.name, allow_rounding)
    fill_store(out, make_part, workers=workers, desc=f"import {file.name}", progress=progress)
    return n


def export_calochallenge(store_path: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
                         progress: bool = True) -> int:
    """Write a calorimeter store as a CaloChallenge HDF5 file; returns N.

    `dtype` of both datasets defaults to the dtypes the store was imported from (float32 for
    simulated stores). The file is written under a temporary name and renamed when complete.
    """
    import h5py
    from tqdm.auto import tqdm

    from uhg.data.store import open_store
    from uhg.sparse.dense import dense_batch

    store = open_store(store_path)
    if store.kind != "calo":
        raise StoreError(f"store {store_path} holds {store.kind} hits; CaloChallenge export needs a calorimeter store")
    if ENERGY_CONDITION not in store.condition_names:
        raise StoreError(f"store {store_path} has no {ENERGY_CONDITION!r} condition (has {store.condition_names})")
    src: dict[str, Any] = store.attrs.get("attributes", {})
    shower_dtype = np.dtype(dtype or src.get("showers_dtype", "float32"))
    energy_dtype = np.dtype(dtype or src.get("incident_energies_dtype", "float32"))
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    n, g = len(store), store.geometry
    with h5py.File(tmp, "w") as h5:
        energies = h5.create_dataset("incident_energies", shape=(n, 1), dtype=energy_dtype)
        showers = h5.create_dataset("showers", shape=(n, g.n_cells), dtype=shower_dtype,
                                    chunks=(max(1, min(n, max(1, 2**20 // g.n_cells))), g.n_cells) if n else None)
        done = 0
        with tqdm(total=n, desc=f"export {out.name}", unit="ev", disable=not progress) as bar:
            for batch in store.iter_batches():
                stop = done + len(batch)
                showers[done:stop] = dense_batch(batch, g).astype(shower_dtype)
                energies[done:stop, 0] = batch.conditions[ENERGY_CONDITION].astype(energy_dtype)
                done = stop
                bar.update(len(batch))
    os.replace(tmp, out)
    return n
