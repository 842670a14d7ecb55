// shm/ring.h: the single-producer single-consumer descriptor ring of one Direction (P3, P5).
// Templated on the atomic type so tests can run the same logic between two threads under TSan
// (TSan cannot see another process).
//
//   RingProducer<> tx(&dir.tail, &dir.head, dir.ring);   // private tail_ is authoritative
//   RingConsumer<> rx(&dir.tail, &dir.head, dir.ring);   // private head_ is authoritative
//
// Memory ordering: push() stores the Desc, then store-releases tail; pop() acquire-loads tail, copies
// the Desc, then store-releases head; push() acquire-loads head before reusing a slot. Indices
// written by the peer are loaded once and validated: a distance above the capacity is a protocol
// error (the peer scribbled), reported as RingStatus::Corrupt, never used as an index.
#pragma once

#include <atomic>
#include <cstdint>

#include "shm/layout.h"

namespace mbmq::shm {

enum class RingStatus { Ok, Empty, Full, Corrupt };

template <class Atomic = std::atomic<std::uint32_t>, std::uint32_t kCap = kRingCapacity>
class RingProducer {
 public:
  RingProducer() = default;
  RingProducer(Atomic* tail, const Atomic* head, Desc* ring, std::uint32_t initial_tail = 0)
      : tail_pub_(tail), head_pub_(head), ring_(ring), tail_(initial_tail) {}

  RingStatus push(const Desc& d) noexcept {
    // Pairs with the consumer's store-release of head in pop(): the slot we overwrite was read.
    std::uint32_t head = head_pub_->load(std::memory_order_acquire);
    std::uint32_t used = tail_ - head;
    if (used > kCap) return RingStatus::Corrupt;
    if (used == kCap) return RingStatus::Full;
    ring_[tail_ & (kCap - 1)] = d;
    ++tail_;
    // Pairs with the consumer's acquire load of tail in pop().
    tail_pub_->store(tail_, std::memory_order_release);
    return RingStatus::Ok;
  }
  std::uint32_t tail() const noexcept { return tail_; }

 private:
  Atomic* tail_pub_ = nullptr;
  const Atomic* head_pub_ = nullptr;
  Desc* ring_ = nullptr;
  std::uint32_t tail_ = 0;
};

template <class Atomic = std::atomic<std::uint32_t>, std::uint32_t kCap = kRingCapacity>
class RingConsumer {
 public:
  RingConsumer() = default;
  RingConsumer(const Atomic* tail, Atomic* head, const Desc* ring, std::uint32_t initial_head = 0)
      : tail_pub_(tail), head_pub_(head), ring_(ring), head_(initial_head) {}

  // A cheap look for spinning: relaxed, because a following pop() re-loads tail with acquire.
  bool maybe_nonempty() const noexcept {
    return tail_pub_->load(std::memory_order_relaxed) != head_;
  }

  RingStatus pop(Desc* out) noexcept {
    // Pairs with the producer's store-release of tail in push().
    std::uint32_t tail = tail_pub_->load(std::memory_order_acquire);
    std::uint32_t avail = tail - head_;
    if (avail == 0) return RingStatus::Empty;
    if (avail > kCap) return RingStatus::Corrupt;
    *out = ring_[head_ & (kCap - 1)];  // copied once; validated by the caller (P5)
    ++head_;
    // Pairs with the producer's acquire load of head in push().
    head_pub_->store(head_, std::memory_order_release);
    return RingStatus::Ok;
  }
  std::uint32_t head() const noexcept { return head_; }

 private:
  const Atomic* tail_pub_ = nullptr;
  Atomic* head_pub_ = nullptr;
  const Desc* ring_ = nullptr;
  std::uint32_t head_ = 0;
};

}  // namespace mbmq::shm
