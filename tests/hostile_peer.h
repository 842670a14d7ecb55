// tests/hostile_peer.h: for tests that play a hostile peer by hand, in the same process: a
// control message's bytes, a direction of the segment behind an end, and a push onto the peer's
// own ring done the way an honest producer does it (P3).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "ipc/test_access.h"
#include "mbmq/channel.h"
#include "shm/layout.h"

namespace mbmq::test {

inline std::span<const std::byte> bytes_of(const shm::CtlMsg& m) {
  return {reinterpret_cast<const std::byte*>(&m), sizeof m};
}

// Direction `side` of the segment behind end c: the messages side `side` produces.
inline shm::Direction& dir(Channel& c, int side) {
  auto seg = detail::TestAccess::segment(c);
  return *reinterpret_cast<shm::Direction*>(
      seg.data() + shm::kDirOffset + static_cast<std::size_t>(side) * sizeof(shm::Direction));
}

// A peer producing on its own ring by hand (P3): the entry, its seq (store-release), then tail.
// *tail is the peer's private producer index.
inline void raw_push(shm::Direction& d, std::uint32_t* tail, const shm::Desc& desc) {
  shm::RingEntry& e = d.ring[*tail % shm::kRingCapacity];
  e.store(desc);
  e.seq.store(*tail + 1, std::memory_order_release);
  ++*tail;
  d.tail.store(*tail, std::memory_order_release);
}

}  // namespace mbmq::test
