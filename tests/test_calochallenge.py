"""CaloChallenge HDF5 import/export: lossless round trip and shape/dtype checks."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from uhg.cli import main
from uhg.data import open_store
from uhg.data.calochallenge import export_calochallenge, import_calochallenge
from uhg.errors import GeometryError, StoreError
from uhg.geometry import get_geometry


def write_h5(path, n: int, n_voxels: int, dtype=np.float32, seed: int = 0):
    """A small file in the CaloChallenge layout: ~5% of voxels hit, log-uniform energies."""
    rng = np.random.default_rng(seed)
    showers = np.where(rng.random((n, n_voxels)) < 0.05, rng.exponential(20.0, (n, n_voxels)), 0.0).astype(dtype)
    showers[3] = 0.0  # an empty shower
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e6), (n, 1))).astype(dtype)
    with h5py.File(path, "w") as h5:
        h5["incident_energies"] = energies
        h5["showers"] = showers
    return showers, energies


def read_h5(path):
    with h5py.File(path, "r") as h5:
        return h5["showers"][:], h5["incident_energies"][:]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_lossless(tmp_path, dtype):
    g = get_geometry("ds2")
    showers, energies = write_h5(tmp_path / "in.hdf5", 25, g.n_cells, dtype)
    if dtype == np.float64:  # exactly-float32 values are accepted from float64 files
        showers = showers.astype(np.float32).astype(np.float64)
        with h5py.File(tmp_path / "in.hdf5", "a") as h5:
            h5["showers"][...] = showers
    assert import_calochallenge(tmp_path / "in.hdf5", "ds2", tmp_path / "store", part_size=10, progress=False) == 25
    store = open_store(tmp_path / "store")
    assert len(store) == 25 and store.read().n_hits == np.count_nonzero(showers)
    assert np.array_equal(store.conditions["incident_energy"], energies[:, 0].astype(np.float64))
    assert np.array_equal(store.dense(7), showers[7].astype(np.float32))
    export_calochallenge(tmp_path / "store", tmp_path / "out.hdf5", progress=False)
    out_showers, out_energies = read_h5(tmp_path / "out.hdf5")
    # the export always writes the official float64; float32 values are exact in it
    assert out_showers.dtype == np.float64 and out_energies.dtype == np.float64
    assert out_showers.shape == (25, g.n_cells) and out_energies.shape == (25, 1)
    assert np.array_equal(out_showers, showers) and np.array_equal(out_energies, energies)
    assert not (tmp_path / "out.hdf5.partial").exists()


def test_cli_round_trip_with_workers(tmp_path):
    g = get_geometry("ds1-photons")
    showers, energies = write_h5(tmp_path / "in.hdf5", 30, g.n_cells)
    assert main(["data", "import-calochallenge", str(tmp_path / "in.hdf5"), "--geometry", "ds1-photons",
                 "--out", str(tmp_path / "s"), "--part-size", "8", "--workers", "2"]) == 0
    assert main(["data", "export-calochallenge", str(tmp_path / "s"), "--out", str(tmp_path / "o.h5")]) == 0
    out_showers, out_energies = read_h5(tmp_path / "o.h5")
    assert np.array_equal(out_showers, showers) and np.array_equal(out_energies, energies)


def test_bad_files(tmp_path, capsys):
    write_h5(tmp_path / "ds2.hdf5", 4, get_geometry("ds2").n_cells)
    with pytest.raises(GeometryError, match=r"ds2.hdf5: dataset 'showers' has shape \(4, 6480\), expected \(N, 368\)"):
        import_calochallenge(tmp_path / "ds2.hdf5", "ds1-photons", tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="does not exist"):
        import_calochallenge(tmp_path / "nope.hdf5", "ds2", tmp_path / "s", progress=False)
    with h5py.File(tmp_path / "no_energy.hdf5", "w") as h5:
        h5["showers"] = np.zeros((2, 6480), np.float32)
    with pytest.raises(StoreError, match="dataset 'incident_energies' is missing"):
        import_calochallenge(tmp_path / "no_energy.hdf5", "ds2", tmp_path / "s", progress=False)
    with h5py.File(tmp_path / "f64.hdf5", "w") as h5:
        h5["showers"] = np.full((2, 6480), 0.1, np.float64)
        h5["incident_energies"] = np.ones((2, 1))
    with pytest.raises(StoreError, match="not exactly a float32"):
        import_calochallenge(tmp_path / "f64.hdf5", "ds2", tmp_path / "s", progress=False)
    assert main(["data", "import-calochallenge", str(tmp_path / "ds2.hdf5"), "--geometry", "pxd", "--out",
                 str(tmp_path / "t")]) == 2
    assert "not a calorimeter" in capsys.readouterr().err


# The official CaloChallenge files as written down in docs/calorimeter.md (source: the
# CaloChallenge homepage repository, Dataset_creation.ipynb and README.md), kept here
# independently of uhg.data.calochallenge: dataset -> (dtype, shape after N, compression)
OFFICIAL = {"incident_energies": ("float64", (1,), "gzip"), "showers": ("float64", ("voxels",), "gzip")}


@pytest.mark.parametrize("geometry", ["ds1-photons", "ds1-pions", "ds2", "ds3"])
def test_export_matches_the_official_format(tmp_path, geometry):
    """Export a simulated store with uhg, read it back with plain h5py: every dataset's name,
    dtype, shape and compression are those of the official files, energies in MeV."""
    from uhg.data import create_store, write_part
    from uhg.data.calochallenge import dense_to_hits

    g = get_geometry(geometry)
    n = 6
    rng = np.random.default_rng(1)
    dense = np.where(rng.random((n, g.n_cells)) < 0.1, rng.exponential(30.0, (n, g.n_cells)), 0.0).astype(np.float32)
    energies_mev = 2.0 ** np.arange(10, 10 + n)
    batch = dense_to_hits(dense, energies_mev, g)
    create_store(tmp_path / "s", "calo", geometry, n, n,
                 conditions={"incident_energy": {"min": 2.0**10, "max": 2.0**15, "unit": "MeV"}})
    write_part(tmp_path / "s", 0, batch)
    assert main(["data", "export-calochallenge", str(tmp_path / "s"), "--out", str(tmp_path / "o.hdf5")]) == 0
    with h5py.File(tmp_path / "o.hdf5", "r") as h5:
        assert sorted(h5.keys()) == sorted(OFFICIAL)
        for name, (dtype, tail, compression) in OFFICIAL.items():
            ds = h5[name]
            assert str(ds.dtype) == dtype, name
            assert ds.shape == (n, *(g.n_cells if t == "voxels" else t for t in tail)), name
            assert ds.compression == compression, name
        energies, showers = h5["incident_energies"][:, 0], h5["showers"][:]
    assert np.array_equal(energies, energies_mev) and np.array_equal(showers, dense)  # MeV in, MeV out
