#!/usr/bin/env bash
# Install uhg with its test extras into .venv and run the test suite.
#   bash tools/run_tests.sh            the whole suite (what CI runs)
#   bash tools/run_tests.sh --fast     the fast tier: every test not marked slow
# Other arguments pass through to pytest (e.g. -k, -x, a test file).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh
uhg_install "[test]"
args=()
for arg in "$@"; do
    if [ "$arg" = "--fast" ]; then
        args+=(-m "not slow")
    else
        args+=("$arg")
    fi
done
# The 25 slowest tests close the output, so a CI log shows where the suite's time goes.
exec python -m pytest --durations=25 ${args[@]+"${args[@]}"}
