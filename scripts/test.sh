#!/usr/bin/env bash
# The README's test command (and CI's): install what is needed, build, and run the whole suite;
# build the library with clang -Wthread-safety -Werror (preset tsa) and run clang-tidy over src/
# (scripts/clang-tidy.sh); then run the same suite under ASan+UBSan (but the `mbmq` command's
# tests, the static style.* checks and the idle-cost tests, which the Release run covers) and the
# thread-level tests under TSan. The sanitizer builds are -O1 -g1 (CMakePresets.json), but for the
# ASan build's test files, which are -O0 (MBMQ_ASAN_TEST_OPT, tests/CMakeLists.txt): measured on
# 2026-12-02, their compile time 552 -> 268 CPU-seconds, its tests as fast as before (their loops
# over payloads are memcpy/memcmp or in the optimised tests/support/fast.cc).
# SANITIZERS=0 skips the sanitizer builds (a quick local run). CTEST_ARGS adds ctest arguments.
# Tests labelled soak (long trials) are left out; run them with: (cd build && ctest -L soak).
set -euo pipefail
cd "$(dirname "$0")/.."
# Each stage's start, in seconds since this script began (where the 20 minutes go).
stage() { echo "== $1 == (${SECONDS} s)"; }
stage "install"
bash scripts/install-deps.sh
stage "Release build"
bash scripts/build.sh
stage "Release: whole suite"
(cd build && ctest --output-on-failure -j2 -LE soak ${CTEST_ARGS:-})
stage "clang -Wthread-safety -Werror: the library"
cmake --preset tsa >/dev/null
# mbmq_net (#19) too where UCX's headers are installed (scripts/install-deps.sh installs them).
net=""; [ -f /usr/include/ucp/api/ucp.h ] && net=mbmq_net
cmake --build build-tsa -j"$(nproc)" --target mbmq_os mbmq_shm mbmq_ipc $net
stage "clang-tidy: src/"
bash scripts/clang-tidy.sh
if [ "${SANITIZERS:-1}" != 0 ]; then
  stage "ASan + UBSan: build"
  cmake --preset asan >/dev/null
  cmake --build build-asan -j"$(nproc)"
  stage "ASan + UBSan: whole suite"
  # Not the idle label either: those tests measure an idle owner's CPU time (10 s each), a claim
  # about cost that the Release run checks; under ASan they would only wait again.
  (cd build-asan && ctest --output-on-failure -j2 -LE "soak|idle" ${CTEST_ARGS:-})
  stage "TSan: build"
  cmake --preset tsan >/dev/null
  # Only the thread-level test binaries: the rest would be built for nothing.
  cmake --build build-tsan -j"$(nproc)" --target threads_tests
  stage "TSan: thread-level tests"
  (cd build-tsan && ctest --output-on-failure -j2 -L threads)
fi
stage "done"
