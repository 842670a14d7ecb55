// shm/ring.h: the single-producer single-consumer descriptor ring of one Direction (P3, P5, P6).
// The same code runs between two processes and, in tests, between two threads (where TSan can
// check its memory ordering; it cannot see across processes).
//
//   RingProducer<> tx(&dir.tail, &dir.head, dir.ring);   // private tail_ is authoritative
//   RingConsumer<> rx(&dir.tail, &dir.head, dir.ring);   // private head_ is authoritative
//
// Memory ordering: push() writes the Desc (packed: RingEntry::store), store-releases the entry's
// seq (pairs with pop()'s acquire load of it), then store-releases tail (pairs with check()'s
// acquire load). pop() store-releases head after copying the Desc (pairs with push()'s acquire
// load of head, which happens only when push()'s cached copy says the ring is full). So on the
// spinning path the entries' lines move from producer to consumer (four entries to a line), and
// nothing else. Batches: put() x k (the fields only) then one publish(), which stores the
// batch's seqs last to first, then the tail once; take() x k then one release() (one head
// store). The consumer loads the seqs one by one as above.
//
// Values written by the peer are loaded once and validated: a head more than a capacity behind
// tail, or a tail that claims messages the entries do not show, is RingStatus::Corrupt, never
// used as an index. An entry whose seq is garbage reads as "not ready" until check() finds the
// tail inconsistent.
#pragma once

#include <atomic>
#include <cstdint>

#include "mbmq/result.h"
#include "shm/layout.h"

namespace mbmq::shm {

enum class RingStatus { Ok, Empty, Full, Corrupt };

template <std::uint32_t kCap = kRingCapacity>
class RingProducer {
  static_assert((kCap & (kCap - 1)) == 0);

 public:
  RingProducer() = default;
  RingProducer(std::atomic<std::uint32_t>* tail, const std::atomic<std::uint32_t>* head,
               RingEntry* ring, std::uint32_t initial_tail = 0)
      : tail_pub_(tail),
        head_pub_(head),
        ring_(ring),
        tail_(initial_tail),
        published_(initial_tail),
        head_cache_(initial_tail - kCap) {}

  // Ok if push() will find room (only this producer fills the ring), Full, or Corrupt.
  RingStatus has_room() noexcept { return has_room_for(1); }
  // Ok if `want` more entries fit now (1 <= want <= kCap), Full, or Corrupt.
  RingStatus has_room_for(std::uint32_t want) noexcept {
    if (tail_ - head_cache_ > kCap - want) {
      // Pairs with the consumer's store-release of head in pop(): the entry we overwrite was read.
      std::uint32_t head = head_pub_->load(std::memory_order_acquire);
      std::uint32_t used = tail_ - head;
      if (used > kCap) return RingStatus::Corrupt;
      head_cache_ = head;
      if (used > kCap - want) return RingStatus::Full;
    }
    return RingStatus::Ok;
  }

  RingStatus push(const Desc& d) noexcept {
    if (RingStatus r = has_room(); r != RingStatus::Ok) return r;
    put(d);
    publish();
    return RingStatus::Ok;
  }
  // A batch (P3): put() each descriptor, then publish() once. put() needs room (has_room_for()
  // said Ok for at least as many): it writes the entry's fields only; publish(), which must
  // follow before the caller lets go of the producer, makes the batch visible.
  void put(const Desc& d) noexcept {
    // Only our own descriptors, within what the packed entry carries (RingEntry::store).
    MBMQ_ASSERT(d.status <= (kWireStatusMask >> kWireStatusShift) &&
                (d.kind & kWireStatusMask) == 0 && ((d.buffer & ~kExtentBit) < kWireExtentBit));
    ring_[tail_ & (kCap - 1)].store(d);
    ++tail_;
  }
  // put() for `k` one-way messages in our pool slots (the stream's path, P3s): entry i carries
  // slot wire id ids[i], sizes[i] and gens[i], kind OneWay, no status or flag. The ids are our
  // slots' (the caller checked each: BufferTable::lend_slots_one_way), below kWireExtentBit.
  // Needs room for k, as put(). Returns the sizes' sum.
  std::uint64_t put_slots(const std::uint32_t* ids, const std::uint32_t* sizes,
                          const std::uint32_t* gens, std::uint32_t k) noexcept {
    RingEntry* const ring = ring_;  // a local: the stores below cannot be taken to change it
    std::uint32_t t = tail_;
    std::uint64_t bytes = 0;
    for (std::uint32_t i = 0; i < k; ++i, ++t) {
      RingEntry& e = ring[t & (kCap - 1)];
      e.size = sizes[i];
      e.gen = gens[i];
      e.buffer = static_cast<std::uint16_t>(ids[i]);
      e.kind = static_cast<std::uint16_t>(DescKind::OneWay);
      bytes += sizes[i];
    }
    tail_ = t;
    return bytes;
  }
  void publish() noexcept {
    // The batch's seqs last to first: a consumer polling the entry at its head sees the batch
    // only once all of it is written, so each of its lines moves to the consumer once, whole,
    // instead of once per entry while we are still writing the rest of the line (four entries to
    // a line). Each pairs with the consumer's acquire load of seq in pop() / take(), which takes
    // entries in order: it never sees a later entry of the batch before the first.
    for (std::uint32_t t = tail_; t != published_; --t)
      ring_[(t - 1) & (kCap - 1)].seq.store(t, std::memory_order_release);
    published_ = tail_;
    // Pairs with the consumer's acquire load of tail in check(). Read only there (before the
    // consumer sleeps), so one store per batch is enough: check() accepts a tail that lags.
    tail_pub_->store(tail_, std::memory_order_release);
  }
  std::uint32_t tail() const noexcept { return tail_; }
  // True if the consumer has taken every entry pushed so far.
  bool drained() const noexcept {
    // Pairs with the consumer's store-release of head in pop().
    return head_pub_->load(std::memory_order_acquire) == tail_;
  }

 private:
  std::atomic<std::uint32_t>* tail_pub_ = nullptr;
  const std::atomic<std::uint32_t>* head_pub_ = nullptr;
  RingEntry* ring_ = nullptr;
  std::uint32_t tail_ = 0;
  std::uint32_t published_ = 0;           // tail_ at the last publish(): seqs stored below it
  std::uint32_t head_cache_ = 0u - kCap;  // the consumer's head as last loaded
};

template <std::uint32_t kCap = kRingCapacity>
class RingConsumer {
  static_assert((kCap & (kCap - 1)) == 0);

 public:
  RingConsumer() = default;
  RingConsumer(const std::atomic<std::uint32_t>* tail, std::atomic<std::uint32_t>* head,
               const RingEntry* ring, std::uint32_t initial_head = 0)
      : tail_pub_(tail), head_pub_(head), ring_(ring), head_(initial_head) {}

  // A cheap look for spinning: relaxed, because a following pop() re-loads seq with acquire.
  bool maybe_nonempty() const noexcept {
    return ring_[head_ & (kCap - 1)].seq.load(std::memory_order_relaxed) == head_ + 1;
  }

  RingStatus pop(Desc* out) noexcept {
    if (!take(out)) return RingStatus::Empty;
    release();
    return RingStatus::Ok;
  }
  // A batch (P5): take() descriptors, then release() once; the entries taken are the producer's
  // to overwrite only after release(), which must follow before the caller lets go of the
  // consumer. false: the entry at head is not ready.
  bool take(Desc* out) noexcept {
    const RingEntry& e = ring_[head_ & (kCap - 1)];
    // Pairs with the producer's store-release of seq in put().
    if (e.seq.load(std::memory_order_acquire) != head_ + 1) return false;
    *out = e.load();  // copied once; validated by the caller (P5)
    ++head_;
    return true;
  }
  // The entry at head if it is ready (acquire, as take()), else nullptr: the caller copies each
  // field it needs once (a hostile peer may be writing them), then advance()s or leaves it for
  // take(). The stream's path (P3s) reads the raw fields without decoding a Desc.
  const RingEntry* ready_entry() const noexcept {
    const RingEntry& e = ring_[head_ & (kCap - 1)];
    // Pairs with the producer's store-release of seq in put().
    return e.seq.load(std::memory_order_acquire) == head_ + 1 ? &e : nullptr;
  }
  void advance() noexcept { ++head_; }  // past the entry ready_entry() gave; release() follows
  void release() noexcept {
    // Pairs with the producer's acquire load of head in has_room_for(): the entries below head_
    // were copied.
    head_pub_->store(head_, std::memory_order_release);
  }

  // Before sleeping (P6): is the producer's published state consistent with the entries?
  // tail may lag behind head: push() stores an entry's seq before tail, so we may have popped
  // entries whose tail store is not visible yet (at most a ring's worth).
  RingStatus check() const noexcept {
    // Pairs with the producer's store-release of tail in push(): every entry below it is ready.
    std::uint32_t tail = tail_pub_->load(std::memory_order_acquire);
    auto ahead = static_cast<std::int32_t>(tail - head_);
    if (ahead > static_cast<std::int32_t>(kCap) || ahead < -static_cast<std::int32_t>(kCap))
      return RingStatus::Corrupt;
    if (ahead <= 0) return RingStatus::Empty;
    return maybe_nonempty() ? RingStatus::Ok : RingStatus::Corrupt;
  }
  std::uint32_t head() const noexcept { return head_; }

 private:
  const std::atomic<std::uint32_t>* tail_pub_ = nullptr;
  std::atomic<std::uint32_t>* head_pub_ = nullptr;
  const RingEntry* ring_ = nullptr;
  std::uint32_t head_ = 0;
};

}  // namespace mbmq::shm
