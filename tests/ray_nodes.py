"""Real Ray nodes on this machine for the multi-node tests: a head and worker raylets, each
`ray start --block` in its own session, stopped by PID; and the small process helpers the Ray
tests share."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from services import POLL_S

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """n ports free on every interface (Ray binds most of its ports to all of them)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process and all its descendants (by PID: never `ray stop`, which ends every Ray of this user)."""
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
        self.gcs_port = free_ports(1)[0]
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
            time.sleep(POLL_S)
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
        agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = free_ports(6)
        cmd = [str(BIN / "ray"), "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={node_mgr}",
               f"--object-manager-port={obj_mgr}"]
        if head:
            cmd += ["--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                    f"--ray-client-server-port={free_ports(1)[0]}"]
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
                kill_tree(self.nodes[name].pid)
                raise RuntimeError(f"Ray node {name} did not join (exit {self.nodes[name].poll()}):\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(POLL_S)

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
        kill_tree(self.nodes[name].pid)
        self.nodes[name].wait(timeout=60)

    def stop_all(self) -> None:
        """Kill every node at once: nothing of the cluster is kept, and an orderly `ray stop` of
        each node takes 10-30 s on 2 cores."""
        for proc in self.nodes.values():
            kill_tree(proc.pid)
        for proc in self.nodes.values():
            proc.wait(timeout=60)
        for pid in processes_naming(self.temp_dir):  # any process of the cluster its node left behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def train(self, workdir: Path, *args: str) -> subprocess.Popen:
        """`uhg train --config configs/tiny.yaml --ray-address` this cluster, from `workdir`."""
        return subprocess.Popen([str(BIN / "uhg"), "train", "--config", "configs/tiny.yaml", "--ray-address",
                                 self.address, *args], cwd=workdir, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)


@contextlib.contextmanager
def loopback_cluster(prefix: str, head_cpus: int = 1) -> Iterator[LoopbackCluster]:
    """A started head (no dashboard, auth disabled: loopback only, nothing else on it) in a temp
    dir of its own; every node it gained is stopped and the temp dir removed afterwards."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           # Ray's OOM killer judges the whole machine: on a shared test machine it would kill
           # the tests' workers for other processes' memory. Node loss is injected on purpose.
           "RAY_memory_monitor_refresh_ms": "0",
           # raylets register slowly with the GCS when the machine is busy (default 10 s)
           "RAY_raylet_start_wait_time_s": "120",
           # A SIGKILLed raylet refuses the GCS's health checks at once: three refusals one
           # second apart declare its node dead (default: five, three seconds apart); a live
           # but busy raylet still has each check's 10 s to answer.
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           # After a node loss Ray Train may size the new worker group before the GCS has
           # declared the node dead (~13 s here), and then waits this long for a placement group
           # that cannot be placed before it sizes again (default 60 s). The wait covers only
           # the placement group, which is ready within a second when the resources exist.
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: socket paths are length-limited
    c = LoopbackCluster(temp_dir, env)
    try:
        c.start("head", head=True, cpus=head_cpus)
        yield c
    finally:
        c.stop_all()
        shutil.rmtree(temp_dir, ignore_errors=True)


def processes_naming(marker: str) -> list[int]:
    """PIDs (other than this one) whose command line names `marker`, e.g. a head's temp dir,
    which every process of that head has in its command line."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return [pid for pid in found if pid != os.getpid()]
