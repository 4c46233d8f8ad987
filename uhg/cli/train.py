"""`uhg train`: train a model from a YAML config.

    uhg train --config configs/pxd_gan_mini.yaml [--set train.steps=50 ...] [--resume RUN]
    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 -m uhg train --config ...   # data parallel

See docs/training.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train_command(
    config: Annotated[Path, typer.Option(help="run config YAML (see configs/)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: --set train.steps=20 (repeatable)")] = None,
    resume: Annotated[str | None, typer.Option(help="resume RUN (run name, run directory or checkpoint directory)")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="ignore the run's own checkpoints and start from step 0")] = False,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="do not log to MLflow")] = False,
) -> None:
    """Train a model locally in this process (or as one rank under torchrun)."""
    from uhg.config import load_config
    from uhg.train.local import run_local

    cfg = load_config(config, set_ or [])
    result = run_local(cfg, resume=resume, fresh=fresh, tracking=False if no_tracking else None)
    if result.export is not None:
        typer.echo(f"trained {cfg.name} to step {result.step}; checkpoint {result.checkpoint}; export {result.export}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
