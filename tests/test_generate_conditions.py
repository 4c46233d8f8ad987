"""The rules `uhg generate`, `uhg overlay` and `uhg train` share, each defined once: beam currents
from the luminosity, condition units in stores, per-event energies, which run storage is remote,
and the UHG_ROOT folder a `ray job submit` command works in."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from uhg.data.hits import CONDITION_UNITS
from uhg.errors import ConditionError
from uhg.generate.conditions import condition_specs, event_conditions, with_beam_currents
from uhg.sim.pxd_machine import luminosity_for_currents
from uhg.train.ray_launch import RayRun, is_remote_storage, storage_root


def test_beam_currents_follow_the_luminosity_for_scalars_and_arrays() -> None:
    lum = np.array([1e34, 4e34])
    out = with_beam_currents({"luminosity": lum}, ["luminosity", "her_current", "ler_current"])
    assert out["her_current"].shape == (2,) and out["her_current"][1] == pytest.approx(4 * out["her_current"][0])
    np.testing.assert_allclose(luminosity_for_currents(out["her_current"], out["ler_current"]), lum)
    scalar = with_beam_currents({"luminosity": 2e34}, ["her_current"])
    assert set(scalar) == {"luminosity", "her_current"} and isinstance(scalar["her_current"], float)
    # given currents are kept; a generator that needs none gets none
    assert with_beam_currents({"luminosity": 2e34, "her_current": 1.0}, ["her_current"])["her_current"] == 1.0
    assert with_beam_currents({"luminosity": 2e34}, ["luminosity"]) == {"luminosity": 2e34}


def test_generated_stores_declare_conditions_in_the_shared_units() -> None:
    pixel = SimpleNamespace(condition_names=["luminosity"], kind="pixel")
    conds = event_conditions(pixel, 0, 3, seed=1, luminosity=2e34)
    specs = condition_specs(conds)
    assert {k: v["unit"] for k, v in specs.items()} == {k: CONDITION_UNITS[k] for k in
                                                         ("luminosity", "her_current", "ler_current", "beta_y_star")}
    with pytest.raises(ConditionError, match="--luminosity"):
        event_conditions(pixel, 0, 3, seed=1)


def test_calorimeter_energies_depend_only_on_seed_and_event() -> None:
    calo = SimpleNamespace(condition_names=["incident_energy"], kind="calo")
    whole = event_conditions(calo, 0, 10, seed=4, energy_min=1e3, energy_max=1e5)["incident_energy"]
    split = np.concatenate([event_conditions(calo, a, b, seed=4, energy_min=1e3, energy_max=1e5)["incident_energy"]
                            for a, b in ((0, 3), (3, 10))])
    assert np.array_equal(whole, split) and whole.min() >= 1e3 and whole.max() <= 1e5
    assert condition_specs({"incident_energy": whole})["incident_energy"]["unit"] == "MeV"


@pytest.mark.parametrize("storage, remote", [
    ("s3://bucket/runs", True), ("gs://bucket/runs", True), ("hdfs://nn/runs", True),
    ("/shared/runs", False), ("runs", False), ("file:///shared/runs", False),
])
def test_one_rule_says_which_run_storage_is_remote(storage: str, remote: bool) -> None:
    assert is_remote_storage(storage) is remote
    assert RayRun(storage, "r").is_remote is remote


def test_storage_root_keeps_object_store_uris_and_resolves_paths(tmp_path: Path) -> None:
    from uhg.config.loading import config_from_dict

    def root(storage: str) -> str:
        return storage_root(config_from_dict({
            "name": "n", "geometry": "pxd-tiny", "data": {"store": "s"}, "model": {"family": "gan"},
            "train": {"steps": 1, "batch_size": 1}, "distributed": {"storage_path": storage}}))

    assert root("s3://bucket/runs") == "s3://bucket/runs"
    assert root(str(tmp_path / "x" / ".." / "runs")) == str(tmp_path / "runs")


def test_uhg_root_is_entered_by_every_command_the_same_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from uhg.cli import main
    from uhg.errors import ConfigError
    from uhg.ray_connect import enter_uhg_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UHG_ROOT", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="UHG_ROOT=.*missing: no such directory"):
        enter_uhg_root()
    for command in (["generate", "--model", "m", "--events", "1", "--out", "o"],
                    ["overlay", "--signal", "s", "--out", "o", "--background", "b"]):
        assert main(command) == 2
        assert "no such directory on this node" in capsys.readouterr().err
    (tmp_path / "root").mkdir()
    monkeypatch.setenv("UHG_ROOT", str(tmp_path / "root"))
    enter_uhg_root()
    assert Path.cwd() == tmp_path / "root"


def test_machine_conditions_follow_the_scenario_the_model_was_trained_on() -> None:
    from uhg.sim.pxd_machine import load_scenario

    squeeze = load_scenario("squeeze")
    got = with_beam_currents({"luminosity": 1.6e36}, ["her_current", "ler_current", "beta_y_star"],
                             squeeze.model_dump(mode="json"))
    want = squeeze.conditions(1.6e36)
    assert {k: got[k] for k in want} == pytest.approx({k: float(v) for k, v in want.items()})
    design = with_beam_currents({"luminosity": 1.6e36}, ["her_current", "beta_y_star"])  # no scenario recorded
    assert design["beta_y_star"] == pytest.approx(load_scenario("design").conditions(1.6e36)["beta_y_star"])
    assert got["beta_y_star"] < design["beta_y_star"] and got["her_current"] < design["her_current"]
