// os/futex.h: shared (not FUTEX_PRIVATE_FLAG) futex wait and wake on a 32-bit word that may live in
// memory mapped by several processes. The kernel keys a shared futex by the page and offset, so a
// word in a memfd segment wakes waiters in any process that maps it. (libstdc++ 12's
// std::atomic::wait is process-private and cannot be used across processes.)
#pragma once

#include <atomic>
#include <cstdint>

#include "mbmq/result.h"

namespace mbmq::os {

enum class FutexWait {
  Woken,         // woken by FUTEX_WAKE (or spuriously): re-check the condition
  ValueChanged,  // *word != expected when the kernel looked: re-check the condition
  TimedOut,      // timeout_ns elapsed
};

// Sleeps while *word == expected, at most timeout_ns (< 0: no limit). EINTR is reported as Woken,
// never retried here: a retry would restart the full timeout, so a process signalled more often
// than that would never time out. Callers loop against their own Deadline and pass the time left
// each round (Endpoint::wait_inbound via call()/receive(), QueueCore::wait).
Result<FutexWait> futex_wait(const std::atomic<std::uint32_t>* word, std::uint32_t expected,
                             std::int64_t timeout_ns) noexcept;
// Wakes up to `count` waiters; returns how many were woken.
Result<int> futex_wake(const std::atomic<std::uint32_t>* word, int count) noexcept;

}  // namespace mbmq::os
