"""`uhg generate`: events from a trained generator into a standard store (one process).

    uhg generate --model runs/pxd_gan_mini/export --events 1000 --out gen.zarr --luminosity 2e34
    uhg generate --model runs/calo_gan_mini/export --events 1000 --out showers.zarr \
        --energy-min 1000 --energy-max 100000

The same --seed gives the same store, bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


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
) -> None:
    """Generate events into a store, in this process."""
    from uhg.generate.single import generate_store

    path = model
    if model.startswith(("models:/", "runs:/")):
        from uhg.tracking.models import resolve_model_uri

        path = str(resolve_model_uri(model))
    info = generate_store(path, events, out, seed=seed, batch_size=batch_size, luminosity=luminosity,
                          energy_min=energy_min, energy_max=energy_max, device=device)
    typer.echo(f"wrote {info['events']} events to {info['path']} in {info['seconds']:.1f} s "
               f"({info['ms_per_event']:.1f} ms/event)")


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
