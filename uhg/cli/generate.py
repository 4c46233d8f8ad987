"""`uhg generate`: events from a trained generator into a standard store.

    uhg generate --model runs/pxd_gan_mini/export --events 1000 --out gen.zarr --luminosity 2e34
    uhg generate --model runs/calo_gan_mini/export --events 1000 --out showers.zarr \
        --energy-min 1000 --energy-max 100000

The same --seed gives the same store, bit for bit. The store is written part by part
(rerunning a stopped command writes only the missing parts); with --distributed, Ray actors
(one loaded generator each) write the parts in parallel: the same bytes, see docs/overlay.md.

    uhg generate --model models:/pxd-gan@prod --events 100000 --out gen.zarr --luminosity 2e34 \
        --distributed --workers 4 [--gpus-per-worker 1] [--conditions conditions.npz]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uhg.cli.overlay import (
    AddressOpt,
    CpusOpt,
    DistributedOpt,
    GpusOpt,
    WorkersOpt,
    ray_options,
)
from uhg.errors import ConfigError
from uhg.ray_connect import enter_uhg_root


def generate_command(
    model: Annotated[str, typer.Option(help="generator export directory (or an MLflow model URI)")],
    events: Annotated[int, typer.Option(help="number of events to generate")],
    out: Annotated[Path, typer.Option(help="output store (directory)")],
    luminosity: Annotated[float | None, typer.Option(help="PXD: luminosity of every event, cm^-2 s^-1")] = None,
    energy_min: Annotated[float | None, typer.Option(help="calorimeter: lowest incident energy, MeV")] = None,
    energy_max: Annotated[float | None, typer.Option(help="calorimeter: highest incident energy, MeV")] = None,
    seed: Annotated[int, typer.Option(help="event i draws from event_seed(seed, i, 'generate')")] = 0,
    batch_size: Annotated[int, typer.Option(help="events per forward pass")] = 16,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    distributed: DistributedOpt = False,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusOpt = 0.0,
    cpus_per_worker: CpusOpt = 1,
    ray_address: AddressOpt = None,
    conditions: Annotated[Path | None, typer.Option(
        help="per-event conditions file (JSON/YAML/NPZ {name: value or list})")] = None,
    part_size: Annotated[int | None, typer.Option(help="events per store part (default: a multiple of --batch-size near 1000)")] = None,
) -> None:
    """Generate events into a store, in this process or (--distributed) on Ray actors."""
    import tempfile

    from uhg.generate.conditions import cli_conditions
    from uhg.generate.distributed import default_part_size, describe_model, run_generate

    enter_uhg_root()
    options = ray_options(distributed, workers, gpus_per_worker, cpus_per_worker, ray_address)
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if part_size is not None and part_size < 1:
        raise ConfigError(f"--part-size must be >= 1, got {part_size}")
    with tempfile.TemporaryDirectory(prefix="uhg-model-") as cache:  # MLflow downloads live for the run only
        info = describe_model(model, cache_dir=cache)
        conds = cli_conditions(info, events, seed, conditions_file=conditions, luminosity=luminosity,
                               energy_min=energy_min, energy_max=energy_max)
        _warn_outside_training_range(info, conds, given=None if conditions is not None else
                                     ("luminosity", "incident_energy"), energy_range=(energy_min, energy_max))
        run_generate(info, out, events, conds, ray_options=options, device=device, seed=seed,
                     batch_size=batch_size, part_size=part_size or default_part_size(events, batch_size))
    typer.echo(f"generated store: {out.resolve()}")


def _warn_outside_training_range(info: dict, conds: dict, given: tuple[str, ...] | None,
                                 energy_range: tuple[float | None, float | None]) -> None:
    """Print how far the requested conditions (`given`; None: all, as from a conditions file)
    lie outside the export's training range. Conditions derived from the luminosity are not
    reported again."""
    from uhg.generate.conditions import range_warnings

    values: dict = {n: (float(v.min()), float(v.max())) for n, v in conds.items()
                    if (given is None or n in given) and len(v)}
    if given is not None and None not in energy_range and "incident_energy" in values:
        values["incident_energy"] = tuple(map(float, energy_range))  # the requested range, not the draws
    for message in range_warnings(info["condition_norm"], values):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
