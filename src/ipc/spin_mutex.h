// ipc/spin_mutex.h: a small test-and-test-and-set lock for the short, process-private critical
// sections of the message path. Locking is one atomic exchange and unlocking a plain release
// store (a pthread mutex pays a second locked instruction to unlock). Holders that take long
// (buffer allocation, fd passing) are rare: waiters spin briefly, then yield.
// Memory ordering: lock() acquires, unlock() releases, as a mutex.
#pragma once

#include <atomic>
#include <thread>

namespace mbmq::detail {

class SpinMutex {
 public:
  void lock() noexcept {
    for (int spins = 0;; ++spins) {
      // Pairs with the release store in unlock().
      if (!locked_.exchange(true, std::memory_order_acquire)) return;
      while (locked_.load(std::memory_order_relaxed)) {
        if (++spins > 128) {
          std::this_thread::yield();
          spins = 0;
        } else {
          __builtin_ia32_pause();
        }
      }
    }
  }
  bool try_lock() noexcept {
    return !locked_.load(std::memory_order_relaxed) &&
           !locked_.exchange(true, std::memory_order_acquire);
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> locked_{false};
};

}  // namespace mbmq::detail
