"""CaloChallenge 2022 HDF5 files <-> sparse calorimeter stores.

The CaloChallenge format is one HDF5 file with two datasets:
- `incident_energies`: (N, 1) float64, incident particle energy in MeV, gzip-compressed;
- `showers`: (N, n_voxels) float64, deposited energy per voxel in MeV, gzip-compressed, voxels
  ordered (layer, alpha, radial) and flattened, i.e. voxel = layer_offsets[layer] + cell in uhg's
  calorimeter geometry.
`OFFICIAL_FORMAT` writes that down with its source (docs/calorimeter.md). A store keeps the
non-zero voxels as float32 hits and the incident energy as the float64 condition
`incident_energy`; the export always writes the official float64 + gzip layout (float32 voxel
energies are exact in float64, so import followed by export gives back the same numbers).
float64 showers are imported only when every value is exactly a float32 (otherwise pass
`allow_rounding`).

`check_calochallenge_file` checks a file against what the CaloChallenge evaluation script
(`evaluate.py` of github.com/CaloChallenge/homepage) needs of its input, before it is sent there.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uhg.data.hits import CONDITION_UNITS, HitBatch
from uhg.errors import GeometryError, StoreError

ENERGY_CONDITION = "incident_energy"
DEFAULT_PART_SIZE = 1000


@dataclass(frozen=True)
class DatasetFormat:
    """How one HDF5 dataset of the official CaloChallenge files is stored."""

    name: str
    dtype: str
    shape: str
    """(N, 1) or (N, voxels)."""
    compression: str
    unit: str


# Source: CaloChallenge/homepage, Dataset_creation.ipynb (the notebook that wrote the published
# files): `create_dataset('incident_energies', data=energies.reshape(N, -1), compression='gzip')`
# with energies built from Python floats / `energy * np.ones(N)` (float64), and
# `create_dataset('showers', data=showers.reshape(N, -1), compression='gzip')` with DS1 showers
# from pandas.read_csv (float64); README.md "Datasets": both in MeV. evaluate.py sets
# torch.set_default_dtype(torch.float64), so its classifiers need float64 input: a file with
# float32 energies and float32 showers fails there with a dtype mismatch.
OFFICIAL_FORMAT: dict[str, DatasetFormat] = {
    "incident_energies": DatasetFormat("incident_energies", "float64", "(N, 1)", "gzip", "MeV"),
    "showers": DatasetFormat("showers", "float64", "(N, voxels)", "gzip", "MeV"),
}
# DS2/DS3 showers: the notebook rescales the Geant4 Par04 arrays by a Python float, so their dtype
# follows the source files, which are not public; the checker accepts float32 there as well.
SHOWERS_DTYPES_DS23 = ("float32", "float64")


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
    from uhg.data.writer import create_store
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
                 conditions={ENERGY_CONDITION: {"min": lo, "max": hi, "unit": CONDITION_UNITS[ENERGY_CONDITION]}},
                 attributes={"source": "CaloChallenge HDF5", "source_file": file.name,
                             "showers_dtype": str(showers_dtype), "incident_energies_dtype": str(energies_dtype),
                             "float32_rounding": bool(allow_rounding and showers_dtype != np.float32)},
                 overwrite=overwrite)
    make_part = functools.partial(_read_part, str(file.resolve()), geom.name, allow_rounding)
    fill_store(out, make_part, workers=workers, desc=f"import {file.name}", progress=progress)
    return n


def export_calochallenge(store_path: str | os.PathLike, out: str | os.PathLike, progress: bool = True) -> int:
    """Write a calorimeter store as a CaloChallenge HDF5 file in the official layout; returns N.

    Both datasets are float64, gzip-compressed, in MeV (`OFFICIAL_FORMAT`). The file is written
    under a temporary name and renamed when complete.
    """
    import h5py
    from tqdm.auto import tqdm

    from uhg.data.reader import open_store
    from uhg.sparse.dense import dense_batch

    store = open_store(store_path)
    if store.kind != "calo":
        raise StoreError(f"store {store_path} holds {store.kind} hits; CaloChallenge export needs a calorimeter store")
    if ENERGY_CONDITION not in store.condition_names:
        raise StoreError(f"store {store_path} has no {ENERGY_CONDITION!r} condition (has {store.condition_names})")
    unit = store.attrs.get("conditions", {}).get(ENERGY_CONDITION, {}).get("unit", "MeV")
    if unit != "MeV":
        raise StoreError(f"store {store_path}: {ENERGY_CONDITION} is in {unit!r}; the CaloChallenge format is MeV")
    fmt_e, fmt_s = OFFICIAL_FORMAT["incident_energies"], OFFICIAL_FORMAT["showers"]
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    n, g = len(store), store.geometry
    with h5py.File(tmp, "w") as h5:
        energies = h5.create_dataset(fmt_e.name, shape=(n, 1), dtype=fmt_e.dtype, compression=fmt_e.compression,
                                     chunks=(max(1, min(n, 2**16)), 1) if n else None)
        showers = h5.create_dataset(fmt_s.name, shape=(n, g.n_cells), dtype=fmt_s.dtype, compression=fmt_s.compression,
                                    chunks=(max(1, min(n, max(1, 2**17 // g.n_cells))), g.n_cells) if n else None)
        done = 0
        with tqdm(total=n, desc=f"export {out.name}", unit="ev", disable=not progress) as bar:
            for batch in store.iter_batches():
                stop = done + len(batch)
                showers[done:stop] = dense_batch(batch, g).astype(fmt_s.dtype)
                energies[done:stop, 0] = batch.conditions[ENERGY_CONDITION].astype(fmt_e.dtype)
                done = stop
                bar.update(len(batch))
    os.replace(tmp, out)
    return n


# ------------------------------------------------------------------ CaloChallenge input checks
@dataclass(frozen=True)
class CaloChallengeDataset:
    """One dataset of the CaloChallenge 2022 as its evaluation script sees it."""

    name: str
    """evaluate.py --dataset value: 1-photons, 1-pions, 2, 3."""
    geometry: str
    """uhg geometry of the same binning."""
    binning: str
    """binning XML file (HighLevelFeatures reads the voxel layout from it)."""
    n_voxels: int
    energy_range_mev: tuple[float, float]
    """Incident energies of the dataset, MeV (lowest, highest)."""
    min_voxel_energy_mev: float
    """Smallest voxel energy the detector reads out (evaluate.py `args.min_energy`), MeV."""


# Voxel counts: evaluate.py `check_file` (num_features); readout minimum: evaluate.py `__main__`
# (args.min_energy: ds1 1 MeV since the script of 2023-11, 10 MeV before; ds2/3 0.5 keV / 0.033);
# energy ranges: the `avg-E` mode's bins of evaluate.py (ds1: 2^8 .. 2^23 MeV, the datasets hold E = 2^8 .. 2^22 MeV; ds2/3: 10^3 .. 10^6 MeV,
# log-uniform 1 GeV .. 1 TeV).
CALOCHALLENGE_DATASETS: dict[str, CaloChallengeDataset] = {
    d.name: d for d in (
        CaloChallengeDataset("1-photons", "ds1-photons", "binning_dataset_1_photons.xml", 368, (2.0**8, 2.0**22), 1.0),
        CaloChallengeDataset("1-pions", "ds1-pions", "binning_dataset_1_pions.xml", 533, (2.0**8, 2.0**22), 1.0),
        CaloChallengeDataset("2", "ds2", "binning_dataset_2.xml", 6480, (1e3, 1e6), 0.5e-3 / 0.033),
        CaloChallengeDataset("3", "ds3", "binning_dataset_3.xml", 40500, (1e3, 1e6), 0.5e-3 / 0.033),
    )
}
# a median E_tot / E_inc outside [10^-2.5, 10^2.5] is ~1000x off: MeV and GeV mixed up
RESPONSE_UNITS_LIMITS = (10**-2.5, 10**2.5)


def calochallenge_dataset(name: str) -> CaloChallengeDataset:
    """The dataset called `name` by evaluate.py (1-photons, 1-pions, 2, 3) or by uhg (ds1-photons, ...)."""
    for d in CALOCHALLENGE_DATASETS.values():
        if name in (d.name, d.geometry):
            return d
    known = ", ".join(f"{d.name} ({d.geometry})" for d in CALOCHALLENGE_DATASETS.values())
    raise GeometryError(f"{name!r} is not a CaloChallenge dataset; known: {known}")


@dataclass
class CaloChallengeCheck:
    """What `check_calochallenge_file` found in a file that passed."""

    file: Path
    dataset: CaloChallengeDataset
    n_events: int
    incident_energy_mev: tuple[float, float]
    """Lowest and highest incident energy, MeV."""
    median_response: float
    """Median E_tot / E_inc over showers with energy (nan if none)."""
    warnings: list[str] = field(default_factory=list)


def check_calochallenge_file(file: str | os.PathLike, dataset: str, *, strict: bool = True,
                             chunk_events: int = 1000) -> CaloChallengeCheck:
    """Check `file` against what the CaloChallenge evaluation script needs of its input.

    `dataset`: evaluate.py's name (1-photons, 1-pions, 2, 3) or the uhg geometry (ds1-photons,
    ds1-pions, ds2, ds3). Raises StoreError / GeometryError naming the file, dataset and value
    for what evaluate.py would refuse or get wrong:

    - evaluate.py `check_file`: datasets `incident_energies` and `showers` exist, their first
      dimensions agree, showers have the dataset's voxel count (368, 533, 6480, 40500);
    - what its feature code needs: `incident_energies` of shape (N, 1) (`prepare_low_data_for_classifier`
      concatenates log10(E_inc) and the voxels along axis 1), finite energies, E_inc > 0 (log10),
      no negative voxel energies (energies in MeV from 0 up);
    - the official layout `OFFICIAL_FORMAT`: float64 incident energies and showers (DS2/DS3
      showers float32 or float64), an error otherwise since evaluate.py's float64 classifiers
      fail on float32 input; gzip compression of both datasets (a `strict` check);
    - units (uhg's addition; `strict=False` makes these warnings): incident energies inside the
      dataset's range in MeV (an out-of-range file is usually in GeV, or an extrapolation study),
      and a median E_tot / E_inc that is not ~1000x off (showers and energies in different units).

    The voxel order cannot be read from a file; `export_calochallenge` writes the order of the
    binning XML (layer, then alpha, then radial) and the tests check it against HighLevelFeatures'
    layout. Reads `chunk_events` showers at a time (files are GBs). Returns a `CaloChallengeCheck`
    with warnings (e.g. voxels below the readout minimum) for a file that passed.
    """
    ds = calochallenge_dataset(dataset)
    file = Path(file)
    where = f"{file} (CaloChallenge dataset {ds.name})"
    warnings: list[str] = []

    def plausibility(message: str) -> None:
        if strict:
            raise StoreError(f"{where}: {message} (pass strict=False / --lenient to accept it)")
        warnings.append(message)

    with _open_h5(file) as h5:
        # CaloChallenge/homepage code/evaluate.py, check_file(): the two keys, matching event counts,
        # the voxel count (the script asserts nothing else; the checks after these are what its
        # feature code and HighLevelFeatures.py assume)
        for name in ("incident_energies", "showers"):
            if name not in h5 or not hasattr(h5[name], "shape"):
                raise StoreError(f"{where}: dataset {name!r} is missing (found {sorted(h5.keys())}); the evaluation "
                                 "reads 'incident_energies' (N, 1) and 'showers' (N, voxels)")
        energies_ds, showers_ds = h5["incident_energies"], h5["showers"]
        if showers_ds.ndim != 2:
            raise StoreError(f"{where}: dataset 'showers' has shape {showers_ds.shape}, expected (N, {ds.n_voxels})")
        n = showers_ds.shape[0]
        if energies_ds.ndim < 1 or energies_ds.shape[0] != n:
            raise StoreError(f"{where}: number of energies {energies_ds.shape[0] if energies_ds.ndim else 'scalar'} "
                             f"does not match the number of showers {n}")
        if showers_ds.shape[1] != ds.n_voxels:
            raise GeometryError(f"{where}: dataset 'showers' has {showers_ds.shape[1]} voxels per shower, expected "
                                f"{ds.n_voxels} ({ds.binning}); is this another dataset's file?")
        if energies_ds.shape != (n, 1):
            raise StoreError(f"{where}: dataset 'incident_energies' has shape {energies_ds.shape}, expected ({n}, 1)")
        # the official layout (OFFICIAL_FORMAT): float64 energies, float64 showers (DS2/DS3 may be
        # float32), gzip. A dtype off the official one is an error: evaluate.py trains its classifiers
        # in float64 and fails on float32 input.
        allowed = {"incident_energies": (OFFICIAL_FORMAT["incident_energies"].dtype,),
                   "showers": (OFFICIAL_FORMAT["showers"].dtype,) if ds.name.startswith("1")
                   else SHOWERS_DTYPES_DS23}
        for name, d in (("incident_energies", energies_ds), ("showers", showers_ds)):
            if str(d.dtype) not in allowed[name]:
                raise StoreError(f"{where}: dataset {name!r} has dtype {d.dtype}, the official files hold "
                                 f"{' or '.join(allowed[name])} (evaluate.py trains its classifiers in float64); "
                                 "`uhg data export-calochallenge` writes the official dtypes")
            expected = OFFICIAL_FORMAT[name].compression
            if d.compression != expected:
                plausibility(f"dataset {name!r} is stored with compression {d.compression!r}, the official files "
                             f"use {expected!r}")
        if n == 0:
            raise StoreError(f"{where}: the file holds no showers")

        energies = np.asarray(energies_ds[:, 0], dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(energies) | (energies <= 0))
        if len(bad):
            raise StoreError(f"{where}: incident energy of event {int(bad[0])} is {float(energies[bad[0]])} "
                             f"({len(bad)} events not finite and > 0); the evaluation takes log10(E_inc) in MeV")
        responses = np.empty(n)
        below_readout = hits = 0
        for lo in range(0, n, chunk_events):
            block = np.asarray(showers_ds[lo:lo + chunk_events])
            bad_ev, bad_vox = np.nonzero(~np.isfinite(block) | (block < 0))
            if len(bad_ev):
                e, v = int(bad_ev[0]), int(bad_vox[0])
                raise StoreError(f"{where}: shower {lo + e}, voxel {v} has energy {float(block[e, v])}; voxel energies "
                                 "must be finite and >= 0 MeV")
            responses[lo:lo + len(block)] = block.sum(axis=1, dtype=np.float64) / energies[lo:lo + len(block)]
            nonzero = block[block > 0]
            hits += nonzero.size
            below_readout += int(np.count_nonzero(nonzero < ds.min_voxel_energy_mev))

    e_lo, e_hi = ds.energy_range_mev

    def outside(e: np.ndarray) -> np.ndarray:
        return (e < e_lo * (1 - 1e-6)) | (e > e_hi * (1 + 1e-6))

    n_out = int(outside(energies).sum())
    if n_out:
        # GeV: more energies would fit the range after x1000 than do now
        hint = ("; they look like GeV: the CaloChallenge uses MeV (multiply by 1000)"
                if int(outside(energies * 1e3).sum()) < n_out else "")
        plausibility(f"{n_out} of {n} incident energies lie outside the dataset's range "
                     f"[{e_lo:.10g}, {e_hi:.10g}] MeV (found {energies.min():.6g} .. {energies.max():.6g}){hint}")
    with_energy = responses[responses > 0]
    median = float(np.median(with_energy)) if len(with_energy) else float("nan")
    lo_r, hi_r = RESPONSE_UNITS_LIMITS
    if len(with_energy) and not lo_r <= median <= hi_r:
        plausibility(f"median E_tot / E_inc is {median:.3g}, ~1000x off 1: showers and incident energies seem to "
                     "be in different units (both must be MeV)")
    if len(with_energy) < n:
        warnings.append(f"{n - len(with_energy)} of {n} showers deposit no energy")
    if below_readout:
        warnings.append(f"{below_readout} of {hits} non-zero voxels lie below the readout minimum "
                        f"{ds.min_voxel_energy_mev:.4g} MeV of the dataset (the evaluation's log-scale histograms "
                        "start there)")
    return CaloChallengeCheck(file, ds, n, (float(energies.min()), float(energies.max())), median, warnings)
