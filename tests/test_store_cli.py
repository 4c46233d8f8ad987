"""`uhg data info` on real stores, for people (tables) and scripts (--json)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from uhg.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from test_store import ENERGY, LUMI, calo_events, pixel_events, write_all  # noqa: E402


def test_info_json_pixel(tmp_path, capsys):
    batch = pixel_events("pxd-tiny", 0, 30)
    write_all(tmp_path / "s", "pixel", "pxd-tiny", batch, 10, LUMI)
    assert main(["data", "info", str(tmp_path / "s"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["events"] == 30
    assert info["parts"] == {"total": 3, "complete": 3, "missing": [], "part_size": 10, "in_progress": 0}
    assert info["hits"] == batch.n_hits
    assert info["hits_per_event"]["max"] == batch.hits_per_event.max()
    assert np.isclose(info["occupancy"], batch.n_hits / 30 / 30720)
    per_sensor = np.bincount(batch.columns["sensor"], minlength=40) / 30 / (16 * 48)
    assert np.allclose(list(info["occupancy_per_sensor"].values()), per_sensor)
    assert set(info["occupancy_per_layer"]) == {"1", "2"}
    lumi = info["conditions"]["luminosity"]
    assert lumi["min"] == batch.conditions["luminosity"].min() and lumi["declared_max"] == 1e35
    assert info["bytes_per_hit"] > 0 and info["disk_bytes"] > 0 and "Delta" in info["compression"]["channel"]


def test_info_calo_incomplete_and_tables(tmp_path, capsys):
    from uhg.data import create_store, write_part

    batch = calo_events("ds2", 0, 20)
    create_store(tmp_path / "c", "calo", "ds2", 20, 10, ENERGY)
    write_part(tmp_path / "c", 1, batch.slice(10, 20))
    assert main(["data", "info", str(tmp_path / "c"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["events"] == 10 and info["parts"]["missing"] == [0]
    part = batch.slice(10, 20)
    assert np.isclose(sum(info["energy_per_layer_mev"]), part.columns["value"].sum(dtype=np.float64) / 10)
    # the human view goes through the installed console script
    out = subprocess.run([sys.executable, "-m", "uhg", "data", "info", str(tmp_path / "c")],
                         capture_output=True, text=True, check=True).stdout
    assert "1 of 2 complete" in out and "incident_energy" in out


def test_info_errors(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
