"""The shared-storage preflight on clusters shaped like KubeRay's and the AWS launcher's: a
0-CPU head (where the driver runs) and worker nodes elsewhere. A worker node that cannot see
the storage path is refused by the driver when it is there at launch, and by the worker itself
when it joins after the launch, as an autoscaler adds it. Real Ray nodes on this machine
(tests/ray_nodes.py); the blind node's raylet runs in its
own mount namespace with an empty tmpfs over the storage path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_nodes import POLL_S, LoopbackCluster, kill_tree, loopback_cluster
from tiny_gan import TINY_GAN_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CONFIG = """\
name: tiny-preflight
geometry: pxd-tiny
seed: 3
data:
  store: ../data/tiny.zarr           # relative to this file (configs/)
  simulate: {n_events: 24, part_size: 12, luminosity_min: 1.0e34, luminosity_max: 4.0e34}
  validation_events: 4
""" + TINY_GAN_MODEL + """\
train: {steps: 2, batch_size: 2, zero_stage: 1}
distributed: {workers: 1, cpus_per_worker: 1, max_failures: 0, storage_path: ../shared}
tracking: {enabled: false}
"""


@pytest.fixture(scope="module")
def head_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackCluster, Path]]:
    """A head with 0 CPUs and no worker node: the start of an autoscaling cluster."""
    workdir = tmp_path_factory.mktemp("preflight")
    (workdir / "configs").mkdir()
    (workdir / "configs" / "tiny.yaml").write_text(CONFIG)
    (workdir / "shared").mkdir()
    with loopback_cluster("uhg-pf-", head_cpus=0) as c:
        yield c, workdir


def _wait_for_head_only(c: LoopbackCluster) -> None:
    """A node killed by an earlier test stays listed alive until the GCS misses its heartbeats."""
    deadline = time.monotonic() + 180
    while len(c.alive_node_ports()) != 1:
        assert time.monotonic() < deadline, "a killed node is still listed alive after 180 s"
        time.sleep(POLL_S)


def test_blind_worker_node_at_launch_is_refused_by_the_driver(head_only) -> None:
    """0-CPU head + one worker node: the only node that can host workers is not the driver's,
    so it is checked (before, a cluster with fewer than two such nodes was not checked at all)."""
    c, workdir = head_only
    storage = workdir / "shared"
    _wait_for_head_only(c)
    c.start("blind", private_mount=storage)
    try:
        t0 = time.monotonic()
        proc = c.train(workdir, "--run-name", "at-launch")
        out, _ = proc.communicate(timeout=300)
        elapsed = time.monotonic() - t0
    finally:
        c.kill("blind")
    assert proc.returncode == 2, out[-4000:]
    message = " ".join(out.split())
    assert f"distributed.storage_path: {storage / 'at-launch'} is not shared between the nodes" in message
    assert "cannot see a file written there by the driver" in message
    assert not (storage / "at-launch" / "checkpoints").exists()
    print(f"\n[preflight] 0-CPU head + blind worker node: refused by the driver {elapsed:.1f} s after the command started")


def test_blind_worker_node_added_after_launch_is_refused_by_the_worker(head_only) -> None:
    """No worker node at launch (nothing the driver can check); the node that joins while Ray
    Train waits for resources cannot see the storage path: its worker refuses to train."""
    c, workdir = head_only
    storage = workdir / "shared"
    run_folder = storage / "late"
    _wait_for_head_only(c)
    proc = c.train(workdir, "--run-name", "late")
    try:
        deadline = time.monotonic() + 180
        while not (run_folder / ".uhg-storage-marker").is_file():
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "the driver wrote no storage marker within 180 s"
            time.sleep(0.2)
        c.start("late", private_mount=storage)  # the node an autoscaler would add
        joined = time.monotonic()
        out, _ = proc.communicate(timeout=300)
        refused_s = time.monotonic() - joined
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        if "late" in c.nodes:
            c.kill("late")
    assert proc.returncode != 0, out[-4000:]
    message = " ".join(out.split())
    assert f"distributed.storage_path: {run_folder} is not shared between the nodes of this cluster: " \
           "the worker of rank 0 on" in message, out[-4000:]
    assert not (run_folder / "checkpoints").exists()
    assert not (run_folder / ".uhg-storage-marker").exists(), "the driver removes its marker when the run ends"
    print(f"\n[preflight] blind node added after the launch: run refused {refused_s:.1f} s after the node joined")
