"""`uhg configs`: the configs shipped with uhg.

    uhg configs list                      # run configs, protocols, DeepSpeed presets, machine scenarios
    uhg configs show pxd_gan_mini         # print one (start your own: ... > my.yaml)

A shipped config is used by name anywhere a config is expected (`uhg train --config
pxd_gan_mini`, `train.deepspeed: zero1`); see uhg.config.shipped for how paths resolve.
"""

from __future__ import annotations

from typing import Annotated

import typer

configs_app = typer.Typer(help="List and print the configs shipped with uhg.", no_args_is_help=True)

KIND_TITLES = {"run": "run configs (uhg train --config NAME)",
               "protocol": "zero-shot protocols (uhg eval extrapolate --config NAME; evaluate.extrapolation: NAME)",
               "deepspeed": "DeepSpeed presets (train.deepspeed: NAME)",
               "machine": "machine scenarios"}


@configs_app.command("list")
def list_command(
    paths: Annotated[bool, typer.Option("--paths", help="also print where each file is installed")] = False,
) -> None:
    """Every shipped config by kind, with the first line of its description."""
    from uhg.config.shipped import shipped_configs

    shipped = shipped_configs()
    width = max(len(c.name) for c in shipped)
    for kind, title in KIND_TITLES.items():
        group = [c for c in shipped if c.kind == kind]
        if not group:
            continue
        typer.echo(f"{title}:")
        for c in group:
            typer.echo(f"  {c.name:<{width}}  {c.summary}" + (f"\n  {'':<{width}}  {c.path}" if paths else ""))


@configs_app.command("show")
def show_command(
    name: Annotated[str, typer.Argument(help="a shipped name from `uhg configs list`")],
) -> None:
    """Print a shipped config; `uhg configs show pxd_gan_mini > my.yaml` starts one's own."""
    from uhg.config.shipped import FOLDERS, shipped_path
    from uhg.errors import ConfigError

    for kind in FOLDERS:
        try:
            path = shipped_path(name, kind)
        except ConfigError:
            continue
        typer.echo(path.read_text(), nl=False)
        return
    shipped_path(name, "run")  # raises the error that lists the run configs


def register(app: typer.Typer) -> None:
    app.add_typer(configs_app, name="configs")
