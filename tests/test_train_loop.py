"""The training loop in one process with real DeepSpeed engines: a run trains and exports,
resuming from a checkpoint reproduces the uninterrupted run's losses, non-finite losses stop
(or skip) with the step and loss named, and damaged checkpoints are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from uhg.config import load_config
from uhg.errors import CheckpointError, TrainingError
from uhg.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from uhg.train.hooks import LocalHooks, TrainHooks
from uhg.train.loop import train

CONFIG = """
name: tiny
seed: 3
geometry: pxd-tiny
data:
  store: {store}
  simulate: {{n_events: 24, part_size: 12, luminosity_min: 2.0e+35, luminosity_max: 4.0e+35}}
  validation_fraction: 0.25
  validation_events: 4
model: {{family: gan, embed_dim: 16, attention_layers: 1, attention_heads: 2, z_dim: 8, sensor_noise_dim: 2,
        decoder_channels: [8, 4], discriminator_channels: [4, 8], ema_decay: 0.9, physics_weight: 1.0}}
train: {{steps: 4, batch_size: 2, checkpoint_every: 2, keep_checkpoints: 2, log_every: 1, lr: 1.0e-3}}
tracking: {{enabled: false}}
"""


pytestmark = pytest.mark.usefixtures("world_of_one")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    path = root / "tiny.yaml"
    path.write_text(CONFIG.format(store=root / "tiny.zarr"))
    return path


class Recorder(TrainHooks):
    def __init__(self, resume: Path | None = None):
        self.resume, self.steps, self.checkpoints = resume, [], []

    def resume_dir(self) -> Path | None:
        return self.resume

    def on_step(self, step, metrics) -> None:
        self.steps.append(step)

    def on_checkpoint(self, ckpt_dir, step, metrics) -> None:
        assert (ckpt_dir / "MANIFEST.json").is_file()
        self.checkpoints.append((step, ckpt_dir.name))


def losses(history: list[dict], steps: list[int]) -> np.ndarray:
    by_step = {int(h["step"]): h for h in history}
    return np.array([[by_step[s]["loss_discriminator"], by_step[s]["loss_generator"]] for s in steps])


def test_resume_reproduces_the_uninterrupted_run(config_file: Path, tmp_path: Path) -> None:
    full_hooks = Recorder()
    full = train(load_config(config_file, [f"output_dir={tmp_path / 'full'}"]), hooks=full_hooks)
    assert full.step == 4 and full_hooks.steps == [1, 2, 3, 4]
    assert full_hooks.checkpoints == [(2, "step_000002"), (4, "step_000004")]
    assert [p.name for p in list_checkpoints(tmp_path / "full" / "checkpoints")] == ["step_000002", "step_000004"]
    ckpt = tmp_path / "full" / "checkpoints" / "step_000004"
    assert {p.name for p in ckpt.iterdir()} >= {"generator", "discriminator", "ema.safetensors", "rng",
                                                 "trainer.json", "MANIFEST.json"}
    assert set(json.loads((full.export / "generator.json").read_text())) >= {"family", "model", "condition_norm"}
    assert "val_occupancy_fake_pct" in full.validation
    # every step records how long it waited for its batch, and that wait's share of the step
    assert all(h["data_wait_s"] > 0 and 0 < h["data_wait_fraction"] < 1 for h in full.history)

    # interrupted after step 2, then resumed from that checkpoint to step 4
    half = train(load_config(config_file, [f"output_dir={tmp_path / 'half'}", "train.steps=2"]),
                 hooks=Recorder())
    assert half.step == 2
    # (read-ahead of batches by a background thread must not change what a step sees)
    resumed = train(load_config(config_file, [f"output_dir={tmp_path / 'half'}", "data.loader_workers=2"]),
                    hooks=LocalHooks(tmp_path / "half"))
    assert [int(h["step"]) for h in resumed.history] == [3, 4]
    np.testing.assert_allclose(losses(resumed.history, [3, 4]), losses(full.history, [3, 4]), rtol=1e-5, atol=1e-6)
    assert resumed.generator_fingerprint == pytest.approx(full.generator_fingerprint, rel=1e-5)
    # a finished run resumed again has nothing left to do
    again = train(load_config(config_file, [f"output_dir={tmp_path / 'half'}"]), hooks=LocalHooks(tmp_path / "half"))
    assert again.history == [] and again.step == 4


def test_nonfinite_loss_stops_or_skips(config_file: Path, tmp_path: Path) -> None:
    # a learning rate this large blows the weights up after one step: the next loss is not finite
    with pytest.raises(TrainingError, match=r"step \d+: loss_\w+ is (nan|inf|-inf) \(non-finite\)"):
        train(load_config(config_file, [f"output_dir={tmp_path / 'stop'}", "train.lr=1e30",
                                        "train.checkpoint_every=0"]), hooks=TrainHooks())
    with pytest.raises(TrainingError, match=r"steps skipped for non-finite losses, more than train.max_skipped_steps=1"):
        train(load_config(config_file, [f"output_dir={tmp_path / 'skip'}", "train.lr=1e30", "train.nonfinite=skip",
                                        "train.max_skipped_steps=1", "train.steps=6", "train.checkpoint_every=0"]),
              hooks=TrainHooks())
    assert latest_checkpoint(tmp_path / "stop" / "checkpoints") is None


def test_checkpoint_with_nonfinite_weights_is_refused(tmp_path: Path) -> None:
    from uhg.train.engine import PlainEngine

    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    engine = PlainEngine(module, torch.optim.Adam(module.parameters()))
    with pytest.raises(TrainingError, match=r"step 7: non-finite weights in generator; checkpoint not written"):
        save_checkpoint(tmp_path, 7, {"generator": engine}, None, {"step": 7}, rank=0, keep=2)
    assert not any(tmp_path.iterdir())


def test_damaged_checkpoint_is_refused_by_name(config_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(load_config(config_file, [f"output_dir={run}", "train.steps=2", "train.checkpoint_every=0"]),
          hooks=TrainHooks())
    ckpt = latest_checkpoint(run / "checkpoints")
    verify_checkpoint(ckpt)
    target = next(p for p in sorted((ckpt / "generator").rglob("*.pt")))
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{target.name}: truncated or modified"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=r"truncated"):
        train(load_config(config_file, [f"output_dir={run}", "train.steps=3"]), hooks=LocalHooks(run, resume=ckpt))
    (ckpt / "MANIFEST.json").unlink()
    assert latest_checkpoint(run / "checkpoints") is None  # an incomplete checkpoint is never resumed from
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        LocalHooks(run, resume=run).resume_dir()
