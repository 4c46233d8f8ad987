"""The evaluation at the end of a run: `uhg train --local` of a tiny calorimeter GAN with
`evaluate.final` and an extrapolation protocol leaves the held-out report and the zero-shot report
in the run folder, and their metrics and folders in the run's own MLflow run (real sqlite store)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from uhg.cli import main
from uhg.config import load_config
from uhg.errors import ConfigError

CONFIG = """
name: calo_eval
seed: 2
geometry: ds1-photons
data:
  store: {root}/showers.zarr
  simulate: {{n_events: 48, part_size: 24, energy_min: 1000.0, energy_max: 4000.0}}
  validation_fraction: 0.5
  validation_events: 4
model: {{family: gan, conditions: [incident_energy], embed_dim: 16, attention_layers: 1, attention_heads: 2, z_dim: 8,
        sensor_noise_dim: 2, decoder_channels: [8, 4], discriminator_channels: [4, 8], ema_decay: 0.9}}
train: {{steps: 2, batch_size: 4, log_every: 1}}
tracking: {{tracking_uri: "sqlite:///{root}/mlflow.db", experiment: uhg-eval-test}}
evaluate: {{final: true, events: 24, repeats: 2, classifier: false, plots: false, extrapolation: {root}/protocol.yaml}}
output_dir: {root}/run
"""

PROTOCOL = """
geometry: ds1-photons
model: null
condition: incident_energy
training_range: [1.0, 2.0]
test_factors: [2.0]
n_events: 12
repeats: 2
classifier: false
plots_per_condition: false
seed: 100
out: unused
"""


pytestmark = pytest.mark.usefixtures("world_of_one")


def test_final_evaluation_and_extrapolation_land_in_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    (tmp_path / "protocol.yaml").write_text(PROTOCOL)
    (tmp_path / "run.yaml").write_text(CONFIG.format(root=tmp_path))
    assert main(["train", "--local", "--config", str(tmp_path / "run.yaml")]) == 0

    # held-out report: the validation split's showers (at most 24) vs as many generated at their energies
    from uhg.data.loader import HitDataset

    val = HitDataset(tmp_path / "showers.zarr", 1, split="val", val_fraction=0.5).events[:24]
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert f"{len(val)} held-out events (validation split, event numbers {val[0]}..{val[-1]})" in \
        metrics["inputs"]["reference"]
    assert metrics["inputs"]["training incident_energy"].endswith("MeV")
    assert (tmp_path / "run" / "eval" / "report.html").is_file()
    # zero-shot report with the run's export and the run's training range (not the file's [1, 2])
    extrapolation = json.loads((tmp_path / "run" / "extrapolation" / "extrapolation.json").read_text())
    assert extrapolation["config"]["model"] == str(tmp_path / "run" / "export")
    lo, hi = extrapolation["config"]["training_range"]
    assert 1000.0 <= lo < hi <= 4000.0
    assert extrapolation["points"][0]["value"] == pytest.approx(2 * hi)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("uhg-eval-test").experiment_id])
    assert run.info.status == "FINISHED" and "uhg.eval_error" not in run.data.tags
    keys = set(run.data.metrics)
    assert {"eval/response/separation_power", "eval/response/separation_power/floor"} <= keys
    assert "extrapolate/response/separation_power/generated" in keys and "loss_generator" in keys
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/response/separation_power")] == [2]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"eval", "extrapolate", "generator"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {"eval/report.html", "eval/metrics.json"}
    assert "extrapolate/report.html" in {a.path for a in client.list_artifacts(run.info.run_id, "extrapolate")}


def test_evaluation_settings_are_checked_before_training(tmp_path: Path) -> None:
    (tmp_path / "protocol.yaml").write_text(PROTOCOL.replace("ds1-photons", "ds2"))
    (tmp_path / "run.yaml").write_text(CONFIG.format(root=tmp_path))
    cfg = load_config(tmp_path / "run.yaml", ["tracking.enabled=false"])
    from uhg.train.evaluation import load_extrapolation

    with pytest.raises(ConfigError, match=r"protocol.yaml is a protocol for geometry 'ds2', the run trains 'ds1-photons'"):
        load_extrapolation(cfg)
    (tmp_path / "protocol.yaml").write_text(PROTOCOL.replace("seed: 100", "seed: 0"))
    with pytest.raises(ConfigError, match=r"protocol.yaml: seed 0: .*reference seed 1 is a seed of the training data"):
        load_extrapolation(cfg)  # data.simulate.seed 1 (default) is the reference's seed
    cfg = load_config(tmp_path / "run.yaml", [f"evaluate.extrapolation={tmp_path / 'missing.yaml'}"])
    with pytest.raises(ConfigError, match=r"evaluate.extrapolation: .*missing.yaml: cannot read protocol file"):
        load_extrapolation(cfg)
    with pytest.raises(ConfigError, match="evaluate.final evaluates on the held-out events: set data.validation_fraction > 0"):
        load_config(tmp_path / "run.yaml", ["data.validation_fraction=0"])
    with pytest.raises(ConfigError, match="evaluate.events"):
        load_config(tmp_path / "run.yaml", ["evaluate.events=0"])


def test_a_failing_evaluation_keeps_the_run_and_is_tagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from uhg.tracking.mlflow_logger import open_run
    from uhg.train.data import TrainingData, simulate_store
    from uhg.train.evaluation import evaluate_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(CONFIG.format(root=tmp_path))
    cfg = load_config(tmp_path / "run.yaml", ["evaluate.extrapolation=null"])
    simulate_store(cfg.data.store[0], cfg.geometry, cfg.data.simulate, progress=False)
    not_an_export = tmp_path / "run" / "export"
    not_an_export.mkdir(parents=True)
    logger = open_run(experiment="uhg-eval-test", run_name="broken", tracking_uri=cfg.tracking.tracking_uri,
                      run_dir=cfg.run_dir, system_metrics=False)
    result = evaluate_run(cfg, not_an_export, TrainingData.open(cfg), logger=logger, step=2)
    logger.close("FINISHED")

    assert result.held_out is None and len(result.errors) == 1
    assert result.errors[0].startswith("held_out evaluation failed: CheckpointError:")
    tags = MlflowClient(tracking_uri=cfg.tracking.tracking_uri).get_run(logger.run_id).data.tags
    assert tags["uhg.eval_error"] == result.errors[0][:500]
