"""The cluster/ recipes are valid for the tools that read them (KubeRay's CRDs and the core
Kubernetes schemas, Ray's cluster-launcher validation, bash), fit together (volume, Secret,
MLflow Service, configs on the shared volume, token authentication) and agree with the pinned
versions. tools/slurm_check.sh runs the SLURM recipe for real (test_slurm_recipe_runs)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SHELL_SCRIPTS = sorted([*CLUSTER.rglob("*.sh"), *CLUSTER.rglob("*.sbatch"), ROOT / "tools" / "slurm_check.sh"])
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))
KUBERAY_SCHEMAS = ROOT / "tests" / "data" / "kuberay"
# Kubernetes minor version the core objects are validated against (kubernetes-validate's
# bundled schemas, strict: unknown fields are errors as with `kubectl apply`).
KUBERNETES_VERSION = "1.33"
SBATCH = CLUSTER / "slurm" / "uhg-ray.sbatch"


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _k8s_objects() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted((CLUSTER / "k8s").glob("*.yaml")) for d in _docs(p)]


def _by_kind(kind: str) -> list[dict]:
    return [d for _, d in _k8s_objects() if d["kind"] == kind]


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    assert shutil.which("bash")
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()


def test_every_recipe_is_covered() -> None:
    assert {p.relative_to(CLUSTER).as_posix() for p in SHELL_SCRIPTS if p.is_relative_to(CLUSTER)} == {
        "local.sh", "slurm/uhg-ray.sbatch"}
    assert {p.relative_to(CLUSTER).as_posix() for p in YAML_FILES} == {
        "aws.yaml", "k8s/rayjob.yaml", "k8s/raycluster.yaml", "k8s/storage.yaml", "k8s/mlflow.yaml"}


# --- Kubernetes -------------------------------------------------------------------------------

def _kuberay_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((KUBERAY_SCHEMAS / f"{kind.lower()}-ray-v1.json").read_text())
    assert "KubeRay v1.7.0" in schema["$comment"]
    return jsonschema.Draft7Validator(schema)


def _validate_k8s(obj: dict) -> None:
    """Raise jsonschema.ValidationError unless `obj` is valid: ray.io/v1 kinds against the
    schemas derived from KubeRay's CRDs, everything else against the core Kubernetes schemas."""
    if obj["apiVersion"] == "ray.io/v1":
        _kuberay_validator(obj["kind"]).validate(obj)
    else:
        import kubernetes_validate

        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("name,obj", _k8s_objects(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_kubernetes_manifest_is_valid(name: str, obj: dict) -> None:
    _validate_k8s(obj)


@pytest.mark.parametrize("kind,path,typo", [
    ("RayJob", ["spec", "rayClusterSpec"], "authOption"),                          # misspelt field
    ("RayCluster", ["spec", "headGroupSpec", "template", "spec", "containers", 0], "volumeMount"),
    ("Deployment", ["spec", "template", "spec", "containers", 0], "readinesProbe"),
    ("PersistentVolumeClaim", ["spec"], "accessMode"),
])
def test_kubernetes_validation_refuses_unknown_fields(kind: str, path: list, typo: str) -> None:
    """The validation above is not vacuous: a misspelt field fails it, as `kubectl apply` would."""
    obj = copy.deepcopy(_by_kind(kind)[0])
    node = obj
    for key in path:
        node = node[key]
    node[typo] = node.get(typo + "s", "x")
    with pytest.raises(jsonschema.ValidationError, match=typo):
        _validate_k8s(obj)


def _pod_specs() -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod the manifests create."""
    out = []
    for name, obj in _k8s_objects():
        spec = obj["spec"]
        if obj["kind"] == "RayJob":
            out.append((f"{name} submitter", spec["submitterPodTemplate"]["spec"]))
            spec = spec["rayClusterSpec"]
        if obj["kind"] in ("RayJob", "RayCluster"):
            out.append((f"{name} head", spec["headGroupSpec"]["template"]["spec"]))
            out += [(f"{name} {g['groupName']}", g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
        elif obj["kind"] in ("Deployment", "Job"):
            out.append((f"{name} {obj['kind']}", spec["template"]["spec"]))
    return out


def test_kubernetes_pods_fit_together() -> None:
    """One image everywhere, pulled with the documented Secret; every claim the pods mount is
    defined; every Ray pod mounts the shared volume at /mnt/uhg."""
    claims = {d["metadata"]["name"] for d in _by_kind("PersistentVolumeClaim")}
    assert claims == {"uhg-shared"}
    (pvc,) = _by_kind("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for where, pod in _pod_specs():
        assert {s["name"] for s in pod.get("imagePullSecrets", [])} == {"uhg-registry"}, where
        images |= {c["image"] for c in pod["containers"]}
        used = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        assert used <= claims, f"{where} mounts undefined claims {used - claims}"
        if "submitter" not in where:
            mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
            assert "/mnt/uhg" in mounts, f"{where} does not mount the shared volume"
    assert len(images) == 1, images


def test_shared_volume_is_prepared_for_the_ray_user() -> None:
    """The init Job makes the volume root writable for uid 1000 and copies the configs there."""
    (job,) = _by_kind("Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["args"])
    assert container["securityContext"]["runAsUser"] == 0
    assert "chown 1000:100 /mnt/uhg " in script
    assert "cp -rn /home/ray/uhg/configs/. /mnt/uhg/configs/" in script
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert "COPY --chown=ray:users . /home/ray/uhg" in dockerfile


def test_ray_manifests_use_token_auth_and_configs_on_the_shared_volume() -> None:
    (job,) = _by_kind("RayJob")
    (cluster,) = _by_kind("RayCluster")
    for spec in (job["spec"]["rayClusterSpec"], cluster["spec"]):
        assert spec["authOptions"] == {"mode": "token"}
        assert spec["rayVersion"] == _ray_version()
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert all(c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
                   for c in g["template"]["spec"]["containers"])
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    entrypoint = job["spec"]["entrypoint"]
    config = re.search(r"--config (\S+)", entrypoint).group(1)
    # Absolute on the shared volume: the DeepSpeed preset and relative paths inside the config
    # then resolve on the volume on every pod, whichever way the config's paths are anchored.
    assert config.startswith("/mnt/uhg/configs/")
    assert (ROOT / "configs" / Path(config).relative_to("/mnt/uhg/configs")).is_file()
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["UHG_ROOT"] == "/mnt/uhg"
    (service,) = _by_kind("Service")
    assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_mlflow_server_accepts_its_service_names() -> None:
    """MLflow 3.17 refuses Host headers other than localhost/private IPs unless --allowed-hosts
    names them: the names the Ray pods use must be listed."""
    (deployment,) = _by_kind("Deployment")
    (service,) = _by_kind("Service")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"] if "=" in a)
    allowed = args["allowed-hosts"].split(",")
    name, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
    assert f"{name}:{port}" in allowed and f"{name}.$(POD_NAMESPACE).svc.cluster.local:{port}" in allowed
    assert "localhost:*" in allowed  # kubectl port-forward
    assert args["backend-store-uri"].startswith("sqlite:////mnt/uhg/")
    assert "--serve-artifacts" in container["args"]
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]


# --- AWS cluster launcher ----------------------------------------------------------------------

def _aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def _ray_validate(config: dict) -> None:
    """Ray's own checks of `ray up`: defaults filled in as the launcher does, then its schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_launcher_config_passes_rays_validation() -> None:
    _ray_validate(_aws())
    broken = _aws()
    broken["available_node_types"]["gpu_worker"]["node_cfg"] = broken["available_node_types"]["gpu_worker"].pop("node_config")
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        _ray_validate(broken)


def test_aws_launcher_nodes_images_storage_and_auth() -> None:
    config = _aws()
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    assert any(n["node_config"]["InstanceType"].startswith(("g", "p")) for n in nodes.values()), "no GPU node type"
    for name, node in nodes.items():
        # Every node type has its own profile: workers upload checkpoints to s3:// and pull the image.
        assert node["node_config"]["IamInstanceProfile"]["Name"], name
        # The current driver AMI, resolved by EC2, not a fixed (ageing) AMI id.
        assert node["node_config"]["ImageId"].startswith("resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-")
    init = "\n".join(config["initialization_commands"])
    assert "chown 1000:100 /mnt/uhg" in init and "mount -t nfs4" in init
    assert "-v /mnt/uhg:/mnt/uhg" in config["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in start, key
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "cp -rn /home/ray/uhg/configs/. /mnt/uhg/configs/" in " ".join(config["head_setup_commands"])


# --- image --------------------------------------------------------------------------------------

def test_image_pins_torch_and_a_documented_cuda_build() -> None:
    """torch's version in the Dockerfile is pyproject's pin, and the default CUDA build is one
    cluster/README.md lists (with its driver minimum) for that torch version."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_pin,) = [p for p in pins if p.startswith("torch==")]
    assert f"pip install --no-cache-dir {torch_pin} --index-url https://download.pytorch.org/whl/${{TORCH_CUDA}}" in dockerfile
    build = re.search(r"^ARG TORCH_CUDA=(\S+)$", dockerfile, flags=re.M).group(1)
    readme = (CLUSTER / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(cu\d+)` \| [^|]+ \| (>= [\d.]+) \|", readme, flags=re.M))
    assert build in rows, f"TORCH_CUDA={build} is not in cluster/README.md's table of CUDA builds {rows}"
    assert f"torch {torch_pin.split('==')[1]}" in readme
    assert f"FROM rayproject/ray:{_ray_version()}-py311-gpu" in dockerfile


def test_dockerignore_keeps_data_runs_and_caches_out() -> None:
    patterns = set((ROOT / ".dockerignore").read_text().split())
    assert {"**/*.zarr", "data", "runs", "**/mlflow.db", "**/*.safetensors", "**/__pycache__", ".git", "**/.venv"} <= patterns
    assert not (CLUSTER / "Dockerfile.dockerignore").exists(), "BuildKit would prefer it over .dockerignore"


# --- SLURM --------------------------------------------------------------------------------------

def test_slurm_script_directives() -> None:
    text = SBATCH.read_text()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=?(\S*)", text, flags=re.M))
    assert {"nodes", "ntasks-per-node", "gpus-per-task", "cpus-per-task", "exclusive"} <= directives.keys()
    assert directives["ntasks-per-node"] == "1"
    assert "ray symmetric-run" in text and "--min-nodes" in text
    assert 'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --cpus-per-task="$SLURM_CPUS_PER_TASK"' in text
    assert "RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT" in text
    assert 'RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in text
    assert "several Ray clusters may share a node" not in text


def _fake_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    return venv


def test_slurm_script_refuses_a_job_without_gpus(tmp_path: Path) -> None:
    """Without GPUs granted (no --gres/--gpus-per-task, or a partition without them) the job
    stops at once instead of starting Ray with 0 GPUs and waiting forever for GPU workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UHG_", "RAY_"))}
    env.update(SLURM_SUBMIT_DIR=str(tmp_path), UHG_VENV=str(_fake_venv(tmp_path)), RAY_AUTH_MODE="disabled")
    out = subprocess.run(["bash", str(SBATCH), "configs/pxd_gan_mini.yaml"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "no GPUs were granted to this job" in out.stderr and "UHG_CPU_ONLY=1" in out.stderr


def test_slurm_script_without_arguments_prints_usage(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "usage:" in out.stderr


def _slurm_unavailable() -> str | None:
    if not shutil.which("sbatch"):
        return "SLURM is not installed (no sbatch on PATH; tools/slurm_check.sh installs it as root)"
    if os.geteuid() != 0:
        return "tools/slurm_check.sh starts SLURM daemons and needs root"
    conf = Path("/etc/slurm/slurm.conf")
    if conf.is_file() and "ClusterName=uhgcheck\n" not in conf.read_text():
        return f"{conf} belongs to another SLURM cluster; tools/slurm_check.sh only runs on its own one-node cluster"
    probe = subprocess.run(["sinfo", "--noheader"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 and not shutil.which("slurmctld"):
        return f"SLURM client present but no controller to start: {probe.stderr.strip()[:200]}"
    return None


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_recipe_runs(tmp_path: Path) -> None:
    """cluster/slurm/uhg-ray.sbatch on a real one-node SLURM cluster (tools/slurm_check.sh):
    the mini GAN on CPU under `ray symmetric-run`, token auth, checkpoint, export, MLflow run;
    and a job whose Ray head cannot start fails."""
    reason = _slurm_unavailable()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RAY_", "MLFLOW_"))}
    env["UHG_SLURM_CHECK_DIR"] = str(tmp_path / "check")
    out = subprocess.run(["bash", str(ROOT / "tools" / "slurm_check.sh")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=850)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "SLURM check passed" in out.stdout
    assert "generated a Ray auth token" in out.stdout
    assert "SLURM check passed: a job whose Ray head could not start failed" in out.stdout


def test_referenced_configs_exist() -> None:
    """Every config a recipe or the cluster README names (in the repository or copied to the
    shared volume's /mnt/uhg/configs) is one the repository ships."""
    texts = [p.read_text() for p in [*YAML_FILES, *SHELL_SCRIPTS, CLUSTER / "README.md", ROOT / "docs" / "distributed.md"]]
    referenced = {m for t in texts for m in re.findall(r"--config (?:/mnt/uhg/)?(configs/[\w./-]+\.yaml)", t)}
    assert referenced, "recipes should show a concrete config"
    missing = sorted(r for r in referenced if not (ROOT / r).is_file())
    assert not missing, f"recipes name configs that do not exist: {missing}"
