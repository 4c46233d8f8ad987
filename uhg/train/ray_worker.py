"""The function every Ray Train worker runs: rebuild the config, set up tracking on rank 0,
run the training loop, register the generator export.

Heavy and GPU-specific imports (torch, deepspeed via the loop, mlflow) happen here, inside
the worker, never in the driver: the Ray Train controller may run on a CPU-only node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

RESTARTS_TAG = "uhg.attempts"


def worker_main(loop_config: dict[str, Any]) -> None:
    import ray.train

    from uhg.config.loading import config_from_dict
    from uhg.tracking.logger import NullLogger, RunLogger
    from uhg.train.loop import train
    from uhg.train.ray_hooks import RayHooks

    root = Path(loop_config["root"])
    if root.is_dir():
        # Relative paths of the config (stores, runs/) mean the same as on the submitting side.
        os.chdir(root)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    storage, name = loop_config["run_storage"], loop_config["run_name"]

    raw = dict(loop_config["config"])
    remote = "://" in storage
    # One folder per Ray run: the loop's checkpoints and export go beside Ray's checkpoints.
    run_folder = Path(raw.get("output_dir") or f"runs/{raw['name']}") / name if remote else Path(storage) / name
    raw["output_dir"] = str(run_folder)
    cfg = config_from_dict(raw, source=f"Ray run {name}")
    hooks = RayHooks(rank, world, run_folder)

    logger: RunLogger = NullLogger()
    mlflow_logger = None
    if rank == 0 and cfg.tracking.enabled:
        mlflow_logger = _open_tracking(cfg, name, run_folder, context)
        logger = mlflow_logger
        hooks.report_extra = {"mlflow_run_id": mlflow_logger.run_id, "tracking_uri": mlflow_logger.tracking_uri}
    try:
        result = train(cfg, hooks=hooks, logger=logger)
        if mlflow_logger is not None:
            _finish_tracking(mlflow_logger, cfg, result, hooks)
    except BaseException:
        if mlflow_logger is not None:
            mlflow_logger.close("FAILED")  # a restarted attempt sets it RUNNING again
        raise
    if mlflow_logger is not None:
        mlflow_logger.close("FINISHED")


def _open_tracking(cfg: Any, name: str, run_folder: Path, context: Any) -> Any:
    from uhg.tracking.mlflow_logger import open_run

    logger = open_run(
        experiment=cfg.tracking.experiment,
        run_name=name,
        tracking_uri=cfg.tracking.tracking_uri,
        artifact_location=cfg.tracking.artifact_location,
        run_dir=run_folder,
        tags={"uhg.launcher": "ray", "uhg.ray.storage": str(run_folder.parent),
              "uhg.ray.experiment": context.get_experiment_name()},
    )
    attempts = int(logger.client.get_run(logger.run_id).data.tags.get(RESTARTS_TAG, "0")) + 1
    logger.set_tags({RESTARTS_TAG: str(attempts)})
    return logger


def _finish_tracking(logger: Any, cfg: Any, result: Any, hooks: Any) -> None:
    """Rank 0 after the loop: loss curves and physics plots (generated vs held-out events), the
    generator export as artifact + registered version."""
    from uhg.tracking.physics_plots import log_physics_plots

    logger.log_loss_curves()
    if hooks.resumed_from is not None:
        logger.set_tags({"uhg.resumed_from_step": str(hooks.resumed_step)})
    if result.export is None:
        return
    log_physics_plots(logger, cfg, result.export, lambda: _plot_reference(cfg))
    if cfg.tracking.registered_model_name:
        version = logger.register_model(result.export, cfg.tracking.registered_model_name, alias=cfg.tracking.alias)
        print(f"[uhg] registered {cfg.tracking.registered_model_name} version {version}"
              + (f" as @{cfg.tracking.alias}" if cfg.tracking.alias else ""), flush=True)
    else:
        logger.log_artifact(result.export, "generator")


def _plot_reference(cfg: Any, max_events: int = 256) -> Any:
    """Up to `max_events` held-out events of the run's data (None if it holds none), for the
    physics plots."""
    from uhg.train.data import TrainingData

    data = TrainingData.open(cfg)
    indices = data.validation_indices(min(cfg.data.validation_events, max_events))
    return data.events(indices) if len(indices) else None
