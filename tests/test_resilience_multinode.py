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
and leaves no extra node behind, so they run alone and in any order.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BIN = Path(sys.executable).parent
RUN = "spread"
CONFIG = """\
name: tiny-multinode
geometry: pxd-tiny
seed: 3
data:
  store: ../data/tiny.zarr           # relative to this file (configs/)
  simulate: {n_events: 24, part_size: 12, luminosity_min: 1.0e34, luminosity_max: 4.0e34}
  validation_events: 4
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
  steps: 12
  batch_size: 2
  checkpoint_every: 2
  keep_checkpoints: 2
  log_every: 1
  zero_stage: 1
distributed: {workers: 2, cpus_per_worker: 1, max_failures: 1, placement: SPREAD, storage_path: ../shared}
tracking:
  experiment: multinode
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


def _kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


class LoopbackCluster:
    """Head + worker raylets on this machine, each `ray start --block` in its own session."""

    def __init__(self, temp_dir: str, env: dict[str, str]) -> None:
        self.temp_dir = temp_dir
        self.env = env
        self.gcs_port = _free_ports(1)[0]
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_ports: dict[str, int] = {}
        self._state = None

    def one_worker_node(self) -> str:
        """Bring the cluster to the head plus exactly one live worker node (the tests kill nodes
        and add others), wait until the GCS lists just those, and return that node's name."""
        alive = [n for n, proc in self.nodes.items() if n != "head" and proc.poll() is None]
        for name in alive[1:]:
            self.kill(name)
        if not alive:
            alive = [f"node{len(self.nodes)}"]
            self.start(alive[0])
        wanted = {self.node_ports["head"], self.node_ports[alive[0]]}
        deadline = time.monotonic() + 180
        while self.alive_node_ports() != wanted:  # a killed raylet is declared dead after its health checks
            assert time.monotonic() < deadline, f"GCS lists nodes {self.alive_node_ports()}, expected {wanted}"
            time.sleep(1)
        return alive[0]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start(self, name: str, *, head: bool = False, private_mount: Path | None = None, cpus: int = 1) -> None:
        """Start node `name` and wait until the GCS lists it alive; with `private_mount`, its
        raylet (and so its workers) runs in its own mount namespace with an empty tmpfs over
        that folder. A worker node gets a second try: on a loaded machine its registration
        with the GCS can time out (`RPC error: Deadline Exceeded`)."""
        for attempt in (1, 2):
            try:
                return self._start(name, head=head, private_mount=private_mount, cpus=cpus)
            except RuntimeError:
                if head or attempt == 2:
                    raise

    def _start(self, name: str, *, head: bool, private_mount: Path | None, cpus: int) -> None:
        agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = _free_ports(6)
        cmd = [str(BIN / "ray"), "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={node_mgr}",
               f"--object-manager-port={obj_mgr}"]
        if head:
            cmd += ["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                    f"--ray-client-server-port={_free_ports(1)[0]}"]
        else:
            cmd += [f"--address={self.address}"]
        if private_mount is not None:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(private_mount))} && exec {shlex.join(cmd)}"]
        log = Path(self.temp_dir) / f"node-{name}.log"
        with open(log, "w") as out:
            self.nodes[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        self.node_ports[name] = node_mgr
        deadline = time.monotonic() + 180
        while node_mgr not in self.alive_node_ports():
            if self.nodes[name].poll() is not None or time.monotonic() > deadline:
                _kill_tree(self.nodes[name].pid)
                raise RuntimeError(f"Ray node {name} did not join (exit {self.nodes[name].poll()}):\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(1)

    def alive_node_ports(self) -> set[int]:
        """Node-manager ports of the nodes the GCS lists alive (read the way ray.cluster_utils
        does, without connecting a driver)."""
        if self._state is None:
            from ray._private.state import GlobalState
            from ray._raylet import GcsClientOptions

            self._state = GlobalState()
            self._state._initialize_global_state(GcsClientOptions.create(
                self.address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False))
        try:
            return {int(n["NodeManagerPort"]) for n in self._state.node_table() if n["Alive"]}
        except Exception:  # the head's GCS is not up yet
            return set()

    def kill(self, name: str) -> None:
        """Node loss: SIGKILL the raylet and every process of the node at once."""
        _kill_tree(self.nodes[name].pid)
        self.nodes[name].wait(timeout=60)

    def stop_all(self) -> None:
        for name in reversed(list(self.nodes)):
            proc = self.nodes[name]
            if proc.poll() is None:
                _kill_tree(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            _kill_tree(proc.pid)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackCluster, Path]]:
    workdir = tmp_path_factory.mktemp("multinode")
    (workdir / "configs").mkdir()
    (workdir / "configs" / "tiny.yaml").write_text(CONFIG)
    (workdir / "shared").mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           # Ray's OOM killer judges the whole machine: on a shared test machine it would kill
           # this test's workers for other processes' memory. Node loss here is injected on purpose.
           "RAY_memory_monitor_refresh_ms": "0",
           # raylets register slowly with the GCS when the machine is busy (default 10 s)
           "RAY_raylet_start_wait_time_s": "120"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    temp_dir = tempfile.mkdtemp(prefix="uhg-mn-", dir="/tmp")  # short: socket paths are length-limited
    c = LoopbackCluster(temp_dir, env)
    try:
        c.start("head", head=True)
        c.start("B")
        yield c, workdir
    finally:
        c.stop_all()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def _train(c: LoopbackCluster, workdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "uhg"), "train", "--config", "configs/tiny.yaml", "--ray-address", c.address,
                             *args], cwd=workdir, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


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
    proc = _train(c, workdir, "--run-name", RUN)
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
            _kill_tree(proc.pid)
    assert proc.returncode == 0, out[-6000:]
    assert f"Ray run {RUN} finished at step 12" in out
    assert "resumes from step" in out

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
    assert len(runs) == 1, f"expected one MLflow run across the node loss, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["uhg.attempts"] == "2"
    assert int(run.data.tags["uhg.resumed_from_step"]) >= 2
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")})
    assert steps == list(range(1, 13))
    # checkpoints of both workers landed in the shared storage path
    final = run_folder / "checkpoint_step_000012"
    assert sorted(p.name for p in (final / "rng").iterdir()) == ["rank_00000.json", "rank_00001.json"]
    assert (run_folder / "checkpoints" / "step_000012" / "MANIFEST.json").is_file()
    print(f"\n[resilience] node loss after step-2 checkpoint: replacement joined in {joined_s:.1f} s, "
          f"run completed {recovered_s:.1f} s after the loss (resumed from step "
          f"{run.data.tags['uhg.resumed_from_step']})")


def test_elastic_run_continues_on_the_remaining_node(cluster) -> None:
    """distributed.min_workers: after the node loss nothing replaces the node; the run restarts
    from its latest checkpoint with one worker (ZeRO shards of two ranks resharded) and completes."""
    c, workdir = cluster
    run_folder = workdir / "shared" / "elastic"
    spare = c.one_worker_node()
    proc = _train(c, workdir, "--run-name", "elastic", "--set", "distributed.min_workers=1",
                  "--set", "tracking.experiment=elastic")
    try:
        _wait_for_step_2_checkpoint(proc, run_folder)
        c.kill(spare)
        lost_at = time.monotonic()
        out, _ = proc.communicate(timeout=480)
        recovered_s = time.monotonic() - lost_at
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert proc.returncode == 0, out[-6000:]
    assert "Ray run elastic finished at step 12" in out
    assert "was written by 2 rank(s), this run has 1" in out

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/runs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("elastic").experiment_id])
    assert len(runs) == 1, f"expected one MLflow run across the node loss, found {len(runs)}"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["uhg.attempts"] == "2"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss_generator")})
    assert steps == list(range(1, 13))
    # the run ended with one worker: the last checkpoint holds one rank's RNG state
    assert sorted(p.name for p in (run_folder / "checkpoint_step_000012" / "rng").iterdir()) == ["rank_00000.json"]
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
        proc = _train(c, workdir, "--run-name", "refused")
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
