#include "os/fd.h"

#include <unistd.h>

#include "os/syscall_count.h"

namespace mbmq::os {

void UniqueFd::reset(int fd) noexcept {
  if (fd_ >= 0) {
    count_syscall();
    ::close(fd_);
  }
  fd_ = fd;
}

}  // namespace mbmq::os

#include <fcntl.h>

#include <cerrno>

namespace mbmq::os {
Result<UniqueFd> dup_fd(int fd) {
  count_syscall();
  int r = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (r < 0) return fail(Error::from_syscall("fcntl(F_DUPFD_CLOEXEC)", errno));
  return UniqueFd(r);
}
}  // namespace mbmq::os
