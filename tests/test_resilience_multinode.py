"""A real multi-node Ray cluster on one machine: a head raylet and worker raylets started with
`ray start --address` (each its own node with its own CPU), all processes stopped by PID.

1. `uhg train` with 2 workers and SPREAD placement runs one worker on each node (the head and
   node B have one CPU each); node B is SIGKILLed with its workers after the step-2 checkpoint
   (node loss); Ray Train waits for resources (max_failures: 1), a replacement node C joins, the
   run restarts from its latest checkpoint in the shared storage path and completes: one MLflow
   run, steps continuous.
2. The same with `distributed.min_workers: 1` (elastic) and no replacement: the run restarts from
   its latest checkpoint with one worker on the remaining node, the two ranks' ZeRO shards
   resharded, and completes: one MLflow run, steps continuous.
3. A node whose raylet runs in its own mount namespace with a private tmpfs over the storage
   path (node-local storage, as on a cluster without a shared filesystem): `uhg train` refuses
   to start and names the path and the node.
Each test starts from the head plus one live worker node (`LoopbackCluster.one_worker_node`)
and leaves no extra node behind, so they run alone and in any order (nodes: tests/ray_nodes.py).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_nodes import LoopbackCluster, kill_tree, loopback_cluster
from tiny_gan import TINY_GAN_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RUN = "spread"
# The node is killed after the step-2 checkpoint; the run resumes and ends at STEPS. A tiny step
# takes ~0.1 s and each checkpoint (every 2 steps) up to 2 s: 8 steps leave the kill three
# checkpoints of margin, and the 4 steps more that 12 took only cost time.
STEPS = 8
CONFIG = """\
name: tiny-multinode
geometry: pxd-tiny
seed: 3
data:
  store: ../data/tiny.zarr           # relative to this file (configs/)
  simulate: {n_events: 24, part_size: 12, luminosity_min: 1.0e34, luminosity_max: 4.0e34}
  validation_events: 4
""" + TINY_GAN_MODEL + f"""\
train:
  steps: {STEPS}
  batch_size: 2
  checkpoint_every: 2
  keep_checkpoints: 2
  log_every: 1
  zero_stage: 1
distributed: {{workers: 2, cpus_per_worker: 1, max_failures: 1, placement: SPREAD, storage_path: ../shared}}
tracking:
  experiment: multinode
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackCluster, Path]]:
    workdir = tmp_path_factory.mktemp("multinode")
    (workdir / "configs").mkdir()
    (workdir / "configs" / "tiny.yaml").write_text(CONFIG)
    (workdir / "shared").mkdir()
    with loopback_cluster("uhg-mn-") as c:
        c.start("B")
        yield c, workdir


def _wait_for_step_2_checkpoint(proc: subprocess.Popen, run_folder: Path) -> None:
    deadline = time.monotonic() + 420
    while not (run_folder / "checkpoints" / "step_000002" / "MANIFEST.json").is_file():
        assert proc.poll() is None, f"run ended before the node loss:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no step-2 checkpoint within 420 s"
        time.sleep(0.1)


def test_spread_run_survives_node_loss_and_resumes_on_a_replacement(cluster) -> None:
    c, workdir = cluster
    run_folder = workdir / "shared" / RUN
    node = c.one_worker_node()
    proc = c.train(workdir, "--run-name", RUN)
    try:
        _wait_for_step_2_checkpoint(proc, run_folder)
        c.kill(node)
        lost_at = time.monotonic()
        c.start(f"replacement{len(c.nodes)}")  # the node Ray Train waits for
        joined_s = time.monotonic() - lost_at
        out, _ = proc.communicate(timeout=480)
        recovered_s = time.monotonic() - lost_at
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, out[-6000:]
    assert f"Ray run {RUN} finished at step {STEPS}" in out
    assert "(resumed at step " in out  # the progress line of the restarted workers

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert len(runs) == 1, f"expected one MLflow run across the node loss, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["uhg.attempts"] == "2"
    assert int(run.data.tags["uhg.resumed_from_step"]) >= 2
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")})
    assert steps == list(range(1, STEPS + 1))
    # checkpoints of both workers landed in the shared storage path
    final = run_folder / f"checkpoint_step_{STEPS:06d}"
    assert sorted(p.name for p in (final / "rng").iterdir()) == ["rank_00000.json", "rank_00001.json"]
    assert (run_folder / "checkpoints" / f"step_{STEPS:06d}" / "MANIFEST.json").is_file()
    print(f"\n[resilience] node loss after step-2 checkpoint: replacement joined in {joined_s:.1f} s, "
          f"run completed {recovered_s:.1f} s after the loss (resumed from step "
          f"{run.data.tags['uhg.resumed_from_step']})")


def test_elastic_run_continues_on_the_remaining_node(cluster) -> None:
    """distributed.min_workers: after the node loss nothing replaces the node; the run restarts
    from its latest checkpoint with one worker (ZeRO shards of two ranks resharded) and completes."""
    c, workdir = cluster
    run_folder = workdir / "shared" / "elastic"
    spare = c.one_worker_node()
    proc = c.train(workdir, "--run-name", "elastic", "--set", "distributed.min_workers=1",
                   "--set", "tracking.experiment=elastic", "--verbose")  # --verbose: the workers' resharding message
    try:
        _wait_for_step_2_checkpoint(proc, run_folder)
        c.kill(spare)
        lost_at = time.monotonic()
        out, _ = proc.communicate(timeout=480)
        recovered_s = time.monotonic() - lost_at
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, out[-6000:]
    assert f"Ray run elastic finished at step {STEPS}" in out
    assert "was written by 2 rank(s), this run has 1" in out

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("elastic").experiment_id])
    assert len(runs) == 1, f"expected one MLflow run across the node loss, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["uhg.attempts"] == "2"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")})
    assert steps == list(range(1, STEPS + 1))
    # the run ended with one worker: the last checkpoint holds one rank's RNG state
    assert sorted(p.name for p in (run_folder / f"checkpoint_step_{STEPS:06d}" / "rng").iterdir()) == ["rank_00000.json"]
    print(f"\n[resilience] elastic run: node lost after the step-2 checkpoint, completed on one worker "
          f"{recovered_s:.1f} s after the loss (resumed from step {run.data.tags['uhg.resumed_from_step']})")


def test_node_local_storage_path_is_refused_before_training(cluster) -> None:
    c, workdir = cluster
    storage = workdir / "shared"
    c.one_worker_node()
    # This node sees its own empty tmpfs at the storage path: node-local storage.
    c.start("private", private_mount=storage)
    try:
        t0 = time.monotonic()
        proc = c.train(workdir, "--run-name", "refused")
        out, _ = proc.communicate(timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        c.kill("private")  # no node with node-local storage is left for the other tests
    assert proc.returncode == 2, out[-4000:]
    assert "Traceback" not in out
    message = " ".join(out.split())
    assert f"distributed.storage_path: {storage / 'refused'} is not shared between the nodes" in message
    assert "cannot see a file written there by the driver" in message
    assert not (storage / "refused" / "checkpoints").exists()
    print(f"\n[resilience] node-local storage refused in {elapsed:.1f} s")
