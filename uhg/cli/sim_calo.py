"""`uhg sim calo`: simulate EM showers in a calorimeter geometry and write them as a sparse store.

    uhg sim calo --geometry ds2 --energy-min 1000 --energy-max 1000000 --events 10000 --out ds2.zarr \
        [--seed 0] [--workers 4] [--part-size 1000]

Energies are in MeV (CaloChallenge convention), drawn log-uniform per event. Each part of the
store is simulated and committed by one worker; rerunning the same command resumes an
interrupted run (only missing parts are simulated), and the events do not depend on --workers.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from uhg.errors import ConditionError, ConfigError, GeometryError

DIGITAL_PART_SIZE = 50  # digital pixel showers reach ~2e5 hits at 1 TeV: keep parts ~1e7 hits
ANALOG_PART_SIZE = 1000


def _make_part(geometry_name: str, seed: int, energy_min: float, energy_max: float, start: int, stop: int):
    """Events start..stop-1 of the run (module level so worker processes can unpickle it)."""
    from uhg.geometry import get_geometry
    from uhg.sim.calo import simulate_calo_showers

    return simulate_calo_showers(get_geometry(geometry_name), stop - start, seed, first_event=start,
                                 energy_min=energy_min, energy_max=energy_max)


def calo_command(
    geometry: Annotated[str, typer.Option(help="calorimeter geometry: ds1-photons, ds2, ds3, epical, epical-mini")],
    energy_min: Annotated[float, typer.Option(help="lowest incident energy in MeV (log-uniform draw)")],
    energy_max: Annotated[float, typer.Option(help="highest incident energy in MeV")],
    events: Annotated[int, typer.Option(help="number of showers")],
    out: Annotated[Path, typer.Option(help="output Zarr store (directory)")],
    seed: Annotated[int, typer.Option(help="random seed; event i uses its own stream of (seed, i)")] = 0,
    workers: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
    part_size: Annotated[int, typer.Option(help="events per store part; 0 = 1000 (50 for digital pixel readouts)")] = 0,
) -> None:
    """Simulate electromagnetic showers (GFlash parameterisation) and write a calorimeter store."""
    from uhg.data.hits import CONDITION_UNITS
    from uhg.data.parallel import fill_store
    from uhg.data.writer import create_store
    from uhg.geometry import get_geometry

    geom = get_geometry(geometry)
    if geom.kind != "calo":
        raise GeometryError(f"--geometry {geometry!r} is a {geom.kind} detector; `uhg sim calo` needs a calorimeter "
                            "(ds1-photons, ds2, ds3, epical, epical-mini)")
    if geom.particle == "pion":
        raise GeometryError(f"--geometry {geometry!r} holds hadronic (pion) showers, which the EM shower simulator "
                            "does not model; import CaloChallenge pion data with `uhg data import-calochallenge`")
    if not energy_min > 0:
        raise ConditionError(f"--energy-min must be > 0 MeV, got {energy_min}")
    if energy_min > energy_max:
        raise ConditionError(f"--energy-min ({energy_min} MeV) must not exceed --energy-max ({energy_max} MeV)")
    if events <= 0:
        raise ConfigError(f"--events must be a positive number of showers, got {events}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if part_size < 0:
        raise ConfigError(f"--part-size must be >= 1 (or 0 for the default), got {part_size}")
    if part_size == 0:
        part_size = DIGITAL_PART_SIZE if geom.readout == "digital" else ANALOG_PART_SIZE

    create_store(
        out, "calo", geom.name, events, part_size,
        conditions={"incident_energy": {"min": energy_min, "max": energy_max, "unit": CONDITION_UNITS["incident_energy"]}},
        attributes={
            "simulator": "uhg.sim.calo.simulate_calo_showers",
            "model": "GFlash EM shower parameterisation (Grindhammer-Peters), see docs/calorimeter.md",
            "particle": geom.particle,
            "energy_distribution": "log-uniform",
            "energy_min_mev": energy_min,
            "energy_max_mev": energy_max,
            "readout": geom.readout,
        },
        seed=seed,
    )
    make_part = functools.partial(_make_part, geom.name, seed, energy_min, energy_max)
    fill_store(out, make_part, workers=workers, desc=f"sim calo {geom.name}")
    typer.echo(f"wrote {events} {geom.particle} showers ({geom.name}, {energy_min:g}-{energy_max:g} MeV) to {out}")
