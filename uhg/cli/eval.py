"""`uhg eval`: compare generated events with reference events, and the zero-shot protocol.

    uhg eval --reference REF.zarr --generated GEN.zarr --out DIR [--reference2 REF2.zarr]
             [--max-events N] [--repeats 5] [--classifier-repeats 3] [--no-classifier] [--no-plots]
             [--training-range luminosity=1e34:8e35] [--mlflow-run RUN_ID] [--tracking-uri URI]
    uhg eval extrapolate --config configs/extrapolate_pxd_luminosity.yaml [--out DIR]

Writes metrics.json, metrics.md, report.html and PNG figures to DIR. Metrics and the folder are
logged to MLflow when --mlflow-run is given or MLFLOW_RUN_ID names a run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from uhg.errors import ConfigError

eval_app = typer.Typer(
    name="eval",
    help="Evaluate generated events against reference events (metrics with reference-vs-reference floors, "
    "plots, HTML report); `uhg eval extrapolate` runs the zero-shot protocol.",
    invoke_without_command=True,
    no_args_is_help=False,
)


def parse_training_range(items: list[str]) -> dict[str, tuple[float, float]]:
    """`name=lo:hi` strings -> {name: (lo, hi)}."""
    out = {}
    for item in items:
        try:
            name, rng = item.split("=", 1)
            lo, hi = (float(v) for v in rng.split(":", 1))
        except ValueError as err:
            raise ConfigError(f"--training-range {item!r}: expected NAME=LOW:HIGH, e.g. luminosity=1e34:8e35") from err
        if not lo <= hi:
            raise ConfigError(f"--training-range {item!r}: LOW must not exceed HIGH")
        out[name.strip()] = (lo, hi)
    return out


def run_logger(run_id: str | None, tracking_uri: str | None):
    """A RunLogger writing into the existing MLflow run `run_id` (or MLFLOW_RUN_ID), else None."""
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from uhg.tracking.mlflow_logger import MlflowRunLogger
    from uhg.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        raise ConfigError(f"--mlflow-run {run_id!r}: no such run at tracking URI {uri} ({err.message})") from err
    return MlflowRunLogger(client, run_id, tracking_uri=uri, resumed=True)


@eval_app.callback()
def eval_command(
    ctx: typer.Context,
    reference: Annotated[Path | None, typer.Option(help="reference store (simulation or data)")] = None,
    generated: Annotated[Path | None, typer.Option(help="generated store to evaluate")] = None,
    out: Annotated[Path | None, typer.Option(help="output directory for metrics, plots and report.html")] = None,
    reference2: Annotated[Path | None, typer.Option(
        help="second, independent reference store for the floor (default: two halves of --reference)")] = None,
    max_events: Annotated[int | None, typer.Option(help="use at most this many events of each store")] = None,
    repeats: Annotated[int, typer.Option(help="repeated splits / bootstraps for mean +- std")] = 5,
    classifier_repeats: Annotated[int, typer.Option(help="repeats of the classifier test")] = 3,
    classifier: Annotated[bool, typer.Option(help="run the classifier two-sample test")] = True,
    plots: Annotated[bool, typer.Option(help="write PNG figures (off: tables and report only)")] = True,
    training_range: Annotated[list[str] | None, typer.Option(
        help="the model's training range NAME=LOW:HIGH (repeatable); events outside are flagged")] = None,
    seed: Annotated[int, typer.Option(help="seed of the splits and classifier")] = 0,
    mlflow_run: Annotated[str | None, typer.Option(help="MLflow run id to log metrics and report into")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite)")] = None,
) -> None:
    """Compare a generated store with a reference store: metrics.json/md, PNG plots, report.html."""
    if ctx.invoked_subcommand is not None:
        return
    missing = [f"--{n}" for n, v in (("reference", reference), ("generated", generated), ("out", out)) if v is None]
    if missing:
        raise ConfigError(f"uhg eval needs {', '.join(missing)} (or a sub-command: `uhg eval extrapolate --config FILE`)")
    if repeats < 2 or classifier_repeats < 1:
        raise ConfigError(f"--repeats must be >= 2 and --classifier-repeats >= 1, got {repeats} and {classifier_repeats}")
    from uhg.eval.evaluate import evaluate_stores

    logger = run_logger(mlflow_run, tracking_uri)
    report = evaluate_stores(reference, generated, out, reference2, max_events=max_events, n_repeats=repeats,
                             classifier_repeats=classifier_repeats, classifier=classifier, plots=plots,
                             training_range=parse_training_range(training_range or []), seed=seed, logger=logger)
    _print_summary(report, out)


def _print_summary(report, out: Path) -> None:
    from uhg.eval.report import fmt

    typer.echo(f"{report.title}")
    for w in report.warnings:
        typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    for r in report.headline():
        typer.echo(f"  {r.feature:32s} {r.metric:34s} {fmt(r.value, r.value_std):>20s}   floor {fmt(r.floor, r.floor_std)}")
    if report.comparison.skipped:
        typer.echo(f"  not computed: {', '.join(s.feature for s in report.comparison.skipped)} (see metrics.md)")
    typer.echo(f"report: {out / 'report.html'}")


@eval_app.command("extrapolate")
def extrapolate_command(
    config: Annotated[Path, typer.Option(help="protocol YAML, or a shipped name such as extrapolate_pxd_luminosity")],
    out: Annotated[Path | None, typer.Option(help="output directory (overrides the config's `out`)")] = None,
    mlflow_run: Annotated[str | None, typer.Option(help="MLflow run id to log the tables and plots into")] = None,
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
) -> None:
    """Zero-shot extrapolation: generate and simulate at conditions beyond the training range,
    compare with the floor and a naive baseline, per condition."""
    from uhg.eval.extrapolate import load_protocol, run_protocol, run_scenarios

    protocol = load_protocol(config)
    if out is not None:
        protocol.out = str(out)
    if isinstance(protocol.machine, list):
        results = run_scenarios(protocol, logger=run_logger(mlflow_run, tracking_uri))
        typer.echo((Path(protocol.out) / "scenarios.md").read_text())
        for r in results:
            typer.echo(f"report: {Path(r.config.out) / 'report.html'}")
        return
    result = run_protocol(protocol, logger=run_logger(mlflow_run, tracking_uri))
    typer.echo(result.summary())
    typer.echo(f"report: {Path(protocol.out) / 'report.html'}")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
