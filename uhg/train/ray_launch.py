"""Run `uhg.train.loop.train` on N workers with Ray Train (TorchTrainer, Train V2).

The driver (`launch`) connects to a Ray cluster (RAY_ADDRESS, set by `ray job submit`) or
starts a local one, and hands the resolved config to `TorchTrainer`. Each worker rebuilds the
config, joins the process group Ray created (gloo on CPU, NCCL on GPU) and runs the same loop
as torchrun; only the hooks differ (`uhg.train.ray_hooks.RayHooks`).

A Ray run is identified by (storage path, run name), chosen by the submitter: the same pair
continues the run (`uhg train --resume NAME`), a new name starts a new one. Everything of one
run lives in `<storage>/<name>/`: Ray's checkpoints (`checkpoint_*`), the loop's own
checkpoints and export, and `mlflow_run.json`, which ties every attempt to one MLflow run.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uhg.config.schema import RunConfig
from uhg.errors import ConfigError, TrainingError

# Variables of the submitting environment the workers need too. Ray starts workers from the
# raylet, whose environment is that of `ray start`, not of this driver.
FORWARDED_ENV = (
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING",
    "NCCL_SOCKET_IFNAME",
    "NCCL_DEBUG",
    "UHG_FAULT_KILL_WORKER",
    "PYTHONUNBUFFERED",
)
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfss", "hdfs")
"""URI schemes of object stores and remote filesystems a Ray run may keep its state in."""


def is_remote_storage(storage: str) -> bool:
    """Whether `storage` (a run's storage root or folder) is an object-store / remote URI
    rather than a local or shared-filesystem path."""
    return re.match(rf"^({'|'.join(REMOTE_SCHEMES)})://", storage) is not None


@dataclass(frozen=True)
class RayRun:
    """Where one Ray run keeps its state: `storage` / `name`."""

    storage: str
    """Local/shared folder (absolute) or an object-store URI (s3://, gs://, ...)."""
    name: str

    @property
    def is_remote(self) -> bool:
        return is_remote_storage(self.storage)

    @property
    def folder(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


def enter_uhg_root(config: Path) -> tuple[Path, Path | None]:
    """Under `ray job submit`, the job runs in Ray's temporary copy of the working dir. With
    UHG_ROOT set, the run's relative paths (stores, runs/, the sqlite store) resolve there
    instead: the working directory becomes UHG_ROOT (`uhg.ray_connect.enter_uhg_root`), and a
    config given by a relative path is read from the uploaded copy but resolves its own paths
    from the same folder under UHG_ROOT. Returns the config's absolute path and that folder
    (None: the config file's own folder)."""
    from uhg.config.shipped import find_config
    from uhg.ray_connect import enter_uhg_root as enter_root

    given = Path(config)
    relative_file = not given.is_absolute() and given.is_file()  # not a shipped name
    config = find_config(config).resolve()
    if not os.environ.get("UHG_ROOT"):
        return config, None
    enter_root()
    base = Path.cwd() / given.parent if relative_file else None
    return config, base


def default_run_name(cfg: RunConfig, now: float | None = None) -> str:
    """`<config name>-YYYYmmdd-HHMMSS` (UTC)."""
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}"


def storage_root(cfg: RunConfig) -> str:
    """`distributed.storage_path`, default the config's run directory, made absolute."""
    raw = str(cfg.distributed.storage_path) if cfg.distributed.storage_path is not None else str(cfg.run_dir)
    # pydantic's Path collapses "s3://b" to "s3:/b"; restore the URI.
    raw = re.sub(rf"^({'|'.join(REMOTE_SCHEMES)}):/(?=[^/])", r"\1://", raw)
    if is_remote_storage(raw):
        return raw
    return str(Path(raw).expanduser().resolve())


def resolve_run(cfg: RunConfig, *, run_name: str | None = None, resume: str | None = None) -> RayRun:
    """The (storage, name) of a new run (`run_name` or a timestamped default) or of the run to
    continue (`resume`: a run name under the storage root, or the path of a run folder)."""
    storage = storage_root(cfg)
    if resume is not None:
        if run_name is not None and run_name != Path(resume).name:
            raise ConfigError(f"--resume {resume} and --run-name {run_name} name different runs; give one of them")
        if "/" in resume:  # a path to the run folder; a bare name is looked up under the storage root
            candidate = Path(resume).expanduser().resolve()
            if not candidate.is_dir():
                raise ConfigError(f"--resume {resume}: no such run folder")
            return RayRun(str(candidate.parent), candidate.name)
        _check_name(resume)
        run = RayRun(storage, resume)
        if not run.is_remote and not Path(run.folder).is_dir():
            known = sorted(p.name for p in Path(storage).iterdir() if p.is_dir()) if Path(storage).is_dir() else []
            raise ConfigError(
                f"--resume {resume}: no run folder {run.folder} "
                f"(runs under {storage}: {', '.join(known) or 'none'})"
            )
        return run
    name = run_name or default_run_name(cfg)
    _check_name(name)
    return RayRun(storage, name)


def launch(
    cfg: RunConfig,
    *,
    run_name: str | None = None,
    resume: str | None = None,
    address: str | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Train `cfg` with Ray Train; returns a summary (run folder, final step, checkpoint,
    MLflow run id). Raises TrainingError when the run fails after its allowed restarts.

    The driver draws one progress line from what rank 0 writes into the run folder. Ray's own
    messages and the workers' output (their logs stay in Ray's session folder) are shown only
    with `verbose`."""
    from uhg.config.loading import config_to_dict
    from uhg.train.preflight import check_run_inputs

    run = resolve_run(cfg, run_name=run_name, resume=resume)
    check_run_inputs(cfg)  # before Ray starts and a worker simulates the store
    if not run.is_remote:
        Path(run.folder).mkdir(parents=True, exist_ok=True)
    _init_ray(address, cfg, verbose)
    marker = None
    if not run.is_remote:
        from uhg.train.preflight import check_shared_storage, write_storage_marker

        check_shared_storage(run.folder)  # multi-node: every node must see the run folder
        marker = write_storage_marker(run.folder)  # ... and nodes that join later: checked by each worker

    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from uhg.train.ray_worker import worker_main

    d = cfg.distributed
    use_gpu = d.gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": d.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = d.gpus_per_worker
    trainer = TorchTrainer(
        worker_main,
        train_loop_config={
            "config": config_to_dict(cfg),
            "root": str(Path.cwd()),
            "run_storage": run.storage,
            "run_storage_is_remote": run.is_remote,
            "run_name": run.name,
            "storage_marker": marker,
        },
        scaling_config=ScalingConfig(
            # (min, max) makes Ray Train elastic: a restart takes the workers that fit
            num_workers=(d.min_workers, d.workers) if d.min_workers is not None else d.workers,
            elastic_resize_monitor_interval_s=d.resize_interval_s,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=d.placement,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(
            name=run.name,
            storage_path=run.storage,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            worker_runtime_env={"env_vars": _worker_env(use_gpu, d.cpus_per_worker)},
        ),
    )
    follower = None
    if not run.is_remote:
        from uhg.train.progress import ProgressLine, ProgressState, follow_file

        follower = follow_file(Path(run.folder), ProgressLine(), ProgressState(run.name, cfg.train.steps))
    try:
        result = trainer.fit()
    finally:
        if follower is not None:
            follower[1].set()
            follower[0].join(timeout=5)
        if marker is not None:
            from uhg.train.preflight import remove_storage_marker

            remove_storage_marker(run.folder)
    if result.error is not None:
        hint = "" if verbose else " (the workers' output: rerun with --verbose, or see Ray's session logs)"
        raise TrainingError(f"Ray run {run.name} ({run.folder}) failed: {result.error}{hint}") from result.error
    metrics = result.metrics or {}
    return {
        "run_name": run.name,
        "run_folder": run.folder,
        "step": metrics.get("step"),
        "checkpoint": result.checkpoint.path if result.checkpoint is not None else None,
        "mlflow_run_id": metrics.get("mlflow_run_id"),
        "mlflow_experiment_id": metrics.get("mlflow_experiment_id"),
        "tracking_uri": metrics.get("tracking_uri"),
    }


def _init_ray(address: str | None, cfg: RunConfig, verbose: bool = False) -> None:
    """Connect to `address` / RAY_ADDRESS, or start a private local Ray sized for the run. Unless
    `verbose`, the output of Ray's actors and the workers is not forwarded to this driver."""
    from uhg.ray_connect import connect_ray

    d = cfg.distributed
    connect_ray(address, num_cpus=max(os.cpu_count() or 1, d.workers * d.cpus_per_worker), verbose=verbose)


def _worker_env(use_gpu: bool, cpus_per_worker: int) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # Ray Train leaves OMP_NUM_THREADS unset in its workers, so torch starts one intra-op
    # thread per core of the node in every worker and N workers oversubscribe the CPUs.
    # Match the reservation (torchrun likewise sets 1 per process).
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", str(cpus_per_worker))
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name in {".", ".."}:
        raise ConfigError(f"run name {name!r}: use letters, digits, '_', '.', '-' only (it names a folder)")
