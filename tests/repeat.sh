#!/usr/bin/env bash
# tests/repeat.sh BINARY FILTER RUNS JOBS: runs one gtest test RUNS times, JOBS at once (each a
# fresh process, as ctest runs it), and fails if any run failed, showing the first failure's
# output. For failures that need a loaded machine to show: JOBS above the CPU count is the load.
# Behind the soak label (tests/CMakeLists.txt); most useful in the ASan build:
#   (cd build-asan && ctest -R soak.repeat --output-on-failure)
set -uo pipefail
bin=$1 filter=$2 runs=$3 jobs=$4
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
export bin filter logs
seq 1 "$runs" | xargs -P "$jobs" -I{} bash -c \
  '"$bin" --gtest_filter="$filter" >"$logs/{}.log" 2>&1 && rm -f "$logs/{}.log"'
failed=$(find "$logs" -name '*.log' | wc -l)
echo "$filter: $failed of $runs runs failed ($jobs at once)"
if [ "$failed" != 0 ]; then
  cat "$(find "$logs" -name '*.log' | head -1)"
  exit 1
fi
