"""`uhg generate`: events from a trained generator into a standard store (one process).

    uhg generate --model runs/pxd_gan_mini/export --events 1000 --out gen.zarr --luminosity 2e34
    uhg generate --model runs/calo_gan_mini/export --events 1000 --out showers.zarr \
        --energy-min 1000 --energy-max 100000

The same --seed gives the same store, bit for bit.

With --distributed, Ray actors (one loaded generator each) write the store's parts in
parallel: same events, resumable, see docs/overlay.md.

    uhg generate --model models:/pxd-gan@prod --events 100000 --out gen.zarr --luminosity 2e34 \
        --distributed --workers 4 [--gpus-per-worker 1] [--conditions conditions.npz]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from uhg.cli.overlay import AddressOpt, CpusOpt, DistributedOpt, GpusOpt, WorkersOpt


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
        help="per-event conditions file (JSON/YAML/NPZ {name: value or list}); implies the part-wise writer")] = None,
    part_size: Annotated[int | None, typer.Option(help="events per store part; implies the part-wise writer")] = None,
) -> None:
    """Generate events into a store, in this process or (--distributed) on Ray actors."""
    from uhg.generate.single import generate_store

    path = model
    if model.startswith(("models:/", "runs:/")):
        from uhg.tracking.models import resolve_model_uri

        path = str(resolve_model_uri(model))
    _warn_outside_training_range(path, luminosity, energy_min, energy_max)
    if distributed or conditions is not None or part_size is not None:
        from uhg.cli.overlay import generate_distributed

        generate_distributed(model, events, out, luminosity=luminosity, energy_min=energy_min, energy_max=energy_max,
                             conditions_file=conditions, seed=seed, batch_size=batch_size, part_size=part_size,
                             distributed=distributed, workers=workers, gpus_per_worker=gpus_per_worker,
                             cpus_per_worker=cpus_per_worker, ray_address=ray_address, device=device)
        return

    info = generate_store(path, events, out, seed=seed, batch_size=batch_size, luminosity=luminosity,
                          energy_min=energy_min, energy_max=energy_max, device=device)
    typer.echo(f"wrote {info['events']} events to {info['path']} in {info['seconds']:.1f} s "
               f"({info['ms_per_event']:.1f} ms/event)")


def _warn_outside_training_range(path: str, luminosity: float | None, energy_min: float | None,
                                 energy_max: float | None) -> None:
    """Print how far the requested conditions lie outside the export's training range."""
    import json

    from uhg.models.generator import SIDECAR
    from uhg.generate.single import range_warnings

    sidecar = Path(path) / SIDECAR
    try:
        norm = json.loads(sidecar.read_text())["condition_norm"]
    except (OSError, ValueError, KeyError):
        return  # loading the generator reports a missing or broken export clearly
    values: dict = {}
    if luminosity is not None and luminosity > 0:
        values["luminosity"] = float(luminosity)
    if energy_min is not None and energy_max is not None and 0 < energy_min <= energy_max:
        values["incident_energy"] = (float(energy_min), float(energy_max))
    for message in range_warnings(norm, values):
        typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
