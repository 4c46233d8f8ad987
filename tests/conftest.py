"""Test-wide environment: the same settings tools/env.sh gives users, so `pytest` behaves the
same whether it is started by tools/run_tests.sh or directly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before anything imports deepspeed or ray.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "uhg" / "torch_extensions"))
# Token auth as for users (tools/env.sh); the token of test clusters lives in the test cache,
# not in ~/.ray, unless the caller set one.
os.environ.setdefault("RAY_AUTH_MODE", "token")
if "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_TOKEN_PATH" not in os.environ:
    _token = Path.home() / ".cache" / "uhg" / "test_ray_auth_token"
    if not _token.is_file():
        import secrets

        _token.parent.mkdir(parents=True, exist_ok=True)
        _token.touch(mode=0o600)
        _token.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_token)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests must never write MLflow data into the working tree by accident.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is faster on a shared 2-core machine than two.
    Modules of small-model tests use it with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch  # here, not at the top: the environment above is set before any heavy import

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# As the session found them: a module-scoped fixture that trains in this process sets them
# before any test's own fixtures run, so "as this test found them" would keep them set.
_LAUNCHER_AT_START = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


@pytest.fixture(autouse=True)
def _no_world_of_one_left_behind():
    """Training in the test process makes it a DeepSpeed world of one through RANK, WORLD_SIZE,
    ... in os.environ (uhg.train.engine.init_distributed). Left set, they would make every later
    `uhg train` subprocess believe it runs under torchrun, so after each test they are back as the session found them."""
    yield
    for key, value in _LAUNCHER_AT_START.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
