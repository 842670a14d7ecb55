// ipc/wait_step.h: the spin-then-sleep step of every waiter (P6 of src/shm/layout.h), written once
// for Endpoint (call, receive) and QueueCore (MsgQueue::wait).
//
// SpinStep decides, after each look that found nothing, whether to look again (spinning, per the
// WaitPolicy), to sleep, or to give up at the deadline. The clock is read once per 64 looks (a
// message that comes at once costs no clock read); Sleep mode reads it before each sleep. Spin
// mode, once it has found nothing for `spin`, yields the CPU (sched_yield) at each clock read.
//
// sleep_once() is the sleep itself, the consumer's half of the wake-up protocol:
//   1. read the futex word (acquire; pairs with the producer's fetch_add(release) in P4): a wake
//      after this read changes it, so FUTEX_WAIT then returns at once;
//   2. announce: consumer_sleeping = 1 on every direction the waiter consumes;
//   3. seq_cst fence (pairs with the producer's fence in P4: either the producer sees the flag,
//      or we see its entry in 4);
//   4. look once more; sleep only if nothing is there, at most until the deadline (and at most
//      max_ns if >= 0);
//   5. retract the announcement.
#pragma once

#include <atomic>
#include <cstdint>

#include "mbmq/deadline.h"
#include "mbmq/wait_policy.h"
#include "os/futex.h"
#include "os/process.h"

namespace mbmq::detail {

inline void cpu_relax() noexcept { __builtin_ia32_pause(); }

class SpinStep {
 public:
  enum class Next : std::uint8_t { Look, Sleep, Expired };
  // A mode outside the enum is taken as Adaptive (the default), by every waiter alike.
  SpinStep(WaitPolicy policy, Deadline deadline) noexcept
      : policy_(valid(policy.mode) ? policy : WaitPolicy{WaitMode::Adaptive, policy.spin}),
        deadline_(deadline) {}

  // After a look that found nothing.
  Next after_miss() noexcept {
    if (policy_.mode != WaitMode::Sleep) {
      // One pause per look, as the raw baseline: on AMD Zen a pause is ~65 cycles, so more would
      // add up to a noticeable delay before a waiting message is seen.
      cpu_relax();
      if ((++looks_ & 63) != 0) return Next::Look;
    }
    const std::int64_t now = monotonic_ns();
    if (start_ == 0) start_ = now;
    if (!deadline_.is_never() && now >= deadline_.ns()) return Next::Expired;
    if (policy_.mode == WaitMode::Adaptive && now - start_ < policy_.spin.count())
      return Next::Look;
    if (policy_.mode != WaitMode::Spin) return Next::Sleep;
    // Spin never sleeps, but past its budget it lets the CPU go once per clock read: a peer that
    // shares our CPU (both ends runnable on one core of a loaded machine) otherwise waits for our
    // whole time slice at every hand-off, and a stream of 200,000 messages took a minute.
    if (now - start_ >= policy_.spin.count()) os::yield_cpu();
    return Next::Look;
  }

 private:
  static constexpr bool valid(WaitMode m) noexcept {
    return m == WaitMode::Spin || m == WaitMode::Adaptive || m == WaitMode::Sleep;
  }
  const WaitPolicy policy_;
  const Deadline deadline_;
  std::uint32_t looks_ = 0;
  std::int64_t start_ = 0;  // the first clock read
};

// Steps 1-5 above. announce() and retract() set and clear consumer_sleeping; nothing_there()
// looks once more (after the fence) and says whether to sleep. max_ns is read after
// nothing_there() (which may change it): < 0 means no cap.
template <class Announce, class NothingThere, class Retract>
void sleep_once(std::atomic<std::uint32_t>& word, Deadline deadline, const std::int64_t& max_ns,
                Announce announce, NothingThere nothing_there, Retract retract) {
  const std::uint32_t v = word.load(std::memory_order_acquire);
  announce();
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (nothing_there()) {
    std::int64_t timeout = deadline.is_never() ? -1 : deadline.remaining_ns();
    if (max_ns >= 0 && (deadline.is_never() || timeout > max_ns)) timeout = max_ns;
    if (deadline.is_never() || timeout > 0) (void)os::futex_wait(&word, v, timeout);
  }
  retract();
}

}  // namespace mbmq::detail
