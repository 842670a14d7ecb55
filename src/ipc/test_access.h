// ipc/test_access.h: for tests and fuzz targets only: the raw shared segment and control socket
// behind a Channel, so a test can play a peer that scribbles over them.
#pragma once

#include <span>

#include "ipc/endpoint.h"
#include "ipc/queue_core.h"
#include "mbmq/channel.h"
#include "mbmq/msg_queue.h"

namespace mbmq::detail {

struct TestAccess {
  static std::span<std::byte> segment(Channel& c) {
    return {c.ep_->segment_base(), c.ep_->segment_size()};
  }
  // The end's control socket, to play a peer that sends arbitrary control messages.
  static int control_fd(Channel& c) { return c.ep_->control_fd_for_test(); }
  // The end has seen its peer close (the hang-up) and not closed itself.
  static bool peer_closed(const Channel& c) { return c.ep_->state() == EpState::PeerClosed; }
  static int extent_fd(Channel& c, const Buffer& b) { return c.ep_->extent_fd_for_test(b); }
  static Status forge_extent_request(Channel& c, int fd, std::uint32_t gen, std::uint32_t size,
                                     std::uint32_t aux) {
    return c.ep_->forge_extent_request_for_test(fd, gen, size, aux);
  }
  // A queue's shared ready page (P4q), to play a peer that forges or clears other channels' bits,
  // and its count of full scans (P6q).
  static shm::QueueReadyPage& ready_page(MsgQueue& q) { return q.core_->ready_page_for_test(); }
  static std::uint64_t full_scans(const MsgQueue& q) { return q.core_->full_scans_for_test(); }
};

}  // namespace mbmq::detail
