// ipc/handles.h: the handles (fds, channel ends) a Buffer carries (P3b of src/shm/layout.h).
// Allocated only when a buffer has handles: messages without them cost nothing extra.
#pragma once

#include <array>
#include <cstdint>

#include "ipc/queue_bell.h"
#include "os/fd.h"
#include "shm/layout.h"

namespace mbmq::detail {

struct Handle {
  shm::HandleMeta meta{};  // meta.kind == 0: empty (taken)
  os::UniqueFd fd;         // Fd: the fd. ChannelEnd: the segment memfd.
  os::UniqueFd fd2;        // ChannelEnd: the control socket.
  BellFds bell;            // ChannelEnd with meta.doorbell_gen != 0: the peer's queue doorbell.
  bool incoming = false;   // arrived with the buffer: not sent back with a reply
};

struct Handles {
  std::array<Handle, shm::kMaxHandles> items;
  std::uint32_t count = 0;
};

}  // namespace mbmq::detail
