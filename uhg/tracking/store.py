"""Where MLflow data lives: tracking URI resolution and the local sqlite + artifact folder default.

MLflow 3.17 refuses the old `./mlruns` file store, so local runs use a sqlite database
(`sqlite:///runs/mlflow.db`) with artifacts in a folder beside it (`runs/mlartifacts`).
`MLFLOW_TRACKING_URI`, when set, wins over the configured URI so that one environment variable
points every job of a cluster at a shared `mlflow server`.
"""

from __future__ import annotations

import os
from pathlib import Path

from uhg.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
ARTIFACT_FOLDER_NAME = "mlartifacts"
_SQLITE_PREFIX = "sqlite:///"


def resolve_tracking_uri(configured: str | None = None, *, base_dir: Path | None = None) -> str:
    """The tracking URI to use: `MLFLOW_TRACKING_URI`, else `configured`, else the sqlite default.

    Relative sqlite paths are made absolute against `base_dir` (default: the current directory)
    so that processes with another working directory (Ray workers) open the same database,
    and the database's folder is created.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured or DEFAULT_TRACKING_URI
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        raise ConfigError(
            f"tracking URI {uri!r}: the MLflow file store is refused by MLflow 3.17; use a database "
            f"such as {DEFAULT_TRACKING_URI!r} or a server URL such as 'http://host:5000'"
        )
    if uri.startswith(_SQLITE_PREFIX):
        db_path = Path(uri[len(_SQLITE_PREFIX) :])
        if str(db_path) != ":memory:":
            if not db_path.is_absolute():
                db_path = (base_dir or Path.cwd()) / db_path
            db_path = db_path.resolve()
            db_path.parent.mkdir(parents=True, exist_ok=True)
            uri = _SQLITE_PREFIX + str(db_path)  # four slashes: an absolute path
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, or None for other stores."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    return Path(uri[len(_SQLITE_PREFIX) :])


def default_artifact_root(tracking_uri: str) -> Path | None:
    """Local artifact folder for a sqlite store (`<db folder>/mlartifacts`); None for servers.

    A server decides its own artifact location (`--default-artifact-root` /
    `--artifacts-destination`), so uhg only picks one for the serverless sqlite case.
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    return db.parent / ARTIFACT_FOLDER_NAME


MODEL_TRAINING_VIEW = "workflowType=machine_learning"
"""Query parameter that opens the MLflow 3 UI in its model-training view. MLflow 3.17's UI picks
GenAI or model training from this parameter (else the browser's last choice, default GenAI), not
from the experiment's `mlflow.experimentKind` tag, which uhg sets as well."""
LOCAL_UI = "http://127.0.0.1:5000"


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's runs (or of one run) in the model-training view:
    on the tracking server itself, or on `mlflow ui` at 127.0.0.1:5000 for a sqlite store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    page = f"/runs/{run_id}" if run_id else "/runs"
    return f"{base}/#/experiments/{experiment_id}{page}?{MODEL_TRAINING_VIEW}"


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """How to look at it: the `mlflow ui` command for a sqlite store, then the page to open."""
    url = ui_url(tracking_uri, experiment_id, run_id)
    if tracking_uri.startswith(_SQLITE_PREFIX):
        return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000, then open {url}"
    return f"open {url}"
