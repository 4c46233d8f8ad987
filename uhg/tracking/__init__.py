"""Experiment tracking at the edge of the system: training code talks to a `RunLogger`,
never to MLflow directly, so the same loop runs tracked (rank 0) or silent (other ranks, tests)."""

from uhg.tracking.logger import NullLogger, RunLogger
from uhg.tracking.mlflow_logger import MlflowRunLogger, open_run
from uhg.tracking.models import resolve_model_uri
from uhg.tracking.store import DEFAULT_TRACKING_URI, resolve_tracking_uri

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MlflowRunLogger",
    "NullLogger",
    "RunLogger",
    "open_run",
    "resolve_model_uri",
    "resolve_tracking_uri",
]
