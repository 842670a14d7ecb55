// tests/ipc/inplace_util.h: what the tests of the stream's own path (mbmq/stream.h) share: channel
// options, a message that carries its sequence number and bytes derived from it, a producer
// through reserve()/commit(), and a count of the buffers an end can have now.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "mbmq/mbmq.h"
#include "test_util.h"

namespace mbmq::test {

inline ChannelOptions inplace_options(WaitMode mode = WaitMode::Adaptive, std::uint32_t slots = 64,
                                      std::uint32_t slot = 256) {
  ChannelOptions o;
  o.slots_per_side = slots;
  o.slot_size = slot;
  o.wait = WaitPolicy{mode, std::chrono::microseconds(50)};
  return o;
}

// Message `seq`: its number, then bytes derived from it (>= 8 bytes in all).
inline void write_msg(std::span<std::byte> p, std::uint64_t seq) {
  std::memcpy(p.data(), &seq, sizeof seq);
  fill(p.subspan(sizeof seq), seq);
}
// The sequence number if the message is intact, else ~0.
inline std::uint64_t read_msg(std::span<const std::byte> p) {
  std::uint64_t seq = 0;
  if (p.size() < sizeof seq) return ~std::uint64_t{0};
  std::memcpy(&seq, p.data(), sizeof seq);
  return check(p.subspan(sizeof seq), seq) ? seq : ~std::uint64_t{0};
}

// Sends messages first .. first + count - 1 of `size` bytes through reserve()/commit(), up to
// `batch` at a time, waiting for room until `deadline`. How many were sent; stops at the first
// error (*why).
inline std::uint64_t produce_in_place(Channel& ch, std::uint64_t first, std::uint64_t count,
                                      std::size_t size, std::size_t batch, Deadline deadline,
                                      Status* why) {
  Reservation r;
  std::uint64_t sent = 0;
  while (sent < count) {
    auto n = ch.reserve(r, size, std::min<std::uint64_t>(batch, count - sent), deadline);
    if (!n) {
      *why = fail(n.error());
      return sent;
    }
    for (std::size_t i = 0; i < *n; ++i) write_msg(r.slot(i), first + sent + i);
    auto k = r.commit(*n);
    if (!k) {
      *why = fail(k.error());
      return sent;
    }
    sent += *k;
  }
  return sent;
}

// How many buffers of `size` the end can have at once now (each taken, then all dropped).
inline std::size_t free_buffers(Channel& ch, std::size_t size) {
  std::vector<Buffer> held;
  for (;;) {
    auto b = ch.buffer(size);
    if (!b) return held.size();
    held.push_back(std::move(*b));
  }
}

}  // namespace mbmq::test
