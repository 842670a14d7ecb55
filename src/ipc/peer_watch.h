// ipc/peer_watch.h: the per-process watcher thread. It notices a peer's death or close without
// polling (P8), and runs the listener's side of rendezvous handshakes (ipc/listener_core.h).
//
// One lazily started thread per process sleeps in epoll_wait on registered fds: control sockets
// of all endpoints (hang-up: the peer closed its end, exited, or was killed, as the kernel closes
// its fds), listening sockets (a connection waits) and handshake connections (a hello arrived, or
// the handshake deadline passed). Each registration names a Watched object, held weakly; its
// on_watch() runs on the watcher thread without the watcher's lock, so it may register and
// unregister fds. It must not block: it does non-blocking I/O only.
// After fork() the child starts its own watcher on first use (the parent's thread is not copied).
#pragma once

#include <cstdint>
#include <memory>

#include "mbmq/result.h"

namespace mbmq::detail {

class Watched {
 public:
  // `events`: the epoll events seen on `fd`, or 0 when the registration's deadline passed.
  virtual void on_watch(int fd, std::uint32_t events) noexcept = 0;

 protected:
  ~Watched() = default;
};

struct WatchSpec {
  std::uint32_t events = 0;  // os::kEpoll* flags
  bool oneshot = true;       // removed before on_watch() runs
  // Monotonic; 0: none. A timed registration must be oneshot and made on the watcher thread.
  std::int64_t deadline_ns = 0;
};

// Registers `fd`; returns a registration id.
Result<std::uint64_t> watch_fd(std::weak_ptr<Watched> who, int fd, WatchSpec spec);
// Removes a registration, if still there (before fd is closed).
void unwatch_fd(std::uint64_t id, int fd) noexcept;

// The watcher's epoll_wait timeout for the nearest deadline: whole milliseconds rounded up (it
// never wakes before the deadline), 0 once the deadline passed, and at most INT_MAX (~24.8 days;
// the loop then waits again). Any int64 pair, without overflow: a deadline hours or centuries away
// neither wraps to a short or negative timeout nor fires early.
int timeout_ms_until(std::int64_t deadline_ns, std::int64_t now_ns) noexcept;

}  // namespace mbmq::detail
