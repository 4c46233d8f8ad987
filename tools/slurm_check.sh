#!/usr/bin/env bash
# Runs cluster/slurm/uhg-ray.sbatch for real on a one-node SLURM cluster on 127.0.0.1 and checks
# what the run left behind: a checkpoint, the generator export and a finished MLflow run.
#
#   sudo tools/slurm_check.sh          (root: installs and starts SLURM if needed)
#
# 1. Installs Debian's slurm-wlm and munge if slurmctld is missing, starts munged, writes a
#    one-node slurm.conf (cluster "uhgcheck": this host, all its cores, no GPUs; a slurm.conf
#    it did not write is left alone and the check refuses to run), and starts slurmctld and slurmd.
# 2. slurmd runs in a PID namespace of its own: the job's `ray symmetric-run` ends with
#    `ray stop`, which stops every Ray process it can see; in the namespace it sees only the
#    job's own. Ports 26379-26381 keep the job's Ray away from a Ray on the default ports.
# 3. Submits the mini GAN config on CPU (2 workers, 4 steps) with UHG_ROOT in a scratch folder
#    and waits (`run_job`: its exit code is the job's), then checks the run folder and
#    the sqlite MLflow store.
# 4. Submits once more with the head's GCS port taken, while step 3's results are checked: the
#    job must fail ("the run never started"), since `ray symmetric-run` exits 0 when the head's
#    `ray start` fails.
# Environment: UHG_SLURM_CHECK_DIR (scratch folder, default /tmp/uhg-slurm-check, emptied first),
# UHG_VENV (environment with uhg's dependencies, default: the one of `python` on PATH).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${UHG_SLURM_CHECK_DIR:-/tmp/uhg-slurm-check}"
PYTHON="$(command -v python)"
export UHG_VENV="${UHG_VENV:-$(dirname "$(dirname "$PYTHON")")}"
HOST="$(hostname -s)"
CPUS="$(nproc --all)"
CONF=/etc/slurm/slurm.conf
RUN_NAME=slurm-check

if [ "$(id -u)" != 0 ]; then
    echo "tools/slurm_check.sh installs and starts SLURM daemons: run it as root" >&2
    exit 2
fi

if [ -f "$CONF" ] && ! grep -q '^ClusterName=uhgcheck$' "$CONF"; then
    echo "$CONF exists and was not written by this script: it only sets up and uses its own one-node cluster" >&2
    exit 2
fi

if ! command -v slurmctld >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge
fi

if ! pgrep -x munged >/dev/null; then
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
fi

if ! grep -q "^NodeName=${HOST} " "$CONF" 2>/dev/null; then
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    # proctrack/linuxproc and task/none: no cgroup hierarchy to manage inside a container.
    cat > "$CONF" <<CONFEOF
ClusterName=uhgcheck
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} State=UNKNOWN
PartitionName=check Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONFEOF
fi

pgrep -x slurmctld >/dev/null || slurmctld
if ! pgrep -x slurmd >/dev/null; then
    # bash as the namespace's PID 1 reaps the Ray daemons that `ray start` orphans.
    nohup unshare --pid --fork --mount-proc bash -c 'slurmd -D & wait' >/var/log/slurm/slurmd.stdout 2>&1 &
fi
for _ in $(seq 60); do
    state="$(sinfo --noheader --nodes="$HOST" --format=%t 2>/dev/null || true)"
    case "$state" in idle*|mix*|alloc*) break ;; esac
    sleep 1
done
case "$state" in
    idle*|mix*|alloc*) ;;
    *) scontrol update nodename="$HOST" state=resume 2>/dev/null || true; sleep 2 ;;
esac
sinfo

# A scratch root holding its own copy of the configs: the sbatch script gets the config by
# absolute path, and every relative path in it (DeepSpeed preset, store, runs/) stays in here.
rm -rf "$WORK"
mkdir -p "$WORK"
cp -r "$ROOT/configs" "$WORK/configs"
cd "$WORK"

export UHG_ROOT="$WORK" UHG_CPU_ONLY=1 UHG_RAY_PORT=26379 UHG_RAY_DASHBOARD_PORT=26380 UHG_RAY_CLIENT_PORT=26381 UHG_RAY_AGENT_PORT=26382
# Ray session folders hold unix sockets: their path must stay short (< 108 bytes).
export RAY_TMPDIR=/tmp/uhg-slurm-ray PYTHONPATH="$ROOT" DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
export RAY_AUTH_TOKEN_PATH="$WORK/.ray/auth_token"
unset MLFLOW_TRACKING_URI RAY_ADDRESS RAY_AUTH_TOKEN
rm -rf "$RAY_TMPDIR" && mkdir -p "$RAY_TMPDIR"

# Submits a job and waits for it; returns the job's exit code (1 if it was killed by a signal or
# never ran), as `sbatch --wait` does. `sbatch --wait` itself asks 2 s, 10 s, 42 s after the
# submission and then every 32 s (Slurm 22.05, `_job_wait`), so it reports a job up to 32 s after
# the job ended (twice per check); this asks every second.
run_job() {
    local id info state code signal missing=0
    id="$(sbatch --parsable "$@")" || return 1
    id="${id%%;*}"
    while :; do
        sleep 1
        info="$(scontrol --oneliner show job "$id" 2>/dev/null || true)"
        state="$(sed -n 's/.* JobState=\([A-Z_]*\) .*/\1/p' <<<"$info")"
        case "$state" in
            PENDING|CONFIGURING|RUNNING|COMPLETING|SUSPENDED|REQUEUED|RESIZING|STAGE_OUT) missing=0 ;;
            "") missing=$((missing + 1)); [ "$missing" -lt 30 ] || { echo "job $id: slurmctld does not know it" >&2; return 1; } ;;
            *) break ;;
        esac
    done
    code="$(sed -n 's/.* ExitCode=\([0-9]*\):[0-9]* .*/\1/p' <<<"$info")"
    signal="$(sed -n 's/.* ExitCode=[0-9]*:\([0-9]*\) .*/\1/p' <<<"$info")"
    if [ "${signal:-0}" != 0 ]; then return 1; fi
    if [ "${code:-1}" != 0 ]; then return "${code:-1}"; fi
    [ "$state" = COMPLETED ]
}

start=$(date +%s)
set +e
run_job --nodes=1 --cpus-per-task="$CPUS" --gpus-per-task=0 --time=00:30:00 \
    --output="$WORK/slurm-%j.out" "$ROOT/cluster/slurm/uhg-ray.sbatch" \
    "$WORK/configs/pxd_gan_mini.yaml" --run-name "$RUN_NAME" \
    --set train.steps=4 --set train.checkpoint_every=2 --set train.validate_every=4 \
    --set train.log_every=2 --set data.simulate.n_events=120 --set evaluate.final=false
rc=$?
set -e
elapsed=$(( $(date +%s) - start ))
cat "$WORK"/slurm-*.out
echo "job exit code ${rc} after ${elapsed} s"
[ "$rc" = 0 ] || exit 1

run_folder="$WORK/runs/pxd_gan_mini/$RUN_NAME"

# A head whose `ray start` fails (here: its GCS port is taken) must fail the job; `ray
# symmetric-run` itself exits 0 then.
"$PYTHON" -c 'import socket, time; s = socket.socket(); s.bind(("0.0.0.0", 26389)); s.listen(); time.sleep(900)' &
holder=$!
trap 'kill "$holder" 2>/dev/null || true' EXIT
sleep 1
# Ray's own waits for a GCS that never answers (40 s by default) are shortened: the check is
# that the job fails, not how long Ray takes to give up. This job runs while the first one's
# results are checked below.
RAY_py_gcs_connect_timeout_s=3 RAY_gcs_rpc_server_connect_timeout_s=2 UHG_RAY_PORT=26389 \
    run_job --nodes=1 --cpus-per-task="$CPUS" --gpus-per-task=0 --time=00:10:00 \
    --output="$WORK/nostart-%j.out" "$ROOT/cluster/slurm/uhg-ray.sbatch" \
    "$WORK/configs/pxd_gan_mini.yaml" --run-name slurm-check-nostart --set train.steps=4 &
nostart=$!

"$PYTHON" - "$run_folder" "$WORK/runs/mlflow.db" "$RUN_NAME" <<'PYEOF'
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

folder, db, name = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
checkpoints = sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name.startswith("step_"))
assert checkpoints and checkpoints[-1] == "step_000004", f"checkpoints in {folder}: {checkpoints}"
assert (folder / "checkpoints" / "step_000004" / "MANIFEST.json").is_file()
export = sorted(p.name for p in (folder / "export").iterdir())
assert any(n.endswith(".safetensors") for n in export), f"export of {folder}: {export}"
client = MlflowClient(tracking_uri=f"sqlite:///{db}")
runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
        if r.info.run_name == name]
assert len(runs) == 1, f"MLflow runs named {name}: {len(runs)}"
run = runs[0]
assert run.info.status == "FINISHED", run.info.status
assert run.data.metrics, f"MLflow run {run.info.run_id} has no metrics"
print(f"SLURM check passed: {folder}: checkpoints {checkpoints}, export {export}; MLflow run "
      f"{run.info.run_id} FINISHED with {len(run.data.metrics)} metrics")
PYEOF

set +e
wait "$nostart"
rc=$?
set -e
kill "$holder" 2>/dev/null || true
cat "$WORK"/nostart-*.out
if [ "$rc" = 0 ] || ! grep -q "the run never started" "$WORK"/nostart-*.out; then
    echo "SLURM check failed: a job whose Ray head could not start ended with exit code ${rc}" >&2
    exit 1
fi
echo "SLURM check passed: a job whose Ray head could not start failed (job exit code ${rc})"
