// Endpoint: the stream's own path (P3s; mbmq/stream.h). The same transitions as buffers(),
// send_batch(), receive_batch() and their release, without a Buffer or a Message per message:
//   reserve   slots Free -> App (BufferTable::alloc_slot), recorded in the Reservation.
//   commit    App -> LentOneWay (BufferTable::lend_slots_one_way), one ring entry each
//             (RingProducer::put_slots), one publish and one wake-up check (P4) for the batch.
//   unreserve App -> Free (free_own_locked), for the slots not committed.
//   receive_in_place  the peer's plain one-way slots taken with the checks take_batch_locked()
//             makes (BufferTable::take_peer_slot_raw: held); any other entry judged by accept():
//             what delivers nothing is consumed, a message of another kind set aside for
//             receive(), a bad one closes the channel.
//   release_in_place  unheld, and given back together (P7r: one fetch_or per word).
// What the peer sees is exactly what send_batch() and receive_batch() produce: either end may use
// either path.
#include "ipc/endpoint.h"
#include "ipc/wait_step.h"
#include "os/mutex.h"

namespace mbmq::detail {

// ---- the producer: reserve, commit, unreserve -----------------------------------------------

Result<std::size_t> Endpoint::reserve(Reservation& r, std::size_t size, std::size_t max,
                                      Deadline deadline) {
  if (r.ep_.get() != this) {
    r.reset();  // another end's slots go back to it
    r.ep_ = shared_from_this();
  } else if (!r.empty()) {
    unreserve(r);
  }
  r.first_ = r.end_ = 0;
  const std::uint32_t slot_size = seg_.geometry().slot_size;
  r.capacity_ = slot_size;
  if (size > slot_size)
    return fail(Errc::InvalidArgument, "Channel::reserve: larger than a slot (use buffer())");
  if (max == 0) return fail(Errc::InvalidArgument, "Channel::reserve: max is 0");
  const std::size_t want = std::min(max, Reservation::kMaxSlots);
  // A producer that never receives must still learn of its peer's death while it waits for room
  // (the hang-up wakes `room`), in a forked child too: no system call once watched here.
  MBMQ_TRY(ensure_watched());
  SpinStep step(wait_policy(), deadline);
  for (;;) {
    const std::uint32_t frees = frees_.load(std::memory_order_acquire);
    {
      os::LockGuard lock(mu_);
      EpState s = state_.load(std::memory_order_acquire);
      if (s != EpState::Open) return fail(closed_errc(s), "Channel::reserve");
      harvest_locked(size);
      std::uint32_t k = 0;
      for (; k < want && table_.has_free_slot(); ++k) {
        const BufferTable::Allocated a = table_.alloc_slot();
        r.data_[k] = a.data;
        r.id_[k] = a.id.raw();
        r.gen_[k] = a.gen;
        r.size_[k] = static_cast<std::uint32_t>(size);
      }
      r.end_ = k;
      if (k > 0) return std::size_t{k};
    }
    // None free: the ring may hold our buffers' late replies (reaped as alloc() does), else wait
    // for the consumer to give slots back (P6r).
    if (!redirected_.load(std::memory_order_relaxed) && consumer_mu_.try_lock()) {
      os::LockGuard consumer(consumer_mu_, os::kAdoptLock);
      os::LockGuard lock(mu_);
      reap_locked();
      if (table_.has_free_slot()) continue;
    }
    MBMQ_TRY(wait_room(frees, step, deadline, /*slot=*/true));
  }
}

Result<std::size_t> Endpoint::commit(Reservation& r, std::size_t k) {
  if (k > r.size()) return fail(Errc::InvalidArgument, "Reservation::commit: more than reserved");
  if (k == 0) return std::size_t{0};
  os::LockGuard lock(mu_);
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open) return fail(closed_errc(s), "send");
  // Every slot lent has an entry's room in an honest ring (free_own_locked()): no room is a peer
  // that stopped consuming (or published a head behind what it took), as for send_batch().
  const shm::RingStatus room = tx_.has_room_for(static_cast<std::uint32_t>(k));
  if (room == shm::RingStatus::Corrupt)
    return fail(fail_protocol_locked("send: peer's ring head is invalid"));
  if (room != shm::RingStatus::Ok)
    return fail(Errc::WouldBlock, "send: ring full (the peer is not consuming)");
  const std::uint32_t first = r.first_;
  // Still App (reserved here): only a Reservation used across fork() or corrupted could say
  // otherwise; what it names is then not sent (a prefix is).
  const std::uint32_t sent =
      table_.lend_slots_one_way(&r.id_[first], static_cast<std::uint32_t>(k));
  r.first_ = first + sent;
  if (sent == 0) return fail(Errc::InvalidArgument, "Reservation::commit: slots not reserved");
  // (P3) Visible to the consumer at publish() (the entries' seqs, last to first).
  const std::uint64_t bytes = tx_.put_slots(&r.id_[first], &r.size_[first], &r.gen_[first], sent);
  tx_.publish();
  counters_.count_out_one_way(sent, bytes);  // (#18) plain stores, mu_ held
  wake_peer_locked();                        // (P4) one fence and one look for the batch
  return std::size_t{sent};
}

void Endpoint::unreserve(Reservation& r) noexcept {
  {
    os::LockGuard lock(mu_);
    for (std::uint32_t i = r.first_; i < r.end_; ++i) {
      const BufferId id = BufferId::from_wire(r.id_[i]);
      OwnState* st = table_.own_state(id);
      if (st != nullptr && *st == OwnState::App) free_own_locked(id);  // as release() does
    }
  }
  r.first_ = r.end_ = 0;
}

// ---- the consumer: receive in place, release ------------------------------------------------

std::size_t Endpoint::take_in_place_locked(InPlace& in, bool* other) {
  // As take_batch_locked(): messages set aside go first (receive() delivers them in order), an
  // untrusted end copies each payload. A channel the peer closed still delivers what it published
  // (P8), in place too; one closed for a protocol error delivers nothing more (poll_locked()).
  // The state is read before the ring: closed then, everything the peer published is visible.
  const EpState was = state_.load(std::memory_order_acquire);
  if (trust_.untrusted_me() || !table_.pending().empty() ||
      (was != EpState::Open && was != EpState::PeerClosed)) {
    *other = true;
    return 0;
  }
  std::uint32_t k = 0;
  std::uint64_t bytes = 0;
  const std::uint32_t head0 = rx_.head();
  const BufferTable::PeerSlots ps = table_.peer_slots();
  const std::byte* const peer_slots = seg_.slot(ps.base);
  // As poll_locked(): at most a ring's worth of descriptors that deliver nothing.
  for (std::uint32_t internal = 0; k < InPlace::kMaxMessages;) {
    // The stream's steady state: plain one-way slots, one after another.
    const shm::RingEntry* e = nullptr;
    for (; k < InPlace::kMaxMessages; ++k) {
      e = rx_.ready_entry();
      if (e == nullptr) break;
      // Each field read once (P5): the peer may be writing them. Single loads the compiler may
      // not repeat after the checks (plain reads could be reloaded: a value checked, another
      // used).
      const std::uint32_t size = __atomic_load_n(&e->size, __ATOMIC_RELAXED);
      const std::uint16_t buffer = __atomic_load_n(&e->buffer, __ATOMIC_RELAXED);
      const std::uint16_t kind = __atomic_load_n(&e->kind, __ATOMIC_RELAXED);
      std::uint32_t slot = 0;
      if (!table_.take_peer_slot_raw(ps, buffer, kind, size, &slot)) break;  // (P5) as accept()
      rx_.advance();
      in.data_[k] = peer_slots + std::size_t{slot} * ps.slot_size;  // trusted: read in place
      in.slot_[k] = slot;
      in.size_[k] = size;
      __builtin_prefetch(in.data_[k]);  // as take_batch_locked(): the batch's first lines at once
      bytes += size;
    }
    if (e == nullptr || k == InPlace::kMaxMessages) break;
    // Anything else is judged as poll_locked() judges it (the entry copied again, whole: only that
    // copy is used). What delivers nothing (a Return, a release hint, a late reply) is consumed
    // here and the look goes on; a message is set aside for receive(), in its place (nothing
    // after it is taken); a bad one closes the channel.
    shm::Desc d;
    if (!rx_.take(&d)) break;  // cannot happen: ready above, and only we move the head
    const Accepted a = accept(d, nullptr, nullptr);
    if (a == Accepted::Internal) {
      const EpState now = state_.load(std::memory_order_acquire);
      if (++internal < shm::kRingCapacity && (now == EpState::Open || now == EpState::PeerClosed))
        continue;
    } else if (a == Accepted::Deliver) {
      pending_push(d);
    } else {
      (void)fail_protocol_locked(a == Accepted::Bad ? why_bad_ : "receive: a reply for no call");
    }
    *other = a != Accepted::Internal || state_.load(std::memory_order_acquire) != EpState::Open;
    break;
  }
  // Closed before the ring was found empty: the end is next, for receive() to deliver.
  if (k == 0 && was != EpState::Open) *other = true;
  in.n_ = k;
  // (P5) One head store for the batch, after accept() read any control packets of what it took.
  if (rx_.head() != head0) rx_.release();
  if (k > 0) counters_.count_in_one_way(k, bytes);  // (#18) plain stores, mu_ held
  return k;
}

Result<std::size_t> Endpoint::receive_in_place(InPlace& in, Deadline deadline) {
  if (in.ep_.get() != this) {
    in.reset();  // another end's messages go back to it
    in.ep_ = shared_from_this();
  } else if (!in.empty()) {
    release_in_place(in);
  }
  if (redirected_.load(std::memory_order_relaxed))
    return fail(Errc::InvalidArgument, "receive: end is redirected to a queue");
  if (!consumer_mu_.lock_until(deadline))
    return fail(Errc::TimedOut, "receive: another thread's call or receive did not finish in time");
  os::LockGuard consumer(consumer_mu_, os::kAdoptLock);
  if (redirected_.load(std::memory_order_relaxed))  // redirected while we waited for the lock
    return fail(Errc::InvalidArgument, "receive: end is redirected to a queue");
  MBMQ_TRY(ensure_watched());
  const WaitPolicy policy = wait_policy();
  for (;;) {
    if (inbound_ready()) {
      bool other = false;
      std::size_t got = 0;
      {
        os::LockGuard lock(mu_);
        const EpState s = state_.load(std::memory_order_acquire);
        if (s == EpState::LocalClosed) return fail(closed_errc(s), "receive");
        // The end was delivered (receive() returned the final PeerClosed) and nothing is left:
        // an error, as receive() now gives, not "use receive()" forever.
        if (s != EpState::Open && end_reported_ && table_.pending().empty() &&
            (s == EpState::Protocol || !rx_.maybe_nonempty()))
          return fail(closed_errc(s), "receive");
        got = take_in_place_locked(in, &other);
      }
      if (got > 0 || other) return got;
    }
    if (deadline.expired()) return fail(Errc::TimedOut, "receive");
    wait_inbound(deadline, policy, WaitFor::AnyMessage);
  }
}

void Endpoint::release_in_place(InPlace& in) noexcept {
  std::array<std::uint64_t, shm::kReturnedWords> mask{};
  {
    os::LockGuard lock(mu_);
    for (std::uint32_t i = 0; i < in.n_; ++i) {
      const std::uint32_t slot = in.slot_[i];
      table_.unhold_peer_slot(slot);
      mask[slot / 64] |= std::uint64_t{1} << (slot % 64);  // as peer_slot_bit()
    }
    // (P7r) One RMW per word and one look at a waiting producer, for the batch; nothing goes back
    // to a channel that is over (release_batch()).
    if (in.n_ > 0 && state_.load(std::memory_order_relaxed) == EpState::Open) give_back_slots(mask);
  }
  in.n_ = 0;
}

}  // namespace mbmq::detail

namespace mbmq {

Reservation::~Reservation() { reset(); }

void Reservation::reset() noexcept {
  if (ep_ && !empty()) ep_->unreserve(*this);
  first_ = end_ = 0;
}

Status Reservation::resize(std::size_t i, std::size_t n) noexcept {
  if (i >= size()) return fail(Errc::InvalidArgument, "Reservation::resize: no such slot");
  if (n > capacity_) return fail(Errc::InvalidArgument, "Reservation::resize: above the slot size");
  size_[first_ + i] = static_cast<std::uint32_t>(n);
  return {};
}

Result<std::size_t> Reservation::commit(std::size_t k) {
  if (!ep_) return fail(Errc::InvalidArgument, "Reservation::commit: nothing reserved");
  return ep_->commit(*this, k);
}

InPlace::~InPlace() { reset(); }

void InPlace::reset() noexcept {
  if (ep_ && n_ > 0) ep_->release_in_place(*this);
  n_ = 0;
}

}  // namespace mbmq
