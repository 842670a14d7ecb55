// os/tcp.h: a connected TCP pair over loopback, for the benchmark's TCP baseline.
#pragma once

#include <cstdint>
#include <utility>

#include "mbmq/result.h"
#include "os/fd.h"

namespace mbmq::os {
// Listens on 127.0.0.1 (an ephemeral port), connects, accepts, closes the listener; both ends
// have TCP_NODELAY and O_CLOEXEC, and block.
Result<std::pair<UniqueFd, UniqueFd>> tcp_loopback_pair();

// A listening TCP socket on host:port (IPv4 dotted quad; port 0: ephemeral), SO_REUSEADDR,
// O_CLOEXEC. *bound_port receives the port.
Result<UniqueFd> tcp_listen(const char* host, std::uint16_t port, int backlog,
                            std::uint16_t* bound_port);
// accept4(SOCK_CLOEXEC) on a TCP listener; TCP_NODELAY on the new socket.
Result<UniqueFd> tcp_accept(int listener);
// A blocking connection to host:port, TCP_NODELAY.
Result<UniqueFd> tcp_connect(const char* host, std::uint16_t port);
// TCP_CORK on or off (hold partial frames, e.g. a header until its body follows).
Status tcp_cork(int fd, bool on);
}  // namespace mbmq::os
