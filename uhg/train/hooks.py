"""Callbacks through which a launcher (local CLI, torchrun, Ray Train) steers the loop.

The loop asks `resume_dir()` once at start, calls `on_step` after every optimiser step and
`on_checkpoint` on ALL ranks after all ranks finished writing a checkpoint (Ray Train reports
`Checkpoint.from_directory(ckpt_dir)` from every rank there).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from uhg.errors import CheckpointError


class TrainHooks:
    """Base hooks: start fresh, do nothing on events. Subclass and override what you need."""

    def resume_dir(self) -> Path | None:
        """A complete checkpoint directory to resume from, or None to start fresh."""
        return None

    def on_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """After optimiser step `step` (1-based) with this rank's metrics of that step."""

    def on_checkpoint(self, ckpt_dir: Path, step: int, metrics: Mapping[str, float]) -> None:
        """After every rank finished writing the checkpoint of `step` into `ckpt_dir`."""


class LocalHooks(TrainHooks):
    """Local runs: resume from `resume` (a run directory or checkpoint directory) if given,
    else from the latest complete checkpoint of this run's own directory, if any."""

    def __init__(self, run_dir: Path, resume: Path | None = None, fresh: bool = False):
        self.run_dir = Path(run_dir)
        self.resume = Path(resume) if resume is not None else None
        self.fresh = fresh

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
