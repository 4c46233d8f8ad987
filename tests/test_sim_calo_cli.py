"""`uhg sim calo`: a real parallel run into a Zarr store, resumable and independent of --workers;
clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import typer

from uhg.cli.sim_calo import calo_command
from uhg.data.reader import open_store
from uhg.errors import ConditionError, ConfigError, GeometryError, UhgError
from uhg.geometry import get_geometry
from uhg.sim.calo import simulate_calo_showers


def _run(*args: str) -> None:
    """Invoke the command as the CLI does (user errors propagate as UhgError)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command("calo")(calo_command)

    @app.command("other")  # two commands keep typer from collapsing the group into one command
    def _other() -> None:
        pass

    app(args=["calo", *args], standalone_mode=False)


def test_parallel_run_writes_the_same_events_as_the_library(tmp_path):
    out = tmp_path / "showers.zarr"
    _run("--geometry", "ds2", "--energy-min", "1000", "--energy-max", "20000", "--events", "24",
         "--out", str(out), "--seed", "7", "--workers", "2", "--part-size", "8")
    store = open_store(out)
    assert len(store) == 24
    assert store.attrs["conditions"]["incident_energy"] == {"min": 1000.0, "max": 20000.0, "unit": "MeV"}
    assert store.attrs["provenance"]["seed"] == 7
    assert store.attrs["geometry"] == "ds2"
    assert store.attrs["attributes"]["energy_distribution"] == "log-uniform"
    expected = simulate_calo_showers(get_geometry("ds2"), 24, seed=7, energy_min=1000, energy_max=20000)
    got = store.read(0, 24)
    assert np.array_equal(got.offsets, expected.offsets)
    for k in ("layer", "cell", "value"):
        assert np.array_equal(got.columns[k], expected.columns[k])
    assert np.array_equal(got.conditions["incident_energy"], expected.conditions["incident_energy"])
    # rerunning the finished command is a no-op resume
    _run("--geometry", "ds2", "--energy-min", "1000", "--energy-max", "20000", "--events", "24",
         "--out", str(out), "--seed", "7", "--workers", "1", "--part-size", "8")
    assert len(open_store(out)) == 24


def test_digital_geometry_store(tmp_path):
    out = tmp_path / "epical.zarr"
    _run("--geometry", "epical-mini", "--energy-min", "1000", "--energy-max", "5000", "--events", "5",
         "--out", str(out))
    event = open_store(out)[3]
    assert len(event) > 0 and np.all(event.value == 1.0)
    assert 1000 <= event.conditions["incident_energy"] <= 5000


@pytest.mark.parametrize(("args", "error", "message"), [
    (["--geometry", "ds9"], GeometryError, "ds9"),
    (["--geometry", "pxd-tiny"], GeometryError, "calorimeter"),
    (["--geometry", "ds1-pions"], GeometryError, "pion"),
    (["--energy-min", "0"], ConditionError, "energy-min"),
    (["--energy-min", "5000", "--energy-max", "1000"], ConditionError, "must not exceed"),
    (["--events", "0"], ConfigError, "events"),
    (["--workers", "0"], ConfigError, "workers"),
])
def test_bad_input_is_a_clear_user_error(tmp_path, args, error, message):
    base = {"--geometry": "ds2", "--energy-min": "1000", "--energy-max": "2000", "--events": "3",
            "--out": str(tmp_path / "bad.zarr")}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    with pytest.raises(error, match=message) as info:
        _run(*[x for kv in base.items() for x in kv])
    assert isinstance(info.value, UhgError)
    assert not (tmp_path / "bad.zarr").exists()
