"""`uhg train`: train a model from a YAML config.

    uhg train --config configs/pxd_gan_mini.yaml [--set train.steps=50 ...] [--resume RUN]
    ray job submit --working-dir . -- uhg train --config ...                    # Ray Train (default)
    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 -m uhg train --config ...   # data parallel
    uhg train --local --config ...                                              # this process only

By default the run goes through Ray Train (uhg.train.ray_launch) with `distributed.workers`
workers; under torchrun (RANK set) or with --local it runs in this process.
See docs/training.md and docs/distributed.md.
"""

from __future__ import annotations

from typing import Annotated

import typer


def train_command(
    config: Annotated[str, typer.Option(help="run config: a YAML file, or the name of a shipped one (`uhg configs list`)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: --set train.steps=20 (repeatable)")] = None,
    resume: Annotated[str | None, typer.Option(help="resume RUN (run name, run directory or checkpoint directory)")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore the run's own checkpoints and start from step 0")] = False,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="do not log to MLflow")] = False,
    local: Annotated[bool, typer.Option("--local", "--no-ray", help="train in this process instead of on Ray (implied under torchrun)")] = False,
    run_name: Annotated[str | None, typer.Option(help="Ray: name of the run folder under distributed.storage_path (default: config name + UTC time)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray: cluster to join (default: RAY_ADDRESS, else start a local Ray)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Ray's messages, the workers' output, library logs and warnings")] = False,
) -> None:
    """Train a model on Ray Train workers (default), or in this process (--local, torchrun).
    One progress line per run shows step / total, losses, steps/s, ETA and the last checkpoint."""
    import os

    _quiet(verbose)

    from uhg.config import load_config
    from uhg.train.local import run_local

    if not local and "RANK" not in os.environ:
        from uhg.train.ray_launch import enter_uhg_root, launch

        path, base = enter_uhg_root(config)
        cfg = load_config(path, set_ or [], base=base)
        if no_tracking:
            cfg.tracking.enabled = False
        if fresh and resume:
            from uhg.errors import ConfigError

            raise ConfigError("--fresh and --resume contradict each other")
        summary = launch(cfg, run_name=run_name, resume=resume, address=ray_address, verbose=verbose)
        typer.echo(summary_text(summary))
        return
    cfg = load_config(config, set_ or [])
    result = run_local(cfg, resume=resume, fresh=fresh, tracking=False if no_tracking else None, progress=True)
    if result.export is not None:
        typer.echo(f"trained {cfg.name} to step {result.step}; checkpoint {result.checkpoint}; export {result.export}")


def _quiet(verbose: bool) -> None:
    """Library chatter (MLflow's and DeepSpeed's info logs, deprecation and future warnings of
    the stack) only with --verbose; uhg's own messages, warnings and errors always."""
    import logging
    import os
    import warnings

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    for name in ("mlflow", "DeepSpeed", "deepspeed", "torch.distributed", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def summary_text(summary: dict) -> str:
    lines = [f"Ray run {summary['run_name']} finished at step {summary['step']}: {summary['run_folder']}"]
    if summary.get("checkpoint"):
        lines.append(f"  latest checkpoint: {summary['checkpoint']}")
    if summary.get("mlflow_run_id"):
        lines.append(f"  MLflow run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
        if summary.get("mlflow_experiment_id"):
            from uhg.tracking.store import ui_hint

            lines.append("  MLflow UI: " + ui_hint(summary["tracking_uri"], summary["mlflow_experiment_id"],
                                                 summary["mlflow_run_id"]))
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
