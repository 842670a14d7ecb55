// os/fd.h: UniqueFd, the move-only owner of a file descriptor. Closing retries nothing (Linux
// closes the fd even when close() reports EINTR).
#pragma once

#include <utility>

namespace mbmq::os {

class UniqueFd {
 public:
  UniqueFd() noexcept = default;
  explicit UniqueFd(int fd) noexcept : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const noexcept { return fd_; }
  bool valid() const noexcept { return fd_ >= 0; }
  explicit operator bool() const noexcept { return valid(); }
  int release() noexcept { return std::exchange(fd_, -1); }
  void reset(int fd = -1) noexcept;

 private:
  int fd_ = -1;
};

}  // namespace mbmq::os

#include "mbmq/result.h"

namespace mbmq::os {
// fcntl(F_DUPFD_CLOEXEC).
Result<UniqueFd> dup_fd(int fd);
}  // namespace mbmq::os
