"""Faults injected into real `uhg train --local` runs (subprocesses on a tiny GAN).

Every test makes the run it damages (one module-wide training store is shared, read-only), so
each runs alone and in any order:
1. the training process is SIGKILLed mid-run; `--resume RUN` continues from the last complete
   checkpoint into the same MLflow run, steps continuous;
2. the training process is SIGKILLed while it writes a checkpoint: the half-written
   `.step_N.tmp` folder is never resumed from, `--resume` continues from the checkpoint before
   it into the same MLflow run and replaces the debris;
3. a byte of the newest checkpoint is flipped (same size): resuming stops with a message naming
   the file and the earlier checkpoints, nothing is loaded; resuming from the named earlier
   checkpoint then completes;
4. checkpointing onto a full disk (a 1.2 MB tmpfs): clear error, the previous checkpoint intact;
5. a corrupt Zarr chunk in the training store: the error names store, part, array and chunk;
6. a NaN condition injected into one event of the store: the run stops before its first step,
   naming store, condition and event.

Timings of each recovery are printed (`-s`) and reported in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tiny_gan import TINY_GAN_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

BIN = Path(sys.executable).parent
RUN = "tiny-fault"
CONFIG = """\
name: tiny-fault
geometry: pxd-tiny
seed: 3
data:
  store: {store}
  simulate: {{n_events: 24, part_size: 12, luminosity_min: 1.0e34, luminosity_max: 4.0e34}}
  validation_events: 4
""" + TINY_GAN_MODEL + """\
train:
  steps: 16
  batch_size: 2
  checkpoint_every: 4
  keep_checkpoints: 3
  log_every: 1
  zero_stage: 1
tracking:
  experiment: resilience
"""


def _uhg(workdir: Path, *args: str, timeout: float = 800) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # tiny model: one thread beats two on a busy 2-core machine
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.monotonic()
    done = subprocess.run([str(BIN / "uhg"), *args], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - t0


def _train(workdir: Path, *args: str, config: str = "configs/tiny.yaml") -> tuple[subprocess.CompletedProcess, float]:
    return _uhg(workdir, "train", "--local", "--config", config, *args)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("faults")
    (root / "configs").mkdir()
    (root / "configs" / "tiny.yaml").write_text(CONFIG.format(store="data/tiny.zarr"))
    from uhg.config import load_config
    from uhg.train.data import simulate_store

    cfg = load_config(root / "configs" / "tiny.yaml")
    simulate_store(root / "data" / "tiny.zarr", cfg.geometry, cfg.data.simulate, progress=False)
    yield root


def _mlflow_run(workdir: Path, experiment: str = "resilience"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")
    experiment = client.get_experiment_by_name(experiment)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one MLflow run across the kill and the resume, found {len(runs)}"
    return client, runs[0]


def _step(ckpt: Path) -> int:
    return int(json.loads((ckpt / "trainer.json").read_text())["step"])


def test_sigkilled_training_resumes_from_its_last_checkpoint(workdir: Path) -> None:
    from uhg.train.checkpoint import latest_checkpoint, verify_checkpoint

    ckpts = workdir / "runs" / RUN / "checkpoints"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # tiny model: one thread beats two on a busy 2-core machine
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([str(BIN / "uhg"), "train", "--local", "--config", "configs/tiny.yaml"], cwd=workdir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 800
        while not (ckpts / "step_000004" / "MANIFEST.json").is_file():
            assert proc.poll() is None, f"training ended before the kill:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 800 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    last = latest_checkpoint(ckpts)
    assert last is not None and 4 <= _step(last) < 16
    verify_checkpoint(last)  # the kill never leaves a complete-looking but damaged checkpoint
    assert not (workdir / "runs" / RUN / "export").exists()
    client, run = _mlflow_run(workdir)
    logged_before = max(m.step for m in client.get_metric_history(run.info.run_id, "loss_generator"))
    last_step = _step(last)
    lost_steps = logged_before - last_step

    done, resume_s = _train(workdir, "--resume", RUN)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "trained tiny-fault to step 16" in done.stdout
    client, run = _mlflow_run(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"].endswith(last.name)
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")})
    assert steps == list(range(1, 17)), "step numbering must continue without gaps"
    assert _step(latest_checkpoint(ckpts)) == 16
    print(f"\n[resilience] SIGKILL after step {logged_before} ({time.monotonic() - killed_at:.1f} s ago); "
          f"resumed from step {last_step} (lost {lost_steps} steps); resume to step 16 took {resume_s:.1f} s")


def test_killed_while_writing_a_checkpoint_resumes_from_the_one_before(workdir: Path) -> None:
    from uhg.train.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint

    run = "tiny-ckpt-kill"
    ckpts = workdir / "runs" / run / "checkpoints"
    partial = ckpts / ".step_000008.tmp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # tiny model: one thread beats two on a busy 2-core machine
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([str(BIN / "uhg"), "train", "--local", "--config", "configs/tiny.yaml", "--set",
                             f"name={run}", "--set", "tracking.experiment=resilience-ckpt-kill"], cwd=workdir,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 800
        # the step-8 checkpoint has begun: its folder holds a first file, the manifest is not written
        while not (partial.is_dir() and any(p.is_file() for p in partial.rglob("*"))):
            assert proc.poll() is None, f"training ended before the kill:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no step-8 checkpoint within 800 s"
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert partial.is_dir() and not (partial / "MANIFEST.json").exists(), "the kill came after the commit"
    assert not (ckpts / "step_000008").exists()
    assert [_step(p) for p in list_checkpoints(ckpts)] == [4], "a half-written checkpoint is listed"
    verify_checkpoint(latest_checkpoint(ckpts))

    done, resume_s = _train(workdir, "--set", f"name={run}", "--set", "tracking.experiment=resilience-ckpt-kill",
                            "--resume", run)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "to step 16" in done.stdout
    assert not partial.exists(), "the half-written checkpoint must be replaced"
    assert [_step(p) for p in list_checkpoints(ckpts)] == [8, 12, 16]
    for ckpt in list_checkpoints(ckpts):
        verify_checkpoint(ckpt)
    client, mlflow_run = _mlflow_run(workdir, "resilience-ckpt-kill")
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["resumed_from"].endswith("step_000004")
    steps = sorted({m.step for m in client.get_metric_history(mlflow_run.info.run_id, "loss_generator")})
    assert steps == list(range(1, 17))
    print(f"\n[resilience] SIGKILL while writing the step-8 checkpoint; resumed from step 4 to 16 in {resume_s:.1f} s")


def test_corrupt_checkpoint_is_never_loaded_and_the_earlier_one_resumes(workdir: Path) -> None:
    from uhg.errors import CheckpointError
    from uhg.train.checkpoint import list_checkpoints, verify_checkpoint

    run = "tiny-corrupt-ckpt"
    done, _ = _train(workdir, "--no-tracking", "--set", f"name={run}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    ckpts = workdir / "runs" / run / "checkpoints"
    assert [_step(p) for p in list_checkpoints(ckpts)] == [8, 12, 16]
    newest, previous = list_checkpoints(ckpts)[-1], list_checkpoints(ckpts)[-2]
    weights = newest / "generator" / "state" / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[int(len(data) * 0.6)] ^= 0xFF  # inside the tensor data: torch.load would not notice
    weights.write_bytes(bytes(data))

    done, _ = _train(workdir, "--no-tracking", "--set", f"name={run}", "--resume", run, "--set", "train.steps=18")
    assert done.returncode == 2, (done.stdout + done.stderr)[-4000:]
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    # paths as the run resolved them: relative to the working directory of the command
    assert str(weights.relative_to(workdir)) in message and "CRC-32" in message
    assert f"--resume {previous.relative_to(workdir)}" in message

    # a truncated file is named as such; so is a missing one
    damaged = ckpts.parent / "damaged"
    shutil.copytree(previous, damaged / previous.name)  # an intact one, damaged two other ways
    ema = damaged / previous.name / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"ema.safetensors: truncated or modified \(100 bytes"):
        verify_checkpoint(damaged / previous.name)
    shutil.copyfile(previous / "ema.safetensors", ema)
    (damaged / previous.name / "trainer.json").unlink()
    with pytest.raises(CheckpointError, match="trainer.json: file listed in the checkpoint manifest is missing"):
        verify_checkpoint(damaged / previous.name)
    shutil.rmtree(damaged)

    done, recover_s = _train(workdir, "--no-tracking", "--set", f"name={run}", "--resume", str(previous),
                             "--set", "train.steps=18")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "to step 18" in done.stdout
    assert [_step(p) for p in list_checkpoints(ckpts)][-2:] == [16, 18]
    verify_checkpoint(ckpts / "step_000016")  # rewritten from the good state, not the flipped file
    print(f"\n[resilience] corrupt step {_step(newest)} refused; resume from step {_step(previous)} "
          f"to 18 took {recover_s:.1f} s")


def test_full_disk_during_checkpointing_keeps_the_previous_checkpoint(workdir: Path, small_disk) -> None:
    from uhg.train.checkpoint import list_checkpoints, verify_checkpoint

    store = workdir / "data" / "tiny.zarr"
    (workdir / "configs" / "disk.yaml").write_text(CONFIG.format(store=store))
    run_dir = small_disk("1200k") / "run"
    done, elapsed = _train(workdir, "--no-tracking", "--set", f"output_dir={run_dir}", "--set", "train.steps=6",
                           "--set", "train.checkpoint_every=2", config="configs/disk.yaml")
    assert done.returncode == 2, (done.stdout + done.stderr)[-4000:]
    message = " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert "cannot write the checkpoint of step" in message and "No space left on device" in message
    assert "the previous checkpoint" in message and "is intact" in message
    good = list_checkpoints(run_dir / "checkpoints")
    assert good and _step(good[-1]) in (2, 4)
    for ckpt in good:
        verify_checkpoint(ckpt)
    assert not list((run_dir / "checkpoints").glob(".step_*.tmp")), "the partial checkpoint must be removed"
    print(f"\n[resilience] full disk: stopped after {elapsed:.1f} s with step {_step(good[-1])} intact")


def _copy_store(workdir: Path, name: str) -> Path:
    target = workdir / "data" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(workdir / "data" / "tiny.zarr", target)
    return target


def test_corrupt_chunk_in_the_training_store_is_named(workdir: Path) -> None:
    store = _copy_store(workdir, "corrupt.zarr")
    chunk = store / "parts" / "p000001" / "value" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (workdir / "configs" / "corrupt.yaml").write_text(CONFIG.format(store=store).replace("tiny-fault", "tiny-corrupt"))
    done, elapsed = _train(workdir, "--no-tracking", "--set", "train.steps=8", config="configs/corrupt.yaml")
    assert done.returncode == 2, (done.stdout + done.stderr)[-4000:]
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert f"store {store}, part 1, array 'value': chunk c/0 is corrupt" in message
    print(f"\n[resilience] corrupt chunk reported after {elapsed:.1f} s")


def test_nan_condition_in_the_store_is_named_before_training(workdir: Path) -> None:
    """One NaN written into a condition chunk behind uhg's back (write_part refuses NaN) used
    to make the condition normalisation NaN, so every step's loss was NaN: with
    nonfinite=skip the run skipped step after step. Now the run stops before the first step
    naming store, condition and event. (NaN losses from the optimisation itself, stop/skip and
    the refusal to checkpoint non-finite weights: tests/test_train_loop.py.)"""
    import zarr

    store = _copy_store(workdir, "nan.zarr")
    lumi = zarr.open_array(store / "parts" / "p000000" / "conditions" / "luminosity", mode="r+")
    lumi[5] = np.nan
    (workdir / "configs" / "nan.yaml").write_text(CONFIG.format(store=store).replace("tiny-fault", "tiny-nan"))
    done, elapsed = _train(workdir, "--no-tracking", "--set", "train.nonfinite=skip", config="configs/nan.yaml")
    assert done.returncode == 2, (done.stdout + done.stderr)[-4000:]
    assert "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert f"store {store}: condition 'luminosity' of event 5 is nan (1 non-finite values)" in message
    assert not (workdir / "runs" / "tiny-nan" / "checkpoints").exists()
    print(f"\n[resilience] NaN condition reported after {elapsed:.1f} s")
