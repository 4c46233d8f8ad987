#!/usr/bin/env bash
# A single-machine Ray head for `ray job submit` (laptop, workstation).
#
#   cluster/local.sh start [ARGS]  start the head (if none is running; ARGS go to `ray start`)
#                                  and print the submit command
#   cluster/local.sh status        show resources and jobs
#   cluster/local.sh stop          stop the head started here
#
# Safe defaults: token authentication on, dashboard and job API on 127.0.0.1 only, usage
# stats off. Ray's GCS, raylet, object manager, dashboard agent and client server listen on
# every interface (Ray has no option to bind them to loopback), so without a token anyone who
# reaches this machine could run code as you; with it each of them refuses a client that does
# not present the token. The token is read from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH
# (default ~/.ray/auth_token), which is created (mode 600) when missing. Clients on this machine
# find it there; elsewhere give them RAY_AUTH_TOKEN. RAY_AUTH_MODE=disabled opts out (only on a
# machine nobody else can reach); head and clients must use the same mode.
# Environment: RAY_AUTH_MODE (token|disabled, default token), RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
# UHG_RAY_CPUS (default nproc), UHG_RAY_GPUS (default: number of GPUs nvidia-smi lists, else 0),
# UHG_RAY_DASHBOARD_PORT (default 8265), UHG_RAY_PORT (GCS port, default 6379),
# UHG_RAY_TEMP_DIR (default /tmp/ray).
set -euo pipefail

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
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

# Token mode needs a token before `ray start` (Ray generates one only for `ray.init()`).
ensure_token() {
    [ "${RAY_AUTH_MODE}" = "token" ] || return 0
    [ -n "${RAY_AUTH_TOKEN:-}" ] && return 0
    local file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [ ! -s "${file}" ]; then
        mkdir -p "$(dirname "${file}")"
        (umask 077 && python -c "import secrets; print(secrets.token_hex(32), end='')" > "${file}")
        echo "wrote a new Ray authentication token to ${file}"
    fi
}

gcs_port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/${GCS_PORT}") 2>/dev/null
}

print_submit() {
    local TOKEN_NOTE=""
    if [ "${RAY_AUTH_MODE}" = "token" ]; then
        TOKEN_NOTE="
Clients on this machine read the token from RAY_AUTH_TOKEN or ${RAY_AUTH_TOKEN_PATH:-~/.ray/auth_token};
the dashboard in a browser asks for it (print it with: ray get-auth-token)."
    fi
    cat <<MSG

Ray head is up: dashboard ${ADDRESS} (bound to 127.0.0.1), auth mode ${RAY_AUTH_MODE}.${TOKEN_NOTE}
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
        shift
        ensure_token
        # `ray status` retries an address where nothing listens for ~45 s before it gives up:
        # ask it only when the GCS port takes a connection.
        if gcs_port_open && ray status --address "127.0.0.1:${GCS_PORT}" >/dev/null 2>&1; then
            echo "a Ray head already answers on 127.0.0.1:${GCS_PORT}"
            print_submit
            exit 0
        fi
        ray start --head \
            --port "${GCS_PORT}" \
            --num-cpus "${CPUS}" --num-gpus "${UHG_RAY_GPUS}" \
            --dashboard-host 127.0.0.1 --dashboard-port "${DASHBOARD_PORT}" \
            --temp-dir "${TEMP_DIR}" \
            --disable-usage-stats "$@"
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
