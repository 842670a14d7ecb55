// ipc/test_access.h: for tests only: the raw shared segment behind a Channel, so a test can play
// a peer that scribbles over it.
#pragma once

#include <span>

#include "ipc/endpoint.h"
#include "mbmq/channel.h"

namespace mbmq::detail {

struct TestAccess {
  static std::span<std::byte> segment(Channel& c) {
    return {c.ep_->segment_base(), c.ep_->segment_size()};
  }
};

}  // namespace mbmq::detail
