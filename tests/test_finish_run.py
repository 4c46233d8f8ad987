"""The end of a run is the same for local and Ray runs (`uhg.train.finish.finish_run`): a
`uhg train --local` run of the tiny GAN that tests/test_ray_job.py trains on Ray leaves the same
MLflow artifacts (loss curves, physics plots, registered generator) and, resumed, the same tags,
in a real sqlite MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uhg.cli import main

CONFIG = """\
name: tiny-local
geometry: pxd-tiny
seed: 3
data:
  store: {root}/tiny.zarr
  simulate: {{n_events: 48, part_size: 24, luminosity_min: 1.0e34, luminosity_max: 4.0e34}}
  validation_events: 8
model: {{family: gan, z_dim: 8, sensor_noise_dim: 2, embed_dim: 16, attention_layers: 1, attention_heads: 2,
        decoder_channels: [8, 4], discriminator_channels: [4, 8]}}
train: {{steps: 4, batch_size: 2, checkpoint_every: 2, log_every: 1}}
tracking: {{tracking_uri: "sqlite:///{root}/mlflow.db", experiment: finish-test, registered_model_name: uhg-tiny-local,
           alias: candidate}}
evaluate: {{final: true, events: 16, repeats: 2, classifier: false, plots: false}}
output_dir: {root}/run
"""


pytestmark = pytest.mark.usefixtures("world_of_one")


@pytest.mark.slow  # two tiny training runs with MLflow: ~80 s on 2 cores
def test_a_local_run_ends_like_a_ray_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    assert main(["train", "--local", "--config", str(config)]) == 0

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("finish-test").experiment_id])
    assert run.info.status == "FINISHED"
    assert not {"uhg.eval_error", "uhg.plots_error", "uhg.resumed_from_step"} & set(run.data.tags)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"eval", "generator", "plots"}
    # the same plots as the Ray run of tests/test_ray_job.py
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/loss_curves.png", "plots/occupancy_per_sensor.png", "plots/charge.png"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "generator")} == {
        "generator/generator.json", "generator/generator.safetensors"}
    version = client.get_model_version_by_alias("uhg-tiny-local", "candidate")
    assert version.run_id == run.info.run_id and version.source == f"runs:/{run.info.run_id}/generator"
    # the held-out report and the plots describe one sample: the first evaluate.events events of
    # the validation split, which is the loader's own "val" split of the store
    from uhg.data.loader import HitDataset

    val = HitDataset(tmp_path / "tiny.zarr", 1, split="val", val_fraction=0.1).events[:16]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["inputs"]["reference"].startswith(
        f"{len(val)} held-out events (validation split, event numbers {val[0]}..{val[-1]}) of")

    # resumed: the same MLflow run, tagged with the step it resumed from, a second model version
    assert main(["train", "--local", "--config", str(config), "--set", "train.steps=6"]) == 0
    [run] = client.search_runs([client.get_experiment_by_name("finish-test").experiment_id])
    assert run.data.tags["uhg.resumed_from_step"] == "4"
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")}) == list(range(1, 7))
    assert client.get_model_version_by_alias("uhg-tiny-local", "candidate").version in (2, "2")


@pytest.mark.slow  # a fresh sqlite MLflow store: ~35 s on the shared 2-core machine
def test_a_tracked_run_without_held_out_events_has_no_plots_and_no_error(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from uhg.config import load_config
    from uhg.tracking.mlflow_logger import open_run
    from uhg.train.data import TrainingData, simulate_store
    from uhg.train.finish import finish_run

    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(root=tmp_path))
    cfg = load_config(config, ["data.validation_fraction=0", "evaluate.final=false",
                               "tracking.registered_model_name=null", "data.simulate.n_events=8", "data.simulate.part_size=8"])
    simulate_store(cfg.data.store[0], cfg.geometry, cfg.data.simulate, progress=False)
    export = tmp_path / "export"  # never loaded: without held-out events there is nothing to generate for
    export.mkdir()
    (export / "generator.json").write_text("{}")
    logger = open_run(experiment="finish-test", run_name="no-held-out", tracking_uri=cfg.tracking.tracking_uri,
                      run_dir=cfg.run_dir, system_metrics=False)
    result = finish_run(cfg, export, TrainingData.open(cfg), logger, step=1)
    logger.close("FINISHED")

    assert result.errors == [] and result.held_out is None
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    assert not {"uhg.eval_error", "uhg.plots_error"} & set(client.get_run(logger.run_id).data.tags)
    assert {a.path for a in client.list_artifacts(logger.run_id)} == {"generator"}
