#!/usr/bin/env bash
# tests/repeat.sh BINARY FILTER RUNS JOBS: runs one gtest test RUNS times, JOBS at once (each a
# fresh process, as ctest runs it), and fails if any run failed (exit status not 0, or gtest did
# not report exactly one test passed: a filter that matches nothing fails too). Each failed run's
# output is shown as it ends, so a ctest timeout still shows what failed before it.
# JOBS above the CPU count is the load (6 on this 2-CPU machine). Behind the soak label
# (tests/CMakeLists.txt); most useful in the ASan build:
#   (cd build-asan && ctest -R soak.repeat --output-on-failure)
set -uo pipefail
bin=$1 filter=$2 runs=$3 jobs=$4
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
export bin filter logs
seq 1 "$runs" | xargs -P "$jobs" -I{} bash -c '
  if "$bin" --gtest_filter="$filter" >"$logs/{}.log" 2>&1 &&
     grep -q "^\[  PASSED  \] 1 test" "$logs/{}.log"; then
    rm -f "$logs/{}.log"
  else
    echo "== run {} failed =="
    cat "$logs/{}.log"
  fi'
failed=$(find "$logs" -name '*.log' | wc -l)
echo "$filter: $failed of $runs runs failed ($jobs at once)"
[ "$failed" = 0 ]
