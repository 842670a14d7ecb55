#include "os/epoll.h"

#include <sys/epoll.h>

#include <array>
#include <cerrno>

#include "os/fault.h"
#include "os/syscall_count.h"

namespace mbmq::os {

static_assert(EPOLLRDHUP == 0x2000 && EPOLLHUP == 0x010 && EPOLLERR == 0x008);
static_assert(EPOLLIN == kEpollIn && EPOLLET == kEpollEdge);

Result<Epoll> Epoll::create() {
  count_syscall();
  int fd = ::epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) return fail(Error::from_syscall("epoll_create1", errno));
  Epoll e;
  e.fd_ = UniqueFd(fd);
  return e;
}

Status Epoll::add(int fd, std::uint32_t events, std::uint64_t data) {
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = data;
  if (injected(Fault::EpollCtl))
    return fail(Error::from_syscall("epoll_ctl(ADD)", fault_errno(Fault::EpollCtl)));
  count_syscall();
  if (::epoll_ctl(fd_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
    return fail(Error::from_syscall("epoll_ctl(ADD)", errno));
  return {};
}

Status Epoll::remove(int fd) {
  count_syscall();
  if (::epoll_ctl(fd_.get(), EPOLL_CTL_DEL, fd, nullptr) != 0)
    return fail(Error::from_syscall("epoll_ctl(DEL)", errno));
  return {};
}

Result<std::size_t> Epoll::wait(std::span<EpollEvent> out, int timeout_ms) {
  std::array<epoll_event, 32> evs{};
  int max = static_cast<int>(std::min(out.size(), evs.size()));
  for (;;) {
    count_syscall();
    int n = ::epoll_wait(fd_.get(), evs.data(), max, timeout_ms);
    // A signal: no events. Retrying with the same timeout would postpone the caller's deadlines
    // for as long as signals keep coming; the caller recomputes its timeout and waits again.
    if (n < 0 && errno == EINTR) return std::size_t{0};
    if (n < 0) return fail(Error::from_syscall("epoll_wait", errno));
    for (int i = 0; i < n; ++i) {
      auto k = static_cast<std::size_t>(i);
      out[k] = EpollEvent{evs[k].events, evs[k].data.u64};
    }
    return static_cast<std::size_t>(n);
  }
}

}  // namespace mbmq::os
