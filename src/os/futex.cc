#include "os/futex.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <ctime>

#include "os/fault.h"
#include "os/syscall_count.h"

namespace mbmq::os {

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t));
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

Result<FutexWait> futex_wait(const std::atomic<std::uint32_t>* word, std::uint32_t expected,
                             std::int64_t timeout_ns) noexcept {
  timespec ts{};
  timespec* tsp = nullptr;
  if (timeout_ns >= 0) {
    ts.tv_sec = static_cast<time_t>(timeout_ns / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(timeout_ns % 1'000'000'000);
    tsp = &ts;
  }
  if (injected(Fault::FutexWait))
    return fail(Error::from_syscall("futex(FUTEX_WAIT)", fault_errno(Fault::FutexWait)));
  count_syscall();
  // FUTEX_WAIT without FUTEX_PRIVATE_FLAG: the word is in shared memory. The relative timeout is
  // on CLOCK_MONOTONIC.
  long r = ::syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, nullptr, 0);
  if (r == 0) return FutexWait::Woken;
  switch (errno) {
    case EAGAIN:
      return FutexWait::ValueChanged;
    case ETIMEDOUT:
      return FutexWait::TimedOut;
    case EINTR:
      return FutexWait::Woken;
    default:
      return fail(Error::from_syscall("futex(FUTEX_WAIT)", errno));
  }
}

Result<int> futex_wake(const std::atomic<std::uint32_t>* word, int count) noexcept {
  if (injected(Fault::FutexWake))
    return fail(Error::from_syscall("futex(FUTEX_WAKE)", fault_errno(Fault::FutexWake)));
  count_syscall();
  long r = ::syscall(SYS_futex, word, FUTEX_WAKE, count, nullptr, nullptr, 0);
  if (r < 0) return fail(Error::from_syscall("futex(FUTEX_WAKE)", errno));
  return static_cast<int>(r);
}

}  // namespace mbmq::os
