#!/usr/bin/env bash
# Install uhg into .venv and run the main job end to end on the embedded default dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
uhg_install ""
exec uhg demo "$@"
