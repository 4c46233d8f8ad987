"""`uhg train` shows one live progress line per run (step / total, losses, steps/s, ETA, last
checkpoint): redrawn in place on a terminal, a line every UHG_PROGRESS_INTERVAL seconds in a log;
Ray's and the libraries' own messages only with --verbose."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from uhg.train.progress import (
    ProgressFile,
    ProgressLine,
    ProgressState,
    ProgressTracker,
    describe,
    follow_file,
)

BIN = Path(sys.executable).parent
TINY = """\
name: tiny-progress
geometry: pxd-tiny
seed: 3
data:
  store: data/tiny.zarr
  simulate: {n_events: 24, part_size: 12, luminosity_min: 1.0e34, luminosity_max: 4.0e34}
  validation_events: 4
model: {family: gan, z_dim: 8, sensor_noise_dim: 2, embed_dim: 16, attention_layers: 1, attention_heads: 2,
        decoder_channels: [8, 4], discriminator_channels: [4, 8]}
train: {steps: 6, batch_size: 2, checkpoint_every: 3, log_every: 1}
distributed: {workers: 2, cpus_per_worker: 1}
tracking: {experiment: progress}
"""
# One progress line: name, step/total, a loss, steps/s, ETA or the end, the last checkpoint.
LINE = re.compile(r"tiny-progress  step (\d+)/6  .*loss_generator [-\d.e]+ .*steps/s.*(checkpoint step \d+|no checkpoint yet)")
RAY_CHATTER = ("PlacementGroupCleaner", "Reporting training result", "RayTrainWorker", "TrainController",
               "FutureWarning", "DeprecationWarning", "INFO mlflow")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_redraws_on_a_terminal_and_prints_every_interval_in_a_log() -> None:
    tty, log = _Terminal(), io.StringIO()
    for sink in (ProgressLine(tty), ProgressLine(log, interval_s=3600)):
        tracker = ProgressTracker("run", sink)
        tracker.start(0, 100)
        for step in range(1, 101):
            tracker.step(step, {"loss_g": 1.0 / step, "d_real": 0.3, "loss_d": 2.0, "loss_discriminator": 3.0,
                                "loss_y": 0})
            if step % 50 == 0:
                tracker.checkpoint(step)
        tracker.phase("done")
        tracker.close()
    # terminal: drawn in place (carriage returns), one line in the end
    assert tty.getvalue().count("\n") == 1 and "\r" in tty.getvalue()
    # the main losses first, at most three
    assert tty.getvalue().rstrip().split("\r")[-1].startswith("run  step 100/100  loss_discriminator 3  loss_g 0.01  loss_d 2")
    # log: the first state, the last step and the phase change, not one line per step
    lines = log.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == "run  step 0/100  no checkpoint yet"
    assert "loss_y" not in lines[1] and "steps/s" in lines[1] and "checkpoint step 50" in lines[1]
    assert lines[2].endswith("checkpoint step 100  done")
    state = ProgressState("r", 10, step=4, first_step=4, losses={"loss": 0.5}, steps_per_s=2.0, eta_s=3725.0,
                          checkpoint_step=4, phase="training")
    assert describe(state) == "r  step 4/10  (resumed at step 4)  loss 0.5  2 steps/s  ETA 1:02:05  checkpoint step 4"


def test_driver_follows_the_progress_file_of_rank_0(tmp_path: Path) -> None:
    log = io.StringIO()
    thread, stop = follow_file(tmp_path, ProgressLine(log, interval_s=0), ProgressState("r", 4), poll_s=0.05)
    tracker = ProgressTracker("r", ProgressFile(tmp_path, every_s=0))
    tracker.start(0, 4)
    for step in range(1, 5):
        tracker.step(step, {"loss": float(step)})
        time.sleep(0.2)
    tracker.checkpoint(4)
    tracker.phase("done")
    time.sleep(0.2)
    stop.set()
    thread.join(timeout=5)
    lines = log.getvalue().splitlines()
    assert lines[0] == "r  starting workers, data and model (4 steps)"
    assert any(line.startswith("r  step 2/4  loss 2") for line in lines)
    assert lines[-1].startswith("r  step 4/4  loss 4") and lines[-1].endswith("checkpoint step 4  done")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", **extra}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MLFLOW_LOGGING_LEVEL"):
        env.pop(name, None)
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "tiny.yaml").write_text(TINY)
    return tmp_path


@pytest.mark.slow
def test_local_run_shows_progress_in_a_log_and_on_a_terminal(workdir: Path) -> None:
    done = subprocess.run([str(BIN / "uhg"), "train", "--local", "--config", "tiny.yaml"], cwd=workdir,
                          env=_env(UHG_PROGRESS_INTERVAL="0"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    steps = [int(m.group(1)) for m in map(LINE.search, done.stderr.splitlines()) if m]
    assert steps[0] == 1 and steps[-1] == 6 and steps == sorted(steps), done.stderr
    assert "ETA" in done.stderr and "checkpoint step 3" in done.stderr
    assert done.stderr.rstrip().endswith("checkpoint step 6  done")
    assert not [w for w in RAY_CHATTER if w in done.stdout + done.stderr], done.stderr
    assert done.stdout.splitlines()[-1].startswith("trained tiny-progress to step 6")

    # on a terminal: one line redrawn in place (the rerun resumes at step 6 and trains to 8)
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(BIN / "uhg"), "train", "--local", "--config", "tiny.yaml", "--set", "train.steps=8",
                             "--no-tracking"], cwd=workdir, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=600)
    os.close(master)
    assert proc.returncode == 0, seen.decode(errors="replace")[-3000:]
    text = seen.decode(errors="replace")
    assert "(resumed at step 6)" in text and "\r" in text
    drawn = text.replace("\r\n", "\n").strip().split("\n")
    assert len(drawn) == 1, drawn  # every update redrew the same line
    assert drawn[0].split("\r")[-1].strip().startswith("tiny-progress  step 8/8")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_ray_run_shows_progress_without_ray_internals(workdir: Path) -> None:
    done = subprocess.run([str(BIN / "uhg"), "train", "--config", "tiny.yaml", "--run-name", "quiet"], cwd=workdir,
                          env=_env(UHG_PROGRESS_INTERVAL="0"), capture_output=True, text=True, timeout=800)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert not [w for w in RAY_CHATTER if w in out], out[-6000:]
    lines = done.stderr.splitlines()
    assert lines[0] == "quiet  starting workers, data and model (6 steps)", lines
    steps = [int(m.group(1)) for m in map(re.compile(r"^quiet  step (\d+)/6 .*steps/s").search, lines) if m]
    assert steps and steps[-1] == 6 and steps == sorted(steps), lines
    assert lines[-1].endswith("checkpoint step 6  done")
    assert done.stdout.startswith("Ray run quiet finished at step 6")
