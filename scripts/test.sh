#!/usr/bin/env bash
# Install, build and run the whole test suite (ctest, label-excluded long soaks stay off unless
# CTEST_ARGS selects them, e.g. CTEST_ARGS="-L stress").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
cd build
ctest --output-on-failure -j2 ${CTEST_ARGS:-}
