// ipc/end_counters.h: the per-end message counters behind live introspection (#18,
// docs/design/introspection.md). Process-private memory, a member of each Endpoint.
//
// Memory ordering: each counter has one writer at a time, the thread holding the end's mu_ (it
// pushes a descriptor in push_locked(), or accepts one in accept()); mu_ orders one writer's
// stores before the next writer's loads, so an increment is a relaxed load and a relaxed store
// (no read-modify-write, no lock prefix: a plain add on x86-64). The reader is the watcher thread
// answering a stat query, with relaxed loads and without mu_: each value it sees is a count that
// was true at some instant; two counters may be seen at slightly different instants.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

#include "shm/layout.h"

namespace mbmq::detail {

struct EndCounters {
  // Indexed by DescKind (1 Request .. 5 ReleaseExtent); [0] unused. Written under mu_ (see above).
  std::array<std::atomic<std::uint64_t>, 6> out{};  // descriptors we published
  std::array<std::atomic<std::uint64_t>, 6> in{};   // descriptors we accepted (not Bad)
  std::atomic<std::uint64_t> bytes_out{0};          // payload bytes of Request/Reply/OneWay out
  std::atomic<std::uint64_t> bytes_in{0};           // the same, in
  std::atomic<std::uint64_t> no_reply_out{0};       // Replies out with status NoReply
  std::atomic<std::uint64_t> no_reply_in{0};        // Replies in with status NoReply

  static void bump(std::atomic<std::uint64_t>& c, std::uint64_t n = 1) noexcept {
    // Single writer (mu_ held): relaxed load + store is enough; see the file comment.
    c.store(c.load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
  // kind: DescKind's value without flags; status: DescStatus; size: payload bytes.
  static void count(std::array<std::atomic<std::uint64_t>, 6>& dir,
                    std::atomic<std::uint64_t>& bytes, std::atomic<std::uint64_t>& no_reply,
                    std::uint16_t kind, std::uint16_t status, std::uint32_t size) noexcept {
    if (kind >= dir.size()) return;
    bump(dir[kind]);
    if (kind <= static_cast<std::uint16_t>(shm::DescKind::OneWay)) bump(bytes, size);
    if (status == static_cast<std::uint16_t>(shm::DescStatus::NoReply)) bump(no_reply);
  }
  void count_out(std::uint16_t kind, std::uint16_t status, std::uint32_t size) noexcept {
    count(out, bytes_out, no_reply_out, kind, status, size);
  }
  void count_in(std::uint16_t kind, std::uint16_t status, std::uint32_t size) noexcept {
    count(in, bytes_in, no_reply_in, kind, status, size);
  }
  // n one-way messages of `bytes` payload bytes in all (a batch).
  void count_out_one_way(std::uint64_t n, std::uint64_t bytes) noexcept {
    bump(out[static_cast<std::size_t>(shm::DescKind::OneWay)], n);
    bump(bytes_out, bytes);
  }
  void count_in_one_way(std::uint64_t n, std::uint64_t bytes) noexcept {
    bump(in[static_cast<std::size_t>(shm::DescKind::OneWay)], n);
    bump(bytes_in, bytes);
  }
  static std::uint64_t get(const std::atomic<std::uint64_t>& c) noexcept {
    return c.load(std::memory_order_relaxed);  // a monitor's read: see the file comment
  }
};
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

// A listener's totals over its retired server ends: an end adds its counters here when it is
// destroyed (Endpoint::~Endpoint, any thread, off the hot path: relaxed fetch_add, as several ends
// may retire at once). Read by the watcher with relaxed loads (a monitor's read).
struct ListenTotals {
  std::array<std::atomic<std::uint64_t>, 6> out{}, in{};
  std::atomic<std::uint64_t> bytes_out{0}, bytes_in{0}, no_reply_out{0}, no_reply_in{0};
  std::atomic<std::uint64_t> peer_closed{0}, protocol{0};
  // The last protocol error's why: a static string (every why in the library is one). Relaxed:
  // the pointee is immutable for the life of the process.
  std::atomic<const char*> last_why{nullptr};

  void retire(const EndCounters& c, bool peer_closed_end, bool protocol_end,
              const char* why) noexcept {
    constexpr auto r = std::memory_order_relaxed;
    for (std::size_t k = 0; k < out.size(); ++k) {
      out[k].fetch_add(EndCounters::get(c.out[k]), r);
      in[k].fetch_add(EndCounters::get(c.in[k]), r);
    }
    bytes_out.fetch_add(EndCounters::get(c.bytes_out), r);
    bytes_in.fetch_add(EndCounters::get(c.bytes_in), r);
    no_reply_out.fetch_add(EndCounters::get(c.no_reply_out), r);
    no_reply_in.fetch_add(EndCounters::get(c.no_reply_in), r);
    if (peer_closed_end) peer_closed.fetch_add(1, r);
    if (protocol_end) {
      protocol.fetch_add(1, r);
      if (why != nullptr && *why != 0) last_why.store(why, r);
    }
  }
};
static_assert(sizeof(EndCounters) == std::size_t{16} * 8);

}  // namespace mbmq::detail
