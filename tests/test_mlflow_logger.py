"""MLflow logging against a real sqlite store in a temporary folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from uhg.errors import ConfigError
from uhg.tracking import RunLogger
from uhg.tracking.metadata import flatten_params
from uhg.tracking.mlflow_logger import RUN_ID_FILE, RUN_NAME_TAG, open_run
from uhg.tracking.models import resolve_model_uri
from uhg.tracking.store import resolve_tracking_uri


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.chdir(tmp_path)  # anything MLflow writes relative to the cwd stays in tmp_path
    return f"sqlite:///{tmp_path}/runs/mlflow.db"


def _export(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "generator.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (folder / "generator.json").write_text(json.dumps({"family": "gan"}))
    return folder


def test_run_holds_params_tags_metrics_artifacts_and_registered_model(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    logger = open_run(
        experiment="uhg-test", run_name="mini-1", tracking_uri=store, run_dir=tmp_path / "ray" / "mini-1",
        system_metrics=True, system_metrics_interval_s=0.5,
    )
    assert isinstance(logger, RunLogger)
    logger.log_params({"model": {"family": "gan", "z_dim": 64}, "train": {"lr": 1e-3, "steps": 4}})
    for step in range(1, 5):
        logger.log_metrics({"loss/generator": 1.0 / step, "loss/discriminator": 0.5, "events_per_s": 100.0}, step)
    time.sleep(1.5)  # at least one system-metrics sample
    assert logger.log_loss_curves() == ["loss/discriminator", "loss/generator"]
    version = logger.register_model(_export(tmp_path / "export"), "uhg-test-gen", alias="candidate")
    logger.close()

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.z_dim"] == "64" and run.data.params["train.lr"] == "0.001"
    assert run.data.tags[RUN_NAME_TAG] == "mini-1"
    assert run.data.tags["version.torch"].startswith("2.")
    assert run.data.tags["version.mlflow"] == "3.17.2"
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert [m.step for m in client.get_metric_history(logger.run_id, "loss/generator")] == [1, 2, 3, 4]
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(logger.run_id, "plots")}
    assert artifacts == {"plots/loss_curves.png"}
    png = Path(run.info.artifact_uri.removeprefix("file://")) / "plots" / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.is_relative_to(tmp_path / "runs" / "mlartifacts")

    registered = client.get_model_version_by_alias("uhg-test-gen", "candidate")
    assert str(registered.version) == version == "1" and registered.run_id == logger.run_id
    local = resolve_model_uri("models:/uhg-test-gen@candidate", tracking_uri=store, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in local.iterdir()) == ["generator.json", "generator.safetensors"]
    by_version = resolve_model_uri("models:/uhg-test-gen/1", tracking_uri=store, cache_dir=tmp_path / "cache")
    assert (by_version / "generator.json").read_text() == json.dumps({"family": "gan"})


def test_reopening_a_run_name_continues_the_same_mlflow_run(store: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    run_dir = tmp_path / "ray" / "mini-2"
    first = open_run(experiment="uhg-test", run_name="mini-2", tracking_uri=store, run_dir=run_dir, system_metrics=False)
    first.log_params({"train": {"steps": 2}})
    first.log_metrics({"loss": 2.0}, step=1)
    first.log_metrics({"loss": 1.5}, step=2)
    # no close(): the worker died; a restarted rank 0 opens the run again.
    assert json.loads((run_dir / RUN_ID_FILE).read_text())["run_id"] == first.run_id

    second = open_run(experiment="uhg-test", run_name="mini-2", tracking_uri=store, run_dir=run_dir, system_metrics=False)
    assert second.run_id == first.run_id and second.resumed
    second.log_params({"train": {"steps": 4}})  # a --resume with more steps: kept as a tag
    second.log_metrics({"loss": 1.4}, step=2)  # step redone after restoring the step-1 checkpoint
    second.log_metrics({"loss": 1.0}, step=3)
    assert second.metric_history("loss") == [(1, 2.0), (2, 1.4), (3, 1.0)]
    second.close()

    # The run-id file is gone (e.g. a fresh storage path): the tag still finds the run.
    (run_dir / RUN_ID_FILE).unlink()
    third = open_run(experiment="uhg-test", run_name="mini-2", tracking_uri=store, run_dir=run_dir, system_metrics=False)
    assert third.run_id == first.run_id
    third.close()

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("uhg-test").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.params["train.steps"] == "2"
    assert runs[0].data.tags["uhg.param_override.train.steps"] == "4"


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("sqlite:///runs/mlflow.db", base_dir=tmp_path) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert (tmp_path / "runs").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    assert resolve_tracking_uri("sqlite:///runs/mlflow.db") == "http://10.0.0.5:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match="file store"):
        resolve_tracking_uri("./mlruns")


def test_unknown_model_reference_is_a_config_error(store: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a folder"):
        resolve_model_uri(tmp_path / "nothing-here")
    with pytest.raises(ConfigError, match="could not be resolved"):
        resolve_model_uri("models:/no-such-model@champion", tracking_uri=store)


def test_flatten_params_joins_nested_keys() -> None:
    assert flatten_params({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None}) == {"a.b.c": "1", "a.d": "[1, 2]", "e": "None"}
