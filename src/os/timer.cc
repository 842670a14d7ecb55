#include "os/timer.h"

#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>

#include "os/syscall_count.h"

namespace mbmq::os {

Result<UniqueFd> make_timer() {
  count_syscall();
  const int fd = ::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  if (fd < 0) return fail(Error::from_syscall("timerfd_create", errno));
  return UniqueFd(fd);
}

Status arm_timer_once(int fd, std::int64_t ns) noexcept {
  itimerspec t{};
  t.it_value.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
  t.it_value.tv_nsec = static_cast<long>(ns % 1'000'000'000);
  if (t.it_value.tv_sec == 0 && t.it_value.tv_nsec == 0) t.it_value.tv_nsec = 1;  // 0 disarms
  count_syscall();
  if (::timerfd_settime(fd, 0, &t, nullptr) != 0)
    return fail(Error::from_syscall("timerfd_settime", errno));
  return {};
}

void drain_timer(int fd) noexcept {
  std::uint64_t expirations = 0;
  count_syscall();
  (void)!::read(fd, &expirations, sizeof(expirations));
}

}  // namespace mbmq::os
