// Helpers for tests that fork: run a function in a child process with a watchdog, and collect
// its exit code. A child never returns into GoogleTest: it _exits with its result.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <span>
#include <thread>

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
// fill() and check() write and compare that content 256 bytes at a time, with memcpy and memcmp
// (fast at any optimisation level: the ASan build compiles the tests -O0, where a loop of
// pattern() calls took 20 s per 256 MiB). In an aligned run of 256 bytes i >> 12 is one k, and
// i * 131 + c = (i + 43 * c) * 131 (mod 256) since 131 * 43 = 1 (mod 256): with c = seq * 7 + k
// the run is pattern(0, ...)'s first 256 bytes rotated by 43 * c, i.e. 256 bytes of the 512 below
// from 43 * c mod 256 on. Test.FillAndCheckAreThePatternByteForByte compares both, byte by byte.
struct PatternRow {
  std::byte row[512];
  PatternRow() {
    for (std::size_t j = 0; j < sizeof row; ++j) row[j] = pattern(0, j & 0xff);
  }
  // pattern(seq, i + j) for j < 256, i a multiple of 256.
  static const std::byte* run(std::uint64_t seq, std::size_t i) {
    static const PatternRow r;
    return r.row + ((43 * (seq * 7 + (i >> 12))) & 0xff);
  }
};
inline void fill(std::span<std::byte> d, std::uint64_t seq) {
  for (std::size_t i = 0; i < d.size(); i += 256)
    std::memcpy(d.data() + i, PatternRow::run(seq, i), std::min<std::size_t>(256, d.size() - i));
}
inline bool check(std::span<const std::byte> d, std::uint64_t seq) {
  for (std::size_t i = 0; i < d.size(); i += 256)
    if (std::memcmp(d.data() + i, PatternRow::run(seq, i),
                    std::min<std::size_t>(256, d.size() - i)) != 0)
      return false;
  return true;
}

inline Deadline secs(int s) { return Deadline::after(std::chrono::seconds(s)); }

// True in the sanitizer builds (ASan+UBSan and TSan, scripts/test.sh). They are there to find
// memory errors, undefined behaviour and data races, which a run a fraction of the size finds as
// well, at several times the cost per operation; the volumes behind a claim of robustness
// (trials, messages, bytes) are the Release run's. A test picks its smaller count with
// sized(release, sanitized) and says why where it does.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
inline constexpr bool kSanitized = true;
#else
inline constexpr bool kSanitized = false;
#endif
template <typename T>
constexpr T sized(T release, T sanitized) {
  return kSanitized ? sanitized : release;
}

// Turns a hang into a failure of the test: if not destroyed within `limit`, prints what hung and
// ends the process (its threads may be stuck inside the library, nothing can be unwound).
class Watchdog {
 public:
  Watchdog(const char* what, std::chrono::seconds limit)
      : thread_([this, what, limit] {
          std::unique_lock lock(mu_);
          if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
            std::fprintf(stderr, "WATCHDOG: %s did not finish within %lld s (a hang)\n", what,
                         static_cast<long long>(limit.count()));
            std::fflush(stderr);
            std::_Exit(97);
          }
        }) {}
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;
  ~Watchdog() {
    {
      std::lock_guard lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

}  // namespace mbmq::test
