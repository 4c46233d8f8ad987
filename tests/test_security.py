"""Security defaults: files from outside never run code when loaded, names from users never
leave their folders, services bind to loopback with an explicit Ray auth mode.

The malicious files are real pickles whose unpickling would create a marker file; each test
first shows that a plain `pickle`/`torch.load(weights_only=False)` of the same file does create
it (so the file is really malicious), then that uhg refuses it and the marker stays absent.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from uhg.errors import CheckpointError, ConditionError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this calls Path.touch(marker): arbitrary code, harmless here."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _proves_malicious(path: Path, marker: Path) -> None:
    """Unpickle `path` in a child process the unsafe way; the marker must appear."""
    probe = marker.parent / "probe.pt"  # torch.load hands *.safetensors files to safetensors
    shutil.copyfile(path, probe)
    code = f"import torch; torch.load({str(probe)!r}, weights_only=False)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert marker.exists(), f"the test file is not malicious: unsafe unpickling created no marker\n{done.stderr[-2000:]}"
    marker.unlink()


def _fake_checkpoint(ckpt: Path, marker: Path) -> Path:
    """A checkpoint whose engine state is a malicious pickle, with a manifest that matches it
    (whoever hands us a checkpoint controls the manifest too)."""
    from uhg.train.checkpoint import _commit

    tmp = ckpt.parent / f".{ckpt.name}.tmp"
    (tmp / "generator" / "state").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(3)}, "extra": _Payload(marker)},
               tmp / "generator" / "state" / "mp_rank_00_model_states.pt")
    (tmp / "trainer.json").write_text(json.dumps({"step": 10, "skipped_steps": 0, "events_seen": 20,
                                                  "world_size": 1, "seed": 1}))
    _commit(tmp, ckpt)
    return ckpt


class _Engine:
    """Stands in for a DeepSpeed engine; loading must be refused before any engine is asked."""

    def __init__(self) -> None:
        self.asked = False

    def load_checkpoint(self, *args: object, **kwargs: object) -> tuple[None, None]:
        self.asked = True
        return None, None


def test_malicious_pickle_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    from uhg.train.checkpoint import load_checkpoint, verify_checkpoint

    marker = tmp_path / "PWNED"
    ckpt = _fake_checkpoint(tmp_path / "checkpoints" / "step_000010", marker)
    verify_checkpoint(ckpt)  # sizes and CRCs match: only the pickle check stands in the way
    payload = ckpt / "generator" / "state" / "mp_rank_00_model_states.pt"
    _proves_malicious(payload, marker)

    engine = _Engine()
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: refused, nothing was loaded.*"
                                              r"could run code"):
        load_checkpoint(ckpt, {"generator": engine}, None, rank=0, world_size=1)
    assert not marker.exists()
    assert not engine.asked


def test_malicious_pickle_as_a_generator_export_is_refused(tmp_path: Path) -> None:
    from overlay_stores import export_untrained_gan

    from uhg.models.generator import Generator

    export = export_untrained_gan(tmp_path / "export", "pxd-tiny", z_dim=4, embed_dim=8, attention_layers=1,
                                  attention_heads=2, decoder_channels=[4, 4], discriminator_channels=[4, 4])
    Generator.load(export)  # the genuine export loads
    marker = tmp_path / "PWNED"
    weights = next(export.glob("*.safetensors"))
    torch.save({"w": _Payload(marker)}, weights)
    _proves_malicious(weights, marker)
    with pytest.raises(CheckpointError, match="corrupt weights"):
        Generator.load(export)
    assert not marker.exists()


def test_pickle_disguised_as_a_safetensors_checkpoint_file_is_refused(tmp_path: Path) -> None:
    from uhg.train.checkpoint import load_checkpoint

    marker = tmp_path / "PWNED"
    ckpt = _fake_checkpoint(tmp_path / "checkpoints" / "step_000010", marker)
    shutil.rmtree(ckpt / "generator")
    tmp = ckpt.parent / ".step_000010.tmp"
    shutil.copytree(ckpt, tmp)
    (tmp / "MANIFEST.json").unlink()
    torch.save({"w": _Payload(marker)}, tmp / "ema.safetensors")
    shutil.rmtree(ckpt)
    from uhg.train.checkpoint import _commit

    _commit(tmp, ckpt)
    with pytest.raises(CheckpointError, match="ema.safetensors: corrupt EMA weights"):
        load_checkpoint(ckpt, {}, {"w": torch.zeros(3)}, rank=0, world_size=1)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escaped", "a/b", "/abs", "..", ".hidden", "", "x y"])
def test_condition_names_cannot_leave_the_store(tmp_path: Path, name: str) -> None:
    from uhg.data import create_store

    with pytest.raises(ConditionError, match="condition name"):
        create_store(tmp_path / "s.zarr", "pixel", "pxd-tiny", 2, 2, {name: {"min": 0, "max": 1, "unit": "x"}})
    assert not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", "."])
def test_ray_run_names_cannot_leave_the_storage_path(tmp_path: Path, name: str) -> None:
    """`--run-name` is checked before Ray starts; `--resume NAME` without a slash too."""
    from uhg.config.loading import config_from_dict
    from uhg.train.ray_launch import resolve_run

    cfg = config_from_dict({"name": "n", "geometry": "pxd-tiny", "data": {"store": "s"}, "model": {"family": "gan"},
                            "train": {"steps": 1, "batch_size": 1},
                            "distributed": {"storage_path": str(tmp_path / "storage")}})
    with pytest.raises(ConfigError, match="run name"):
        resolve_run(cfg, run_name=name)
    if "/" not in name:
        with pytest.raises(ConfigError, match="run name"):
            resolve_run(cfg, resume=name)


def test_run_name_traversal_is_a_clear_cli_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("name: n\ngeometry: pxd-tiny\ndata: {store: s}\nmodel: {family: gan}\n"
                      "train: {steps: 1, batch_size: 1}\n")
    done = subprocess.run([str(Path(sys.executable).parent / "uhg"), "train", "--config", str(config),
                           "--run-name", "../../escaped"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "run name '../../escaped'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path.parent / "escaped").exists()


def test_check_name_rules() -> None:
    from uhg.paths import check_name

    assert check_name("run-1.2_a", "x") == "run-1.2_a"
    for bad in ["..", ".", "../x", "a/b", "a\\b", "", ".git", None, 5, "a\x00b"]:
        with pytest.raises(ConfigError):
            check_name(bad, "x")
    assert check_name("luminosity", "c", identifier=True) == "luminosity"
    with pytest.raises(ConfigError):
        check_name("lumi-nosity", "c", identifier=True)


def test_services_bind_to_loopback_with_token_auth_by_default() -> None:
    """What uhg starts itself: the local head script (dashboard/job API on 127.0.0.1, token
    auth unless RAY_AUTH_MODE says otherwise), Ray started by the launchers without a dashboard
    and with Ray's token-auth default left on, and the MLflow UI commands uhg prints bound to
    127.0.0.1. (At run time: tests/test_ray_auth.py.)"""
    script = (ROOT / "cluster" / "local.sh").read_text()
    assert "--dashboard-host 127.0.0.1" in script
    assert 'export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in script
    assert 'export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in (ROOT / "tools" / "env.sh").read_text()
    assert "--host 127.0.0.1" in script  # the mlflow ui command it prints
    connect = (ROOT / "uhg/ray_connect.py").read_text()  # how uhg train / generate / overlay start Ray
    assert "include_dashboard=False" in connect
    for module in ROOT.joinpath("uhg").rglob("*.py"):
        text = module.read_text()
        assert '"RAY_AUTH_MODE", "disabled"' not in text and "RAY_AUTH_MODE='disabled'" not in text, module
    demo = (ROOT / "uhg/cli/demo.py").read_text()
    assert "mlflow ui" not in demo or "--host 127.0.0.1" in demo


def test_numpy_inputs_are_read_without_pickle(tmp_path: Path) -> None:
    """Condition files for `uhg generate --conditions` are .npz: object arrays (pickles) are refused."""
    from uhg.generate.conditions import load_conditions

    marker = tmp_path / "PWNED"
    path = tmp_path / "conditions.npz"
    np.savez(path, luminosity=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(ConfigError, match="not a plain numeric .npz"):
        load_conditions(path, 1)
    assert not marker.exists()
