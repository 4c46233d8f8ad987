# Environment shared by the set-up scripts; sourced, not run.
# DeepSpeed: CPU accelerator unless a GPU is present, and a persistent cache for its JIT ops
# (the first build of the comm op takes ~45 s; later runs reuse it).
if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"; fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/uhg/torch_extensions}"
# Ray: token authentication for every head and client (Ray's ports listen beyond loopback;
# the token is ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN), no usage reporting.
# RAY_AUTH_MODE=disabled opts out, for head and clients alike.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED=0
export PYTHONUNBUFFERED=1

# Create .venv beside the repository (once) and install uhg with the given extras.
uhg_install() {
    local root extras
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    extras="$1"
    if [ ! -x "$root/.venv/bin/python" ]; then
        python3 -m venv "$root/.venv"
    fi
    "$root/.venv/bin/pip" install --quiet -e "$root$extras"
    export PATH="$root/.venv/bin:$PATH"
}
