"""tools/gpu_check.py: its CPU fallback path (--device cpu --quick) runs every figure and the
training exports, each figure's failure is reported as a JSON line, and exports stay under 16 MiB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402


def _run(*args: str, tmp_path: Path, timeout: int = 900) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(tmp_path / "out"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_spent_budget_gives_one_error_line_per_figure(tmp_path):
    lines = _run("--budget-s", "0", tmp_path=tmp_path, timeout=120)
    names = [line["figure"] for line in lines]
    assert names == ["gan_generate_events_per_s", "transformer_train_mfu", "transformer_generate_events_per_s",
                     "gan_train_step_s", "train_data_wait_fraction", "calo_ds2_ms_per_shower", "ray_overhead"]
    for line in lines:
        assert "value" not in line and "budget" in line["error"], line


def test_unknown_figure_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--only", "nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "nope" in done.stderr


@pytest.mark.slow
def test_cpu_quick_measures_every_figure_and_writes_exports(tmp_path):
    figures = ("gan_generate_events_per_s,transformer_train_mfu,transformer_generate_events_per_s,"
               "gan_train_step_s,train_data_wait_fraction,calo_ds2_ms_per_shower")  # ray_overhead: two launches of Ray/torchrun, minutes
    lines = {line["figure"]: line for line in _run("--only", figures, "--train-minutes", "0.02", tmp_path=tmp_path)}
    for name in figures.split(","):
        assert "error" not in lines[name], lines[name]
        assert lines[name]["value"] >= 0 and lines[name]["device"] == "cpu"
    for family in ("gan", "transformer"):
        line = lines[f"train_{family}_export"]
        assert "error" not in line, line
        export = tmp_path / "out" / "exports" / f"pxd_{family}_mini"
        assert (export / "generator.json").is_file() and (export / "generator.safetensors").is_file()
        from uhg.models.generator import Generator

        assert Generator.load(export).geometry.name == "pxd-mini"


def test_large_export_is_stored_in_bf16_and_loads(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    big = torch.randn(5 * 2**20)  # 20 MiB in fp32, 10 MiB in bf16
    save_file({"w": big, "steps": torch.arange(3)}, str(src / "generator.safetensors"), metadata={"format": "x"})
    (src / "generator.json").write_text("{}")
    info = gpu_check.copy_export(src, tmp_path / "dest")
    assert info["weights"] == "bf16" and max(info["bytes"].values()) <= gpu_check.MAX_EXPORT_BYTES
    back = load_file(str(tmp_path / "dest" / "generator.safetensors"))
    assert back["w"].dtype == torch.bfloat16 and back["steps"].dtype == torch.int64
    assert torch.allclose(back["w"].float(), big, rtol=1e-2, atol=1e-2)


def test_peak_tflops_by_device_name():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("some CPU") is None
