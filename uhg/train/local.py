"""The in-process launcher behind `uhg train` (one process, or one rank under torchrun)."""

from __future__ import annotations

import os
from pathlib import Path

from uhg.config.schema import RunConfig
from uhg.train.hooks import LocalHooks
from uhg.train.loop import TrainResult, train


def resolve_resume(resume: str | Path | None) -> Path | None:
    """--resume RUN: a run directory, a checkpoint directory, or a run name under runs/."""
    if resume is None:
        return None
    p = Path(resume)
    if not p.exists() and (Path("runs") / str(resume)).exists():
        p = Path("runs") / str(resume)
    return p


def run_local(cfg: RunConfig, *, resume: str | Path | None = None, fresh: bool = False,
              tracking: bool | None = None, progress: bool = False) -> TrainResult:
    """Train `cfg` in this process (data-parallel when started by torchrun), with MLflow
    tracking on rank 0 when `cfg.tracking.enabled` (or `tracking`) is true. Resumes from
    `resume`, else from the run's own latest checkpoint unless `fresh`. With `progress`, rank 0
    draws the progress line on stderr."""
    hooks = LocalHooks(cfg.run_dir, resolve_resume(resume), fresh=fresh, progress=cfg.name if progress else None)
    use_tracking = cfg.tracking.enabled if tracking is None else tracking
    rank = int(os.environ.get("RANK", "0"))
    logger = None
    if use_tracking and rank == 0:
        from uhg.tracking.mlflow_logger import open_run

        logger = open_run(experiment=cfg.tracking.experiment, run_name=cfg.name,
                          tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", cfg.tracking.tracking_uri),
                          artifact_location=cfg.tracking.artifact_location, run_dir=cfg.run_dir,
                          system_metrics=False)
    status = "FAILED"
    try:
        result = train(cfg, hooks=hooks, logger=logger)  # ends with finish_run on rank 0
        status = "FINISHED"
        return result
    finally:
        if hooks.progress is not None:
            hooks.progress.close()  # a failed run: the error starts on a line of its own
        if logger is not None:
            logger.close(status)
