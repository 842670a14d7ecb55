// ipc/peer_watch.h: notices a peer's death or close without polling (P8). One lazily started
// thread per process sleeps in epoll_wait on the control sockets of all endpoints; a hang-up
// (the peer closed its end, exited, or was killed: the kernel closes its fds) marks the endpoint
// closed and wakes whoever waits on it through the same futex word a message would use.
// After fork() the child starts its own watcher on first use (the parent's thread is not copied).
#pragma once

#include <cstdint>
#include <memory>

#include "mbmq/result.h"

namespace mbmq::detail {

class Endpoint;

// Registers `fd` (a control socket) for hang-up; returns a registration id.
Result<std::uint64_t> watch_peer(std::weak_ptr<Endpoint> ep, int fd);
// Removes a registration (before fd is closed).
void unwatch_peer(std::uint64_t id, int fd) noexcept;

}  // namespace mbmq::detail
