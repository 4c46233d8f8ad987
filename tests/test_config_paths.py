"""Paths inside a config resolve relative to the config file (shipped configs: data and outputs
in the working directory), shipped configs and presets are addressable by name, and every input
check of `uhg train` fails before the training store is simulated or Ray is started."""

from __future__ import annotations

from pathlib import Path

import pytest

from uhg.cli import main
from uhg.config import load_config
from uhg.config.shipped import SHIPPED_DIR, find_config, shipped_configs
from uhg.errors import ConfigError
from uhg.eval.extrapolate import load_protocol
from uhg.sim.pxd_machine import load_scenario

RUN = """\
name: paths
geometry: pxd-tiny
data:
  store: {store}
  simulate: {{n_events: 8, part_size: 4, luminosity_min: 1.0e34, luminosity_max: 2.0e34, machine: {machine}}}
model: {{family: gan, z_dim: 8, embed_dim: 16, attention_heads: 2, decoder_channels: [8, 4],
        discriminator_channels: [4, 8]}}
train: {{steps: 1, batch_size: 2, deepspeed: {deepspeed}}}
evaluate: {{extrapolation: {protocol}}}
output_dir: out
tracking: {{enabled: false}}
"""
PROTOCOL = """\
geometry: pxd-tiny
condition: luminosity
training_range: [1.0e34, 2.0e34]
test_factors: [2.0]
"""


def _write(folder: Path, store: str = "data/x.zarr", deepspeed: str = "presets/z1.yaml",
           protocol: str = "protocol.yaml", machine: str = "scenarios/m.yaml") -> Path:
    (folder / "presets").mkdir(parents=True, exist_ok=True)
    (folder / "presets" / "z1.yaml").write_text("zero_optimization: {stage: 1}\n")
    (folder / "scenarios").mkdir(exist_ok=True)
    (folder / "scenarios" / "m.yaml").write_text((SHIPPED_DIR / "machine" / "squeeze.yaml").read_text())
    (folder / "protocol.yaml").write_text(PROTOCOL)
    path = folder / "run.yaml"
    path.write_text(RUN.format(store=store, deepspeed=deepspeed, protocol=protocol, machine=machine))
    return path


def test_paths_in_a_config_file_resolve_from_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _write(tmp_path / "project")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(config)
    folder = (tmp_path / "project").resolve()
    assert cfg.data.store == [folder / "data" / "x.zarr"]
    assert cfg.train.deepspeed == folder / "presets" / "z1.yaml"
    assert cfg.evaluate.extrapolation == folder / "protocol.yaml"
    assert cfg.output_dir == folder / "out"
    assert cfg.data.simulate.machine == str(folder / "scenarios" / "m.yaml")
    # a protocol's scenario files resolve from its folder too; scenario names stay names
    (folder / "protocol_m.yaml").write_text(PROTOCOL + "machine: [design, scenarios/m.yaml]\n")
    assert load_protocol(folder / "protocol_m.yaml").machine == ["design", str(folder / "scenarios" / "m.yaml")]
    # a relative path to the config itself works the same way
    monkeypatch.chdir(tmp_path)
    assert load_config("project/run.yaml").data.store == [folder / "data" / "x.zarr"]


def test_command_line_values_are_relative_to_the_working_directory(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config = _write(tmp_path / "project")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(config, ["data.simulate=null", "data.store=[a.zarr, /abs/b.zarr]", "output_dir=o", "train.deepspeed=zero1",
                               "distributed.storage_path=s3://bucket/runs", "evaluate.extrapolation=null"])
    assert cfg.data.store == [Path("a.zarr"), Path("/abs/b.zarr")]
    assert cfg.output_dir == Path("o")
    assert cfg.train.deepspeed == SHIPPED_DIR / "deepspeed" / "zero1.yaml"  # a bare name is a shipped preset
    assert str(cfg.distributed.storage_path).startswith("s3:/")
    assert cfg.evaluate.extrapolation is None


def test_shipped_configs_by_name_keep_data_in_the_working_directory(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config("pxd_gan_mini")
    assert cfg.name == "pxd_gan_mini"
    assert cfg.data.store == [Path("data/pxd_mini_bg_design.zarr")]  # not inside the package
    assert cfg.data.simulate.machine == str(SHIPPED_DIR / "machine" / "design.yaml")  # a shipped scenario by name
    assert load_scenario(cfg.data.simulate.machine).name == "design"
    assert cfg.train.deepspeed is not None and cfg.train.deepspeed.is_file()
    assert cfg.train.deepspeed.parent == SHIPPED_DIR / "deepspeed"
    assert find_config("pxd_gan_mini.yaml") == SHIPPED_DIR / "pxd_gan_mini.yaml"
    # the same file by its path in the repository (configs/ is the shipped folder) behaves alike
    repo_copy = load_config(Path(__file__).resolve().parents[1] / "configs" / "pxd_gan_mini.yaml")
    assert repo_copy.data.store == cfg.data.store and repo_copy.train.deepspeed == cfg.train.deepspeed
    names = {(c.kind, c.name) for c in shipped_configs()}
    assert {("run", "pxd_transformer_mini"), ("protocol", "extrapolate_pxd_luminosity"),
            ("deepspeed", "zero3")} <= names
    with pytest.raises(ConfigError, match=r"'pxd_gan_maxi' is neither a file nor a shipped run config .*pxd_gan_mini"):
        load_config("pxd_gan_maxi")
    with pytest.raises(ConfigError, match=r"train.deepspeed: 'zero9' is neither a file nor a shipped deepspeed config"):
        load_config("pxd_gan_mini", ["train.deepspeed=zero9"])
    with pytest.raises(ConfigError, match=r"data.simulate.machine: 'squeez' is neither a file nor a shipped machine config"):
        load_config("pxd_gan_mini", ["data.simulate.machine=squeez"])


@pytest.mark.parametrize("mode", [["--local"], []], ids=["local", "ray"])
def test_a_missing_preset_fails_before_the_store_is_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture, mode: list[str]) -> None:
    config = _write(tmp_path / "project", deepspeed="presets/missing.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["train", *mode, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.deepspeed: cannot read preset" in err and "presets/missing.yaml" in err
    assert not (tmp_path / "project" / "data").exists(), "the store was simulated before the check"


@pytest.mark.parametrize("mode", [["--local"], []], ids=["local", "ray"])
def test_missing_store_and_protocol_are_reported_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture, mode: list[str]) -> None:
    config = _write(tmp_path / "project", protocol="nowhere.yaml")
    assert main(["train", *mode, "--config", str(config)]) == 2
    assert "evaluate.extrapolation" in capsys.readouterr().err
    assert not (tmp_path / "project" / "data").exists()
    assert main(["train", *mode, "--config", str(config), "--set", "data.simulate=null",
                 "--set", "evaluate.extrapolation=null"]) == 2
    err = capsys.readouterr().err
    assert "data.store:" in err and str((tmp_path / "project" / "data" / "x.zarr").resolve()) in err
