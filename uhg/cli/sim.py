"""`uhg sim`: reference simulators writing sparse event stores.

    uhg sim pxd --luminosity 8e35 [--luminosity-max 1.6e36] [--her-current 2.6 --ler-current 3.6] \
        --events 1000 --out bkg.zarr [--machine design|squeeze|high-vacuum|luminosity-dominated|FILE.yaml] \
        [--geometry pxd] [--seed 0] [--workers 2] [--part-size 100]
    uhg sim signal --events 1000 --out signal.zarr [--geometry pxd] [--seed 0] [--workers 2]
    uhg sim calo --geometry ds2 --energy-min 1000 --energy-max 1000000 --events 1000 --out ds2.zarr

Every part of a store is simulated and committed by one worker process; rerunning the same
command resumes an interrupted run (only missing parts are simulated), and the events do not
depend on --workers or --part-size.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from uhg.errors import ConditionError, ConfigError, GeometryError

sim_app = typer.Typer(help="Simulate reference data (PXD background and signal, calorimeter showers) into stores.",
                      no_args_is_help=True)

L_CAL = 8.0e35  # mirrors uhg.sim.pxd_machine.L_CAL (importing it here would slow `uhg --help`)


def _pxd_part(geometry_name: str, seed: int, luminosity: float, luminosity_max: float | None,
              her_current: float | None, ler_current: float | None, scenario: dict, start: int, stop: int):
    """Background events start..stop-1 (module level so worker processes can unpickle it)."""
    from uhg.geometry import get_geometry
    from uhg.sim.pxd_background import simulate_pxd_background
    from uhg.sim.pxd_machine import MachineScenario

    return simulate_pxd_background(get_geometry(geometry_name), stop - start, seed, first_event=start,
                                   luminosity=luminosity, luminosity_max=luminosity_max,
                                   her_current=her_current, ler_current=ler_current,
                                   scenario=MachineScenario.model_validate(scenario))


def _signal_part(geometry_name: str, seed: int, tracks_min: int, tracks_max: int, start: int, stop: int):
    from uhg.geometry import get_geometry
    from uhg.sim.pxd_signal import simulate_pxd_signal

    return simulate_pxd_signal(get_geometry(geometry_name), stop - start, seed, first_event=start,
                               tracks_min=tracks_min, tracks_max=tracks_max)


def _pixel_geometry(name: str):
    from uhg.geometry import get_geometry

    geom = get_geometry(name)
    if geom.kind != "pixel":
        raise GeometryError(f"--geometry {name!r} is a {geom.kind} detector; this simulator needs a PXD geometry "
                            "(pxd, pxd-mini, pxd-tiny)")
    return geom


def _check_run(events: int, workers: int, part_size: int) -> None:
    if events <= 0:
        raise ConfigError(f"--events must be a positive number of events, got {events}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if part_size < 1:
        raise ConfigError(f"--part-size must be >= 1 event, got {part_size}")


@sim_app.command("pxd")
def pxd_command(
    events: Annotated[int, typer.Option(help="number of PXD readouts to simulate")],
    out: Annotated[Path, typer.Option(help="output Zarr store (directory)")],
    luminosity: Annotated[float, typer.Option(
        help="instantaneous luminosity in cm^-2 s^-1; default: the calibration point 8e35 "
             "(SuperKEKB design, where the output matches the published background sample)")] = L_CAL,
    luminosity_max: Annotated[float | None, typer.Option(
        help="draw each event's luminosity log-uniformly in [--luminosity, --luminosity-max]")] = None,
    her_current: Annotated[float | None, typer.Option(
        help="HER (e-) current in A; give with --ler-current, else the currents follow the luminosity")] = None,
    ler_current: Annotated[float | None, typer.Option(help="LER (e+) current in A")] = None,
    machine: Annotated[str, typer.Option(
        help="machine scenario: design, squeeze, high-vacuum, luminosity-dominated (configs/machine/) or a "
             "YAML file of the same schema (docs/calibration.md): how currents and beta_y* follow the "
             "luminosity and how each background process scales")] = "design",
    geometry: Annotated[str, typer.Option(help="pixel geometry: pxd (7.68 M channels), pxd-mini, pxd-tiny")] = "pxd",
    seed: Annotated[int, typer.Option(help="random seed; event i uses its own stream of (seed, i)")] = 0,
    workers: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
    part_size: Annotated[int, typer.Option(help="events per store part")] = 100,
) -> None:
    """Simulate beam-induced PXD background (two-photon, radiative Bhabha, Touschek, beam-gas, SR)."""
    from uhg.data.hits import CONDITION_UNITS
    from uhg.data.parallel import fill_store
    from uhg.data.writer import create_store
    from uhg.sim.pxd_machine import check_conditions, load_scenario

    geom = _pixel_geometry(geometry)
    _check_run(events, workers, part_size)
    check_conditions(luminosity, luminosity_max, her_current, ler_current)
    scenario = load_scenario(machine)
    lum_hi = luminosity_max if luminosity_max is not None else luminosity
    ends = scenario.conditions([luminosity, lum_hi], her_current, ler_current)
    create_store(
        out, "pixel", geom.name, events, part_size,
        # every condition that drives the rates, so a model can condition on all of them
        conditions={name: {"min": float(values.min()), "max": float(values.max()), "unit": CONDITION_UNITS[name]}
                    for name, values in ends.items()},
        attributes={
            "simulator": "uhg.sim.pxd_background.simulate_pxd_background",
            "model": "beam-induced PXD background, calibrated at L = 8e35 cm^-2 s^-1 (docs/calibration.md)",
            "luminosity_distribution": "log-uniform" if luminosity_max is not None else "fixed",
            "currents": "given" if her_current is not None else "machine model (follow the luminosity)",
            "machine": scenario.model_dump(mode="json"),
        },
        seed=seed,
    )
    make_part = functools.partial(_pxd_part, geom.name, seed, luminosity, luminosity_max, her_current, ler_current,
                                  scenario.model_dump(mode="json"))
    fill_store(out, make_part, workers=workers, desc=f"sim pxd {geom.name}")
    lum_text = f"{luminosity:.3g}" + (f"-{luminosity_max:.3g}" if luminosity_max is not None else "")
    typer.echo(f"wrote {events} PXD background events ({geom.name}, L = {lum_text} cm^-2 s^-1, "
               f"machine {scenario.name}) to {out}")


@sim_app.command("signal")
def signal_command(
    events: Annotated[int, typer.Option(help="number of signal events")],
    out: Annotated[Path, typer.Option(help="output Zarr store (directory)")],
    geometry: Annotated[str, typer.Option(help="pixel geometry: pxd, pxd-mini, pxd-tiny")] = "pxd",
    tracks_min: Annotated[int, typer.Option(help="fewest tracks per event")] = 2,
    tracks_max: Annotated[int, typer.Option(help="most tracks per event")] = 10,
    seed: Annotated[int, typer.Option(help="random seed; event i uses its own stream of (seed, i)")] = 0,
    workers: Annotated[int, typer.Option(help="parallel worker processes")] = 1,
    part_size: Annotated[int, typer.Option(help="events per store part")] = 1000,
) -> None:
    """Simulate PXD signal: charged tracks from the interaction point crossing both layers."""
    from uhg.data.parallel import fill_store
    from uhg.data.writer import create_store

    geom = _pixel_geometry(geometry)
    _check_run(events, workers, part_size)
    if not 0 <= tracks_min <= tracks_max:
        raise ConditionError(f"need 0 <= --tracks-min <= --tracks-max, got {tracks_min} and {tracks_max}")
    create_store(
        out, "pixel", geom.name, events, part_size,
        conditions={"n_tracks": {"min": tracks_min, "max": tracks_max, "unit": "tracks"}},
        attributes={"simulator": "uhg.sim.pxd_signal.simulate_pxd_signal",
                    "model": "helical tracks from the IP in 1.5 T, one cluster per crossed sensor"},
        seed=seed,
    )
    make_part = functools.partial(_signal_part, geom.name, seed, tracks_min, tracks_max)
    fill_store(out, make_part, workers=workers, desc=f"sim signal {geom.name}")
    typer.echo(f"wrote {events} PXD signal events ({geom.name}, {tracks_min}-{tracks_max} tracks) to {out}")


def register(app: typer.Typer) -> None:
    from uhg.cli.sim_calo import calo_command

    sim_app.command("calo")(calo_command)
    app.add_typer(sim_app, name="sim")
