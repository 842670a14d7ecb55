// tests/fuzz/fuzz_common.h: shared by the fuzz targets. Each target is built twice: with
// libFuzzer (the `fuzz` preset, clang) to search, and as a plain program (every build) that
// replays the committed corpus in tests/fuzz/corpus/<target>/, so the default test run exercises
// every input the fuzzers kept.
#pragma once

#include <fuzzer/FuzzedDataProvider.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "mbmq/mbmq.h"
#include "os/process.h"

namespace mbmq::fuzz {

// The first channel of a process starts its watcher thread (and its epoll fd): do that before any
// fd count is taken.
inline void warm_up() {
  static const bool done = [] {
    auto p = Channel::pair();
    return true;
  }();
  (void)done;
}

// Aborts (a finding for the fuzzer) unless the fd count comes back to `want` (or below: an end of
// the previous input may still have been open when `want` was counted) within 200 ms. An end
// closed while the watcher thread delivers its hang-up is freed when that delivery returns.
inline void expect_fds(std::size_t want) {
  for (int i = 0; i < 200; ++i) {
    if (os::open_fd_count() <= want) return;
    ::usleep(1000);
  }
  std::fprintf(stderr, "fd leak: %zu open, %zu expected\n", os::open_fd_count(), want);
  std::abort();  // an fd leaked
}

}  // namespace mbmq::fuzz
