"""`uhg demo`: the main job end to end on a small embedded default, on a laptop CPU.

simulate pxd-mini background (training luminosity range) + held-out references + signal
-> train the mini GAN and the mini transformer on 2 Ray workers with DeepSpeed, tracked in MLflow
   (each run ends with its evaluation on the held-out split: evaluate.final in the configs)
-> generate in range and at 2x the top training luminosity (zero-shot) -> evaluation reports
-> overlay generated background onto signal events.

Every step is the `uhg` command a user would type, printed before it runs, so the demo doubles
as a walkthrough. Steps whose outputs are already complete are skipped (stores resume by part),
so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

# The training range of the demo and the zero-shot point above it (cm^-2 s^-1).
LUMI_MIN, LUMI_MAX = 2.0e35, 8.0e35
LUMI_ZERO_SHOT = 2 * LUMI_MAX
GEOMETRY = "pxd-mini"
EXPERIMENT = "uhg-pxd"  # MLflow experiment of both demo runs
# The demo's own short trainings, whatever the mini configs ship: it must end within 10 minutes
# on 2 cores. The transformer keeps 150 steps at a constant rate and exports its last weights
# (its demo target is the cluster-size spectrum, reached there); its shipped config trains longer,
# with an average of the weights, for the in-range protocol.
DEMO_TRAIN = {"gan": [], "transformer": ["train.steps=150", "train.lr_schedule=constant", "train.warmup_steps=0",
                                         "model.ema_decay=0.0"]}


def _run(argv: list[str], title: str, done: bool = False) -> None:
    line = "uhg " + shlex.join(argv)
    typer.secho(f"\n== {title}", fg=typer.colors.CYAN, bold=True)
    typer.echo(f"$ {line}")
    if done:
        typer.echo("   (already done, skipped)")
        return
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "uhg", *argv], env=os.environ.copy())
    if proc.returncode != 0:
        typer.secho(f"demo step failed (exit {proc.returncode}): {line}", fg=typer.colors.RED, err=True)
        raise typer.Exit(proc.returncode)
    typer.echo(f"   done in {time.perf_counter() - t0:.0f} s")


def _store_complete(path: Path) -> bool:
    if not path.exists():
        return False
    from uhg.data.layout import missing_parts

    try:
        return not missing_parts(path)
    except Exception:  # not a store (yet): the step recreates it
        return False


def demo_command(
    out: Annotated[Path, typer.Option(help="folder for every output of the demo")] = Path("runs/demo"),
    workers: Annotated[int, typer.Option(help="Ray training workers (DeepSpeed data-parallel ranks)")] = 2,
    steps: Annotated[int | None, typer.Option(help="training steps per model (default: the GAN config's, 150 for "
                                                  "the transformer)")] = None,
    events: Annotated[int, typer.Option(help="training events to simulate")] = 400,
) -> None:
    """Run the main job end to end on CPU: simulate, train a GAN and a transformer with Ray +
    DeepSpeed + MLflow, generate in range and zero-shot, evaluate, overlay."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    out = out.resolve()
    data, runs, reports = out / "data", out / "runs", out / "reports"
    # MLFLOW_TRACKING_URI overrides (a shared server, say); else a sqlite store beside the outputs
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    t_start = time.perf_counter()

    train_store = data / "pxd_mini_train.zarr"
    ref_in = data / "pxd_mini_reference.zarr"
    ref_zero = data / "pxd_mini_reference_2x.zarr"
    signal = data / "pxd_mini_signal.zarr"
    sim = ["sim", "pxd", "--geometry", GEOMETRY, "--workers", "2"]
    _run([*sim, "--luminosity", f"{LUMI_MIN:g}", "--luminosity-max", f"{LUMI_MAX:g}", "--events", str(events),
          "--seed", "1", "--out", str(train_store)], "simulate the training set (luminosity range)",
         _store_complete(train_store))
    _run([*sim, "--luminosity", f"{LUMI_MAX:g}", "--events", "200", "--seed", "2", "--out", str(ref_in)],
         "simulate an in-range reference sample (top training luminosity)", _store_complete(ref_in))
    _run([*sim, "--luminosity", f"{LUMI_ZERO_SHOT:g}", "--events", "200", "--seed", "3", "--out", str(ref_zero)],
         "simulate the zero-shot reference (2x the top training luminosity)", _store_complete(ref_zero))
    _run(["sim", "signal", "--geometry", GEOMETRY, "--events", "100", "--seed", "4", "--out", str(signal)],
         "simulate signal events (tracks from the interaction point)", _store_complete(signal))
    _run(["data", "info", str(train_store)], "inspect the training store")

    exports = {}
    for family in ("gan", "transformer"):
        run_dir = runs / family
        export = run_dir / family / "export"
        argv = ["train", "--config", f"pxd_{family}_mini", "--run-name", family,  # shipped with uhg
                "--set", f"data.store={train_store}", "--set", f"output_dir={run_dir}",
                "--set", f"distributed.workers={workers}", "--set", f"tracking.tracking_uri={tracking_uri}",
                "--set", "tracking.enabled=true", "--set", f"tracking.experiment={EXPERIMENT}",
                "--set", f"tracking.registered_model_name=uhg-demo-pxd-{family}", "--set", "tracking.alias=demo"]
        for override in DEMO_TRAIN[family]:
            argv += ["--set", override]
        if steps is not None:
            argv += ["--set", f"train.steps={steps}"]
        _run(argv, f"train the mini {family} on {workers} Ray workers (DeepSpeed ZeRO, MLflow)",
             (export / "generator.json").exists())
        exports[family] = export

    for family, export in exports.items():
        for label, lumi, ref in (("in-range", LUMI_MAX, ref_in), ("zero-shot 2x", LUMI_ZERO_SHOT, ref_zero)):
            tag = "2x" if "2x" in label else "in_range"
            gen = data / f"generated_{family}_{tag}.zarr"
            _run(["generate", "--model", str(export), "--events", "200", "--luminosity", f"{lumi:g}", "--seed", "5",
                  "--out", str(gen)], f"generate with the {family} ({label}, L = {lumi:g})", _store_complete(gen))
            _run(["eval", "--reference", str(ref), "--generated", str(gen), "--out", str(reports / f"{family}_{tag}"),
                  "--repeats", "3", "--classifier-repeats", "1"], f"evaluate the {family} ({label})")

    overlay = data / "pxd_mini_overlay.zarr"
    _run(["overlay", "--signal", str(signal), "--model", str(exports["gan"]), "--luminosity", f"{LUMI_MAX:g}",
          "--seed", "6", "--out", str(overlay)], "overlay generated background onto the signal events",
         _store_complete(overlay))
    _run(["data", "info", str(overlay)], "inspect the overlay store")

    typer.secho(f"\nuhg demo finished in {(time.perf_counter() - t_start) / 60:.1f} min.", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  stores:        {data}")
    typer.echo(f"  runs:          {runs}  (checkpoints, generator exports)")
    for family in exports:
        typer.echo(f"  reports:       {reports / (family + '_in_range') / 'report.html'}  |  "
                   f"{reports / (family + '_2x') / 'report.html'}")
    for family, export in exports.items():  # the runs' own evaluation on their held-out split (evaluate.final)
        typer.echo(f"  run report:    {export.parent / 'eval' / 'report.html'}  (held-out {family} events; also in MLflow)")
    typer.echo(f"  MLflow:        {tracking_uri}: experiment {EXPERIMENT} (runs gan and transformer), "
               "models uhg-demo-pxd-gan and uhg-demo-pxd-transformer")
    from mlflow import MlflowClient

    from uhg.tracking.store import ui_hint

    experiment = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        typer.echo(f"  MLflow UI:     {ui_hint(tracking_uri, experiment.experiment_id)}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
