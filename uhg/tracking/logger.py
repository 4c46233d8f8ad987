"""The logging interface the training and evaluation code sees.

Only rank 0 gets a real logger (MLflow); every other rank gets `NullLogger`, whose methods
accept the same arguments and do nothing, so call sites need no rank checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RunLogger(Protocol):
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flat or nested parameters (nested keys are joined with '.')."""

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a directory, stored under `artifact_path` in the run."""

    def log_figure(self, figure: Any, name: str) -> None:
        """A matplotlib figure saved as PNG artifact `name`."""

    def log_loss_curves(self) -> list[str]:
        """Plots the run's stored loss histories (all attempts); returns the plotted keys."""

    def register_model(self, export_dir: str | Path, name: str, *, alias: str | None = None) -> str | None:
        """Logs a generator export and registers it as a new version of model `name`."""


class NullLogger:
    """A logger that drops everything (non-zero ranks, tests, tracking switched off)."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_figure(self, figure: Any, name: str) -> None:
        pass

    def log_loss_curves(self) -> list[str]:
        return []

    def register_model(self, export_dir: str | Path, name: str, *, alias: str | None = None) -> str | None:
        return None
