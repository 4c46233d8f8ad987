"""`uhg data`: inspect stores and convert CaloChallenge files.

    uhg data info STORE [--json]
    uhg data import-calochallenge FILE.hdf5 --geometry ds2 --out STORE [--part-size 1000] [--workers 2]
    uhg data export-calochallenge STORE --out FILE.hdf5
    uhg data check-calochallenge FILE.hdf5 --dataset ds2 [--lenient]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from uhg.errors import ConfigError

data_app = typer.Typer(help="Inspect sparse event stores; import and export CaloChallenge HDF5 files.",
                       no_args_is_help=True)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n} B"


def _print_summary(s: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    parts = s["parts"]
    head = Table(title=f"{s['path']}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("kind / geometry", f"{s['kind']} / {s['geometry']} ({s['n_channels']:,} channels)")
    head.add_row("events", f"{s['events']:,} of {s['events_planned']:,} planned")
    missing = parts["missing"]
    head.add_row("parts", f"{parts['complete']} of {parts['total']} complete (part size {parts['part_size']})"
                 + (f"; missing {missing[:10]}{' ...' if len(missing) > 10 else ''}" if missing else "")
                 + (f"; {parts['in_progress']} being written or left by a killed writer" if parts["in_progress"] else ""))
    h = s["hits_per_event"]
    head.add_row("hits", f"{s['hits']:,}")
    head.add_row("hits per event", f"mean {_fmt(h['mean'])}  std {_fmt(h['std'])}  min {_fmt(h['min'])}  "
                 f"q05 {_fmt(h['q05'])}  q50 {_fmt(h['q50'])}  q95 {_fmt(h['q95'])}  max {_fmt(h['max'])}")
    if s["kind"] == "pixel":
        head.add_row("occupancy", f"{s['occupancy']:.4%} of all pixels per event")
        head.add_row("occupancy per layer", "  ".join(f"L{k}: {v:.4%}" for k, v in s["occupancy_per_layer"].items()))
    else:
        e = s["energy_per_event_mev"]
        head.add_row("deposited energy", f"mean {_fmt(e['mean'])} MeV  min {_fmt(e['min'])}  max {_fmt(e['max'])}")
    for name, c in s["conditions"].items():
        head.add_row(f"condition {name}", f"{_fmt(c['min'])} .. {_fmt(c['max'])} {c['unit']} (mean {_fmt(c['mean'])}; "
                     f"declared {_fmt(c['declared_min'])} .. {_fmt(c['declared_max'])})")
    head.add_row("size on disk", f"{_bytes(s['disk_bytes'])}; {_fmt(s['bytes_per_hit'], 3)} bytes/hit "
                 f"({_fmt(s['hit_bytes_per_hit'], 3)} for hit columns alone)")
    head.add_row("compression", f"channel: {s['compression']['channel']}; value: {s['compression']['value']}")
    prov = s["provenance"]
    head.add_row("provenance", f"{prov.get('command', '')!s} (uhg {prov.get('uhg_version')}, seed {prov.get('seed')}, "
                 f"{prov.get('created')})")
    console.print(head)

    if s["kind"] == "pixel":
        table = Table(title="occupancy per sensor (fraction of pixels fired per event)", title_justify="left")
        for _ in range(4):
            table.add_column("sensor")
            table.add_column("occupancy", justify="right")
        items = list(s["occupancy_per_sensor"].items())
        for i in range(0, len(items), 4):
            row = []
            for name, v in items[i:i + 4]:
                row += [name, f"{v:.4%}"]
            table.add_row(*row)
    else:
        table = Table(title="per layer (means per event)", title_justify="left")
        table.add_column("layer", justify="right")
        table.add_column("energy [MeV]", justify="right")
        table.add_column("hits", justify="right")
        for i, (e, n) in enumerate(zip(s["energy_per_layer_mev"], s["hits_per_layer"], strict=True)):
            if n > 0:
                table.add_row(str(i), _fmt(e), _fmt(n))
    console.print(table)


@data_app.command("info")
def info_command(
    store: Annotated[Path, typer.Argument(help="store directory")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of tables")] = False,
) -> None:
    """Summarise a store: events, parts, hits per event, occupancy or energy, conditions, size on disk."""
    from uhg.data.info import summarize

    summary = summarize(store)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        _print_summary(summary)


@data_app.command("import-calochallenge")
def import_command(
    file: Annotated[Path, typer.Argument(help="CaloChallenge HDF5 file (incident_energies, showers)")],
    geometry: Annotated[str, typer.Option(help="calorimeter geometry of the file: ds1-photons, ds1-pions, ds2, ds3")],
    out: Annotated[Path, typer.Option(help="output store directory")],
    part_size: Annotated[int, typer.Option(help="showers per store part (read from the file at once)")] = 1000,
    workers: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
    allow_rounding: Annotated[bool, typer.Option(help="accept float64 showers that are not exact float32")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing store at --out")] = False,
) -> None:
    """Import a CaloChallenge HDF5 file into a sparse calorimeter store (resumable)."""
    from uhg.data.calochallenge import import_calochallenge

    if part_size < 1 or workers < 1:
        raise ConfigError(f"--part-size and --workers must be >= 1, got {part_size} and {workers}")
    n = import_calochallenge(file, geometry, out, part_size=part_size, workers=workers,
                             allow_rounding=allow_rounding, overwrite=overwrite)
    typer.echo(f"imported {n} showers from {file} into {out}")


@data_app.command("export-calochallenge")
def export_command(
    store: Annotated[Path, typer.Argument(help="calorimeter store directory")],
    out: Annotated[Path, typer.Option(help="output CaloChallenge HDF5 file")],
) -> None:
    """Write a calorimeter store as a CaloChallenge HDF5 file in the official layout
    (incident_energies (N, 1) and showers (N, voxels), float64, gzip, MeV)."""
    from uhg.data.calochallenge import export_calochallenge

    n = export_calochallenge(store, out)
    typer.echo(f"exported {n} showers from {store} to {out}")


@data_app.command("check-calochallenge")
def check_command(
    file: Annotated[Path, typer.Argument(help="CaloChallenge HDF5 file (incident_energies, showers)")],
    dataset: Annotated[str, typer.Option(help="1-photons, 1-pions, 2, 3 (or ds1-photons, ds1-pions, ds2, ds3)")],
    lenient: Annotated[bool, typer.Option(help="report energies outside the dataset's range, a unit mismatch "
                                                "of showers and energies and a compression other than gzip as "
                                                "warnings instead of errors")] = False,
) -> None:
    """Check a file against the official CaloChallenge layout and the input checks of its evaluation
    script (keys, shapes, dtypes, compression, voxel count, MeV units, energy range)."""
    from uhg.data.calochallenge import check_calochallenge_file

    result = check_calochallenge_file(file, dataset, strict=not lenient)
    for w in result.warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    lo, hi = result.incident_energy_mev
    typer.echo(f"{file}: {result.n_events} showers pass the CaloChallenge dataset {result.dataset.name} input checks "
               f"({result.dataset.n_voxels} voxels; incident energy {lo:.6g} .. {hi:.6g} MeV; median E_tot/E_inc "
               f"{result.median_response:.3g})")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
