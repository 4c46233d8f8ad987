"""Checks a Ray run makes before its workers start, so that a wrong setting fails in seconds
with a clear message instead of minutes later inside a worker.

Shared storage: every node that runs a worker must see the run's storage folder (Ray Train:
"all workers must be able to write to the same persistent storage location"). A node-local
path, e.g. a /tmp or a home folder that is not shared, would otherwise scatter the checkpoints
over the nodes, and a restart on another node would find none. Checked twice:

1. `check_shared_storage`, by the driver before any worker starts: a zero-CPU task on each
   alive node that can host workers (CPUs or GPUs) looks for a file the driver wrote, whenever
   one of those nodes is not the driver's own. Fails in seconds, before any training.
2. `check_worker_sees_storage`, by every Ray Train worker when it starts, against the marker
   file the driver keeps in the run folder for the whole run (`write_storage_marker`). This
   covers the nodes that were not there at launch: on an autoscaling cluster (KubeRay, the AWS
   launcher) a 0-CPU head and no worker node at first are normal, and the worker nodes join
   only when the run asks for them; a restarted worker group on replacement nodes too.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

import yaml

from uhg.config.schema import RunConfig
from uhg.errors import ConfigError, StoreError

PROBE_TIMEOUT_S = 60.0
MARKER = ".uhg-storage-marker"
_NOT_SHARED_HINT = ("Multi-node runs need storage every node mounts at the same path (NFS, Lustre, EFS, "
                    "a ReadWriteMany volume, ...) or object storage (s3://, gs://); see docs/distributed.md "
                    "and docs/reliability.md")

# Keys of a DeepSpeed preset that uhg sets itself; a preset must not contradict them.
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler", "fp16", "bf16", "torch_autocast")


def read_deepspeed_preset(cfg: RunConfig) -> dict[str, Any]:
    """The preset of `train.deepspeed` ({} when none), checked against the train section."""
    t = cfg.train
    if t.deepspeed is None:
        return {}
    try:
        preset = yaml.safe_load(Path(t.deepspeed).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"train.deepspeed: cannot read preset {t.deepspeed}: {err}") from None
    if not isinstance(preset, dict):
        raise ConfigError(f"train.deepspeed: preset {t.deepspeed} must be a mapping")
    clash = [k for k in OWNED_KEYS if k in preset]
    if clash:
        raise ConfigError(f"train.deepspeed: preset {t.deepspeed} sets {', '.join(clash)}; these come from "
                          "the train section (batch_size, precision, gradient_clipping, lr)")
    stage = preset.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != t.zero_stage:
        raise ConfigError(f"train.zero_stage is {t.zero_stage} but preset {t.deepspeed} sets "
                          f"zero_optimization.stage {stage}")
    return preset


def check_run_inputs(cfg: RunConfig):
    """Every check of the run's inputs that can fail, cheapest first; returns the zero-shot
    protocol of `evaluate.extrapolation` (or None) so that it is read once."""
    from uhg.geometry import get_geometry
    from uhg.train.evaluation import load_extrapolation

    read_deepspeed_preset(cfg)
    protocol = load_extrapolation(cfg)
    sim = cfg.data.simulate
    if sim is not None:
        if get_geometry(cfg.geometry).kind == "pixel":
            if sim.luminosity_min is None:
                raise ConfigError("data.simulate.luminosity_min is required for a pixel geometry")
        elif sim.energy_min is None or sim.energy_max is None:
            raise ConfigError("data.simulate.energy_min and energy_max are required for a calorimeter geometry")
    for path in cfg.data.store:
        if sim is None and not Path(path).exists():
            raise StoreError(f"data.store: {path} does not exist (relative paths in a config file are relative "
                             "to its folder; add a data.simulate section to create the store)")
    return protocol


def _sees_token(path: str, token: str) -> tuple[bool, str]:
    """Runs on one node: does `path` exist there with `token` inside? Returns (seen, host)."""
    try:
        seen = Path(path).read_text() == token
    except OSError:
        seen = False
    return seen, socket.gethostname()


def worker_nodes() -> list[dict[str, Any]]:
    """Alive nodes of the connected cluster that have CPUs or GPUs (where workers can run)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0
                                                          or n["Resources"].get("GPU", 0) > 0)]


def check_shared_storage(folder: str | Path, timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """Raise ConfigError unless every worker node sees a file the driver writes into `folder`
    (a local or network filesystem path; object-store URIs need no check). Returns the number of
    nodes checked: 0 when every node that can host workers is the driver's own, or when there
    is none yet (autoscaling); `check_worker_sees_storage` then checks where workers land."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = worker_nodes()
    here = ray.get_runtime_context().get_node_id()
    if all(n["NodeID"] == here for n in nodes):
        return 0  # no worker node yet (autoscaling) or only this one: the workers check at start
    folder = Path(folder)
    token = uuid.uuid4().hex
    probe_file = folder / f".uhg-storage-probe-{token[:12]}"
    probe_file.write_text(token)
    try:
        remote = ray.remote(num_cpus=0, max_retries=0)(_sees_token)
        refs = {remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(probe_file), token): n for n in nodes}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        blind, silent = [], []
        for ref, node in refs.items():
            where = f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})"
            if ref not in ready:
                silent.append(where)
                continue
            try:
                seen, _host = ray.get(ref)
            except Exception:  # the node died under the probe
                silent.append(where)
                continue
            if not seen:
                blind.append(where)
    finally:
        probe_file.unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"distributed.storage_path: {folder} is not shared between the nodes of this cluster: "
            f"{', '.join(blind)} cannot see a file written there by the driver. {_NOT_SHARED_HINT}")
    if silent:
        raise ConfigError(f"distributed.storage_path: could not check {folder} on {', '.join(silent)} "
                          f"(no answer within {timeout_s:.0f} s; is the node overloaded or dying?)")
    return len(nodes)


def write_storage_marker(folder: str | Path) -> str:
    """Driver, before the workers start: a marker file with a fresh token in the run folder,
    kept for the whole run (removed by `remove_storage_marker`). Returns the token."""
    token = uuid.uuid4().hex
    (Path(folder) / MARKER).write_text(token)
    return token


def remove_storage_marker(folder: str | Path) -> None:
    (Path(folder) / MARKER).unlink(missing_ok=True)


def check_worker_sees_storage(folder: str | Path, token: str, rank: int) -> None:
    """Worker, at start: raise ConfigError unless this node sees the driver's marker in the run
    folder, naming the folder, the rank and this node."""
    marker = Path(folder) / MARKER
    try:
        seen = marker.read_text() == token
    except OSError:
        seen = False
    if not seen:
        raise ConfigError(
            f"distributed.storage_path: {Path(folder)} is not shared between the nodes of this cluster: "
            f"the worker of rank {rank} on {socket.gethostname()} cannot see the file {marker} written "
            f"there by the driver (a node that joined after the launch, e.g. added by the autoscaler). "
            f"{_NOT_SHARED_HINT}")
