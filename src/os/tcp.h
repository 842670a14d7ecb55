// os/tcp.h: a connected TCP pair over loopback, for the benchmark's TCP baseline.
#pragma once

#include <utility>

#include "mbmq/result.h"
#include "os/fd.h"

namespace mbmq::os {
// Listens on 127.0.0.1 (an ephemeral port), connects, accepts, closes the listener; both ends
// have TCP_NODELAY and O_CLOEXEC, and block.
Result<std::pair<UniqueFd, UniqueFd>> tcp_loopback_pair();
}  // namespace mbmq::os
