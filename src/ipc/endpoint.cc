// Endpoint: one end of a channel, composed of its parts (see ipc/endpoint.h). Steps (P1)-(P8) are
// those of src/shm/layout.h; docs/PROTOCOL.md says which part implements each.
#include "ipc/endpoint.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>

#include "ipc/foreign_buffer.h"
#include "ipc/handles.h"
#include "ipc/peer_watch.h"
#include "ipc/queue_core.h"
#include "ipc/wait_step.h"
#include "os/epoll.h"
#include "os/fault.h"
#include "os/futex.h"
#include "os/mutex.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq::detail {

using shm::Desc;
using shm::DescKind;
using shm::kMaxExtents;

Endpoint::Endpoint(Init init)
    : seg_(std::move(init.segment)),
      side_(init.side),
      out_(seg_.dir(init.side)),
      in_(seg_.dir(1 - init.side)),
      table_slots_(seg_.geometry().slots_per_side),
      table_(seg_, init.side, init.next_extent_gen),
      trust_(seg_, init.side, table_),
      ctl_(std::move(init.control),
           Sideband::Limits{seg_.geometry().max_handles,
                            2 * (seg_.geometry().slots_per_side + kMaxExtents),
                            kMaxStashedHandleFds}),
      tx_(&out_.tail, &out_.head, out_.ring, init.tx_tail),
      rx_(&in_.tail, &in_.head, in_.ring, init.rx_head),
      wait_(init.wait) {
  // Room for every control message an honest peer can have unread (kControlSendBuffer); a best
  // effort: a smaller net.core.wmem_max only makes a flooding peer's channel close sooner.
  (void)os::set_send_buffer(ctl_.fd(), kControlSendBuffer);
}

Result<std::shared_ptr<Endpoint>> Endpoint::make(Init init) {
  if (init.side != 0 && init.side != 1) return fail(Errc::InvalidArgument, "endpoint: side");
  std::shared_ptr<Endpoint> ep(new Endpoint(std::move(init)));
  {
    os::LockGuard lock(ep->mu_);
    if (!ep->trust_.copies_ok())
      return fail(Error::from_syscall(
          "endpoint (untrusted): the private copies of the pool's slots (2 * slots_per_side * "
          "slot_size) cannot be allocated",
          ENOMEM));
  }
  // Without the watch, the death of the peer would go unnoticed: no end without it.
  MBMQ_TRY(ep->ensure_watched());
  return ep;
}

Endpoint::~Endpoint() {
  unwatch();
  os::LockGuard lock(mu_);
  retire_locked(state());  // if close_local() did not
}

void Endpoint::unwatch() noexcept {
  // A copy inherited across fork() was registered by the parent's watcher, not ours.
  if (watch_pid_.load(std::memory_order_relaxed) != os::current_pid() || !ctl_.is_open()) return;
  unwatch_fd(watch_id_, ctl_.fd());
  watch_pid_.store(0, std::memory_order_relaxed);
}

// ---- (P2) buffers ------------------------------------------------------------------------------

Result<Buffer> Endpoint::alloc(std::size_t size) {
  auto b = alloc_once(size);
  if (b || b.error().code != Errc::NoBuffers || redirected_.load(std::memory_order_relaxed))
    return b;
  // Our buffers may be waiting in the inbound ring (returned one-way messages, late replies)
  // with no call() or receive() running to take them: reap them here, unless another thread is
  // consuming (then it will). A redirected end's returns are reaped by its queue's wait().
  if (!consumer_mu_.try_lock()) return b;
  os::LockGuard consumer(consumer_mu_, os::kAdoptLock);
  {
    os::LockGuard lock(mu_);
    reap_locked();
  }
  return alloc_once(size);
}

void Endpoint::reap_locked() {
  // At most a ring's worth: a peer that keeps the ring full must not keep us here.
  for (std::uint32_t i = 0;
       i < shm::kRingCapacity && state_.load(std::memory_order_acquire) != EpState::Protocol; ++i) {
    Desc d;
    if (!rx_.take(&d)) return;
    Accepted a = accept(d, nullptr, nullptr);
    rx_.release();  // (P5) after accept() read its control packets: see poll_locked()
    if (a == Accepted::Deliver) pending_push(d);  // kept for receive()
    if (a == Accepted::Bad || a == Accepted::CallDone) {
      (void)fail_protocol_locked(a == Accepted::Bad ? why_bad_ : "receive: a reply for no call");
      return;
    }
  }
}

void Endpoint::harvest_locked(std::size_t size) {
  // (P7r) Slots the peer gave back, harvested only when none is free: one line transfer per up to
  // slots_per_side one-way messages. Pairs with the consumer's fetch_or: its reads of the payload
  // happen before we reuse the slot.
  if (size > seg_.geometry().slot_size || table_.has_free_slot()) return;
  std::uint32_t freed = 0;
  for (std::uint32_t w = 0; w < returned_words(); ++w)
    if (out_.returned[w].load(std::memory_order_relaxed) != 0)
      freed += table_.take_returned(w, out_.returned[w].exchange(0, std::memory_order_acquire));
  if (freed > 0) {
    // More may be free than this thread takes: another thread waiting for room must see it
    // (as for a local free, free_own_locked()).
    frees_.fetch_add(1, std::memory_order_seq_cst);
    if (room_sleepers_.load(std::memory_order_seq_cst) != 0) wake_room();
  }
}

void Endpoint::fill_own_locked(Buffer& b, const BufferTable::Allocated& a, std::size_t size) {
  // b is empty; parked (send_batch) with a reference to us, it keeps it.
  if (b.ep_.get() != this) [[unlikely]]
    adopt_buffer(b);
  b.id_ = a.id.raw();
  b.gen_ = a.gen;
  b.data_ = a.data;
  b.capacity_ = a.capacity;
  b.size_ = static_cast<std::uint32_t>(size);
  b.origin_ = Buffer::Origin::Own;
}

Result<Buffer> Endpoint::alloc_once(std::size_t size) {
  os::LockGuard lock(mu_);
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open) return fail(closed_errc(s), "Channel::buffer");
  harvest_locked(size);
  // (P3c) An extent that will go sealed may live on huge pages (BufferTable::make_extent_memory).
  const bool to_seal =
      size <= shm::kMaxExtentSize && trust_.must_seal(static_cast<std::uint32_t>(size));
  const BufferTable::Allocated a = MBMQ_TRY(table_.alloc(size, to_seal));
  Buffer b;
  fill_own_locked(b, a, size);
  return b;
}

Result<std::size_t> Endpoint::alloc_many(std::size_t size, std::span<Buffer> out) {
  if (out.empty()) return std::size_t{0};
  // What the caller left in out is dropped first, without our lock (a release takes it); buffers
  // parked by send_batch() keep their reference to us.
  for (Buffer& b : out)
    if (b.ep_.get() != this || b.origin_ != Buffer::Origin::None) b.reset();
  if (out.size() > 1 && size <= seg_.geometry().slot_size) {
    // Slots: as many as are free, under one lock (one drain of the store buffer for the batch).
    os::LockGuard lock(mu_);
    EpState s = state_.load(std::memory_order_acquire);
    if (s != EpState::Open) return fail(closed_errc(s), "Channel::buffer");
    harvest_locked(size);
    std::size_t k = 0;
    for (; k < out.size() && table_.has_free_slot(); ++k)
      fill_own_locked(out[k], table_.alloc_slot(), size);
    if (k > 0) return k;
  }
  // One buffer: an extent, or a slot after reaping the ring as alloc() does (or NoBuffers).
  out[0] = MBMQ_TRY(alloc(size));
  return std::size_t{1};
}

Result<std::size_t> Endpoint::alloc_until(std::size_t size, std::span<Buffer> out,
                                          Deadline deadline) {
  // A producer that never receives must still learn of its peer's death while it waits for room
  // (the hang-up wakes `room`), in a forked child too: no system call once watched here.
  MBMQ_TRY(ensure_watched());
  SpinStep step(wait_policy(), deadline);
  for (;;) {
    const std::uint32_t frees = frees_.load(std::memory_order_acquire);
    auto n = alloc_many(size, out);
    if (n || n.error().code != Errc::NoBuffers) return n;
    MBMQ_TRY(wait_room(frees, step, deadline, size <= seg_.geometry().slot_size));
  }
}

Result<Buffer> Endpoint::alloc_until(std::size_t size, Deadline deadline) {
  Buffer b;
  MBMQ_TRY(alloc_until(size, {&b, 1}, deadline));
  return b;
}

Status Endpoint::wait_room(std::uint32_t frees, SpinStep& step, Deadline deadline, bool slot) {
  // (P6r) Spinning, it looks at `returned` every 8th pause only, and waits for a quarter of the
  // pool to be back (any bit after 512 looks): reading the consumer's line on every pause would
  // steal it from the consumer's next fetch_or, and harvesting bit by bit would make batches of
  // one. The caller retries after 1024 looks anyway (alloc() also reaps extents returned through
  // the ring). Then it sleeps on `room`, woken by the first bit.
  // An extent is wanted: returned slot bits are no sign of room (they would keep it from sleeping).
  const std::uint32_t any = slot ? 1u : ~0u;
  const std::uint32_t quarter = slot ? std::max<std::uint32_t>(1, table_slots_ / 4) : ~0u;
  for (std::uint32_t looks = 1;; ++looks) {
    if ((looks % 8 == 0 && room_maybe(frees, looks < 512 ? quarter : any)) || looks % 1024 == 0)
      return {};
    const SpinStep::Next next = step.after_miss();
    if (next == SpinStep::Next::Expired)
      return fail(Errc::TimedOut, "Channel::buffer: no buffer came back before the deadline");
    if (next == SpinStep::Next::Look) continue;
    // At most 10 ms per sleep: an extent's Return arriving through the ring between our reap and
    // our announcement wakes nobody (room_maybe() cannot look at the ring, which another thread
    // may be consuming): the next alloc() reaps it.
    const std::int64_t cap = kRoomSleepCapNs;
    // Counted before the fence of sleep_once: a local free either sees us or we see it.
    room_sleepers_.fetch_add(1, std::memory_order_seq_cst);
    sleep_once(
        out_.room, deadline, cap,
        [&] { out_.producer_waiting.fetch_add(1, std::memory_order_relaxed); },
        [&] { return !room_maybe(frees, any); },
        [&] { out_.producer_waiting.fetch_sub(1, std::memory_order_relaxed); });
    room_sleepers_.fetch_sub(1, std::memory_order_relaxed);
    if (deadline.expired() && !room_maybe(frees, any))
      return fail(Errc::TimedOut, "Channel::buffer: no buffer came back before the deadline");
    return {};
  }
}

namespace {
// Bits set in x, inline: the build targets baseline x86-64 (no POPCNT), where
// __builtin_popcountll and std::popcount are a call into libgcc, on the spinning path.
constexpr std::uint32_t bit_count(std::uint64_t x) noexcept {
  x -= (x >> 1) & 0x5555'5555'5555'5555ull;
  x = (x & 0x3333'3333'3333'3333ull) + ((x >> 2) & 0x3333'3333'3333'3333ull);
  x = (x + (x >> 4)) & 0x0f0f'0f0f'0f0f'0f0full;
  return static_cast<std::uint32_t>((x * 0x0101'0101'0101'0101ull) >> 56);
}
static_assert(bit_count(0) == 0 && bit_count(~0ull) == 64 &&
              bit_count(0x8000'0000'0000'0001ull) == 2);
}  // namespace

bool Endpoint::room_maybe(std::uint32_t frees, std::uint32_t min_bits) const noexcept {
  std::uint32_t bits = 0;
  for (std::uint32_t w = 0; w < returned_words() && bits < min_bits; ++w)
    bits += bit_count(out_.returned[w].load(std::memory_order_relaxed));
  return bits >= min_bits || frees_.load(std::memory_order_relaxed) != frees ||
         state_.load(std::memory_order_acquire) != EpState::Open;
}

void Endpoint::wake_room() noexcept {
  out_.room.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&out_.room, INT_MAX);
}

void Endpoint::wake_peer_producer() noexcept {
  // seq_cst: after our seq_cst RMW (or fence), ordered on every architecture, not only x86.
  if (in_.producer_waiting.load(std::memory_order_seq_cst) == 0) return;
  // Pairs with the producer's acquire load of `room` before FUTEX_WAIT (P6r).
  in_.room.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&in_.room, INT_MAX);
}

void Endpoint::give_back_slots(
    const std::array<std::uint64_t, shm::kReturnedWords>& mask) noexcept {
  // seq_cst: our reads of the payloads happen before the producer's reuse (its acquire
  // exchange), and each RMW is a fence between this store and the load of producer_waiting
  // (pairs with the fence in the producer's sleep_once, P6r).
  for (std::uint32_t w = 0; w < returned_words(); ++w)
    if (mask[w] != 0) in_.returned[w].fetch_or(mask[w], std::memory_order_seq_cst);
  wake_peer_producer();
}

Status Endpoint::grow(Buffer& b, std::size_t n) {
  if (b.origin_ != Buffer::Origin::Own)
    return fail(Errc::InvalidArgument, "Buffer::reserve: a received buffer cannot grow");
  Buffer nb = MBMQ_TRY(alloc(n));
  std::memcpy(nb.data_, b.data_, b.size_);  // a one-time move at growth, not per message
  nb.size_ = b.size_;
  b = std::move(nb);
  return {};
}

void Endpoint::free_own_locked(BufferId id) noexcept {
  const std::uint32_t hint = table_.free_own(id);
  // (P6r) seq_cst: pairs with a waiter's count-then-fence; it sees the new count, or we see it.
  frees_.fetch_add(1, std::memory_order_seq_cst);
  if (room_sleepers_.load(std::memory_order_seq_cst) != 0) wake_room();
  // (P7) Every descriptor that names a buffer (ours lent, or the peer's given back) must always
  // find room in the ring: at most 2 * (slots + extents) of them can be there at once. A release
  // hint is pushed only beyond that reserve; without room it is merely delayed to the id's next
  // use, which replaces the peer's mapping.
  const std::uint32_t reserve = 2 * (table_.slots_per_side() + kMaxExtents);
  if (hint != 0 && state_.load(std::memory_order_relaxed) == EpState::Open &&
      reserve < shm::kRingCapacity && tx_.has_room_for(reserve + 1) == shm::RingStatus::Ok)
    (void)push_locked(
        Desc{id.raw(), 0, hint, static_cast<std::uint16_t>(DescKind::ReleaseExtent), 0});
}

void Endpoint::release(Buffer& b) noexcept {
  os::LockGuard lock(mu_);
  const BufferId id = BufferId::from_wire(b.id_);
  if (b.origin_ == Buffer::Origin::Own) {
    OwnState* st = table_.own_state(id);
    if (st != nullptr && *st == OwnState::App) free_own_locked(id);
    return;
  }
  // A peer's buffer we were holding: unhold it, then answer or give it back (P7).
  table_.set_held(id, false);
  const bool request = is(b.kind_, DescKind::Request);
  if (request) table_.request_released();
  if (state_.load(std::memory_order_relaxed) != EpState::Open) return;
  if (request) {
    (void)push_locked(Desc{b.id_, 0, b.gen_, static_cast<std::uint16_t>(DescKind::Reply),
                           static_cast<std::uint16_t>(shm::DescStatus::NoReply)});
  } else if (!id.is_extent()) {
    std::array<std::uint64_t, shm::kReturnedWords> mask{};
    std::uint32_t w = 0;
    const std::uint64_t bit = peer_slot_bit(id, &w);
    mask[w] = bit;
    give_back_slots(mask);  // (P7r) no descriptor
  } else {
    (void)push_locked(Desc{b.id_, 0, b.gen_, static_cast<std::uint16_t>(DescKind::Return), 0});
    // push_locked's fence (P4) orders the entry before this load of producer_waiting (P6r).
    wake_peer_producer();
  }
}

// ---- (P3)/(P4) sending -------------------------------------------------------------------------

Status Endpoint::push_locked(const Desc& d, bool wake) {
  switch (tx_.push(d)) {
    case shm::RingStatus::Ok:
      counters_.count_out(kind_of(d), d.status, d.size);  // (#18) plain stores, mu_ held
      if (wake) wake_peer_locked();
      return {};
    case shm::RingStatus::Full: {
      const std::uint16_t kind = kind_of(d);
      // A reply or a return always fits in an honest ring (see free_own_locked()): the peer
      // published a head behind what it took (it read entries without consuming them). Never
      // drop it silently: the channel is closed, and the caller learns why.
      if (is(kind, DescKind::Reply) || is(kind, DescKind::Return))
        return fail(fail_protocol_locked("reply: ring full although every buffer's entry fits"));
      return fail(Errc::WouldBlock, "send: ring full (the peer is not consuming)");
    }
    default:
      return fail(fail_protocol_locked("send: peer's ring head is invalid"));
  }
}

void Endpoint::wake_peer_locked() noexcept {
  // Pairs with the consumer's store-release of doorbell_gen after sending its queue's doorbell
  // (redirect): the doorbell is on the socket before the generation that names it is visible.
  const std::uint32_t g = out_.doorbell_gen.load(std::memory_order_acquire);
  if (g != 0) {
    if (g != peer_bell_.gen()) {
      (void)drain_locked([g](const Sideband& s) { return s.has_doorbell(g); });
      if (state_.load(std::memory_order_relaxed) != EpState::Open) return;
      if (ctl_.has_doorbell(g)) {
        StashedBell st = ctl_.take_doorbell();
        PeerBell bell;
        if (const char* why = bell.open(std::move(st.fds), g, st.slot)) {
          (void)fail_protocol_locked(why);
          return;
        }
        if (bell.is_open()) peer_bell_ = std::move(bell);
      }
    }
    // (P4q) The peer's queue. Without its doorbell (a peer that lied about it, or our own mmap
    // failed), its own word below: its problem, not ours.
    if (g == peer_bell_.gen()) {
      peer_bell_.ring();
      return;
    }
  }
  // (P4) push() published the entry with release stores (its seq, then tail). This seq_cst fence
  // orders them before the relaxed load of consumer_sleeping below, and pairs with the
  // consumer's seq_cst fence in (P6, ipc/wait_step.h), which sits between its store of
  // consumer_sleeping and its re-check of the ring: either it sees our entry when it re-checks,
  // or we see its flag here. (On x86 the fence is an mfence or a locked instruction.) The value
  // is only a hint (layout.h).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (out_.consumer_sleeping.load(std::memory_order_relaxed) == 0) return;
  // Pairs with the consumer's acquire load of the word before FUTEX_WAIT (P6).
  out_.doorbell.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&out_.doorbell, 1);
}

Status Endpoint::sent_locked(Status s, bool took_all) {
  // Never block under mu_ (the outbox is non-blocking): see the declaration for what full means.
  if (!s && s.error().code == Errc::WouldBlock) {
    if (took_all)
      return fail(fail_protocol_locked("control socket full: the peer does not read it"));
    return fail(Errc::WouldBlock, "send: the peer's control socket is full (it is not consuming)");
  }
  return s;
}

Status Endpoint::send_locked(Buffer& b, DescKind kind, OwnState lent_as, bool wake) {
  if (b.ep_.get() != this || b.origin_ != Buffer::Origin::Own)
    return fail(Errc::InvalidArgument, "send: not a buffer of this channel's end");
  const BufferId id = BufferId::from_wire(b.id_);
  OwnState* st = table_.own_state(id);
  if (st == nullptr || *st != OwnState::App)
    return fail(Errc::InvalidArgument, "send: buffer state");
  const std::uint32_t limit = seg_.geometry().max_in_flight;
  if (kind == DescKind::Request && limit != 0 && table_.requests_out() >= limit)
    return fail(Errc::Busy, "send: the channel's in-flight limit (max_in_flight) is reached");
  // Room first: once an extent or handles are on the control socket, the descriptor must follow.
  switch (tx_.has_room()) {
    case shm::RingStatus::Ok:
      break;
    case shm::RingStatus::Full:
      return fail(Errc::WouldBlock, "send: ring full (the peer is not consuming)");
    default:
      return fail(fail_protocol_locked("send: peer's ring head is invalid"));
  }
  // Too many handles is refused before anything goes: an extent's packet sent first would stay
  // unread on the peer's socket with no descriptor after it, and a loop of such sends filled the
  // socket until a healthy channel was closed (review 2026-12-02).
  if (b.handles_) MBMQ_TRY(ctl_.check_handles(*b.handles_));
  if (Status prep = trust_.prepare_send(b); !prep) {
    // The buffer stays valid and usable, or (its bytes unreachable) becomes invalid: never a
    // valid buffer over unmapped memory.
    if (id.is_extent() && !table_.own_extent(id).map.valid()) {
      free_own_locked(id);
      detach_buffer(b);
    }
    return prep;
  }
  if (id.is_extent()) {
    OwnExtent& x = table_.own_extent(id);
    if (x.sent_gen != x.gen) {
      // (P3) The extent's fd travels before the first descriptor naming it.
      MBMQ_TRY(send_extent_locked(id.extent_index(), x.gen, x.sealed ? shm::kExtentSealed : 0u,
                                  x.fd.get()));
      x.sent_gen = x.gen;
    }
  }
  auto k = static_cast<std::uint16_t>(kind);
  if (b.handles_) {
    auto sent = send_handles_locked(id, b.gen_, HandlesOf::Message, *b.handles_);
    if (!sent) return fail(sent.error());
    if (*sent) k |= shm::kDescHasHandles;
    b.handles_.reset();  // sent: the receiver's copies are the live ones
  }
  MBMQ_TRY(push_locked(Desc{b.id_, b.size_, b.gen_, k, 0}, wake));
  *st = lent_as;
  if (kind == DescKind::Request) table_.request_sent();
  return {};
}

Status Endpoint::send(Buffer&& b, DescKind kind) {
  os::LockGuard lock(mu_);
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open) return fail(closed_errc(s), "send");
  MBMQ_TRY(send_locked(b, kind,
                       kind == DescKind::Request ? OwnState::LentRequest : OwnState::LentOneWay));
  detach_buffer(b);
  MBMQ_CRASH_POINT("send.sent");
  return {};
}

std::size_t Endpoint::send_slots_locked(std::span<Buffer> bufs) {
  // An untrusted end's slots may be private copies (P5b) to copy back first: send_locked() does.
  if (bufs.empty() || trust_.untrusted_me()) return 0;
  // Room for the whole batch at once; without it, send_locked() sends what fits one by one. A
  // one-way slot needs no control message, so nothing else can refuse it once there is room.
  const auto want = static_cast<std::uint32_t>(std::min<std::size_t>(bufs.size(), 64));
  if (tx_.has_room_for(want) != shm::RingStatus::Ok) return 0;
  std::size_t k = 0;
  std::uint64_t bytes = 0;
  for (; k < want; ++k) {
    Buffer& b = bufs[k];
    if (b.ep_.get() != this || b.origin_ != Buffer::Origin::Own || b.handles_ ||
        !table_.lend_slot_one_way(BufferId::from_wire(b.id_)))
      break;
    // (P3) Visible to the consumer at once (the entry's seq); the tail follows below.
    tx_.put(Desc{b.id_, b.size_, b.gen_, static_cast<std::uint16_t>(DescKind::OneWay), 0});
    bytes += b.size_;
    park_buffer(b);  // invalid, but keeps its reference to us for buffers() to reuse
  }
  if (k > 0) {
    tx_.publish();
    counters_.count_out_one_way(k, bytes);  // (#18) plain stores, mu_ held
  }
  return k;
}

Result<std::size_t> Endpoint::send_batch(std::span<Buffer> bufs) {
  os::LockGuard lock(mu_);
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open) return fail(closed_errc(s), "send");
  std::size_t sent = 0;
  // Plain one-way slots first, as one batch; then the rest, if any, one by one.
  while (sent < bufs.size()) {
    const std::size_t k = send_slots_locked(bufs.subspan(sent));
    if (k == 0) break;
    sent += k;
  }
  Status why;
  for (Buffer& b : bufs.subspan(sent)) {
    // A sealed send (P3c) can fail in a way that loses the buffer: such a buffer goes only first
    // in a batch, so that its error is this call's (after a prefix it would be lost with it).
    if (sent > 0 && b.ep_.get() == this && b.origin_ == Buffer::Origin::Own && trust_.seals(b))
      break;
    // A control message (an extent's fd, handles) must be followed by its descriptor, and the
    // peer reads it when it takes that descriptor: waking it late is fine, it only reads later.
    why = send_locked(b, DescKind::OneWay, OwnState::LentOneWay, /*wake=*/false);
    if (!why) break;
    park_buffer(b);  // invalid, but keeps its reference to us for buffers() to reuse
    ++sent;
  }
  // (P4) One fence and one look at the peer's sleeping flag for the whole batch.
  if (sent > 0) wake_peer_locked();
  if (sent == 0 && !why) return fail(why.error());
  return sent;
}

Status Endpoint::keep_for_retry_locked(Buffer& b, std::shared_ptr<Endpoint>&& keep) {
  table_.set_held(BufferId::from_wire(b.id_), true);
  table_.request_kept();
  b.ep_ = std::move(keep);
  return fail(Errc::WouldBlock, "reply: the caller's control socket is full; retry");
}

Status Endpoint::reply(Buffer&& b) {
  if (b.origin_ != Buffer::Origin::Peer || !is(b.kind_, DescKind::Request))
    return fail(Errc::InvalidArgument, "reply: not a received request");
  // Keeps us alive to the end of this function (the buffer may hold the last reference): declared
  // before the lock so it is released after the unlock. Moved, not copied: two atomic
  // reference-count updates fewer per reply.
  std::shared_ptr<Endpoint> keep = std::move(b.ep_);
  os::LockGuard lock(mu_);
  const BufferId id = BufferId::from_wire(b.id_);
  const std::uint32_t size = b.size_, gen = b.gen_;
  table_.set_held(id, false);
  table_.request_released();
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open) {
    detach_buffer(b);
    // Closed here (Channel::close) or by the peer: either way the caller will not get it; not a
    // mistake of the replier's (a server loop goes on).
    return fail(s == EpState::Protocol ? Errc::Protocol : Errc::PeerClosed, "reply");
  }
  auto k = static_cast<std::uint16_t>(DescKind::Reply);
  // (P7b) A sealed extent cannot take the answer, nor may an untrusted caller get more than
  // copy_threshold bytes unsealed: it goes back in a replacement memfd.
  PeerExtent* pe = table_.peer_extent(id);  // nullptr: a slot
  const bool replace = pe != nullptr && (pe->sealed || trust_.must_seal(size));
  // Room first when a control message precedes the descriptor (P3b, P7b): it must follow.
  // It always has room in an honest ring (free_own_locked()): full, the peer cheated.
  if ((replace || b.handles_) && tx_.has_room() != shm::RingStatus::Ok) {
    detach_buffer(b);
    return fail(fail_protocol_locked("reply: ring full although every buffer's entry fits"));
  }
  Status copied;
  if (replace) {
    // A retry after back-pressure does not send a second replacement for the same generation
    // (the caller takes the first one it reads): the answer is the bytes of the first attempt.
    if (pe->replaced_gen != gen) {
      auto r = trust_.make_replacement(b.data_, size);
      copied = r ? send_extent_locked(id.extent_index(), gen, r->aux, r->fd.get())
                 : Status(fail(r.error()));
      if (!copied && copied.error().code == Errc::WouldBlock)
        return keep_for_retry_locked(b, std::move(keep));
      if (copied) pe->replaced_gen = gen;
    }
    k |= shm::kDescReplaced;
  } else {
    copied = trust_.write_back_answer(b, size);  // (P5b) an untrusted end's private copy
  }
  if (!copied) {
    detach_buffer(b);
    // The caller is not left waiting: it gets NoReply.
    (void)push_locked(Desc{id.raw(), 0, gen, static_cast<std::uint16_t>(DescKind::Reply),
                           static_cast<std::uint16_t>(shm::DescStatus::NoReply)});
    return copied;
  }
  if (b.handles_) {
    auto sent = send_handles_locked(id, gen, HandlesOf::Reply, *b.handles_);
    if (!sent) {
      Status why = fail(sent.error());
      // Back-pressure, or too many handles for the channel (the replier's mistake, to fix and
      // retry): kept for the retry.
      if (why.error().code == Errc::WouldBlock || why.error().code == Errc::InvalidArgument) {
        (void)keep_for_retry_locked(b, std::move(keep));
        return why;
      }
      // The handles cannot go (ETOOMANYREFS, ENOBUFS, the caller gone): an answer without the
      // handles it announces would be a silent loss. The caller gets NoReply; we get the error.
      // A replacement already sent travels with it (flagged), so the caller consumes it rather
      // than finding it stale at its next reply.
      detach_buffer(b);
      auto nk = static_cast<std::uint16_t>(DescKind::Reply);
      if (replace && pe->replaced_gen == gen) nk |= shm::kDescReplaced;
      if (pe != nullptr) pe->replaced_gen = 0;
      (void)push_locked(
          Desc{id.raw(), 0, gen, nk, static_cast<std::uint16_t>(shm::DescStatus::NoReply)});
      return why;
    }
    if (*sent) k |= shm::kDescHasHandles;
    b.handles_.reset();
  }
  if (pe != nullptr) pe->replaced_gen = 0;
  detach_buffer(b);
  MBMQ_CRASH_POINT("reply.before_send");
  // (P7) The answer travels in the request's own buffer.
  Status pushed = push_locked(Desc{id.raw(), size, gen, k, 0});
  MBMQ_CRASH_POINT("reply.sent");
  return pushed;
}

void Endpoint::pending_push(const Desc& d) noexcept {
  table_.pending().push(d);
  pending_nonempty_.store(1, std::memory_order_relaxed);
}

bool Endpoint::pending_pop(Desc* d) noexcept {
  if (!table_.pending().pop(d)) return false;
  if (table_.pending().empty()) pending_nonempty_.store(0, std::memory_order_relaxed);
  return true;
}

Error Endpoint::fail_protocol_locked(const char* op) noexcept {
  EpState expected = EpState::Open;
  if (state_.compare_exchange_strong(expected, EpState::Protocol)) {
    why_bad_ = op;  // for the final Kind::PeerClosed message (Message::why)
    // Close the channel for both sides: the peer sees the hang-up (P8), and what it parked in
    // our stashes goes now (the peer budget).
    ctl_.fail_channel();
    in_.doorbell.fetch_add(1, std::memory_order_release);
    (void)os::futex_wake(&in_.doorbell, INT_MAX);
    wake_room();
  }
  return Error::make(Errc::Protocol, op);
}

Status Endpoint::reply_message(Buffer&& b) {
  // A remote channel's request (mbmq::net, ipc/foreign_buffer.h): answered over the network.
  if (b.foreign_) {
    ForeignBuffer* f = b.foreign_.get();  // reply() takes b's reference before anything else
    return f->reply(std::move(b));
  }
  if (!b.ep_) return fail(Errc::InvalidArgument, "reply: empty buffer");
  Endpoint* ep = b.ep_.get();  // reply() takes the buffer's reference before anything else
  return ep->reply(std::move(b));
}

}  // namespace mbmq::detail
