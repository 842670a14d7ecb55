// ipc/deadline_mutex.h: a process-private mutex whose waiters sleep (futex) and give up at a
// deadline. It serializes the consumers of one channel end (call()/receive()): a second thread's
// call waits for the first one's reply without spinning, and returns Errc::TimedOut at its own
// deadline. The holder may sleep while holding it (that is its purpose); nothing else is held then.
//
// State word (Drepper, "Futexes are tricky", mutex 2): 0 free, 1 locked, 2 locked and a waiter
// may sleep. Memory ordering: a successful lock acquires, unlock() releases, as a mutex.
// A capability for clang's thread-safety analysis: after a successful lock_until(), hold it with
// os::LockGuard(mu, os::kAdoptLock) (os/mutex.h).
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>

#include "mbmq/deadline.h"
#include "os/futex.h"
#include "os/thread_annotations.h"

namespace mbmq::detail {

class MBMQ_CAPABILITY("mutex") DeadlineMutex {
 public:
  // True once locked; false if the deadline passed first.
  bool lock_until(Deadline deadline) noexcept MBMQ_TRY_ACQUIRE(true) {
    std::uint32_t c = 0;
    // Pairs with the release exchange in unlock().
    if (w_.compare_exchange_strong(c, 1, std::memory_order_acquire, std::memory_order_relaxed))
      return true;
    if (c != 2) c = w_.exchange(2, std::memory_order_acquire);
    while (c != 0) {
      const std::int64_t rem = deadline.remaining_ns();
      if (!deadline.is_never() && rem <= 0) return false;  // w_ stays 2: one spurious wake later
      (void)os::futex_wait(&w_, 2, deadline.is_never() ? -1 : rem);
      c = w_.exchange(2, std::memory_order_acquire);
    }
    return true;
  }
  void lock() noexcept MBMQ_ACQUIRE() { (void)lock_until(Deadline::never()); }
  bool try_lock() noexcept MBMQ_TRY_ACQUIRE(true) {
    std::uint32_t c = 0;
    return w_.compare_exchange_strong(c, 1, std::memory_order_acquire, std::memory_order_relaxed);
  }
  void unlock() noexcept MBMQ_RELEASE() {
    // Pairs with the acquire operations in lock_until().
    if (w_.exchange(0, std::memory_order_release) == 2) (void)os::futex_wake(&w_, 1);
  }

 private:
  std::atomic<std::uint32_t> w_{0};
};

}  // namespace mbmq::detail
