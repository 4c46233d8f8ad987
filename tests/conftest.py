"""Test-wide environment: the same settings tools/env.sh gives users, so `pytest` behaves the
same whether it is started by tools/run_tests.sh or directly."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
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
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as a launcher's world of one (RANK=0, WORLD_SIZE=1, ...) for a test that
    trains in-process, on a free local port unless an earlier test of this process already
    joined the process group (it stays joined, on its own port). Undone after the test."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """small_disk("160k"): a folder on a tmpfs of that size (disk-full tests), unmounted after the
    test; the test is skipped where mounting needs privileges this process lacks."""
    mounts = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)
