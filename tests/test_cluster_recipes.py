"""The cluster/ recipes parse, carry the fields their tools require, and agree with the
pinned Ray version and with each other."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SHELL_SCRIPTS = sorted([*CLUSTER.rglob("*.sh"), *CLUSTER.rglob("*.sbatch")])
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    assert shutil.which("bash")
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()


def test_every_recipe_is_covered() -> None:
    assert {p.relative_to(CLUSTER).as_posix() for p in SHELL_SCRIPTS} == {"local.sh", "slurm/uhg-ray.sbatch"}
    assert {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES} == {
        "aws.yaml", "k8s/rayjob.yaml", "k8s/raycluster.yaml"}


def test_aws_launcher_config_matches_rays_own_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert any(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in nodes.values()), "no GPU node type"
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "RAY_AUTH_MODE=" in start and "--disable-usage-stats" in start


def _k8s(name: str) -> dict:
    return yaml.safe_load((CLUSTER / "k8s" / name).read_text())


def _gpu_limits(group: dict) -> list[str]:
    return [c["resources"]["limits"].get("nvidia.com/gpu") for c in group["template"]["spec"]["containers"]]


def test_kuberay_rayjob_manifest() -> None:
    job = _k8s("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["entrypoint"].startswith("uhg train --config ")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["UHG_ROOT"] == "/mnt/uhg"
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_version()
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    workers = cluster["workerGroupSpecs"]
    assert workers and all(all(_gpu_limits(g)) for g in workers)
    mounts = {m["mountPath"] for m in workers[0]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "/mnt/uhg" in mounts, "workers need the shared volume for checkpoints and stores"


def test_kuberay_raycluster_manifest() -> None:
    cluster = _k8s("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == _ray_version()
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert all(all(_gpu_limits(g)) for g in spec["workerGroupSpecs"])


def test_slurm_script_uses_symmetric_run_and_gpus_per_task() -> None:
    text = (CLUSTER / "slurm" / "uhg-ray.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=?(\S*)", text, flags=re.M))
    assert {"nodes", "ntasks-per-node", "gpus-per-task", "cpus-per-task"} <= directives.keys()
    assert directives["ntasks-per-node"] == "1"
    assert "ray symmetric-run" in text and "--min-nodes" in text
    assert "ray job submit" in text and "uhg train --config" in text


def test_referenced_configs_exist() -> None:
    """Every `--config configs/X.yaml` a recipe or the cluster README names is in the repository."""
    texts = [p.read_text() for p in [*YAML_FILES, *SHELL_SCRIPTS, CLUSTER / "README.md"]]
    referenced = {m for t in texts for m in re.findall(r"--config (configs/[\w./-]+\.yaml)", t)}
    assert referenced, "recipes should show a concrete config"
    missing = sorted(r for r in referenced if not (ROOT / r).is_file())
    assert not missing, f"recipes name configs that do not exist: {missing}"


def test_local_script_without_command_prints_usage() -> None:
    out = subprocess.run(["bash", str(CLUSTER / "local.sh")], capture_output=True, text=True)
    assert out.returncode == 2 and "usage:" in out.stderr
