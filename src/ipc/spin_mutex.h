// ipc/spin_mutex.h: a small test-and-test-and-set lock for the short, process-private critical
// sections of the message path. Locking is one atomic exchange and unlocking a plain release
// store (a pthread mutex pays a second locked instruction to unlock). Holders that take long
// (buffer allocation, fd passing) are rare: waiters spin briefly, then yield.
// Memory ordering: lock() acquires, unlock() releases, as a mutex.
// A capability for clang's thread-safety analysis: hold it with os::LockGuard (os/mutex.h), and
// mark what it guards with MBMQ_GUARDED_BY.
#pragma once

#include <atomic>

#include "os/process.h"
#include "os/thread_annotations.h"

namespace mbmq::detail {

class MBMQ_CAPABILITY("mutex") SpinMutex {
 public:
  void lock() noexcept MBMQ_ACQUIRE() {
    for (int spins = 0;; ++spins) {
      // Pairs with the release store in unlock().
      if (!locked_.exchange(true, std::memory_order_acquire)) return;
      while (locked_.load(std::memory_order_relaxed)) {
        if (++spins > 128) {
          os::yield_cpu();  // through os/: counted, as every system call
          spins = 0;
        } else {
          __builtin_ia32_pause();
        }
      }
    }
  }
  bool try_lock() noexcept MBMQ_TRY_ACQUIRE(true) {
    return !locked_.load(std::memory_order_relaxed) &&
           !locked_.exchange(true, std::memory_order_acquire);
  }
  void unlock() noexcept MBMQ_RELEASE() { locked_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> locked_{false};
};

}  // namespace mbmq::detail
