"""Run provenance: flattened config params, git revision, package versions."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = ("torch", "deepspeed", "ray", "zarr", "numcodecs", "mlflow", "uhg")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}; lists and scalars become strings.

    Pydantic models and dataclasses are accepted through their `model_dump()` / `__dict__`.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


@dataclass(frozen=True)
class GitRevision:
    commit: str
    dirty: bool


def git_revision(path: Path | None = None) -> GitRevision | None:
    """HEAD commit of the repository holding `path` (default: the uhg package), or None
    outside a git checkout (installed wheel, Ray working-dir copy without .git)."""
    where = path or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return GitRevision(commit=commit, dirty=bool(status.strip())) if commit else None


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of the stack, read from package metadata (no imports)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
