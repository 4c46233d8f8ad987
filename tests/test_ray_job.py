"""A real Ray head on loopback and real `ray job submit` runs of `uhg train` with 2 workers.

One head serves the module (each Ray Train start costs ~20 s on 2 cores):
1. a run whose rank-1 worker is SIGKILLed after step 3 (checkpoints every 2 steps, one
   restart allowed) completes from its step-2 checkpoint into ONE MLflow run with params,
   continuous step metrics, plots and a registered generator;
2. `--resume` of that run with more steps continues it in the same MLflow run;
3. the driver of a run is SIGKILLed mid-run, once as the entrypoint of a `ray job submit` job,
   once as a `uhg train --ray-address` process: the job (or command) dies, and `--resume`
   continues from the last checkpoint into the same MLflow run, metric steps without gaps.
The head runs with token authentication, as `cluster/local.sh` starts it.
The run of 1 is a module fixture that records what the tests check right after it ends, so
each test runs alone and in any order.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_nodes import free_ports, kill_tree, processes_naming
from services import wait_until_healthy
from tiny_gan import TINY_GAN_MODEL

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
""" + TINY_GAN_MODEL + """\
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


@pytest.fixture(scope="module")
def ray_head() -> Iterator[dict[str, str]]:
    """One head for the tests of the killed-worker job."""
    yield from _start_ray_head()


@pytest.fixture
def fresh_ray_head() -> Iterator[dict[str, str]]:
    """A head of its own: a SIGKILLed driver's Ray Train actors stay on its head until Ray
    notices the driver is gone, and would starve a later test's workers of the head's 2 CPUs."""
    yield from _start_ray_head()


def _start_ray_head() -> Iterator[dict[str, str]]:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and ports; stopped by PID."""
    temp_dir = tempfile.mkdtemp(prefix="uhg-ray-", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs, dashboard, client, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = free_ports(9)
    env = {
        **os.environ,  # token auth, the token file of the test session (tests/conftest.py)
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "DS_ACCELERATOR": "cpu",
    }
    assert env["RAY_AUTH_MODE"] == "token"
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
    token = env.get("RAY_AUTH_TOKEN") or Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    version = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        wait_until_healthy(version, head, "Ray head", timeout=180)
        yield {**env, "RAY_ADDRESS": address, "UHG_TEST_GCS": f"127.0.0.1:{gcs}"}
    finally:
        # Killed, not stopped: nothing of the head is kept, and Ray's orderly shutdown of a head
        # with job actors on it takes 10-40 s on 2 cores.
        kill_tree(head.pid)
        head.wait(timeout=60)
        for pid in processes_naming(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit_command(workdir: Path, *uhg_args: str, job_env: dict[str, str], options: tuple[str, ...] = ()) -> list[str]:
    # Sample system metrics every second: a tiny run can finish before MLflow's default 10 s.
    runtime_env = {"env_vars": {"UHG_ROOT": str(workdir), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", **job_env}}
    return [str(BIN / "ray"), "job", "submit", *options, "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps(runtime_env), "--", "uhg", "train", *uhg_args]


def _submit(env: dict[str, str], workdir: Path, *uhg_args: str, job_env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(_submit_command(workdir, *uhg_args, job_env=job_env), env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rayjob")
    (root / "configs").mkdir()
    (root / "configs" / "tiny.yaml").write_text(TINY_CONFIG)
    return root


# The drivers are killed after the step-2 checkpoint and resumed to DRIVER_STEPS: steps enough
# that the kill lands mid-run, the rest of the run only costs time.
DRIVER_STEPS = 8
DRIVER_CONFIG = TINY_CONFIG.replace("steps: 6", f"steps: {DRIVER_STEPS}").replace(
    "distributed: {workers: 2, cpus_per_worker: 1, max_failures: 1}",
    "distributed: {workers: 1, cpus_per_worker: 1, max_failures: 0}").replace(
    "experiment: ray-job-test", "experiment: ray-driver-test").replace(
    "  registered_model_name: uhg-tiny-ray\n  alias: candidate\n", "")


@pytest.fixture
def driver_workdir(tmp_path: Path) -> Path:
    """A folder of its own: one MLflow store and one run per driver test."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(DRIVER_CONFIG)
    return tmp_path


def _drivers(marker: str) -> list:
    """`uhg train` processes whose command line holds `marker` (the config path)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            # not the shell that Ray's job supervisor runs the entrypoint in, nor the submitter
            if (marker in cmdline and "train" in cmdline and proc.name() not in ("sh", "bash", "dash")
                    and "job" not in (proc.info["cmdline"] or [])[1:3] and proc.pid != os.getpid()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def _wait_for_checkpoint(run_folder: Path, step: int, alive, what: str) -> None:
    deadline = time.monotonic() + 900
    while not (run_folder / f"checkpoint_step_{step:06d}" / "trainer.json").is_file():
        assert alive(), f"{what} ended before its step-{step} checkpoint"
        assert time.monotonic() < deadline, f"no step-{step} checkpoint of {what} within 900 s"
        time.sleep(0.2)


def _one_continuous_run(workdir: Path, steps: int):
    client = _client(workdir)
    experiment = client.get_experiment_by_name("ray-driver-test")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"expected one MLflow run across the kill and the resume, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["uhg.resumed_from_step"]) >= 2
    logged = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")})
    assert logged == list(range(1, steps + 1)), "step numbering must continue without gaps"
    return run


def test_killed_job_driver_resumes_into_one_mlflow_run(fresh_ray_head: dict[str, str], driver_workdir: Path) -> None:
    """The entrypoint of a `ray job submit` job (`uhg train`, the Ray Train driver) SIGKILLed
    after the step-2 checkpoint; the job fails; a new job with `--resume RUN` completes."""
    config = str(driver_workdir / "configs" / "tiny.yaml")
    run = "tiny-driver-job"
    run_folder = driver_workdir / "runs" / "tiny-ray" / run
    submission = f"uhg-driver-kill-{os.getpid()}-{time.monotonic_ns()}"
    submit = subprocess.Popen(_submit_command(driver_workdir, "--config", config, "--run-name", run, job_env={},
                                              options=("--submission-id", submission)),
                              env=fresh_ray_head, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_checkpoint(run_folder, 2, lambda: submit.poll() is None, "the job")
        drivers = _drivers(config)
        assert len(drivers) == 1, f"expected the job's one driver process, found {drivers}"
        drivers[0].kill()
        out, _ = submit.communicate(timeout=300)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
    assert submit.returncode != 0, "the job must fail when its driver is killed"
    status = subprocess.run([str(BIN / "ray"), "job", "status", submission], env=fresh_ray_head, capture_output=True,
                            text=True, timeout=120)
    said = status.stdout + status.stderr
    assert f"Job '{submission}' failed" in said and "exit code 137" in said, said[-3000:]
    assert not (run_folder / f"checkpoint_step_{DRIVER_STEPS:06d}").exists()

    done = _submit(fresh_ray_head, driver_workdir, "--config", config, "--resume", run, job_env={})
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    mlflow_run = _one_continuous_run(driver_workdir, DRIVER_STEPS)
    print(f"\n[ray] job driver killed after the step-2 checkpoint; resumed from step "
          f"{mlflow_run.data.tags['uhg.resumed_from_step']}, attempts {mlflow_run.data.tags['uhg.attempts']}")


def test_killed_uhg_train_driver_resumes_into_one_mlflow_run(fresh_ray_head: dict[str, str], driver_workdir: Path) -> None:
    """`uhg train --ray-address` (the driver, in its own process group) SIGKILLed after the
    step-2 checkpoint; `uhg train --resume RUN` completes the run."""
    config = str(driver_workdir / "configs" / "tiny.yaml")
    run = "tiny-driver-cli"
    run_folder = driver_workdir / "runs" / "tiny-ray" / run
    env = {**fresh_ray_head, "UHG_ROOT": str(driver_workdir), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    env.pop("RAY_ADDRESS")
    command = [str(BIN / "uhg"), "train", "--config", config, "--ray-address", fresh_ray_head["UHG_TEST_GCS"]]
    driver = subprocess.Popen([*command, "--run-name", run], env=env, cwd=driver_workdir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_checkpoint(run_folder, 2, lambda: driver.poll() is None, "uhg train")
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode == -signal.SIGKILL
    assert not (run_folder / f"checkpoint_step_{DRIVER_STEPS:06d}").exists()

    done = subprocess.run([*command, "--resume", run], env=env, cwd=driver_workdir, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert f"finished at step {DRIVER_STEPS}" in done.stdout
    mlflow_run = _one_continuous_run(driver_workdir, DRIVER_STEPS)
    print(f"\n[ray] uhg train driver killed after the step-2 checkpoint; resumed from step "
          f"{mlflow_run.data.tags['uhg.resumed_from_step']}, attempts {mlflow_run.data.tags['uhg.attempts']}")


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


@pytest.fixture(scope="module")
def killed_worker_run(ray_head: dict[str, str], workdir: Path) -> dict:
    """The job whose rank-1 worker kills itself after step 3, and its outcome as it was when
    the job ended (a later resume changes the MLflow run and the checkpoints)."""
    done = _submit(ray_head, workdir, "--config", str(workdir / "configs" / "tiny.yaml"), "--run-name", RUN,
                   "--verbose", job_env={"UHG_FAULT_KILL_WORKER": "1@3"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    run_folder = workdir / "runs" / "tiny-ray" / RUN
    merged = run_folder / "checkpoint_step_000006"
    client, run = _single_run(workdir)
    version = client.get_model_version_by_alias("uhg-tiny-ray", "candidate")
    return {
        "log": log,
        "fault_marker": (run_folder / ".fault_injected_rank1_step3").is_file(),
        "ray_checkpoints": {p.name for p in run_folder.glob("checkpoint_step_*")},
        "merged_step": json.loads((merged / "trainer.json").read_text())["step"],
        "merged_rng": sorted(p.name for p in (merged / "rng").iterdir()),
        "run": run,
        "steps": sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")}),
        "artifacts": {a.path for a in client.list_artifacts(run.info.run_id)},
        "plots": {a.path for a in client.list_artifacts(run.info.run_id, "plots")},
        "version": version,
    }


def test_killed_worker_restarts_from_checkpoint_into_one_mlflow_run(killed_worker_run: dict) -> None:
    job = killed_worker_run
    log = job["log"]
    assert "rank 1" in log and "SIGKILLs itself after step 3" in log
    assert "resumes from step 2" in log

    assert job["fault_marker"]
    # Ray's copies of the checkpoints of the second attempt (keep_checkpoints: 2); the step-2
    # upload of the first attempt may remain, as the killed worker group never committed it.
    assert {"checkpoint_step_000004", "checkpoint_step_000006"} <= job["ray_checkpoints"]
    assert job["merged_step"] == 6
    assert job["merged_rng"] == ["rank_00000.json", "rank_00001.json"]

    run = job["run"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["uhg.attempts"] == "2"
    assert run.data.tags["uhg.resumed_from_step"] == "2"
    assert run.data.params["distributed.workers"] == "2" and run.data.params["world_size"] == "2"
    assert run.data.tags["version.ray"] == "2.60.0"
    assert job["steps"] == [1, 2, 3, 4, 5, 6]
    assert any(k.startswith("val_") for k in run.data.metrics)
    assert any(k.startswith("system/") for k in run.data.metrics)
    assert {"generator", "plots"} <= job["artifacts"]
    assert job["plots"] == {"plots/loss_curves.png", "plots/occupancy_per_sensor.png", "plots/charge.png"}
    version = job["version"]
    assert version.run_id == run.info.run_id and version.source == f"runs:/{run.info.run_id}/generator"


def test_resume_continues_the_finished_run(ray_head: dict[str, str], workdir: Path, killed_worker_run: dict) -> None:
    done = _submit(ray_head, workdir, "--config", str(workdir / "configs" / "tiny.yaml"), "--resume", RUN,
                   "--set", "train.steps=8", job_env={})
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    # the job's log: uhg's progress line, none of Ray's internal messages
    log = done.stdout + done.stderr
    assert re.search(rf"{RUN}  step [678]/8  \(resumed at step 6\)", log), log[-6000:]
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
