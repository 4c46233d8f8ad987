"""A built wheel is all a user needs: the shipped configs travel inside it and a tiny training
run by config name works from an empty folder.

The wheel is built from the source files without network access (no build isolation) and
installed without dependencies into a fresh virtual environment that sees the dependencies of
the test environment through a .pth line (so nothing is downloaded); uhg itself comes only from
the wheel.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "data.simulate.n_events=16", "--set", "data.simulate.part_size=8", "--set", "train.steps=2",
        "--set", "train.batch_size=2", "--set", "train.checkpoint_every=0", "--set", "data.validation_events=2",
        "--set", "evaluate.final=false", "--set", "model.embed_dim=16", "--set", "model.attention_heads=2"]


def _source_copy(dest: Path) -> Path:
    """The files git would ship (tracked and new, not ignored), links kept as links."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, dst = ROOT / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout of uhg to know its source files")
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp / "dist"), str(src)], check=True, timeout=600)
    (wheel,) = (tmp / "dist").glob("uhg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("uhg/configs/pxd_gan_mini.yaml", "uhg/configs/deepspeed/zero1.yaml",
                    "uhg/configs/extrapolate_pxd_luminosity.yaml", "uhg/geometry/data/binning_dataset_2.xml"):
        assert shipped in names, f"{shipped} is missing from the wheel"
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    (venv_site,) = (venv / "lib").glob("python3*/site-packages")
    # the dependencies of this environment, without processing its .pth files (an editable uhg)
    (venv_site / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                    "--force-reinstall", "-q", str(wheel)], check=True, timeout=300)
    return venv


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _uhg(venv: Path, cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "uhg"), *args], cwd=cwd, env=_env(venv), capture_output=True,
                          text=True, timeout=timeout)


def test_wheel_ships_configs_and_trains_by_name_in_an_empty_folder(wheel_env: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([str(wheel_env / "bin" / "python"), "-c", "import uhg; print(uhg.__file__)"],
                           cwd=empty, env=_env(wheel_env), capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(wheel_env)), f"uhg imported from {where}, not from the wheel"

    listed = _uhg(wheel_env, empty, "configs", "list")
    assert listed.returncode == 0, listed.stderr
    assert "pxd_gan_mini" in listed.stdout and "zero1" in listed.stdout
    shown = _uhg(wheel_env, empty, "configs", "show", "pxd_gan_mini")
    assert shown.returncode == 0 and shown.stdout == (ROOT / "configs" / "pxd_gan_mini.yaml").read_text()

    done = _uhg(wheel_env, empty, "train", "--local", "--no-tracking", "--config", "pxd_gan_mini", *TINY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = empty / "runs" / "pxd_gan_mini"
    assert (run / "export" / "generator.json").is_file()
    store = yaml.safe_load(shown.stdout)["data"]["store"]  # relative in the shipped config
    assert (empty / store).is_dir(), f"the store {store} belongs in the working directory"
    assert not list(wheel_env.glob("lib/python3*/site-packages/uhg/configs/data")), "data written into the package"
