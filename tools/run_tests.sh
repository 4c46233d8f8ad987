#!/usr/bin/env bash
# Install uhg with its test extras into .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
uhg_install "[test]"
exec python -m pytest "$@"
