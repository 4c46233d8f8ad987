"""The function every Ray Train worker runs: rebuild the config, set up tracking on rank 0,
run the training loop (which ends with `uhg.train.finish.finish_run`: export, plots, evaluation).

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
    remote = loop_config["run_storage_is_remote"]  # the launcher's RayRun.is_remote
    # One folder per Ray run: the loop's checkpoints and export go beside Ray's checkpoints.
    run_folder = Path(raw.get("output_dir") or f"runs/{raw['name']}") / name if remote else Path(storage) / name
    raw["output_dir"] = str(run_folder)
    if loop_config.get("storage_marker"):
        from uhg.train.preflight import check_worker_sees_storage

        check_worker_sees_storage(run_folder, loop_config["storage_marker"], rank)
    cfg = config_from_dict(raw, source=f"Ray run {name}")
    hooks = RayHooks(rank, world, run_folder)
    if rank == 0 and not remote:  # the driver follows it and draws the progress line
        from uhg.train.progress import ProgressFile, ProgressTracker

        hooks.progress = ProgressTracker(name, ProgressFile(run_folder))

    logger: RunLogger = NullLogger()
    mlflow_logger = None
    if rank == 0 and cfg.tracking.enabled:
        mlflow_logger = _open_tracking(cfg, name, run_folder, context)
        logger = mlflow_logger
        hooks.report_extra = {"mlflow_run_id": mlflow_logger.run_id, "tracking_uri": mlflow_logger.tracking_uri,
                              "mlflow_experiment_id": mlflow_logger.experiment_id}
    try:
        train(cfg, hooks=hooks, logger=logger)  # ends with finish_run on rank 0
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
