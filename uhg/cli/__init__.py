"""The `uhg` command line.

Each concern registers its commands from its own module (`uhg/cli/<concern>.py`, a
`register(app)` function). Heavy imports (torch, ray, mlflow) happen inside the commands so
that `uhg --help` and `uhg data info` stay fast.
"""

from __future__ import annotations

import importlib
import sys

import typer

from uhg.errors import UhgError

app = typer.Typer(
    name="uhg",
    help="Generative surrogates for ultra-high-granularity detectors: simulate, store, train, generate, overlay, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Order is the order of `uhg --help`.
COMMAND_MODULES: list[str] = ["demo", "sim", "data", "train", "generate", "overlay", "eval", "configs"]
for _name in COMMAND_MODULES:
    importlib.import_module(f"uhg.cli.{_name}").register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one clear message (exit 2), bugs keep their traceback."""
    try:
        app(args=argv, standalone_mode=False)
    except UhgError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        return 2
    except typer.Exit as ex:
        return ex.exit_code
    except typer.Abort:
        typer.secho("aborted", err=True)
        return 130
    except Exception as err:  # click usage errors carry their own formatting
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
