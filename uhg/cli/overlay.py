"""`uhg overlay`: merge generated (or stored) beam background into simulated signal events.

    uhg overlay --signal signal.zarr --model MODEL --luminosity 2.7e34 --out overlay.zarr \
        [--seed 0] [--distributed [--workers K] [--gpus-per-worker G]] [--part-size P]
    uhg overlay --signal signal.zarr --background background.zarr --out overlay.zarr

MODEL is a generator export folder or an MLflow model URI (`models:/name@alias`, `runs:/...`).
Rerunning the same command resumes an interrupted run; the output does not depend on the
number of workers. See docs/overlay.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uhg.errors import ConfigError


def ray_options(distributed: bool, workers: int | None, gpus_per_worker: float, cpus_per_worker: int,
                address: str | None):
    """RayOptions for --distributed, None for an in-process run; rejects Ray flags without it."""
    from uhg.generate.ray_pool import RayOptions

    if not distributed:
        if workers is not None or gpus_per_worker or address:
            raise ConfigError("--workers, --gpus-per-worker and --ray-address need --distributed")
        return None
    return RayOptions(workers=2 if workers is None else workers, cpus_per_worker=cpus_per_worker,
                      gpus_per_worker=gpus_per_worker, address=address)


def scalar_conditions(luminosity: float | None, conditions_file: Path | None) -> dict[str, float]:
    """Fixed generator conditions from --luminosity and a JSON/YAML file {name: value}."""
    from uhg.generate.conditions import load_conditions

    conditions: dict[str, float] = {}
    if conditions_file is not None:
        conditions = {k: float(v[0]) for k, v in load_conditions(conditions_file, 1).items()}
    if luminosity is not None:
        if not luminosity > 0:
            raise ConfigError(f"--luminosity must be > 0 cm^-2 s^-1, got {luminosity}")
        conditions["luminosity"] = float(luminosity)
    return conditions


DistributedOpt = Annotated[bool, typer.Option("--distributed", help="run on Ray actors (one loaded model each)")]
WorkersOpt = Annotated[int | None, typer.Option(help="Ray actors (with --distributed; default 2)")]
GpusOpt = Annotated[float, typer.Option(help="GPUs per actor (with --distributed; 0 = CPU)")]
CpusOpt = Annotated[int, typer.Option(help="CPUs (torch threads) per actor")]
AddressOpt = Annotated[str | None, typer.Option(
    help="Ray cluster address; default: the job's cluster under `ray job submit`, else a private local Ray")]


def overlay_command(
    signal: Annotated[Path, typer.Option(help="signal store (pixel hits)")],
    out: Annotated[Path, typer.Option(help="output overlay store (directory)")],
    model: Annotated[str | None, typer.Option(
        help="generator export folder or MLflow URI (models:/NAME@ALIAS, runs:/RUN/PATH)")] = None,
    luminosity: Annotated[float | None, typer.Option(help="generator condition: luminosity in cm^-2 s^-1")] = None,
    conditions: Annotated[Path | None, typer.Option(
        help="JSON/YAML file {condition: value} of further generator conditions")] = None,
    background: Annotated[Path | None, typer.Option(
        help="take background event j from this store (event j mod its size) instead of a model")] = None,
    seed: Annotated[int, typer.Option(help="generator seed; background event j uses the stream of (seed, j)")] = 0,
    part_size: Annotated[int | None, typer.Option(help="events per output part (default: the signal store's)")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="events per generator forward pass (default: 16, 1 for the full 7.68 M-channel PXD)")] = None,
    device: Annotated[str, typer.Option(help="generator device without --distributed: cpu or cuda")] = "cpu",
    distributed: DistributedOpt = False,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusOpt = 0.0,
    cpus_per_worker: CpusOpt = 1,
    ray_address: AddressOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="delete an existing output store first")] = False,
) -> None:
    """Overlay background (generated or stored) onto signal events: charges add, saturate at
    255 ADU, the threshold is re-applied, and each hit keeps its origin (1 signal, 2 background, 3 both)."""
    from uhg.generate.overlay import run_overlay

    if model is None and background is None:
        raise ConfigError("give --model MODEL (with --luminosity / --conditions) or --background STORE")
    if model is not None and background is not None:
        raise ConfigError("give either --model or --background, not both")
    if background is not None and (luminosity is not None or conditions is not None):
        raise ConfigError("--luminosity / --conditions set generator conditions; they do not apply to --background")
    if part_size is not None and part_size < 1:
        raise ConfigError(f"--part-size must be >= 1, got {part_size}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    from uhg.ray_connect import enter_uhg_root

    enter_uhg_root()
    options = ray_options(distributed, workers, gpus_per_worker, cpus_per_worker, ray_address)
    plan_args = {"seed": seed, "part_size": part_size, "batch_size": batch_size, "overwrite": overwrite}
    if model is not None:
        plan_args |= {"model": model, "conditions": scalar_conditions(luminosity, conditions)}
    else:
        plan_args["background"] = background
    run_overlay(signal, out, ray_options=options, device=device, **plan_args)
    typer.echo(f"overlay store: {out.resolve()}")


def register(app: typer.Typer) -> None:
    app.command("overlay")(overlay_command)
