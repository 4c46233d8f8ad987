"""How uhg connects to Ray, and where a `ray job submit` job works: one rule for `uhg train`
and for `uhg generate` / `uhg overlay`.

Ray is imported inside the function: importing uhg never imports Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

from uhg.errors import ConfigError


def enter_uhg_root() -> None:
    """Under `ray job submit` the command runs in Ray's temporary copy of the working dir; with
    UHG_ROOT set (cluster/local.sh prints how), it changes to that folder, so relative paths
    (stores, runs/, the sqlite MLflow store) resolve there instead."""
    root = os.environ.get("UHG_ROOT")
    if root:
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise ConfigError(f"UHG_ROOT={root}: no such directory on this node")
        os.chdir(root_path)


def connect_ray(address: str | None = None, *, num_cpus: int, num_gpus: float = 0.0, verbose: bool = True) -> bool:
    """Join a Ray cluster, or start a private local one.

    address: the cluster to join; None takes RAY_ADDRESS (set by `ray job submit` for its
        entrypoint). The job-API address users export for `ray job submit`
        (http(s)://host:8265) joins through "auto", which finds the GCS of a head on this machine.
    Without either, a private local Ray starts with `num_cpus` CPUs (`address="local"`: it never
    attaches to a cluster someone else started on this machine); needing more GPUs
    (`num_gpus`) than it detects is a ConfigError before any work. Unless `verbose`, Ray's
    messages below warnings and the output of its workers are not forwarded to this process.

    Returns True when this call connected (the caller then shuts Ray down), False when Ray
    was already initialised by the caller."""
    # Auth: with RAY_AUTH_MODE unset, Ray 2.60 starts a local cluster with token auth (token in
    # ~/.ray/auth_token, generated if missing) and a client joining a cluster uses the token
    # when it finds one. Its ports listen beyond loopback, so uhg leaves that default on;
    # RAY_AUTH_MODE=disabled (head and clients alike) is the explicit opt-out.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import logging

    import ray

    if ray.is_initialized():
        return False
    level = logging.INFO if verbose else logging.WARNING
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        if target.startswith(("http://", "https://")):
            target = "auto"
        ray.init(address=target, log_to_driver=verbose, logging_level=level)
        return True
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=verbose,
             logging_level=level)
    found = ray.cluster_resources().get("GPU", 0)
    if num_gpus > found:
        ray.shutdown()
        raise ConfigError(f"the run needs {num_gpus:g} GPUs; this machine has {found:g}")
    return True
