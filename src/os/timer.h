// os/timer.h: one-shot timers as file descriptors (timerfd), for the watcher thread's epoll.
#pragma once

#include <cstdint>

#include "mbmq/result.h"
#include "os/fd.h"

namespace mbmq::os {

// timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC): readable once it expired.
Result<UniqueFd> make_timer();
// Expires once, ns from now (replacing any earlier setting).
Status arm_timer_once(int fd, std::int64_t ns) noexcept;
// Reads the expiry count (non-blocking), so the fd is no longer readable.
void drain_timer(int fd) noexcept;

}  // namespace mbmq::os
