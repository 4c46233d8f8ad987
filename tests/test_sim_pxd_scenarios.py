"""Machine scenarios of the PXD background simulator: every shipped scenario validates and
simulates, `design` is the simulator as it was before scenarios existed (bit for bit), the
scenarios scale differently with luminosity, conditions are recorded with units, and bad
scenario files fail with the file and the key."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import yaml

from uhg.cli import main
from uhg.data.reader import open_store
from uhg.errors import ConfigError
from uhg.geometry import get_geometry
from uhg.sim.pxd_background import simulate_pxd_background
from uhg.sim.pxd_machine import CONDITIONS, SHIPPED_SCENARIOS, load_scenario, scenario_directory


def _digest(batch) -> str:
    h = hashlib.sha256()
    for k in ("sensor", "row", "col", "value"):
        h.update(np.ascontiguousarray(batch.columns[k]).tobytes())
    h.update(np.asarray(batch.offsets).tobytes())
    for k in ("luminosity", "her_current", "ler_current"):
        h.update(np.ascontiguousarray(batch.conditions[k]).tobytes())
    return h.hexdigest()


# Digests of the simulator's output before machine scenarios existed (hits, offsets and the
# luminosity and currents of every event), for a luminosity scan, the calibration point and
# fixed currents.
BEFORE_SCENARIOS = [
    (dict(n_events=12, seed=3, luminosity=2e35, luminosity_max=2.4e36),
     "d1596fe2a00d335bd7d550a5c2168bedf529804a90141e268e80878fb1d579e4"),
    (dict(n_events=4, seed=5), "9f4b5ec803187be59e65a90213d3f0984dff219de55f839dec83f485dc766da8"),
    (dict(n_events=4, seed=7, luminosity=5e35, her_current=1.3, ler_current=2.0),
     "9a225a23a6caf630102f361d92f24a48c952302e06dae9ab6a88aa806552b42e"),
]


@pytest.mark.parametrize(("kwargs", "digest"), BEFORE_SCENARIOS)
def test_design_scenario_is_the_simulator_before_scenarios(kwargs, digest):
    geometry = get_geometry("pxd-mini")
    default = simulate_pxd_background(geometry, **kwargs)
    assert _digest(default) == digest
    assert _digest(simulate_pxd_background(geometry, **kwargs, scenario="design")) == digest
    assert np.all(default.conditions["beta_y_star"] > 0)


@pytest.mark.parametrize("name", SHIPPED_SCENARIOS)
def test_every_shipped_scenario_validates_and_simulates(name):
    scenario = load_scenario(name)
    assert scenario.name == name
    assert load_scenario(scenario_directory() / f"{name}.yaml") == scenario
    batch = simulate_pxd_background(get_geometry("pxd-tiny"), 3, seed=1, luminosity=4e35,
                                    luminosity_max=1.6e36, scenario=name)
    assert set(batch.conditions) == set(CONDITIONS) and batch.offsets[-1] > 0
    cond = batch.conditions
    # the recorded conditions deliver the recorded luminosity (L ~ sqrt(I_LER I_HER) / beta_y*)
    lum = 8e35 * np.sqrt(cond["her_current"] / 2.6 * cond["ler_current"] / 3.6) * 0.27 / cond["beta_y_star"]
    assert lum == pytest.approx(cond["luminosity"], rel=1e-12)


def _occupancy(name: str, luminosity: float) -> float:
    geometry = get_geometry("pxd-tiny")
    batch = simulate_pxd_background(geometry, 40, seed=9, luminosity=luminosity, scenario=name)
    return batch.offsets[-1] / 40 / (40 * geometry.pixels_per_sensor)


def test_scenarios_scale_with_different_exponents():
    exponent = {n: np.log(_occupancy(n, 2.4e36) / _occupancy(n, 2e35)) / np.log(12.0) for n in SHIPPED_SCENARIOS}
    order = sorted(exponent, key=exponent.get)
    assert order == ["luminosity-dominated", "squeeze", "design", "high-vacuum"], exponent
    assert min(np.diff(sorted(exponent.values()))) > 0.08, exponent


def test_store_records_every_condition_with_units(tmp_path):
    out = tmp_path / "squeeze.zarr"
    assert main(["sim", "pxd", "--geometry", "pxd-tiny", "--machine", "squeeze", "--luminosity", "2e35",
                 "--luminosity-max", "8e35", "--events", "4", "--seed", "2", "--out", str(out)]) == 0
    store = open_store(out)
    declared = store.attrs["conditions"]
    assert {k: v["unit"] for k, v in declared.items()} == {
        "luminosity": "cm^-2 s^-1", "her_current": "A", "ler_current": "A", "beta_y_star": "mm"}
    assert store.attrs["attributes"]["machine"]["name"] == "squeeze"
    events = store.read(0, 4)
    for name in CONDITIONS:
        assert declared[name]["min"] <= events.conditions[name].min() * (1 + 1e-12)
        assert events.conditions[name].max() <= declared[name]["max"] * (1 + 1e-12)
    expected = simulate_pxd_background(get_geometry("pxd-tiny"), 4, seed=2, luminosity=2e35, luminosity_max=8e35,
                                       scenario="squeeze")
    assert np.array_equal(events.columns["row"], expected.columns["row"])
    # squeeze: beta_y* falls as the luminosity rises
    order = np.argsort(events.conditions["luminosity"])
    assert np.all(np.diff(events.conditions["beta_y_star"][order]) < 0)


def _write(tmp_path, mutate) -> str:
    raw = yaml.safe_load((scenario_directory() / "design.yaml").read_text())
    mutate(raw)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r["processes"]["touschek"].update(speed=1), "processes.touschek.speed: unknown key"),
    (lambda r: r["processes"]["touschek"]["rate"][0]["powers"].update(temperature=1.0),
     "processes.touschek.rate.0.powers.temperature"),
    (lambda r: r["processes"]["touschek"]["rate"][0].update(weight=0.5), "rate weights must sum to 1"),
    (lambda r: r["processes"]["synchrotron"]["share"].update(layer1=0.3), "layer1 shares must sum to 1"),
    (lambda r: r["machine"].update(current_exponent=-1), "machine.current_exponent"),
    (lambda r: r["processes"].pop("beam_gas"), "processes.beam_gas"),
])
def test_bad_scenario_names_file_and_key(tmp_path, mutate, message):
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_scenario(path)
    assert path in str(err.value) and message in str(err.value)


def test_custom_scenario_file_and_cli_errors(tmp_path, capsys):
    def steeper(raw):
        raw["name"] = "steeper"
        raw["processes"]["synchrotron"]["rate"][0]["powers"] = {"her_current": 2.5}

    path = _write(tmp_path, steeper)
    batch = simulate_pxd_background(get_geometry("pxd-tiny"), 2, seed=0, luminosity=1.6e36, scenario=path)
    assert len(batch) == 2
    for machine, message in (("nonsense", "neither a shipped scenario"),
                             (_write(tmp_path, lambda r: r.update(colour="red")), "colour: unknown key")):
        assert main(["sim", "pxd", "--geometry", "pxd-tiny", "--events", "2", "--machine", machine,
                     "--out", str(tmp_path / "x.zarr")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
