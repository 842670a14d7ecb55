#!/usr/bin/env bash
# Configures and builds mbmq. BUILD_DIR (default build) and BUILD_TYPE (default Release) may be set;
# extra arguments go to cmake's configure step (e.g. -DMBMQ_SANITIZE=address).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" \
  -DMBMQ_WERROR="${MBMQ_WERROR:-ON}" "$@"
cmake --build "$BUILD_DIR" -j"$(nproc)"
