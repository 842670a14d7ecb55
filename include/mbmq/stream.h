// mbmq/stream.h: the stream's own path, for one-way messages in pool slots at ring speed (#14):
// a producer reserves slots, writes each message in place and commits them (a Disruptor's claim
// and publish); a consumer reads them in place and gives them back together, with no Buffer or
// Message per message. The messages are the same as send()'s and receive()'s: either end may use
// either API, and every guarantee of a Channel holds (ownership moves, a peer's death ends the
// stream with PeerClosed, a hostile descriptor closes only that channel).
//
//   mbmq::Reservation out;                                  // reused: no allocation per batch
//   for (;;) {
//     std::size_t n = MBMQ_TRY(producer.reserve(out, 64, 32, mbmq::Deadline::after(1s)));
//     for (std::size_t i = 0; i < n; ++i) write(out.slot(i));    // 64 bytes each, in place
//     MBMQ_TRY(out.commit(n));                              // one batch, one wake-up check
//   }
//
//   mbmq::InPlace in;                                       // reused as well
//   for (;;) {
//     std::size_t n = MBMQ_TRY(consumer.receive_in_place(in, mbmq::Deadline::never()));
//     for (std::size_t i = 0; i < n; ++i) read(in[i]);       // the sender's bytes, in place
//     if (n == 0) { /* the next message is of another kind: */ msg = consumer.receive(...); }
//   }
//
// Thread safety: a Reservation or an InPlace is a value for one thread at a time, as a Buffer.
// Memory: each keeps a reference to the channel end it was last used with (its segment stays
// mapped, even after Channel::close(), until it is destroyed or used with another end).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "mbmq/export.h"
#include "mbmq/result.h"

namespace mbmq {

namespace detail {
class Endpoint;
}  // namespace detail

// Pool slots of a channel end reserved for one-way messages (Channel::reserve). Slot i of the
// size() still reserved is written in place through slot(i); commit(k) sends the first k, in
// order, as one batch. Slots not sent go back to the pool at the next reserve() into this
// object, at reset(), or when it is destroyed.
class MBMQ_EXPORT Reservation {
 public:
  static constexpr std::size_t kMaxSlots = 64;  // at most this many reserved at once

  Reservation() noexcept = default;
  Reservation(const Reservation&) = delete;
  Reservation& operator=(const Reservation&) = delete;
  ~Reservation();

  // Slots reserved and not yet sent.
  std::size_t size() const noexcept { return end_ - first_; }
  bool empty() const noexcept { return end_ == first_; }
  // Slot i (i < size()): its message's bytes, in shared memory, as many as reserve() asked or
  // resize() set.
  std::span<std::byte> slot(std::size_t i) const noexcept {
    return {data_[first_ + i], size_[first_ + i]};
  }
  // The most a slot may hold (the channel's slot_size).
  std::size_t capacity() const noexcept { return capacity_; }
  // Sets slot i's message size; Errc::InvalidArgument above capacity() or for i >= size().
  Status resize(std::size_t i, std::size_t n) noexcept;
  // Sends slots 0..k) one-way (k <= size(), else Errc::InvalidArgument), in order, as one batch:
  // one lock, one ring publication, one look at a sleeping peer. The rest stay reserved, now
  // slots 0.., and the returned count is k. Errors, nothing sent and the slots still reserved:
  // WouldBlock (no room in the ring: only a peer that stopped consuming; retry), PeerClosed or
  // Protocol (the channel is over), InvalidArgument (closed locally, or never reserved).
  Result<std::size_t> commit(std::size_t k);
  // Gives every slot still reserved back to the pool.
  void reset() noexcept;

 private:
  friend class detail::Endpoint;
  std::shared_ptr<detail::Endpoint> ep_;
  std::uint32_t first_ = 0, end_ = 0;  // reserved: entries [first_, end_) of the arrays
  std::uint32_t capacity_ = 0;
  std::array<std::byte*, kMaxSlots> data_{};
  std::array<std::uint32_t, kMaxSlots> id_{};  // the slot's wire id (BufferId::raw())
  std::array<std::uint32_t, kMaxSlots> gen_{};
  std::array<std::uint32_t, kMaxSlots> size_{};
};

// One-way messages received in place (Channel::receive_in_place): message i's payload is
// (*this)[i], the sender's bytes in its pool slot, valid until the next receive_in_place() into
// this object, reset(), or its destruction, which give them all back to the sender at once.
class MBMQ_EXPORT InPlace {
 public:
  static constexpr std::size_t kMaxMessages = 64;  // at most this many at once

  InPlace() noexcept = default;
  InPlace(const InPlace&) = delete;
  InPlace& operator=(const InPlace&) = delete;
  ~InPlace();

  std::size_t size() const noexcept { return n_; }
  bool empty() const noexcept { return n_ == 0; }
  std::span<const std::byte> operator[](std::size_t i) const noexcept {
    return {data_[i], size_[i]};
  }
  // Gives the messages back to their sender now.
  void reset() noexcept;

 private:
  friend class detail::Endpoint;
  std::shared_ptr<detail::Endpoint> ep_;
  std::uint32_t n_ = 0;
  std::array<const std::byte*, kMaxMessages> data_{};
  std::array<std::uint32_t, kMaxMessages> slot_{};  // the slot's index in the peer's side
  std::array<std::uint32_t, kMaxMessages> size_{};
};

}  // namespace mbmq
