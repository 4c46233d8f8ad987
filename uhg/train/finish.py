"""The end of every training run, the same for `uhg train --local`, torchrun and Ray Train.

`finish_run` runs on rank 0 after the export and after the last barrier (no collective follows):
1. a resumed run is tagged `uhg.resumed_from_step` (the step its last attempt started from);
2. the export goes into the MLflow run: registered as a new version of
   `tracking.registered_model_name` (files under artifact folder `generator/`), else logged as
   artifact folder `generator/` alone;
3. loss curves from the run's stored metric history (restarts included): plots/loss_curves.png;
4. the evaluation of `uhg.train.evaluation.evaluate_run`: one held-out sample for the physics
   plots (plots/*.png) and, with `evaluate.final`, the held-out report; with
   `evaluate.extrapolation`, the zero-shot protocol.
Without tracking (a `NullLogger`), only the evaluation the config asks for runs, into the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uhg.config.schema import RunConfig
from uhg.tracking.logger import NullLogger, RunLogger
from uhg.train.evaluation import RunEvaluation, evaluate_run


def finish_run(cfg: RunConfig, export: Path, data: Any, logger: RunLogger, *, step: int,
               resumed_step: int | None = None, device: str = "cpu", protocol: Any = None) -> RunEvaluation:
    """Track and evaluate the finished run (see the module docstring). `data` is the run's
    uhg.train.data.TrainingData, `protocol` the loaded `evaluate.extrapolation` or None."""
    tracked = not isinstance(logger, NullLogger)
    if tracked:
        if resumed_step is not None:
            logger.set_tags({"uhg.resumed_from_step": str(resumed_step)})
        name = cfg.tracking.registered_model_name
        if name:
            version = logger.register_model(export, name, alias=cfg.tracking.alias)
            print(f"[uhg] registered {name} version {version}"
                  + (f" as @{cfg.tracking.alias}" if cfg.tracking.alias else ""), flush=True)
        else:
            logger.log_artifact(export, "generator")
        logger.log_loss_curves()
    return evaluate_run(cfg, export, data, logger=logger if tracked else None, step=step, device=device,
                        protocol=protocol, physics_plots=tracked)
