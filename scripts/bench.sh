#!/usr/bin/env bash
# The main job: install, build, and run the two-process call/reply benchmark (mbmq beside raw
# shared-memory, futex, pipe and Unix-socket baselines). Arguments go to mbmq-bench
# (e.g. --quick, --json, --sizes 64,1048576).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh >/dev/null
exec ./build/bench/mbmq-bench "$@"
