#!/usr/bin/env bash
# A single-machine Ray head for `ray job submit` (laptop, workstation).
#
#   cluster/local.sh start     start the head (if none is running) and print the submit command
#   cluster/local.sh status    show resources and jobs
#   cluster/local.sh stop      stop the head started here
#
# Safe defaults: dashboard and job API on 127.0.0.1 only (whoever reaches the job API can run
# any code on this machine), usage stats off, and RAY_AUTH_MODE set explicitly so that the
# head and every client agree (a mismatch fails with "Missing authentication token").
# Environment: RAY_AUTH_MODE (disabled|token, default disabled), UHG_RAY_CPUS (default nproc),
# UHG_RAY_GPUS (default: number of GPUs nvidia-smi lists, else 0), UHG_RAY_DASHBOARD_PORT
# (default 8265), UHG_RAY_PORT (GCS port, default 6379), UHG_RAY_TEMP_DIR (default /tmp/ray).
set -euo pipefail

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export RAY_USAGE_STATS_ENABLED=0
CPUS="${UHG_RAY_CPUS:-$(nproc)}"
if [ -z "${UHG_RAY_GPUS:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        UHG_RAY_GPUS="$(nvidia-smi --list-gpus 2>/dev/null | wc -l)"
    else
        UHG_RAY_GPUS=0
    fi
fi
DASHBOARD_PORT="${UHG_RAY_DASHBOARD_PORT:-8265}"
GCS_PORT="${UHG_RAY_PORT:-6379}"
TEMP_DIR="${UHG_RAY_TEMP_DIR:-/tmp/ray}"
ADDRESS="http://127.0.0.1:${DASHBOARD_PORT}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

print_submit() {
    cat <<MSG

Ray head is up: dashboard ${ADDRESS} (bound to 127.0.0.1), auth mode ${RAY_AUTH_MODE}.
Submit a training run from the repository root (${ROOT}):

  export RAY_ADDRESS=${ADDRESS} RAY_AUTH_MODE=${RAY_AUTH_MODE}
  ray job submit --working-dir . --runtime-env-json '{"env_vars": {"UHG_ROOT": "${ROOT}"}}' -- uhg train --config configs/pxd_gan_mini.yaml

UHG_ROOT makes relative paths (configs, stores, runs/) resolve in the repository instead of
Ray's temporary copy of it, so checkpoints and the MLflow store land in ${ROOT}/runs.
Follow the run:  mlflow ui --backend-store-uri sqlite:///${ROOT}/runs/mlflow.db --default-artifact-root ${ROOT}/runs/mlartifacts --host 127.0.0.1
MSG
}

case "${1:-}" in
    start)
        if ray status --address "127.0.0.1:${GCS_PORT}" >/dev/null 2>&1; then
            echo "a Ray head already answers on 127.0.0.1:${GCS_PORT}"
            print_submit
            exit 0
        fi
        ray start --head \
            --port "${GCS_PORT}" \
            --num-cpus "${CPUS}" --num-gpus "${UHG_RAY_GPUS}" \
            --dashboard-host 127.0.0.1 --dashboard-port "${DASHBOARD_PORT}" \
            --temp-dir "${TEMP_DIR}" \
            --disable-usage-stats
        print_submit
        ;;
    status)
        ray status --address "127.0.0.1:${GCS_PORT}"
        echo
        ray job list --address "${ADDRESS}"
        ;;
    stop)
        # `ray stop` ends every Ray process of this user on this machine; that is the head
        # started here on a personal machine. On shared machines stop your head's processes
        # by PID instead.
        ray stop
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
