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
# Two test processes, one per core: most of the slow tests wait on Ray, DeepSpeed or a subprocess
# while the in-process tests run on one thread (tests/conftest.py). A test file stays on one
# process (its module fixtures, such as a Ray head or a trained run, are made once). The 25
# slowest tests close the output, so a CI log shows where the suite's time goes.
# UHG_TEST_PROCESSES=0 runs everything in this process.
exec python -m pytest -n "${UHG_TEST_PROCESSES:-2}" --dist loadfile --durations=25 ${args[@]+"${args[@]}"}
