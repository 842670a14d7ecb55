// ipc/atomic_wait_policy.h: a WaitPolicy that one thread may change while others wait with it,
// read without a lock on every wait.
// Memory ordering: relaxed. A waiter that reads a policy mixed from an old and a new setting
// still waits correctly (only how long it spins changes), and the next wait sees the new one.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#include "mbmq/wait_policy.h"

namespace mbmq::detail {

class AtomicWaitPolicy {
 public:
  explicit AtomicWaitPolicy(WaitPolicy p) noexcept { store(p); }
  WaitPolicy load() const noexcept {
    return {mode_.load(std::memory_order_relaxed),
            std::chrono::nanoseconds(spin_ns_.load(std::memory_order_relaxed))};
  }
  void store(WaitPolicy p) noexcept {
    mode_.store(p.mode, std::memory_order_relaxed);
    spin_ns_.store(static_cast<std::int64_t>(p.spin.count()), std::memory_order_relaxed);
  }

 private:
  std::atomic<WaitMode> mode_{WaitMode::Adaptive};
  std::atomic<std::int64_t> spin_ns_{0};
};

}  // namespace mbmq::detail
