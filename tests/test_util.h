// Helpers for tests that fork: run a function in a child process with a watchdog, and collect
// its exit code. A child never returns into GoogleTest: it _exits with its result.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <span>

#include "mbmq/mbmq.h"
#include "os/process.h"

namespace mbmq::test {

// Runs fn() in a child (killed by SIGALRM after watchdog_s seconds); the child exits with fn's
// return value.
inline pid_t spawn(const std::function<int()>& fn, unsigned watchdog_s = 60) {
  auto pid = os::fork_process();
  if (!pid) return -1;
  if (*pid == 0) {
    os::die_with_parent();
    ::alarm(watchdog_s);
    int rc = fn();
    os::exit_now(rc);
  }
  return *pid;
}

// The child's exit code, or 128 + signal.
inline int join(pid_t pid) {
  auto st = os::wait_process(pid);
  if (!st) return -1;
  if (WIFEXITED(*st)) return WEXITSTATUS(*st);
  if (WIFSIGNALED(*st)) return 128 + WTERMSIG(*st);
  return -1;
}

// Deterministic content: byte i of message `seq` of size n.
inline std::byte pattern(std::uint64_t seq, std::size_t i) {
  return static_cast<std::byte>((i * 131 + seq * 7 + (i >> 12)) & 0xff);
}
inline void fill(std::span<std::byte> d, std::uint64_t seq) {
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = pattern(seq, i);
}
inline bool check(std::span<const std::byte> d, std::uint64_t seq) {
  for (std::size_t i = 0; i < d.size(); ++i)
    if (d[i] != pattern(seq, i)) return false;
  return true;
}

inline Deadline secs(int s) { return Deadline::after(std::chrono::seconds(s)); }

}  // namespace mbmq::test
