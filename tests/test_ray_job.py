"""A real Ray head on loopback and real `ray job submit` runs of `uhg train` with 2 workers.

One head serves both tests (each Ray Train start costs ~20 s on 2 cores):
1. a run whose rank-1 worker is SIGKILLed after step 3 (checkpoints every 2 steps, one
   restart allowed) completes from its step-2 checkpoint into ONE MLflow run with params,
   continuous step metrics, plots and a registered generator;
2. `--resume` of that run with more steps continues it in the same MLflow run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

# ~1.5 min per job on an idle 2-core machine; generous limits because shared CI machines are not idle.
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RUN = "tiny-ray"
TINY_CONFIG = """\
name: tiny-ray
geometry: pxd-tiny
seed: 3
data:
  store: data/tiny.zarr
  simulate: {n_events: 48, part_size: 24, luminosity_min: 1.0e34, luminosity_max: 4.0e34}
  validation_events: 8
model:
  family: gan
  z_dim: 8
  sensor_noise_dim: 2
  embed_dim: 16
  attention_layers: 1
  attention_heads: 2
  decoder_channels: [8, 4]
  discriminator_channels: [4, 8]
train:
  steps: 6
  batch_size: 2
  checkpoint_every: 2
  keep_checkpoints: 2
  log_every: 1
  zero_stage: 1
distributed: {workers: 2, cpus_per_worker: 1, max_failures: 1}
tracking:
  experiment: ray-job-test
  registered_model_name: uhg-tiny-ray
  alias: candidate
"""


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _own_processes(marker: str) -> list[int]:
    """PIDs whose command line names our Ray temp dir (every process of our head has it)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [pid for pid in found if pid != os.getpid()]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and ports; stopped by PID."""
    temp_dir = tempfile.mkdtemp(prefix="uhg-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs, dashboard, client, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = _free_ports(9)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "DS_ACCELERATOR": "cpu",
    }
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={node_mgr}",
         f"--object-manager-port={obj_mgr}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not come up:\n{head.stdout.read() if head.stdout else ''}")
            time.sleep(1)
        yield {**env, "RAY_ADDRESS": address}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in _own_processes(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(env: dict[str, str], workdir: Path, *uhg_args: str, job_env: dict[str, str]) -> subprocess.CompletedProcess:
    # Sample system metrics every second: a tiny run can finish before MLflow's default 10 s.
    runtime_env = {"env_vars": {"UHG_ROOT": str(workdir), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", **job_env}}
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps(runtime_env), "--", "uhg", "train", *uhg_args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rayjob")
    (root / "configs").mkdir()
    (root / "configs" / "tiny.yaml").write_text(TINY_CONFIG)
    return root


def _client(workdir: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir}/runs/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _single_run(workdir: Path):
    client = _client(workdir)
    experiment = client.get_experiment_by_name("ray-job-test")
    assert experiment is not None, "the job logged nothing to the sqlite store under UHG_ROOT"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one MLflow run for all attempts, found {len(runs)}"
    return client, runs[0]


def test_killed_worker_restarts_from_checkpoint_into_one_mlflow_run(ray_head: dict[str, str], workdir: Path) -> None:
    # --verbose: the workers' own messages (the injected kill, the resume) reach the job's log
    done = _submit(ray_head, workdir, "--config", str(workdir / "configs" / "tiny.yaml"), "--run-name", RUN,
                   "--verbose", job_env={"UHG_FAULT_KILL_WORKER": "1@3"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert "rank 1" in log and "SIGKILLs itself after step 3" in log
    assert "resumes from step 2" in log

    run_folder = workdir / "runs" / "tiny-ray" / RUN
    assert (run_folder / ".fault_injected_rank1_step3").is_file()
    # Ray's copies of the checkpoints of the second attempt (keep_checkpoints: 2); the step-2
    # upload of the first attempt may remain, as the killed worker group never committed it.
    ray_checkpoints = {p.name for p in run_folder.glob("checkpoint_step_*")}
    assert {"checkpoint_step_000004", "checkpoint_step_000006"} <= ray_checkpoints
    merged = run_folder / "checkpoint_step_000006"
    assert json.loads((merged / "trainer.json").read_text())["step"] == 6
    assert sorted(p.name for p in (merged / "rng").iterdir()) == ["rank_00000.json", "rank_00001.json"]

    client, run = _single_run(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.tags["uhg.attempts"] == "2"
    assert run.data.tags["uhg.resumed_from_step"] == "2"
    assert run.data.params["distributed.workers"] == "2" and run.data.params["world_size"] == "2"
    assert run.data.tags["version.ray"] == "2.60.0"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")})
    assert steps == [1, 2, 3, 4, 5, 6]
    assert any(k.startswith("val_") for k in run.data.metrics)
    assert any(k.startswith("system/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"generator", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/loss_curves.png", "plots/occupancy_per_sensor.png", "plots/charge.png"}
    version = client.get_model_version_by_alias("uhg-tiny-ray", "candidate")
    assert version.run_id == run.info.run_id and version.source == f"runs:/{run.info.run_id}/generator"


def test_resume_continues_the_finished_run(ray_head: dict[str, str], workdir: Path) -> None:
    done = _submit(ray_head, workdir, "--config", str(workdir / "configs" / "tiny.yaml"), "--resume", RUN,
                   "--set", "train.steps=8", job_env={})
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    # the job's log: uhg's progress line, none of Ray's internal messages
    log = done.stdout + done.stderr
    assert re.search(rf"{RUN}  step 6/8  \(resumed at step 6\)", log), log[-6000:]
    assert re.search(r"step 8/8 .*steps/s.*checkpoint step 8  done", log), log[-6000:]
    for chatter in ("PlacementGroupCleaner", "Reporting training result", "RayTrainWorker", "TrainController"):
        assert chatter not in log, log[-6000:]
    client, run = _single_run(workdir)
    assert run.info.status == "FINISHED"
    assert run.data.tags["uhg.attempts"] == "3"
    assert run.data.tags["uhg.resumed_from_step"] == "6"
    assert run.data.tags["uhg.param_override.train.steps"] == "8"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")})
    assert steps == list(range(1, 9))
    versions = client.search_model_versions("name='uhg-tiny-ray'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert client.get_model_version_by_alias("uhg-tiny-ray", "candidate").version in (2, "2")
