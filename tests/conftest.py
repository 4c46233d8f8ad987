"""Test-wide environment: the same settings tools/env.sh gives users, so `pytest` behaves the
same whether it is started by tools/run_tests.sh or directly."""

from __future__ import annotations

import os
from pathlib import Path

# Set before anything imports deepspeed or ray.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "uhg" / "torch_extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests must never write MLflow data into the working tree by accident.
os.environ.pop("MLFLOW_TRACKING_URI", None)
