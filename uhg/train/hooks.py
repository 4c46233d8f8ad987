"""Callbacks through which a launcher (local CLI, torchrun, Ray Train) steers the loop.

The loop asks `resume_dir()` once at start, calls `on_start` before the first step, `on_step`
after every optimiser step, `on_checkpoint` on ALL ranks after all ranks finished writing a
checkpoint (Ray Train reports `Checkpoint.from_directory(ckpt_dir)` from every rank there) and
`on_phase` when the run moves on to its end-of-run evaluation and when it is done.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from uhg.errors import CheckpointError
from uhg.train.progress import ProgressLine, ProgressTracker


class TrainHooks:
    """Base hooks: start fresh, do nothing on events. Subclass and override what you need."""

    progress: ProgressTracker | None = None
    """The run's progress line (rank 0 of launchers that show one), fed by the methods below."""

    def resume_dir(self) -> Path | None:
        """A complete checkpoint directory to resume from, or None to start fresh."""
        return None

    def on_start(self, step: int, total_steps: int) -> None:
        """Before the first step of this attempt (`step` > 0 after a resume)."""
        if self.progress is not None:
            self.progress.start(step, total_steps)

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """After optimiser step `step` (1-based) with this rank's metrics of that step."""
        if self.progress is not None:
            self.progress.step(step, metrics)

    def on_checkpoint(self, ckpt_dir: Path, step: int, metrics: Mapping[str, float]) -> None:
        """After every rank finished writing the checkpoint of `step` into `ckpt_dir`."""
        if self.progress is not None:
            self.progress.checkpoint(step)

    def on_phase(self, phase: str) -> None:
        """The run moved on: "evaluating" (end-of-run evaluation) or "done"."""
        if self.progress is not None:
            self.progress.phase(phase)
            if phase == "done":
                self.progress.close()


class LocalHooks(TrainHooks):
    """Local runs: resume from `resume` (a run directory or checkpoint directory) if given,
    else from the latest complete checkpoint of this run's own directory, if any. With
    `progress` (a run name), rank 0 draws the progress line on stderr."""

    def __init__(self, run_dir: Path, resume: Path | None = None, fresh: bool = False,
                 progress: str | None = None):
        self.run_dir = Path(run_dir)
        self.resume = Path(resume) if resume is not None else None
        self.fresh = fresh
        if progress is not None and int(os.environ.get("RANK", "0")) == 0:
            self.progress = ProgressTracker(progress, ProgressLine())

    def resume_dir(self) -> Path | None:
        from uhg.train.checkpoint import is_checkpoint, latest_checkpoint

        if self.resume is not None:
            if is_checkpoint(self.resume):
                return self.resume
            found = latest_checkpoint(self.resume / "checkpoints")
            if found is None:
                raise CheckpointError(f"{self.resume}: no complete checkpoint to resume from "
                                      f"(expected a checkpoint directory or a run directory with checkpoints/)")
            return found
        if self.fresh:
            return None
        return latest_checkpoint(self.run_dir / "checkpoints")
