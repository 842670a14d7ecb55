// ipc/buffer_table.h: BufferTable, one end's ownership tables (P2, P5, P7, P8 of
// src/shm/layout.h): its own buffers (the slots of its side of the segment, and its extents) with
// their life states and generations, the peer's buffers it holds, the requests in flight each
// way, and the descriptors accepted but not yet delivered. Private memory only: nothing here is
// shared with the peer, so nothing here needs atomics. The owner (Endpoint) calls it with its mu_
// held. The only system calls: creating and mapping a new extent's memfd in alloc().
//
// The life of one of our buffers (OwnState):
//   Free --alloc--> App --send--> LentCall | LentRequest | LentOneWay
//   LentCall --reply--> App (the call returns it)    LentCall --deadline--> Abandoned
//   LentRequest --reply--> App (delivered as Kind::Reply)
//   LentOneWay --Return (extent) or its bit in `returned` (slot, P7r)--> Free
//   Abandoned --late reply--> Free
//   Lent* and Abandoned --peer gone (P8)--> Free;  App --Buffer dropped--> Free
// Every transition is checked against the peer's descriptor first (check_*), then committed
// (take_*): a rejected descriptor changes nothing.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ipc/buffer_id.h"
#include "mbmq/result.h"
#include "os/fd.h"
#include "os/mapping.h"
#include "shm/layout.h"
#include "shm/segment.h"

namespace mbmq::detail {

// A descriptor's kind without its flags, and a comparison that reads as one.
constexpr std::uint16_t kind_of(const shm::Desc& d) noexcept {
  return d.kind & static_cast<std::uint16_t>(~shm::kDescFlags);
}
constexpr bool is(std::uint16_t kind, shm::DescKind k) noexcept {
  return kind == static_cast<std::uint16_t>(k);
}

enum class OwnState : std::uint8_t { Free, App, LentCall, LentRequest, LentOneWay, Abandoned };

struct OwnSlot {
  OwnState state = OwnState::Free;
  std::uint32_t gen = 0;
};

struct OwnExtent {
  OwnState state = OwnState::Free;
  std::uint32_t gen = 0;
  std::uint32_t sent_gen = 0;  // the peer has this extent's fd at this generation (0: never)
  os::UniqueFd fd;
  os::Mapping map;  // shared read-write; copy-on-write once sealed (P3c)
  bool sealed = false;
  bool huge = false;  // made on hugetlbfs for a sealed send (BufferTable::make_extent_memory)
  std::vector<std::byte> shadow;  // untrusted ends: the private copy of a reply (P5b)
};

struct PeerExtent {
  std::uint32_t gen = 0;
  bool held = false;
  os::UniqueFd fd;  // kept with the mapping: egress (send_buffer) and untrusted replies use it
  os::Mapping map;  // shared read-write; read-only for untrusted ends; copy-on-write if sealed
  bool sealed = false;
  std::vector<std::byte> shadow;  // untrusted ends: the private copy of the payload (P5b)
  // (P7b) A replacement for this generation is on the control socket, its reply not yet sent
  // (a reply retried after back-pressure): not sent twice.
  std::uint32_t replaced_gen = 0;
};

// Descriptors accepted while nobody was receiving (call() takes only its reply): delivered later,
// in order. Each names a distinct buffer, so 2 * (slots + extents) entries always suffice.
class PendingDescs {
 public:
  bool empty() const noexcept { return count_ == 0; }
  std::uint32_t size() const noexcept { return count_; }
  void push(const shm::Desc& d) noexcept;
  bool pop(shm::Desc* d) noexcept;

 private:
  std::array<shm::Desc, std::size_t{2} * (shm::kMaxSlotsPerSide + shm::kMaxExtents)> ring_{};
  std::uint32_t head_ = 0, count_ = 0;
};

class BufferTable {
 public:
  // side 0 owns slots [0, n), side 1 owns [n, 2n) (n = the segment's slots_per_side).
  BufferTable(const shm::Segment& seg, int side, std::uint32_t next_extent_gen);
  BufferTable(const BufferTable&) = delete;
  BufferTable& operator=(const BufferTable&) = delete;

  std::uint32_t slots_per_side() const noexcept { return n_; }

  // ---- our buffers (P2) ----
  struct Allocated {
    BufferId id;
    std::uint32_t gen = 0;
    std::byte* data = nullptr;
    std::uint32_t capacity = 0;
  };
  // A slot if size fits one, else an extent (a new sealed-size memfd, mapped and prefaulted).
  // to_seal: an extent that will be sent sealed (P3c), on huge pages if the kernel has them (see
  // make_extent_memory). Errc::NoBuffers: the pool or the extent table is full.
  Result<Allocated> alloc(std::size_t size, bool to_seal = false);
  OwnState* own_state(BufferId id) noexcept;  // nullptr: not one of ours
  // For an id own_state() accepts:
  std::uint32_t own_gen(BufferId id) const noexcept;
  std::uint32_t own_capacity(BufferId id) const noexcept;
  std::byte* own_data(BufferId id) const noexcept;
  OwnExtent& own_extent(BufferId id) noexcept { return own_ext_[id.extent_index()]; }
  const OwnExtent& own_extent(BufferId id) const noexcept { return own_ext_[id.extent_index()]; }
  // Back to the pool. Returns the generation at which the peer still maps this extent (a
  // ReleaseExtent hint would let it unmap it now), or 0.
  std::uint32_t free_own(BufferId id) noexcept;
  bool has_free_slot() const noexcept { return !free_slots_.empty(); }
  // (P7r) Word w of the peer's `returned`: bit b names our slot 64 * w + b; those lent one-way
  // are free again (others, and slots past slots_per_side, are ignored: bits the peer had no
  // right to set). Returns how many were freed.
  std::uint32_t take_returned(std::uint32_t w, std::uint64_t bits) noexcept;
  // (P8) The peer is gone: what was lent to it, or abandoned, is free again; no requests are out.
  void reclaim_lent() noexcept;
  std::uint32_t take_extent_gen() noexcept;  // never 0 (0 means "never sent")

  // ---- the spare extent (P3c): fresh pages for the next sealed send ----
  // A sealed memfd is never written again, so every sealed send needs fresh pages, and preparing
  // them (allocating, and mapping every page writable) is most of its cost. A call() that sent a
  // sealed extent prepares one fresh extent of the same capacity while it waits for the reply
  // (make_extent_memory, outside mu_), and alloc() takes it when a request of up to that size
  // needs an extent (capacity within 2x: never much more memory than asked for). At most one per
  // end: the bound is one extent of the last sealed size. It is ours only, mapped only by us,
  // unsealed; sealing it later is P3c's (the kernel refuses F_SEAL_WRITE while any writable
  // mapping of it exists, so a mapping kept elsewhere makes the send go through a fresh copy).
  //
  // huge (an extent to be sealed, of 2 MiB or more): a hugetlb memfd (MFD_HUGETLB, 2 MiB pages,
  // the capacity rounded up to 2 MiB, every page allocated up front by fallocate) where the
  // kernel's pool (vm.nr_hugepages) has enough free pages; else, silently, 4 KiB pages as
  // always. A 16 MiB extent is then 8 page-table entries: preparing it and the unmap/seal/map of
  // the sealed send cost a fraction of 4096 pages' (README, #16). Only sealed sends use it: an
  // untrusted peer answers an unsealed extent with pwrite(), which hugetlbfs does not support.
  struct ExtentMemory {
    os::UniqueFd fd;
    os::Mapping map;
    bool huge = false;
  };
  static Result<ExtentMemory> make_extent_memory(std::size_t cap, bool huge = false);
  bool wants_spare(std::size_t cap) const noexcept { return spare_.map.size() != cap; }
  void put_spare(ExtentMemory m) noexcept { spare_ = std::move(m); }
  std::size_t spare_capacity() const noexcept { return spare_.map.size(); }
  std::uint32_t next_extent_gen() const noexcept { return next_extent_gen_; }

  // ---- the peer's buffers (P5, P7) ----
  bool is_peer_slot(BufferId id) const noexcept;
  // nullptr: not an extent id in range.
  PeerExtent* peer_extent(BufferId id) noexcept;
  // (P5b) Bytes of the private copies of extents (an untrusted end's), and freeing the copies of
  // extents nobody holds (the peer's not held, ours free): kept for reuse until then.
  std::uint64_t shadow_bytes() const noexcept;
  void free_idle_shadows() noexcept;
  const PeerExtent* peer_extent(BufferId id) const noexcept;
  // For a valid peer id (a slot in its range, or an extent in range): we hold it (lent to us).
  bool held(BufferId id) const noexcept;
  void set_held(BufferId id, bool held) noexcept {
    if (id.is_extent()) {
      peer_ext_[id.extent_index()].held = held;
    } else {
      peer_held_[id.slot_index() - static_cast<std::uint32_t>(1 - side_) * n_] = held;
    }
  }

  // ---- checking, then committing, what the peer's descriptors say ----
  // A buffer of the peer's lent to us (Request, OneWay): nullptr if it may be taken (an
  // extent's mapping is checked by the caller, before take_lent()).
  const char* check_lent(const shm::Desc& d, std::uint32_t max_in_flight) const noexcept;
  void take_lent(const shm::Desc& d) noexcept;
  // One of ours coming back (Reply, or Return if is_return): nullptr if it may be taken. `call`:
  // the buffer a call() waits on, if any. A reply's size is checked by the caller (a replaced
  // reply travels in a buffer of its own); a return's here.
  const char* check_back(const shm::Desc& d, bool is_return, const BufferId* call) noexcept;
  // Commits a checked Reply; returns the state it was in (LentCall: the call is done, the buffer
  // is App; LentRequest: to deliver, App; Abandoned: the late reply to a call that timed out,
  // for the caller to free_own()).
  OwnState take_reply(BufferId id) noexcept;
  // A ReleaseExtent hint: nullptr if valid (the mapping is dropped if still at that generation).
  const char* release_peer_extent(const shm::Desc& d) noexcept;

  // ---- batches of one-way messages in pool slots (the stream's path; Endpoint::send_batch,
  // poll_batch): the same transitions as alloc(), send and check_lent()/take_lent(), inline ----
  // A free slot, as alloc() gives it (alloc() calls this for a size that fits a slot): App, its
  // generation bumped. has_free_slot() must hold.
  Allocated alloc_slot() noexcept {
    const std::uint32_t k = free_slots_.back();
    free_slots_.pop_back();
    OwnSlot& slot = own_slots_[k];
    slot.state = OwnState::App;
    ++slot.gen;
    const BufferId id = BufferId::slot(static_cast<std::uint32_t>(side_) * n_ + k);
    return Allocated{id, slot.gen, seg_.slot(id.slot_index()), slot_size_};
  }
  // Our slot `id` (any value), held by the application, is sent one-way: App -> LentOneWay.
  // false, nothing changed: not one of our slots, or not in state App.
  bool lend_slot_one_way(BufferId id) noexcept {
    const std::uint32_t k = id.slot_index() - static_cast<std::uint32_t>(side_) * n_;
    if (id.is_extent() || k >= n_ || own_slots_[k].state != OwnState::App) return false;
    own_slots_[k].state = OwnState::LentOneWay;
    return true;
  }
  // (P5) d, a descriptor of the peer's, is a OneWay without flags or status naming one of its slots
  // that we do not hold, within slot_size: taken (held), as check_lent() and take_lent() would.
  // false, nothing changed: anything else, for check_lent() to judge.
  bool take_peer_slot_one_way(const shm::Desc& d) noexcept {
    const std::uint32_t k = d.buffer - static_cast<std::uint32_t>(1 - side_) * n_;
    // A status (meant for replies) goes the one-at-a-time way too, which counts it (#18 stats).
    if (d.kind != static_cast<std::uint16_t>(shm::DescKind::OneWay) || d.status != 0 ||
        (d.buffer & shm::kExtentBit) != 0 || k >= n_ || d.size > slot_size_ || peer_held_[k])
      return false;
    peer_held_[k] = true;
    return true;
  }
  // The stream's path (P3s, endpoint_stream.cc), on raw values:
  // Our slots ids[0..k) (wire ids, any value), held by the application (reserved), sent one-way:
  // App -> LentOneWay. How many, a prefix: it stops at the first that is not one of our slots in
  // state App.
  std::uint32_t lend_slots_one_way(const std::uint32_t* ids, std::uint32_t k) noexcept {
    const std::uint32_t base = static_cast<std::uint32_t>(side_) * n_;
    std::uint32_t i = 0;
    for (; i < k; ++i) {
      const std::uint32_t s = ids[i] - base;  // an extent's id (kExtentBit) is far above n_
      if (s >= n_ || own_slots_[s].state != OwnState::App) break;
      own_slots_[s].state = OwnState::LentOneWay;
    }
    return i;
  }
  // The table's constants for a batch of take_peer_slot_raw(), read once by the caller (the loop
  // keeps them in registers).
  struct PeerSlots {
    std::uint32_t base, n, slot_size;
  };
  PeerSlots peer_slots() const noexcept {
    return {static_cast<std::uint32_t>(1 - side_) * n_, n_, slot_size_};
  }
  // A peer's descriptor's raw fields (RingEntry, each read once by the caller): a OneWay without
  // flags or status in one of its slots we do not hold, within slot_size: taken (held), as
  // take_peer_slot_one_way(); *k is the slot's index in the peer's side. false: anything else.
  bool take_peer_slot_raw(const PeerSlots& p, std::uint16_t buffer, std::uint16_t kind,
                          std::uint32_t size, std::uint32_t* k) noexcept {
    // An extent's (kWireExtentBit | id) is far above n, and so is a slot below the peer's side.
    const std::uint32_t s = buffer - p.base;
    if (kind != static_cast<std::uint16_t>(shm::DescKind::OneWay) || s >= p.n ||
        size > p.slot_size || peer_held_[s])
      return false;
    peer_held_[s] = true;
    *k = s;
    return true;
  }
  // Slot k (an index in the peer's side, from take_peer_slot_raw()) is no longer held.
  void unhold_peer_slot(std::uint32_t k) noexcept { peer_held_[k] = false; }
  std::uint32_t slot_size() const noexcept { return slot_size_; }

  // ---- requests in flight (max_in_flight) ----
  std::uint32_t requests_out() const noexcept { return requests_out_; }
  // (#18) Gauges for a stat query.
  std::uint32_t requests_in() const noexcept { return requests_in_; }
  std::uint32_t slots_in_use() const noexcept {
    return n_ - static_cast<std::uint32_t>(free_slots_.size());
  }
  std::uint32_t extents_in_use() const noexcept {
    std::uint32_t n = 0;
    for (const OwnExtent& e : own_ext_) n += e.state != OwnState::Free ? 1 : 0;
    return n;
  }
  void request_sent() noexcept { ++requests_out_; }
  void request_answered() noexcept {
    if (requests_out_ > 0) --requests_out_;
  }
  // A peer's request we held is answered or given back.
  void request_released() noexcept {
    if (requests_in_ > 0) --requests_in_;
  }
  void request_kept() noexcept { ++requests_in_; }  // a reply to retry: still held

  PendingDescs& pending() noexcept { return pending_; }
  // Why this end cannot move to another process now (buffers out or held, messages pending), or
  // nullptr.
  const char* busy() const noexcept;

 private:
  const shm::Segment& seg_;
  const int side_;
  const std::uint32_t n_;  // slots per side (private copy of the validated geometry)
  const std::uint32_t slot_size_;
  std::array<OwnSlot, shm::kMaxSlotsPerSide> own_slots_{};
  std::vector<std::uint32_t> free_slots_;  // capacity reserved at construction: no allocation
  std::array<OwnExtent, shm::kMaxExtents> own_ext_{};
  std::vector<std::uint32_t> free_ext_;
  std::uint32_t next_extent_gen_;
  std::array<bool, shm::kMaxSlotsPerSide> peer_held_{};
  std::array<PeerExtent, shm::kMaxExtents> peer_ext_{};
  ExtentMemory spare_;              // see wants_spare()
  std::uint32_t requests_out_ = 0;  // our requests not yet answered
  std::uint32_t requests_in_ = 0;   // the peer's requests we hold
  PendingDescs pending_;
};

}  // namespace mbmq::detail
