"""Turn a model reference into a local folder holding a generator export.

Accepted references (for `uhg generate --model`, `uhg overlay --model`, ...):
- a local folder (returned as is),
- `models:/<name>@<alias>` or `models:/<name>/<version>` (MLflow model registry),
- `runs:/<run id>/<artifact path>` (artifacts of one MLflow run),
- any other MLflow artifact URI (`mlflow-artifacts:/...`, `s3://...`).

MLflow references are downloaded into a cache folder; the export is plain files (safetensors
weights + json), so nothing is unpickled on the way.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from uhg.errors import ConfigError
from uhg.tracking.store import resolve_tracking_uri

_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/", "s3://", "gs://", "wasbs://", "abfss://", "file:/")


def is_mlflow_uri(reference: str) -> bool:
    return reference.startswith(_MLFLOW_SCHEMES)


def resolve_model_uri(
    reference: str | Path,
    *,
    tracking_uri: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Local folder of the generator export named by `reference`.

    tracking_uri: store to resolve `models:/` and `runs:/` against (default:
        `MLFLOW_TRACKING_URI`, else `sqlite:///runs/mlflow.db`).
    cache_dir: where downloads go (default: a new temporary folder). A download replaces an
        older copy of the same reference in the cache, so an alias that moved is re-fetched.
    Raises ConfigError when the reference names nothing.
    """
    text = str(reference)
    if not is_mlflow_uri(text):
        path = Path(text)
        if not path.is_dir():
            raise ConfigError(
                f"model {text!r}: not a folder and not an MLflow URI "
                "(expected a generator export folder, 'models:/NAME@ALIAS', 'models:/NAME/VERSION' "
                "or 'runs:/RUN_ID/PATH')"
            )
        return path

    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    if cache_dir is None:
        target = Path(tempfile.mkdtemp(prefix="uhg-model-"))
    else:
        target = Path(cache_dir) / hashlib.sha256(f"{uri}|{text}".encode()).hexdigest()[:16]
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = _download(text, target, uri)
    except MlflowException as err:
        raise ConfigError(f"model {text!r} could not be resolved in {uri}: {err.message}") from err
    path = Path(local)
    if not path.is_dir():
        raise ConfigError(f"model {text!r} names a single file ({path.name}); expected a generator export folder")
    return path


def _download(reference: str, target: Path, uri: str) -> str:
    """Downloads through an explicit client: `download_artifacts(artifact_uri="models:/...")`
    would resolve the registry against the process-global URI, not `uri`."""
    import mlflow.artifacts
    from mlflow import MlflowClient

    if reference.startswith("models:/"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        name, version = _parse_models_uri(reference)
        if version.startswith("@"):
            model_version = client.get_model_version_by_alias(name, version[1:])
        else:
            model_version = client.get_model_version(name, version)
        reference = model_version.source
        if not reference.startswith("runs:/"):
            reference = client.get_model_version_download_uri(name, str(model_version.version))
    if reference.startswith("runs:/"):
        run_id, _, artifact_path = reference.removeprefix("runs:/").partition("/")
        return mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path or None, dst_path=str(target), tracking_uri=uri
        )
    return mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(target), tracking_uri=uri)


def _parse_models_uri(reference: str) -> tuple[str, str]:
    """"models:/name@alias" -> ("name", "@alias"); "models:/name/3" -> ("name", "3")."""
    body = reference.removeprefix("models:/").strip("/")
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return name, "@" + alias
    name, _, version = body.rpartition("/")
    if not name or not version.isdigit():
        raise ConfigError(f"model {reference!r}: expected 'models:/NAME@ALIAS' or 'models:/NAME/VERSION'")
    return name, version
