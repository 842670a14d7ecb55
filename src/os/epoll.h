// os/epoll.h: a minimal epoll owner, used by the peer-death watcher.
#pragma once

#include <cstdint>
#include <span>

#include "mbmq/result.h"
#include "os/fd.h"

namespace mbmq::os {

struct EpollEvent {
  std::uint32_t events;
  std::uint64_t data;
};
inline constexpr std::uint32_t kEpollHangup = 0x2000u | 0x010u | 0x008u;  // RDHUP | HUP | ERR
inline constexpr std::uint32_t kEpollIn = 0x001u;                         // EPOLLIN
inline constexpr std::uint32_t kEpollEdge = 1u << 31;                     // EPOLLET

class Epoll {
 public:
  static Result<Epoll> create();
  Status add(int fd, std::uint32_t events, std::uint64_t data);
  Status remove(int fd);
  // Waits up to timeout_ms (-1: forever); returns how many entries of `out` were filled.
  // The events seen (0 at the timeout, or when a signal interrupted the wait: the caller
  // recomputes its timeout).
  Result<std::size_t> wait(std::span<EpollEvent> out, int timeout_ms);
  int fd() const noexcept { return fd_.get(); }

 private:
  UniqueFd fd_;
};

}  // namespace mbmq::os
