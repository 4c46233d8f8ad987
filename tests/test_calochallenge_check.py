"""Exported calorimeter stores meet the input checks of the CaloChallenge evaluation script:
generated showers of every CaloChallenge geometry pass `uhg data check-calochallenge`, a voxel
lands where HighLevelFeatures looks for it, and malformed files are refused by name."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_generate_model import make_export

from uhg.cli import main
from uhg.data import HitBatch, create_store, write_part
from uhg.data.calochallenge import (
    CALOCHALLENGE_DATASETS,
    check_calochallenge_file,
    export_calochallenge,
)
from uhg.errors import GeometryError, StoreError
from uhg.geometry import get_geometry

GEOMETRIES = ["ds1-photons", "ds1-pions", "ds2", "ds3"]


def hlf_layout(binning: str) -> tuple[list[int], list[np.ndarray], list[np.ndarray], list[int], list[int]]:
    """Voxel layout as the CaloChallenge XMLHandler / HighLevelFeatures build it from the binning
    XML, written independently of uhg.geometry: bin_edges (first voxel of each layer), x (eta) and
    y (phi) of every voxel of each layer in file order, n_alpha and n_r per layer."""
    root = ET.fromstring(resources.files("uhg.geometry").joinpath("data", binning).read_text())
    bin_edges, xs, ys, n_alphas, n_rs = [0], [], [], [], []
    for particle in root:  # XMLHandler: layers in document order
        for layer in particle:
            r_edges = [float(v) for v in layer.attrib["r_edges"].split(",")]
            n_r, n_alpha = len(r_edges) - 1, int(layer.attrib["n_bin_alpha"])
            bin_edges.append(bin_edges[-1] + n_r * n_alpha)
            alpha_edges = np.linspace(-math.pi, math.pi, n_alpha + 1)
            alpha_mid = (alpha_edges[:-1] + alpha_edges[1:]) / 2
            r_mid = [(r_edges[i] + r_edges[i + 1]) / 2 for i in range(n_r)]
            # XMLHandler.fill_r_a_lists: alpha outer loop, r inner loop
            r = np.array([r_mid[i] for _ in range(n_alpha) for i in range(n_r)])
            a = np.array([alpha_mid[j] for j in range(n_alpha) for _ in range(n_r)])
            xs.append(r * np.cos(a))
            ys.append(r * np.sin(a))
            n_alphas.append(n_alpha)
            n_rs.append(n_r)
    return bin_edges, xs, ys, n_alphas, n_rs


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_generated_showers_pass_the_evaluation_input_checks(tmp_path: Path, geometry: str) -> None:
    export = make_export(tmp_path / "export", geometry)
    store, h5 = tmp_path / "gen.zarr", tmp_path / "gen.hdf5"
    assert main(["generate", "--model", str(export), "--events", "2", "--out", str(store),
                 "--energy-min", "1000", "--energy-max", "50000", "--batch-size", "2"]) == 0
    assert main(["data", "export-calochallenge", str(store), "--out", str(h5)]) == 0

    dataset = next(d for d in CALOCHALLENGE_DATASETS.values() if d.geometry == geometry)
    result = check_calochallenge_file(h5, dataset.name)
    assert result.n_events == 2 and result.dataset.n_voxels == get_geometry(geometry).n_cells
    with h5py.File(h5, "r") as f:
        assert sorted(f.keys()) == ["incident_energies", "showers"]
        assert f["incident_energies"].shape == (2, 1) and f["showers"].shape == (2, dataset.n_voxels)
        assert f["showers"].dtype == np.float64 and np.all(f["showers"][:] >= 0)
        assert np.all((f["incident_energies"][:] >= 1000) & (f["incident_energies"][:] <= 50000))
    assert main(["data", "check-calochallenge", str(h5), "--dataset", geometry]) == 0


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_voxel_lands_where_high_level_features_expects_it(tmp_path: Path, geometry: str) -> None:
    """Per active layer one shower with energy in one voxel (alpha and radial bins > 0 where the
    layer has them): after export it sits at bin_edges[layer] + alpha * n_r + r, and the layer's
    centre of energy computed the HighLevelFeatures way is the voxel's centre in uhg's geometry."""
    g = get_geometry(geometry)
    dataset = next(d for d in CALOCHALLENGE_DATASETS.values() if d.geometry == geometry)
    bin_edges, xs, ys, n_alphas, n_rs = hlf_layout(dataset.binning)
    assert bin_edges[-1] == dataset.n_voxels == g.n_cells
    layers = [layer for layer in range(len(n_rs)) if n_rs[layer] * n_alphas[layer] > 0]
    assert tuple(layers) == g.active_layers
    picks = [(layer, n_alphas[layer] - 1 if n_alphas[layer] > 1 else 0, min(n_rs[layer] - 1, 2)) for layer in layers]
    n = len(picks)
    cells = np.array([a * n_rs[layer] + r for layer, a, r in picks])
    energies = np.full(n, 2.0**12)
    batch = HitBatch("calo", {"layer": np.array([p[0] for p in picks]), "cell": cells,
                              "value": np.arange(1, n + 1, dtype=np.float32) * 100},
                     np.arange(n + 1, dtype=np.int64), {"incident_energy": energies})
    create_store(tmp_path / "s.zarr", "calo", geometry, n, n,
                 conditions={"incident_energy": {"min": 2.0**12, "max": 2.0**12, "unit": "MeV"}})
    write_part(tmp_path / "s.zarr", 0, batch)
    export_calochallenge(tmp_path / "s.zarr", tmp_path / "s.hdf5", progress=False)
    check_calochallenge_file(tmp_path / "s.hdf5", dataset.name)
    with h5py.File(tmp_path / "s.hdf5", "r") as f:
        showers = f["showers"][:]
    for i, (layer, a, r) in enumerate(picks):
        index = bin_edges[layer] + a * n_rs[layer] + r
        assert np.flatnonzero(showers[i]).tolist() == [index]
        assert showers[i, index] == (i + 1) * 100
        # HighLevelFeatures.CalculateFeatures: layer slice, then centre of energy from eta/phi_all_layers
        layer_data = showers[i:i + 1, bin_edges[layer]:bin_edges[layer + 1]]
        ec_x = (xs[layer] * layer_data).sum(axis=-1) / layer_data.sum(axis=-1)
        ec_y = (ys[layer] * layer_data).sum(axis=-1) / layer_data.sum(axis=-1)
        cx, cy = g.cell_centers(layer)
        assert ec_x[0] == pytest.approx(cx[cells[i]], abs=1e-6) and ec_y[0] == pytest.approx(cy[cells[i]], abs=1e-6)


def write(path: Path, showers: np.ndarray, energies: np.ndarray, compression: str | None = "gzip",
          **extra: np.ndarray) -> Path:
    """A file written the way the official ones were: h5py create_dataset(..., compression='gzip')."""
    with h5py.File(path, "w") as f:
        f.create_dataset("showers", data=showers, compression=compression if showers.ndim else None)
        f.create_dataset("incident_energies", data=energies, compression=compression if energies.ndim else None)
        for k, v in extra.items():
            f[k] = v
    return path


def good(n: int = 4, voxels: int = 368) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    energies = 2.0 ** rng.integers(8, 23, (n, 1))
    showers = np.zeros((n, voxels))
    showers[:, :10] = energies / 10  # E_tot = E_inc
    return showers, energies.astype(np.float64)


def test_malformed_files_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    showers, energies = good()
    ok = write(tmp_path / "ok.h5", showers, energies, extra_key=np.zeros(3))
    assert check_calochallenge_file(ok, "1-photons").n_events == 4  # extra datasets are ignored, as by evaluate.py

    with h5py.File(tmp_path / "key.h5", "w") as f:
        f["shower"] = showers
        f["incident_energies"] = energies
    with pytest.raises(StoreError, match=r"key.h5 \(CaloChallenge dataset 1-photons\): dataset 'showers' is missing "
                                         r"\(found \['incident_energies', 'shower'\]\)"):
        check_calochallenge_file(tmp_path / "key.h5", "1-photons")
    with pytest.raises(GeometryError, match="has 368 voxels per shower, expected 533"):
        check_calochallenge_file(ok, "1-pions")
    with pytest.raises(StoreError, match=r"'incident_energies' has shape \(4,\), expected \(4, 1\)"):
        check_calochallenge_file(write(tmp_path / "flat.h5", showers, energies[:, 0]), "1-photons")
    with pytest.raises(StoreError, match="number of energies 3 does not match the number of showers 4"):
        check_calochallenge_file(write(tmp_path / "n.h5", showers, energies[:3]), "1-photons")
    with pytest.raises(StoreError, match=r"'showers' has shape \(1472,\)"):
        check_calochallenge_file(write(tmp_path / "1d.h5", showers.reshape(-1), energies), "1-photons")

    negative = showers.copy()
    negative[2, 7] = -1.5
    with pytest.raises(StoreError, match=r"shower 2, voxel 7 has energy -1.5; voxel energies must be finite and >= 0"):
        check_calochallenge_file(write(tmp_path / "neg.h5", negative, energies), "1-photons")
    nan = showers.copy()
    nan[1, 0] = np.nan
    with pytest.raises(StoreError, match="shower 1, voxel 0 has energy nan"):
        check_calochallenge_file(write(tmp_path / "nan.h5", nan, energies), "1-photons")
    zero_e = energies.copy()
    zero_e[3] = 0
    with pytest.raises(StoreError, match=r"incident energy of event 3 is 0.0 .*log10\(E_inc\) in MeV"):
        check_calochallenge_file(write(tmp_path / "e0.h5", showers, zero_e), "1-photons")
    with pytest.raises(StoreError, match="'showers' has dtype int32, the official files hold float64"):
        check_calochallenge_file(write(tmp_path / "int.h5", showers.astype(np.int32), energies), "1-photons")
    # float32 energies and showers: what evaluate.py's float64 classifiers fail on
    with pytest.raises(StoreError, match="'incident_energies' has dtype float32, the official files hold float64 "
                                         r"\(evaluate.py trains its classifiers in float64\)"):
        check_calochallenge_file(write(tmp_path / "f32.h5", showers.astype(np.float32),
                                       energies.astype(np.float32)), "1-photons")
    with pytest.raises(StoreError, match="'showers' has dtype float32, the official files hold float64"):
        check_calochallenge_file(write(tmp_path / "s32.h5", showers.astype(np.float32), energies), "1-photons")
    # uncompressed: refused unless lenient
    raw = write(tmp_path / "raw.h5", showers, energies, compression=None)
    with pytest.raises(StoreError, match="'incident_energies' is stored with compression None, the official files use 'gzip'"):
        check_calochallenge_file(raw, "1-photons")
    assert "compression None" in check_calochallenge_file(raw, "1-photons", strict=False).warnings[0]

    # a whole file in GeV: incident energies below the dataset's range, with the hint
    gev = write(tmp_path / "gev.h5", showers / 1000, energies / 1000)
    with pytest.raises(StoreError, match=r"\d of 4 incident energies lie outside the dataset's range \[256, 4194304\] "
                                         r"MeV .*they look like GeV: the CaloChallenge uses MeV \(multiply by 1000\)"):
        check_calochallenge_file(gev, "1-photons")
    # showers in GeV, energies in MeV: the response is 1000x off
    with pytest.raises(StoreError, match=r"median E_tot / E_inc is 0.001, ~1000x off 1"):
        check_calochallenge_file(write(tmp_path / "gev_showers.h5", showers / 1000, energies), "1-photons")
    # --lenient (an extrapolation study beyond the dataset's range) turns these into warnings
    lenient = check_calochallenge_file(gev, "1-photons", strict=False)
    assert "look like GeV" in lenient.warnings[0] and "below the readout minimum 1 MeV" in lenient.warnings[1]

    assert main(["data", "check-calochallenge", str(gev), "--dataset", "1-photons"]) == 2
    assert "look like GeV" in capsys.readouterr().err
    assert main(["data", "check-calochallenge", str(gev), "--dataset", "1-photons", "--lenient"]) == 0
    assert main(["data", "check-calochallenge", str(ok), "--dataset", "4"]) == 2
    assert "'4' is not a CaloChallenge dataset; known: 1-photons (ds1-photons)" in capsys.readouterr().err
    assert main(["data", "check-calochallenge", str(tmp_path / "nope.h5"), "--dataset", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_readout_minimum_is_a_warning(tmp_path: Path) -> None:
    showers, energies = good(voxels=6480)
    showers = showers.astype(np.float32)  # DS2/DS3 showers may be float32
    energies = np.full_like(energies, 5e4)
    showers[:, :10] = 5e3
    showers[0, 20] = 1e-3  # 1 keV: below the 15.15 keV readout minimum of DS2
    result = check_calochallenge_file(write(tmp_path / "ds2.h5", showers, energies), "ds2")
    assert result.median_response == pytest.approx(1.0)
    assert result.warnings == ["1 of 41 non-zero voxels lie below the readout minimum 0.01515 MeV of the dataset "
                               "(the evaluation's log-scale histograms start there)"]
