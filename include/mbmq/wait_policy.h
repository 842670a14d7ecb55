// mbmq/wait_policy.h: how a side waits for a message. On a 2-vCPU virtual machine a futex wake-up
// costs ~10 µs while a cache-line round trip costs ~0.2 µs, so the spin budget is a time, not a
// loop count.
#pragma once

#include <chrono>
#include <cstdint>

namespace mbmq {

enum class WaitMode : std::uint8_t {
  Spin,      // never sleep: lowest latency, one core busy while waiting (still honours deadlines);
             // after `spin` with nothing, it yields the CPU (sched_yield) every 64 looks, so a
             // peer sharing its core on a loaded machine is not held off for a whole time slice
  Adaptive,  // spin for `spin`, then sleep on the futex (the default)
  Sleep,     // sleep at once (after one look): least CPU, pays a wake-up per message
};           // A value outside these is taken as Adaptive.

struct WaitPolicy {
  WaitMode mode = WaitMode::Adaptive;
  std::chrono::nanoseconds spin = std::chrono::microseconds(50);
};

}  // namespace mbmq
