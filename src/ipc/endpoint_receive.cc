// Endpoint, its receiving half (P5, P6 of src/shm/layout.h): each inbound descriptor checked
// against the BufferTable, what it needs gathered from the Sideband through PeerTrust's checks,
// then committed; messages made from them; and the loops that wait for them (call, receive, poll).
// The sending half, the buffers and the lifecycle are in ipc/endpoint.cc.
#include <climits>
#include <cstring>

#include "ipc/endpoint.h"
#include "ipc/wait_step.h"
#include "os/fault.h"
#include "os/mutex.h"

namespace mbmq::detail {

using shm::Desc;
using shm::DescKind;
using shm::kMaxExtents;

// ---- (P5) receiving ----------------------------------------------------------------------------

const char* Endpoint::map_peer_extent_locked(const Desc& d) {
  const BufferId id = BufferId::from_wire(d.buffer);
  PeerExtent& pe = *table_.peer_extent(id);  // check_lent() passed
  const std::uint32_t e = id.extent_index();
  if (!pe.map.valid() || pe.gen != d.gen) {
    (void)drain_locked([&](const Sideband& s) { return s.has_extent(e, d.gen); });
    if (!ctl_.has_extent(e, d.gen)) return "receive: extent descriptor without its memfd";
    Stashed st = ctl_.take_extent(e);
    if (const char* why =
            trust_.install_peer_extent(pe, std::move(st.fd), st.sealed, d.gen, d.size))
      return why;
  }
  return trust_.check_peer_payload(pe, d.size);
}

const char* Endpoint::prepare_replacement_locked(const Desc& d, os::UniqueFd* fd_out,
                                                 os::Mapping* map_out, bool* sealed_out) {
  const BufferId id = BufferId::from_wire(d.buffer);
  if (!id.is_extent()) return "reply: a replaced buffer that is not an extent";
  const std::uint32_t e = id.extent_index();
  if (e >= kMaxExtents) return "reply: replaced extent id";
  (void)drain_locked([&](const Sideband& s) { return s.has_replacement(e, d.gen); });
  if (!ctl_.has_replacement(e, d.gen)) return "reply: replacement announced but not sent";
  Stashed st = ctl_.take_replacement(e);
  if (const char* why =
          trust_.check_replacement(st.fd.get(), st.sealed, d.size, map_out, sealed_out))
    return why;
  *fd_out = std::move(st.fd);
  return nullptr;
}

bool Endpoint::handles_arrived_locked(const Desc& d, HandlesOf of) {
  const BufferId id = BufferId::from_wire(d.buffer);
  if (!drain_locked([&](const Sideband& s) { return s.has_handles(id, d.gen, of); })) return false;
  // Its descriptor is accepted (the caller commits right after): no longer "sent ahead".
  ctl_.claim_handles(id, d.gen, of);
  return true;
}

Endpoint::Accepted Endpoint::accept(const Desc& d, const Buffer* call_buf,
                                    std::uint16_t* call_status) {
  const Accepted a = accept_one(d, call_buf, call_status);
  if (a != Accepted::Bad) counters_.count_in(kind_of(d), d.status, d.size);  // (#18) mu_ held
  return a;
}

Endpoint::Accepted Endpoint::accept_one(const Desc& d, const Buffer* call_buf,
                                        std::uint16_t* call_status) {
  const std::uint16_t kind = kind_of(d);
  if ((d.kind & shm::kDescReplaced) != 0 && !is(kind, DescKind::Reply))
    return bad("receive: a replacement on a descriptor that is not a reply");
  switch (static_cast<DescKind>(kind)) {
    case DescKind::Request:
    case DescKind::OneWay:  // the peer's buffer, lent to us
      return accept_lent(d);
    case DescKind::Reply:
    case DescKind::Return:  // our buffer, coming back
      return accept_back(d, call_buf, call_status);
    case DescKind::ReleaseExtent:
      if (const char* why = table_.release_peer_extent(d)) return bad(why);
      return Accepted::Internal;
  }
  return bad("receive: unknown descriptor kind");
}

Endpoint::Accepted Endpoint::accept_lent(const Desc& d) {
  if (const char* why = table_.check_lent(d, seg_.geometry().max_in_flight)) return bad(why);
  if (BufferId::from_wire(d.buffer).is_extent()) {
    if (const char* why = map_peer_extent_locked(d)) return bad(why);
    if (const char* why = trust_.prepare_copy(BufferId::from_wire(d.buffer), d.size, false))
      return bad(why);
  }
  if ((d.kind & shm::kDescHasHandles) != 0 && !handles_arrived_locked(d, HandlesOf::Message))
    return bad("receive: handles announced but not sent");
  table_.take_lent(d);
  return Accepted::Deliver;
}

Endpoint::Accepted Endpoint::accept_back(const Desc& d, const Buffer* call_buf,
                                         std::uint16_t* call_status) {
  const BufferId id = BufferId::from_wire(d.buffer);
  const bool is_return = is(kind_of(d), DescKind::Return);
  const BufferId call = call_buf != nullptr ? BufferId::from_wire(call_buf->id_) : BufferId{};
  if (const char* why = table_.check_back(d, is_return, call_buf != nullptr ? &call : nullptr))
    return bad(why);
  if (is_return) {
    free_own_locked(id);
    return Accepted::Internal;
  }
  // Every check first, then the commit: a rejected reply changes nothing of ours (P7b).
  const bool replaced = (d.kind & shm::kDescReplaced) != 0;
  const bool with_handles = (d.kind & shm::kDescHasHandles) != 0;
  os::UniqueFd rfd;
  os::Mapping rmap;
  bool rsealed = false;
  if (replaced) {
    if (const char* why = prepare_replacement_locked(d, &rfd, &rmap, &rsealed)) return bad(why);
  } else {
    if (id.is_extent() && trust_.needs_sealed(d.size) && !table_.own_extent(id).sealed)
      return bad("reply (untrusted): answer above copy_threshold in shared memory");
    if (d.size > table_.own_capacity(id)) return bad("receive: reply larger than its buffer");
  }
  if (with_handles && !handles_arrived_locked(d, HandlesOf::Reply))
    return bad("receive: handles announced but not sent");
  if (replaced) {  // commit (P7b): the old generation is stale for the peer, the fd is resent
    OwnExtent& x = table_.own_extent(id);
    x.fd = std::move(rfd);
    x.map = std::move(rmap);
    x.sealed = rsealed;
    x.huge = false;  // the peer's memfd, whatever it is: not one we chose huge pages for
    x.gen = table_.take_extent_gen();
    x.sent_gen = 0;
  }
  if (const char* why = trust_.prepare_copy(id, d.size, true)) return bad(why);
  switch (table_.take_reply(id)) {
    case OwnState::LentCall:
      *call_status = d.status;
      return Accepted::CallDone;
    case OwnState::Abandoned:  // the late reply to a call that timed out
      if (with_handles) (void)ctl_.take_handles(id, d.gen, HandlesOf::Reply);  // nobody waits
      free_own_locked(id);
      return Accepted::Internal;
    default:  // LentRequest
      return Accepted::Deliver;
  }
}

void Endpoint::make_message(const Desc& d, Message* out) {
  Buffer& b = out->buffer;
  // Empty (the callers' contract), perhaps parked with a reference to us by release_batch(): the
  // reference is kept, two atomic updates fewer per message.
  if (b.ep_.get() != this) {
    b.reset();
    b.ep_ = shared_from_this();
  }
  const std::uint16_t kind = kind_of(d);
  const bool reply = is(kind, DescKind::Reply);
  if ((d.kind & shm::kDescHasHandles) != 0)
    b.handles_ = ctl_.take_handles(BufferId::from_wire(d.buffer), d.gen,
                                   reply ? HandlesOf::Reply : HandlesOf::Message);
  b.id_ = d.buffer;
  b.gen_ = d.gen;
  b.size_ = d.size;
  b.kind_ = kind;
  out->key = key_.load(std::memory_order_relaxed);
  out->error = Errc::PeerClosed;
  if (reply) {
    b.origin_ = Buffer::Origin::Own;
    trust_.own_view(b, d.size);
    out->kind = Kind::Reply;
    if (d.status == static_cast<std::uint16_t>(shm::DescStatus::NoReply))
      out->error = Errc::NoReply;
    return;
  }
  b.origin_ = Buffer::Origin::Peer;
  trust_.peer_view(b, d.size);
  out->kind = is(kind, DescKind::Request) ? Kind::Request : Kind::Message;
  if (out->kind == Kind::Request) MBMQ_CRASH_POINT("receive.got_request");
}

Endpoint::Poll Endpoint::poll(Message* out) {
  // (T10) A topic subscription: samples come from the subscriber's ring; the channel carries only
  // the publisher's notifications (dropped here: their slots go back by P7r) and the end.
  if (std::shared_ptr<TopicTap> tap = tap_.lock()) {
    if (tap->take_into(out)) return Poll::Got;
    for (std::uint32_t n = 0; n < shm::kRingCapacity; ++n) {
      if (!inbound_ready()) return Poll::Empty;
      Poll p;
      {
        os::LockGuard lock(mu_);
        p = poll_locked(out);
      }
      if (p == Poll::Ended) tap->on_end(out);
      if (p != Poll::Got || out->kind != Kind::Message) return p;
      *out = Message{};  // a notification: its slot goes back (P7r)
      if (tap->take_into(out)) return Poll::Got;
    }
    return Poll::Empty;
  }
  if (!inbound_ready()) return Poll::Empty;
  os::LockGuard lock(mu_);
  return poll_locked(out);
}

void Endpoint::adopt_buffer(Buffer& b) {
  b.reset();
  b.ep_ = shared_from_this();
}

void Endpoint::make_slot_message(Desc d, std::uint64_t key, Message* out) {
  Buffer& b = out->buffer;
  // Empty, as for make_message(); in a stream, parked by release_batch() with its reference to us.
  if (b.ep_.get() != this) [[unlikely]]
    adopt_buffer(b);
  b.id_ = d.buffer;
  b.gen_ = d.gen;
  b.size_ = d.size;
  b.kind_ = d.kind;
  b.origin_ = Buffer::Origin::Peer;
  b.data_ = seg_.slot(d.buffer);  // trusted: read in place (PeerTrust::peer_view)
  b.capacity_ = table_.slot_size();
  out->key = key;
  out->error = Errc::PeerClosed;
  out->kind = Kind::Message;
}

std::size_t Endpoint::take_batch_locked(Message* out, std::size_t n) {
  // Messages set aside first (poll_locked() delivers them in order); an untrusted end copies
  // each payload (P5b), make_message() does.
  if (trust_.untrusted_me() || !table_.pending().empty() ||
      state_.load(std::memory_order_acquire) != EpState::Open)
    return 0;
  const std::uint64_t key = key_.load(std::memory_order_relaxed);
  std::size_t k = 0;
  std::uint64_t fast = 0, bytes = 0;
  // As poll_locked(): at most a ring's worth of descriptors that deliver nothing.
  for (std::uint32_t internal = 0; k < n && internal < shm::kRingCapacity;) {
    Desc d;
    if (!rx_.take(&d)) break;
    if (table_.take_peer_slot_one_way(d)) {  // (P5) checked and taken as accept() would
      make_slot_message(d, key, &out[k]);
      // The payload's first line, fetched now for every message of the batch at once rather than
      // missed one at a time when the caller reads them (a slot of ours, validated just above).
      __builtin_prefetch(out[k++].buffer.data_);
      ++fast;
      bytes += d.size;
      continue;
    }
    // Copies, so that d itself never has its address taken: the compiler keeps it in registers
    // on the path above (a store to the stack and a wider load back missed store forwarding).
    const Desc slow = d;
    const Accepted a = accept(slow, nullptr, nullptr);
    if (a == Accepted::Deliver) {
      make_message(slow, &out[k++]);
    } else if (a == Accepted::Internal) {
      ++internal;
    } else {
      (void)fail_protocol_locked(a == Accepted::Bad ? why_bad_ : "receive: a reply for no call");
      break;
    }
    // accept() may have closed the channel (a bad control packet read on the way): as
    // poll_locked(), nothing more is taken from the ring then.
    if (state_.load(std::memory_order_acquire) != EpState::Open) break;
  }
  // (P5) One head store for the batch: the producer may overwrite what we copied.
  rx_.release();
  if (fast > 0) counters_.count_in_one_way(fast, bytes);  // (#18) plain stores, mu_ held
  return k;
}

Endpoint::Poll Endpoint::poll_batch(Message* out, std::size_t n, std::size_t* got) {
  *got = 0;
  if (n == 0) return Poll::Got;
  if (!inbound_ready()) return Poll::Empty;
  os::LockGuard lock(mu_);
  *got = take_batch_locked(out, n);
  if (*got == n) return Poll::Got;
  for (;;) {
    const Poll p = poll_locked(&out[*got]);
    if (p == Poll::Got || p == Poll::Ended) ++*got;
    if (p != Poll::Got || *got == n) return p;
  }
}

Endpoint::Poll Endpoint::poll_locked(Message* out) {
  // Descriptors that deliver nothing (returns, release hints) are taken at most a ring's worth at
  // a time: a peer that floods them keeps neither this end nor its queue from the others and
  // from deadlines.
  for (std::uint32_t internal = 0;; ++internal) {
    if (internal == shm::kRingCapacity) return Poll::Empty;
    EpState s = state_.load(std::memory_order_acquire);
    if (s == EpState::LocalClosed) return Poll::Gone;
    Desc d;
    if (pending_pop(&d)) {
      make_message(d, out);
      return Poll::Got;
    }
    if (s != EpState::Protocol && rx_.take(&d)) {
      Accepted a = accept(d, nullptr, nullptr);
      // (P5) The head moves only once accept() has read the descriptor's control packets (its
      // handles): the peer takes "every descriptor taken" to mean "every packet read", and a
      // full control socket then as a peer that does not read it (Endpoint::sent_locked). With
      // the head stored first, a receiver preempted between the two made the peer close a
      // healthy channel (Review.ReplyAndWaitUnderBackPressureNeverTurnsAnAnswerIntoNoReply under
      // load: 12 of 150 runs).
      rx_.release();
      if (a == Accepted::Deliver) {
        make_message(d, out);
        return Poll::Got;
      }
      if (a != Accepted::Internal)
        (void)fail_protocol_locked(a == Accepted::Bad ? why_bad_ : "receive: a reply for no call");
      continue;
    }
    if (s == EpState::Open) return Poll::Empty;
    if (end_reported_) return Poll::Gone;
    end_reported_ = true;
    reclaim_lent_locked();
    out->buffer.reset();
    out->kind = Kind::PeerClosed;
    out->error = closed_errc(s);
    out->why = s == EpState::Protocol ? why_bad_ : "";
    out->key = key_.load(std::memory_order_relaxed);
    return Poll::Ended;
  }
}

bool Endpoint::ring_ready() const noexcept {
  return rx_.maybe_nonempty() || state_.load(std::memory_order_acquire) != EpState::Open;
}

bool Endpoint::inbound_ready() const noexcept {
  return rx_.maybe_nonempty() || pending_nonempty_.load(std::memory_order_relaxed) != 0 ||
         state_.load(std::memory_order_acquire) != EpState::Open;
}

bool Endpoint::check_ring() noexcept {
  if (rx_.check() != shm::RingStatus::Corrupt) return true;
  os::LockGuard lock(mu_);
  (void)fail_protocol_locked("receive: ring tail inconsistent with its entries");
  return false;
}

// ---- waiting (P6): ipc/wait_step.h -------------------------------------------------------------

void Endpoint::wait_inbound(Deadline deadline, WaitPolicy policy, WaitFor what) {
  auto ready = [&] { return what == WaitFor::Ring ? ring_ready() : inbound_ready(); };
  SpinStep step(policy, deadline);
  for (;;) {
    if (ready()) return;
    const SpinStep::Next next = step.after_miss();
    if (next == SpinStep::Next::Expired) return;
    if (next == SpinStep::Next::Sleep) break;
  }
  const std::int64_t no_cap = -1;
  sleep_once(
      in_.doorbell, deadline, no_cap,
      [&] { in_.consumer_sleeping.store(1, std::memory_order_relaxed); },
      [&] { return !ready() && check_ring(); },
      [&] { in_.consumer_sleeping.store(0, std::memory_order_relaxed); });
}

Status Endpoint::call(Buffer& b, Deadline deadline) {
  if (redirected_.load(std::memory_order_relaxed))
    return fail(Errc::InvalidArgument, "call: end is redirected to a queue (use send_request)");
  // One call at a time on an end: a second caller sleeps here until its own deadline (the buffer
  // is then still the caller's: it was never sent).
  if (!consumer_mu_.lock_until(deadline))
    return fail(Errc::TimedOut, "call: another call on this channel did not finish in time");
  os::LockGuard consumer(consumer_mu_, os::kAdoptLock);
  if (redirected_.load(std::memory_order_relaxed))  // redirected while we waited for the lock
    return fail(Errc::InvalidArgument, "call: end is redirected to a queue (use send_request)");
  MBMQ_TRY(ensure_watched());
  const WaitPolicy policy = wait_policy();
  std::size_t spare = 0;  // a sealed request: the capacity of fresh pages to prepare meanwhile
  {
    os::LockGuard lock(mu_);
    EpState s = state_.load(std::memory_order_acquire);
    if (s != EpState::Open) return fail(closed_errc(s), "call");
    MBMQ_TRY(send_locked(b, DescKind::Request, OwnState::LentCall));
    const BufferId sent = BufferId::from_wire(b.id_);
    if (sent.is_extent() && table_.own_extent(sent).sealed &&
        table_.wants_spare(table_.own_extent(sent).map.size()))
      spare = table_.own_extent(sent).map.size();
  }
  MBMQ_CRASH_POINT("call.sent");
  if (spare != 0) {
    // (P3c) The sealed extent cannot be written again: while the peer reads it, prepare the fresh
    // pages the next sealed request will need (BufferTable::wants_spare), outside mu_. A failure
    // only means the next one is made when needed.
    if (auto m = BufferTable::make_extent_memory(spare, /*huge=*/true)) {
      os::LockGuard lock(mu_);
      table_.put_spare(std::move(*m));
    }
  }
  const BufferId id = BufferId::from_wire(b.id_);
  for (;;) {
    // Only the ring matters here: messages already set aside for receive() must not keep this
    // loop from sleeping or from its deadline.
    if (ring_ready()) {
      os::LockGuard lock(mu_);
      // A ring's worth per pass, then the deadline: a peer that floods descriptors (release hints,
      // returns) must not keep the call past it.
      for (std::uint32_t i = 0; i < shm::kRingCapacity; ++i) {
        if (state_.load(std::memory_order_acquire) == EpState::Protocol) break;
        Desc d;
        if (!rx_.take(&d)) break;
        std::uint16_t status = 0;
        Accepted a = accept(d, &b, &status);
        rx_.release();  // (P5) after accept() read its control packets: see poll_locked()
        if (a == Accepted::CallDone) {
          MBMQ_CRASH_POINT("call.got_reply");
          b.size_ = d.size;
          trust_.own_view(b, d.size);
          if ((d.kind & shm::kDescHasHandles) != 0)
            b.handles_ = ctl_.take_handles(id, d.gen, HandlesOf::Reply);
          if (status == static_cast<std::uint16_t>(shm::DescStatus::NoReply))
            return fail(Errc::NoReply, "call");
          return {};
        }
        if (a == Accepted::Deliver) pending_push(d);  // a request from the peer: for receive()
        if (a == Accepted::Bad) {
          (void)fail_protocol_locked(why_bad_);
          break;
        }
      }
      EpState s = state_.load(std::memory_order_acquire);
      if (s != EpState::Open) {
        // (P8) The automatic reply: the buffer is the caller's again.
        OwnState* st = table_.own_state(id);
        if (st != nullptr && *st == OwnState::LentCall) {
          *st = OwnState::App;
          table_.request_answered();
        }
        reclaim_lent_locked();
        return fail(closed_errc(s), "call");
      }
    }
    // After a pass over the ring (so a reply already there is taken, not abandoned).
    if (deadline.expired()) {
      os::LockGuard lock(mu_);
      // The callee may still write the buffer: give it up; its late reply frees it.
      OwnState* st = table_.own_state(id);
      if (st != nullptr && *st == OwnState::LentCall) *st = OwnState::Abandoned;
      detach_buffer(b);
      return fail(Errc::TimedOut, "call");
    }
    if (!ring_ready()) wait_inbound(deadline, policy, WaitFor::Ring);
  }
}

Result<Message> Endpoint::receive(Deadline deadline) {
  Message m;
  MBMQ_TRY(receive_batch({&m, 1}, deadline));
  return m;
}

void Endpoint::release_batch(std::span<Message> ms) noexcept {
  std::array<std::uint64_t, shm::kReturnedWords> mask{};
  bool any = false;
  std::size_t done = 0;  // messages finished here (our one-way slots)
  {
    os::LockGuard lock(mu_);
    const bool open = state_.load(std::memory_order_relaxed) == EpState::Open;
    for (Message& m : ms) {
      Buffer& b = m.buffer;
      const BufferId id = BufferId::from_wire(b.id_);
      if (b.ep_.get() != this || b.origin_ != Buffer::Origin::Peer || b.handles_ ||
          !is(b.kind_, DescKind::OneWay) || id.is_extent() || m.kind == Kind::Connection)
        continue;
      table_.set_held(id, false);
      if (open) {
        std::uint32_t w = 0;
        const std::uint64_t bit = peer_slot_bit(id, &w);
        mask[w] |= bit;
        any = true;
      }
      park_buffer(b);  // keeps its reference to us for the next batch
      m.kind = Kind::PeerClosed;
      ++done;
    }
    if (any) give_back_slots(mask);  // one RMW per word, one look at a waiter, for the batch
  }
  if (done == ms.size()) return;  // the stream's steady state: every message was one of those
  // The rest (requests, extents, handles, other ends' buffers) as their destructors would.
  for (Message& m : ms) {
    if (m.buffer.ep_.get() != this || m.buffer.origin_ != Buffer::Origin::None) m.buffer.reset();
    if (m.kind == Kind::Connection) m.channel = Channel{};
    if (m.sample.valid()) m.sample.reset();  // a topic's sample: its slot goes back
    m.kind = Kind::PeerClosed;
  }
}

Result<std::size_t> Endpoint::receive_batch(std::span<Message> out, Deadline deadline) {
  if (out.empty()) return std::size_t{0};
  // What the caller left in out is dropped first (make_message() under the lock must find empty
  // messages): our one-way slots in one go, the rest one by one.
  release_batch(out);
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
    std::size_t got = 0;
    const Poll p = poll_batch(out.data(), out.size(), &got);
    if (got > 0) return got;  // the final PeerClosed, if it came, is the last one
    if (p == Poll::Gone) return fail(closed_errc(state()), "receive");
    if (deadline.expired()) return fail(Errc::TimedOut, "receive");
    wait_inbound(deadline, policy, WaitFor::AnyMessage);
  }
}

}  // namespace mbmq::detail
