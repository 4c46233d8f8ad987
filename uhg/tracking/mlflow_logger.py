"""`RunLogger` backed by MLflow, used on rank 0 only.

One uhg training run is one MLflow run, also across Ray Train restarts and `uhg train --resume`:
the MLflow run id is written to `<run dir>/mlflow_run.json` (the Ray run's storage folder) and the
run carries the tag `uhg.run_name`; a restarted rank 0 finds the run by the file (or, if the file
is gone, by the tag) and keeps logging into it.

All calls go through an explicit `MlflowClient` (no global active run), so several loggers can
live in one process (tests) and nothing depends on `mlflow.start_run` state.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uhg.tracking.metadata import flatten_params, git_revision, package_versions
from uhg.tracking.store import default_artifact_root, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

log = logging.getLogger(__name__)

RUN_NAME_TAG = "uhg.run_name"
RUN_ID_FILE = "mlflow_run.json"
# MLflow's limits per log_batch call (params: 100, metrics: 1000).
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_PARAM_VALUE_LIMIT = 6000


class MlflowRunLogger:
    """Logs to one MLflow run; implements `uhg.tracking.RunLogger` plus model registration.

    Create it with `open_run(...)`; finish it with `close()` (or use it as a context manager,
    which closes with status FAILED when an exception leaves the block).
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        tracking_uri: str,
        resumed: bool,
        system_metrics: SystemMetricsMonitor | None = None,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = client.get_run(run_id).info.experiment_id
        self.tracking_uri = tracking_uri
        self.resumed = resumed
        self._system_metrics = system_metrics
        self._closed = False

    # -- RunLogger --------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested mappings become dotted keys. MLflow params are immutable: on a resumed run,
        keys already logged with another value are kept and the new value is recorded as tag
        `uhg.param_override.<key>` (e.g. a longer `train.steps` for `--resume`)."""
        from mlflow.entities import Param, RunTag

        flat = {k: _clip(v) for k, v in flatten_params(params).items()}
        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        changed = [
            RunTag(f"uhg.param_override.{k}", v)
            for k, v in flat.items()
            if k in existing and existing[k] != v
        ]
        for chunk in _chunks(new, _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=chunk)
        if changed:
            log.info("run %s: %d params differ from the first attempt; logged as tags", self.run_id, len(changed))
            self.client.log_batch(self.run_id, tags=changed)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(k, float(v), now_ms, int(step)) for k, v in metrics.items()]
        for chunk in _chunks(batch, _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Any, name: str) -> None:
        """Saves `figure` as PNG artifact `name` (".png" is appended when missing)."""
        if not name.endswith(".png"):
            name += ".png"
        self.client.log_figure(self.run_id, figure, name, save_kwargs={"dpi": 110, "bbox_inches": "tight"})

    # -- beyond RunLogger -------------------------------------------------------------------

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of one metric over the whole run, all attempts, sorted by step; for a
        step logged twice (steps redone after a restart) the later value wins."""
        by_step: dict[int, tuple[int, float]] = {}
        for m in self.client.get_metric_history(self.run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        return [(s, v) for s, (_, v) in sorted(by_step.items())]

    def metric_keys(self) -> list[str]:
        return sorted(self.client.get_run(self.run_id).data.metrics)

    def log_loss_curves(self, name: str = "plots/loss_curves.png") -> list[str]:
        """Plots every metric whose name contains "loss" (excluding system metrics) against step,
        from the stored history (so restarts are included); returns the plotted keys."""
        from uhg.tracking.plots import loss_curve_figure

        keys = [k for k in self.metric_keys() if "loss" in k and not k.startswith("system/")]
        if not keys:
            return []
        figure = loss_curve_figure({k: self.metric_history(k) for k in keys})
        try:
            self.log_figure(figure, name)
        finally:
            import matplotlib.pyplot as plt

            plt.close(figure)
        return keys

    def register_model(
        self,
        export_dir: str | Path,
        name: str,
        *,
        alias: str | None = None,
        artifact_path: str = "generator",
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Logs the generator export (safetensors weights + json description, no pickle) as run
        artifacts under `artifact_path` and registers them as a new version of model `name`
        (source `runs:/<run id>/<artifact_path>`); points `alias` at it. Returns the version.

        Loading goes through `uhg.tracking.models.resolve_model_uri("models:/name@alias")`,
        which downloads the files; nothing is unpickled.
        """
        from mlflow.exceptions import MlflowException

        export_dir = Path(export_dir)
        if not export_dir.is_dir():
            from uhg.errors import CheckpointError

            raise CheckpointError(f"generator export {export_dir} is not a directory")
        self.log_artifact(export_dir, artifact_path)
        try:
            self.client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            name,
            source=f"runs:/{self.run_id}/{artifact_path}",
            run_id=self.run_id,
            tags={"format": "uhg-safetensors", **(tags or {})},
        )
        if alias:
            self.client.set_registered_model_alias(name, alias, version.version)
        self.set_tags({"uhg.registered_model": f"{name}/{version.version}"})
        return str(version.version)

    def close(self, status: str = "FINISHED") -> None:
        """Stops system metrics and marks the run FINISHED / FAILED / KILLED (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._system_metrics is not None:
            self._system_metrics.finish()
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> MlflowRunLogger:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")


def open_run(
    *,
    experiment: str,
    run_name: str,
    tracking_uri: str | None = None,
    artifact_location: str | None = None,
    run_dir: str | Path | None = None,
    system_metrics: bool = True,
    system_metrics_interval_s: float | None = None,
    tags: Mapping[str, str] | None = None,
) -> MlflowRunLogger:
    """Creates the MLflow run of uhg run `run_name`, or reopens it when it exists.

    artifact_location: artifact root of the experiment if this call creates it (default: for a
        sqlite store, `mlartifacts/` beside the database; for a server, the server's choice).
    run_dir: the run's own folder (Ray: `<storage_path>/<run name>`); the MLflow run id is
        stored there so every attempt of the run logs into the same MLflow run.
    tags: extra tags; git revision and package versions are always added.
    system_metrics_interval_s: seconds between system-metric samples (default: MLflow's
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, else 10).
    """
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment_id = _experiment_id(client, experiment, uri, artifact_location)
    run_id = _existing_run_id(client, experiment_id, run_name, run_dir, uri)
    resumed = run_id is not None
    if run_id is None:
        run = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name})
        run_id = run.info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
        log.info("continuing MLflow run %s of %s", run_id, run_name)
    if run_dir is not None:
        _write_run_id(Path(run_dir), run_id, experiment_id, uri)

    monitor = None
    if system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if system_metrics_interval_s is None:
            system_metrics_interval_s = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or 10.0)
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=system_metrics_interval_s,
            resume_logging=resumed,
            tracking_uri=uri,
        )
        monitor.start()
    logger = MlflowRunLogger(client, run_id, tracking_uri=uri, resumed=resumed, system_metrics=monitor)
    logger.set_tags({**_provenance_tags(), **(tags or {})})
    return logger


def find_run_id(run_name: str, *, experiment: str, tracking_uri: str | None = None) -> str | None:
    """The MLflow run id of uhg run `run_name` (by tag), or None."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    return _run_id_by_tag(client, exp.experiment_id, run_name)


# -- helpers ----------------------------------------------------------------------------------


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""The experiment tag the MLflow 3 UI reads to choose its view; without it the UI guesses and may
open the GenAI traces view. uhg experiments train models: "custom_model_development"."""
EXPERIMENT_KIND = "custom_model_development"


def _experiment_id(client: MlflowClient, name: str, uri: str, artifact_location: str | None) -> str:
    """The id of experiment `name`, created if missing, tagged as model training (a kind a user
    chose in the UI is kept)."""
    exp_id = _find_or_create_experiment(client, name, uri, artifact_location)
    if EXPERIMENT_KIND_TAG not in client.get_experiment(exp_id).tags:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp_id


def _find_or_create_experiment(client: MlflowClient, name: str, uri: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location
    root = default_artifact_root(uri)
    if location is None and root is not None:
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    elif location is not None and "://" not in location and not location.startswith("/"):
        location = Path(location).resolve().as_uri()  # relative folder: absolute, like the database
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process created it between the lookup and the create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _existing_run_id(
    client: MlflowClient, experiment_id: str, run_name: str, run_dir: str | Path | None, uri: str
) -> str | None:
    from mlflow.exceptions import MlflowException

    if run_dir is not None:
        recorded = Path(run_dir) / RUN_ID_FILE
        if recorded.is_file():
            info = json.loads(recorded.read_text())
            if info.get("tracking_uri") == uri:
                try:
                    run = client.get_run(info["run_id"])
                    if run.info.lifecycle_stage == "active":
                        return run.info.run_id
                except MlflowException:
                    log.warning("%s names run %s, which %s does not hold", recorded, info["run_id"], uri)
    return _run_id_by_tag(client, experiment_id, run_name)


def _run_id_by_tag(client: MlflowClient, experiment_id: str, run_name: str) -> str | None:
    quoted = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{quoted}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _write_run_id(run_dir: Path, run_id: str, experiment_id: str, uri: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RUN_ID_FILE}.tmp"
    tmp.write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}, indent=1))
    tmp.replace(run_dir / RUN_ID_FILE)


def _provenance_tags() -> dict[str, str]:
    tags = {f"version.{name}": version for name, version in package_versions().items()}
    revision = git_revision()
    if revision is not None:
        tags["mlflow.source.git.commit"] = revision.commit
        tags["git.dirty"] = str(revision.dirty).lower()
    return tags


def _clip(value: str) -> str:
    return value if len(value) <= _PARAM_VALUE_LIMIT else value[: _PARAM_VALUE_LIMIT - 3] + "..."


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
