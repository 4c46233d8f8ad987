"""Run configs: every shipped YAML validates; bad keys, types and batch arithmetic are rejected
with a message naming the file and the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from uhg.config import load_config
from uhg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GOOD = """
name: t
geometry: pxd-tiny
data: {store: data/x.zarr}
model: {family: gan, z_dim: 8}
train: {steps: 10, batch_size: 2}
"""


def write(tmp_path: Path, text: str = GOOD) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


RUN_CONFIGS = sorted([*(ROOT / "configs").glob("*gan*.yaml"), *(ROOT / "configs").glob("*transformer*.yaml")])


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name and cfg.train.batch_size >= 1
    if cfg.train.deepspeed is not None:
        preset = yaml.safe_load((ROOT / cfg.train.deepspeed).read_text())
        assert preset["zero_optimization"]["stage"] == cfg.train.zero_stage


def test_every_shipped_config_key_is_commented() -> None:
    for path in (ROOT / "configs").glob("*gan*.yaml"):
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
                assert "#" in line, f"{path.name}: uncommented key line {line!r}"


def test_overrides_are_yaml_parsed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path), ["train.steps=20", "model.conditions=[luminosity, her_current]",
                                        "data.store=[a.zarr, b.zarr]", "train.nonfinite=skip"])
    assert cfg.train.steps == 20
    assert cfg.model.conditions == ["luminosity", "her_current"]
    assert [p.name for p in cfg.data.store] == ["a.zarr", "b.zarr"]
    assert cfg.run_dir == Path("runs/t")


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.zdim: unknown key"):
        load_config(write(tmp_path), ["model.zdim=4"])
    with pytest.raises(ConfigError, match=r"train\.stepz: unknown key"):
        load_config(write(tmp_path, GOOD.replace("steps:", "stepz:")))


def test_wrong_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.steps: .*integer.*'many'"):
        load_config(write(tmp_path), ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train\.zero_stage"):
        load_config(write(tmp_path), ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"model\.family"):
        load_config(write(tmp_path), ["model.family=diffusion"])


def test_impossible_batch_arithmetic(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"global_batch_size \(7\) is not divisible by distributed.workers \(2\)"):
        load_config(write(tmp_path), ["train.batch_size=null", "train.global_batch_size=7", "distributed.workers=2"])
    with pytest.raises(ConfigError, match=r"batch_size \(3\) x distributed.workers \(2\) != train.global_batch_size \(8\)"):
        load_config(write(tmp_path), ["train.batch_size=3", "train.global_batch_size=8", "distributed.workers=2"])
    cfg = load_config(write(tmp_path), ["train.batch_size=null", "train.global_batch_size=8", "distributed.workers=2"])
    assert cfg.train.batch_size == 4
    assert cfg.batch_size_for(4) == 2
    with pytest.raises(ConfigError, match="not divisible by the world size"):
        cfg.batch_size_for(3)


def test_elastic_worker_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"distributed.min_workers \(3\) exceeds distributed.workers \(2\)"):
        load_config(write(tmp_path), ["distributed.workers=2", "distributed.min_workers=3"])
    # every size the elastic run may shrink to must split the global batch
    with pytest.raises(ConfigError, match=r"global_batch_size \(8\) is not divisible by 3 workers"):
        load_config(write(tmp_path), ["train.batch_size=null", "train.global_batch_size=8", "distributed.workers=4",
                                      "distributed.min_workers=2"])
    cfg = load_config(write(tmp_path), ["train.batch_size=null", "train.global_batch_size=12",
                                        "distributed.workers=4", "distributed.min_workers=2"])
    assert list(cfg.distributed.worker_counts) == [2, 3, 4] and cfg.batch_size_for(3) == 4


def test_other_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="geometry: .*unknown geometry 'pxd-huge'"):
        load_config(write(tmp_path), ["geometry=pxd-huge"])
    with pytest.raises(ConfigError, match="attention_heads"):
        load_config(write(tmp_path), ["model.attention_heads=3"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(write(tmp_path), ["train.steps"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="name: required key is missing"):
        load_config(write(tmp_path, GOOD.replace("name: t\n", "")))


def test_the_gan_takes_the_pooled_count_law_and_refuses_an_unknown_one():
    from pydantic import ValidationError

    from uhg.config.gan import GanConfig

    assert GanConfig(count_law="pooled", cluster_shapes=8, fit_from_data=True).count_law == "pooled"
    with pytest.raises(ValidationError, match="count_law\n.*'power', 'powers', 'quadratic' or 'pooled'"):
        GanConfig(count_law="unit_quadratic", cluster_shapes=8, fit_from_data=True)


def test_the_demo_trains_the_transformer_as_before_whatever_the_mini_config_ships():
    """`uhg demo` must end within 10 minutes and reach its cluster-size target with 150 steps
    at a constant rate and the last weights; the shipped mini config trains 2400 steps with an
    average of the weights for the in-range protocol, and its overrides must undo both."""
    from uhg.cli.demo import DEMO_TRAIN

    demo = load_config(ROOT / "configs/pxd_transformer_mini.yaml", DEMO_TRAIN["transformer"])
    assert (demo.train.steps, demo.train.lr_schedule, demo.train.warmup_steps, demo.model.ema_decay) == (
        150, "constant", 0, 0.0)
