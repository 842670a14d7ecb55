#!/usr/bin/env bash
# The main job: install, build, and run `mbmq bench`: two-process request/response, mbmq beside
# raw shared memory, futex, pipe, Unix sockets, TCP, ZeroMQ, Boost.Interprocess and iceoryx.
# Arguments go to `mbmq bench` (e.g. --quick, --json, --markdown, --plot latency.svg, --sizes 64,1M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh >/dev/null
exec ./build/tools/mbmq bench "$@"
