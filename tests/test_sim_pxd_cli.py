"""`uhg sim pxd` and `uhg sim signal`: real (parallel) runs into Zarr stores that hold exactly
the library's events, with provenance and declared condition ranges; clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from uhg.cli import main
from uhg.cli.sim import L_CAL as CLI_L_CAL
from uhg.data.reader import open_store
from uhg.geometry import get_geometry
from uhg.sim import L_CAL, simulate_pxd_background, simulate_pxd_signal
from uhg.sim.pxd_machine import currents_for_luminosity


def _same(got, expected) -> None:
    assert np.array_equal(got.offsets, expected.offsets)
    for k in ("sensor", "row", "col", "value"):
        assert np.array_equal(got.columns[k], expected.columns[k])
    for k, v in expected.conditions.items():
        assert np.array_equal(got.conditions[k], v)


def test_pxd_store_in_parallel_parts_holds_the_library_events(tmp_path):
    out = tmp_path / "bkg.zarr"
    args = ["sim", "pxd", "--geometry", "pxd-tiny", "--luminosity", "2e35", "--luminosity-max", "1.6e36",
            "--events", "10", "--part-size", "3", "--seed", "5", "--out", str(out)]
    assert main([*args, "--workers", "2"]) == 0
    store = open_store(out)
    assert len(store) == 10 and store.attrs["geometry"] == "pxd-tiny"
    prov = store.attrs["provenance"]
    assert prov["seed"] == 5 and "command" in prov and prov["uhg_version"]
    conds = store.attrs["conditions"]
    assert conds["luminosity"] == {"min": 2e35, "max": 1.6e36, "unit": "cm^-2 s^-1"}
    her_hi, ler_hi = currents_for_luminosity(1.6e36)
    assert conds["ler_current"]["max"] == pytest.approx(float(ler_hi))
    expected = simulate_pxd_background(get_geometry("pxd-tiny"), 10, seed=5, luminosity=2e35, luminosity_max=1.6e36)
    _same(store.read(0, 10), expected)
    assert main([*args, "--workers", "1"]) == 0  # finished run: resuming is a no-op
    assert len(open_store(out)) == 10


def test_pxd_with_fixed_currents_and_signal_store(tmp_path):
    out = tmp_path / "bkg.zarr"
    assert main(["sim", "pxd", "--geometry", "pxd-tiny", "--events", "4", "--her-current", "1.2",
                 "--ler-current", "1.8", "--out", str(out)]) == 0
    event = open_store(out)[2]
    beta = 0.27 * np.sqrt(1.2 / 2.6 * 1.8 / 3.6)  # beta_y* that delivers L_CAL with these currents
    assert event.conditions == pytest.approx({"luminosity": L_CAL, "her_current": 1.2, "ler_current": 1.8,
                                              "beta_y_star": beta})
    sig = tmp_path / "signal.zarr"
    assert main(["sim", "signal", "--geometry", "pxd-tiny", "--events", "6", "--tracks-min", "1",
                 "--tracks-max", "3", "--seed", "2", "--out", str(sig)]) == 0
    store = open_store(sig)
    assert store.attrs["conditions"]["n_tracks"] == {"min": 1.0, "max": 3.0, "unit": "tracks"}
    _same(store.read(0, 6), simulate_pxd_signal(get_geometry("pxd-tiny"), 6, seed=2, tracks_min=1, tracks_max=3))


def test_cli_default_luminosity_is_the_calibration_point():
    assert CLI_L_CAL == L_CAL


@pytest.mark.parametrize(("args", "message"), [
    (["pxd", "--events", "0"], "--events must be a positive"),
    (["pxd", "--events", "-5"], "--events must be a positive"),
    (["pxd", "--events", "3", "--geometry", "pxd-huge"], "unknown geometry 'pxd-huge'"),
    (["pxd", "--events", "3", "--geometry", "ds2"], "needs a PXD geometry"),
    (["pxd", "--events", "3", "--luminosity", "-1e35"], "luminosity must be a positive"),
    (["pxd", "--events", "3", "--her-current", "2.0"], "both beam currents"),
    (["pxd", "--events", "3", "--luminosity", "1e35", "--luminosity-max", "1e34"], "luminosity_max"),
    (["signal", "--events", "3", "--tracks-min", "4", "--tracks-max", "1"], "--tracks-min"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, args, message):
    out = tmp_path / "x.zarr"
    assert main(["sim", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing half-written


def test_sim_group_lists_all_simulators(capsys):
    assert main(["sim", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("pxd", "signal", "calo"))
