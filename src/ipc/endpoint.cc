// Endpoint: one end of a channel. Steps (P1)-(P8) are those of src/shm/layout.h.
#include "ipc/endpoint.h"

#include <algorithm>
#include <climits>
#include <cstring>

#include "ipc/handles.h"
#include "ipc/peer_watch.h"
#include "ipc/queue_core.h"
#include "os/epoll.h"
#include "os/fault.h"
#include "os/file.h"
#include "os/futex.h"
#include "os/memfd.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq::detail {

using shm::Desc;
using shm::DescKind;
using shm::kExtentBit;
using shm::kMaxExtents;

namespace {

inline void cpu_relax() noexcept { __builtin_ia32_pause(); }

std::span<const std::byte> bytes_of(const shm::CtlMsg& m) {
  return {reinterpret_cast<const std::byte*>(&m), sizeof(m)};
}

}  // namespace

Endpoint::Endpoint(Init init)
    : seg_(std::move(init.segment)),
      side_(init.side),
      n_(seg_.geometry().slots_per_side),
      slot_size_(seg_.geometry().slot_size),
      out_(seg_.dir(init.side)),
      in_(seg_.dir(1 - init.side)),
      control_(std::move(init.control)),
      tx_(&out_.tail, &out_.head, out_.ring, init.tx_tail),
      rx_(&in_.tail, &in_.head, in_.ring, init.rx_head),
      next_extent_gen_(init.next_extent_gen == 0 ? 1 : init.next_extent_gen),
      untrusted_me_(((seg_.geometry().untrusted_mask >> init.side) & 1u) != 0),
      untrusted_peer_(((seg_.geometry().untrusted_mask >> (1 - init.side)) & 1u) != 0),
      copy_threshold_(seg_.geometry().copy_threshold),
      wait_(init.wait) {}

Result<std::shared_ptr<Endpoint>> Endpoint::make(Init init) {
  if (init.side != 0 && init.side != 1) return fail(Errc::InvalidArgument, "endpoint: side");
  std::shared_ptr<Endpoint> ep(new Endpoint(std::move(init)));
  // All allocation happens here, never per message.
  ep->free_slots_.reserve(ep->n_);
  for (std::uint32_t k = ep->n_; k-- > 0;) ep->free_slots_.push_back(k);
  ep->free_ext_.reserve(kMaxExtents);
  for (std::uint32_t e = kMaxExtents; e-- > 0;) ep->free_ext_.push_back(e);
  if (ep->untrusted_me_)
    ep->slot_shadow_ =
        std::make_unique_for_overwrite<std::byte[]>(std::size_t{2} * ep->n_ * ep->slot_size_);
  // Room for every control message an honest peer can have unread (kControlSendBuffer); a best
  // effort: a smaller net.core.wmem_max only makes a flooding peer's channel close sooner.
  (void)os::set_send_buffer(ep->control_.get(), kControlSendBuffer);
  // Without the watch, the death of the peer would go unnoticed: no end without it.
  MBMQ_TRY(ep->ensure_watched());
  return ep;
}

Endpoint::~Endpoint() { unwatch(); }

void Endpoint::unwatch() noexcept {
  // A copy inherited across fork() was registered by the parent's watcher, not ours.
  if (watch_pid_.load(std::memory_order_relaxed) != os::current_pid() || !control_) return;
  unwatch_fd(watch_id_, control_.get());
  watch_pid_.store(0, std::memory_order_relaxed);
}

// ---- ownership tables (mu_ held) -----------------------------------------------------------

Endpoint::OwnState* Endpoint::own_state(std::uint32_t id) noexcept {
  if ((id & kExtentBit) != 0) {
    std::uint32_t e = id & ~kExtentBit;
    return e < kMaxExtents ? &own_ext_[e].state : nullptr;
  }
  std::uint32_t first = static_cast<std::uint32_t>(side_) * n_;
  if (id < first || id - first >= n_) return nullptr;
  return &own_slots_[id - first].state;
}

std::uint32_t Endpoint::own_capacity(std::uint32_t id) const noexcept {
  if ((id & kExtentBit) != 0)
    return static_cast<std::uint32_t>(own_ext_[id & ~kExtentBit].map.size());
  return slot_size_;
}

std::byte* Endpoint::own_data(std::uint32_t id) const noexcept {
  if ((id & kExtentBit) != 0) return own_ext_[id & ~kExtentBit].map.data();
  return seg_.slot(id);
}

void Endpoint::free_own(std::uint32_t id) noexcept {
  if ((id & kExtentBit) != 0) {
    std::uint32_t e = id & ~kExtentBit;
    OwnExtent& x = own_ext_[e];
    // (P7) Every descriptor that names a buffer (ours lent, or the peer's given back) must
    // always find room in the ring: at most 2 * (slots + extents) of them can be there at once.
    // A release is pushed only beyond that reserve; without room it is merely delayed to the
    // id's next use, which replaces the peer's mapping.
    const std::uint32_t reserve = 2 * (n_ + kMaxExtents);
    if (x.sent_gen == x.gen && state_.load(std::memory_order_relaxed) == EpState::Open &&
        reserve < shm::kRingCapacity && tx_.has_room_for(reserve + 1) == shm::RingStatus::Ok) {
      (void)push_locked(Desc{id, 0, x.gen, static_cast<std::uint16_t>(DescKind::ReleaseExtent), 0});
    }
    x.map.reset();
    x.fd.reset();
    x.sealed = false;
    x.state = OwnState::Free;
    free_ext_.push_back(e);  // capacity reserved in make(): no allocation
    return;
  }
  std::uint32_t k = id - static_cast<std::uint32_t>(side_) * n_;
  own_slots_[k].state = OwnState::Free;
  free_slots_.push_back(k);
}

// ---- (P2) allocation ---------------------------------------------------------------------------

Result<Buffer> Endpoint::alloc(std::size_t size) {
  auto b = alloc_once(size);
  if (b || b.error().code != Errc::NoBuffers || redirected_.load(std::memory_order_relaxed))
    return b;
  // Our buffers may be waiting in the inbound ring (returned one-way messages, late replies)
  // with no call() or receive() running to take them: reap them here, unless another thread is
  // consuming (then it will). A redirected end's returns are reaped by its queue's wait().
  std::unique_lock consumer(consumer_mu_, std::try_to_lock);
  if (!consumer.owns_lock()) return b;
  {
    std::lock_guard lock(mu_);
    reap_locked();
  }
  return alloc_once(size);
}

void Endpoint::reap_locked() {
  // At most a ring's worth: a peer that keeps the ring full must not keep us here.
  for (std::uint32_t i = 0;
       i < shm::kRingCapacity && state_.load(std::memory_order_acquire) != EpState::Protocol; ++i) {
    Desc d;
    if (rx_.pop(&d) != shm::RingStatus::Ok) return;
    Accepted a = accept(d, nullptr, nullptr);
    if (a == Accepted::Deliver) pending_push(d);  // kept for receive()
    if (a == Accepted::Bad || a == Accepted::CallDone) {
      (void)fail_protocol_locked(a == Accepted::Bad ? why_bad_ : "receive: a reply for no call");
      return;
    }
  }
}

Result<Buffer> Endpoint::alloc_once(std::size_t size) {
  std::lock_guard lock(mu_);
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open) return fail(closed_errc(s), "Channel::buffer");
  Buffer b;
  if (size <= slot_size_) {
    if (free_slots_.empty()) return fail(Errc::NoBuffers, "Channel::buffer: pool exhausted");
    std::uint32_t k = free_slots_.back();
    free_slots_.pop_back();
    OwnSlot& slot = own_slots_[k];
    slot.state = OwnState::App;
    ++slot.gen;
    b.id_ = static_cast<std::uint32_t>(side_) * n_ + k;
    b.gen_ = slot.gen;
    b.data_ = seg_.slot(b.id_);
    b.capacity_ = slot_size_;
  } else {
    if (size > shm::kMaxExtentSize)
      return fail(Errc::InvalidArgument, "Channel::buffer: larger than 4 GiB - 4 KiB");
    if (free_ext_.empty()) return fail(Errc::NoBuffers, "Channel::buffer: extent table full");
    std::size_t cap = (size + 4095) / 4096 * 4096;
    auto fd = os::make_sealed_memfd("mbmq-extent", cap);
    if (!fd) return fail(fd.error());
    auto map = os::Mapping::map_shared(fd->get(), cap, os::Access::ReadWrite, os::Prefault::Yes);
    if (!map) return fail(map.error());
    std::uint32_t e = free_ext_.back();
    free_ext_.pop_back();
    OwnExtent& x = own_ext_[e];
    x.fd = std::move(*fd);
    x.map = std::move(*map);
    x.state = OwnState::App;
    x.gen = take_extent_gen_locked();
    x.sent_gen = 0;
    b.id_ = kExtentBit | e;
    b.gen_ = x.gen;
    b.data_ = x.map.data();
    b.capacity_ = static_cast<std::uint32_t>(cap);
  }
  b.ep_ = shared_from_this();
  b.size_ = static_cast<std::uint32_t>(size);
  b.origin_ = Buffer::Origin::Own;
  return b;
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

void Endpoint::release(Buffer& b) noexcept {
  std::lock_guard lock(mu_);
  if (b.origin_ == Buffer::Origin::Own) {
    OwnState* st = own_state(b.id_);
    if (st != nullptr && *st == OwnState::App) free_own(b.id_);
    return;
  }
  // A peer's buffer we were holding: unhold it, then answer or give it back (P7).
  if ((b.id_ & kExtentBit) != 0) {
    peer_ext_[b.id_ & ~kExtentBit].held = false;
  } else {
    peer_held_[b.id_ - static_cast<std::uint32_t>(1 - side_) * n_] = false;
  }
  if (b.kind_ == static_cast<std::uint16_t>(DescKind::Request) && requests_in_ > 0) --requests_in_;
  if (state_.load(std::memory_order_relaxed) != EpState::Open) return;
  if (b.kind_ == static_cast<std::uint16_t>(DescKind::Request)) {
    (void)push_locked(Desc{b.id_, 0, b.gen_, static_cast<std::uint16_t>(DescKind::Reply),
                           static_cast<std::uint16_t>(shm::DescStatus::NoReply)});
  } else {
    (void)push_locked(Desc{b.id_, 0, b.gen_, static_cast<std::uint16_t>(DescKind::Return), 0});
  }
}

// ---- (P3)/(P4) sending -------------------------------------------------------------------------

Status Endpoint::push_locked(const Desc& d) {
  switch (tx_.push(d)) {
    case shm::RingStatus::Ok:
      wake_peer_locked();
      return {};
    case shm::RingStatus::Full: {
      const auto kind = static_cast<DescKind>(d.kind & ~shm::kDescFlags);
      // A reply or a return always fits in an honest ring (see free_own()): the peer published
      // a head behind what it took (it read entries without consuming them). Never drop it
      // silently: the channel is closed, and the caller learns why.
      if (kind == DescKind::Reply || kind == DescKind::Return)
        return fail(fail_protocol_locked("reply: ring full although every buffer's entry fits"));
      return fail(Errc::WouldBlock, "send: ring full (the peer is not consuming)");
    }
    default:
      return fail(fail_protocol_locked("send: peer's ring head is invalid"));
  }
}

void Endpoint::wake_peer_locked() noexcept {
  // (P4) push() published the entry with release stores (its seq, then tail). This seq_cst fence
  // orders them before the relaxed load of consumer_sleeping below, and pairs with the
  // consumer's seq_cst fence in (P6), which sits between its store of consumer_sleeping and its
  // re-check of the ring: either it sees our entry when it re-checks, or we see its flag here.
  // (On x86 the fence is an mfence or a locked instruction.) The value is only a hint
  // (layout.h).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (out_.consumer_sleeping.load(std::memory_order_relaxed) == 0) return;
  std::atomic<std::uint32_t>* word = &out_.doorbell;
  // Pairs with the consumer's store-release of doorbell_gen after sending the page (redirect).
  std::uint32_t g = out_.doorbell_gen.load(std::memory_order_acquire);
  if (g != 0) {
    if (g != peer_db_gen_) {
      (void)drain_until([&] { return stash_doorbell_.fd && stash_doorbell_.gen == g; });
      if (state_.load(std::memory_order_relaxed) != EpState::Open) return;
      if (stash_doorbell_.fd && stash_doorbell_.gen == g) {
        os::UniqueFd fd = std::move(stash_doorbell_.fd);
        // Like a segment or an extent: only a memfd sealed against shrinking can be mapped
        // without risking SIGBUS when the peer truncates it later.
        auto seals = os::get_seals(fd.get());
        auto size = os::file_size(fd.get());
        if (!seals || (*seals & os::kSealsFixedSize) != os::kSealsFixedSize || !size ||
            *size < shm::kDoorbellPageSize) {
          (void)fail_protocol_locked("doorbell: not a memfd of a page sealed against shrinking");
          return;
        }
        auto map = os::Mapping::map_shared(fd.get(), shm::kDoorbellPageSize, os::Access::ReadWrite);
        if (map) {
          peer_db_map_ = std::move(*map);
          peer_db_fd_ = std::move(fd);
          peer_db_gen_ = g;
        }
      }
    }
    // Without the page (a peer that lied about it), wake its own word: its problem, not ours.
    if (g == peer_db_gen_) word = &reinterpret_cast<shm::DoorbellPage*>(peer_db_map_.data())->word;
  }
  // Pairs with the consumer's acquire load of the word before FUTEX_WAIT (P6).
  word->fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(word, 1);
}

Status Endpoint::send_ctl_locked(std::span<const std::byte> bytes, std::span<const int> fds) {
  if (!control_) return fail(Errc::PeerClosed, "control socket closed");
  Status s = os::send_msg(control_.get(), bytes, fds, os::Blocking::No);
  // Never block under mu_. A full socket with descriptors of ours still in the peer's ring: the
  // peer is slow, and reads the packets when it gets to their descriptors: back-pressure, like a
  // full ring (Errc::WouldBlock, nothing sent). Full although it took every descriptor we sent
  // (each packet precedes its descriptor, and is read when that descriptor is): it does not read
  // its control socket at all, and the channel is closed.
  if (!s && s.error().code == Errc::WouldBlock) {
    if (tx_.drained())
      return fail(fail_protocol_locked("control socket full: the peer does not read it"));
    return fail(Errc::WouldBlock, "send: the peer's control socket is full (it is not consuming)");
  }
  return s;
}

bool Endpoint::read_control_once() {
  if (!control_ || state_.load(std::memory_order_relaxed) == EpState::Protocol) return false;
  struct {
    shm::CtlMsg h;
    shm::HandleMeta meta[shm::kMaxHandles];
  } pkt{};
  std::array<os::UniqueFd, os::kMaxFdsPerMsg> fds;
  auto r = os::recv_msg(control_.get(), {reinterpret_cast<std::byte*>(&pkt), sizeof(pkt)}, fds,
                        os::Blocking::No);
  // A peer that closed its end with our messages unread in its queue makes the kernel report
  // ECONNRESET once, ahead of the messages it had sent us: read on past it.
  if (!r && r.error().code == Errc::PeerClosed) return true;
  if (!r || (r->bytes == 0 && r->nfds == 0)) return false;  // nothing more, or hung up (P8)
  const shm::CtlMsg& m = pkt.h;
  if (r->truncated || r->bytes < sizeof(m)) {
    (void)fail_protocol_locked("control message malformed");
    return false;
  }
  if (m.type == static_cast<std::uint32_t>(shm::CtlType::Handles)) {
    // (P3b) Every size and count must agree before anything is kept.
    const std::uint32_t count = m.aux & 0xff;
    std::size_t want_fds = 0;
    bool ok = count >= 1 && count <= seg_.geometry().max_handles &&
              (m.aux & ~(0xffu | shm::kHandlesForReply)) == 0 &&
              r->bytes == sizeof(m) + count * sizeof(shm::HandleMeta);
    for (std::uint32_t k = 0; ok && k < count; ++k) {
      if (pkt.meta[k].kind == static_cast<std::uint32_t>(shm::WireHandle::Fd) ||
          pkt.meta[k].kind == static_cast<std::uint32_t>(shm::WireHandle::FileRange)) {
        want_fds += 1;
      } else if (pkt.meta[k].kind == static_cast<std::uint32_t>(shm::WireHandle::ChannelEnd)) {
        want_fds += pkt.meta[k].doorbell_gen != 0 ? 3 : 2;
      } else {
        ok = false;
      }
    }
    if (!ok || r->nfds != want_fds) {
      (void)fail_protocol_locked("control message: handles malformed or over max_handles");
      return false;
    }
    // The stash is bounded in packets and in fds (the peer budget, docs/RELIABILITY.md).
    // Only packets sent ahead of their descriptors count: those of accepted messages (pending
    // for receive()) are bounded by the buffers in flight.
    if (stash_unclaimed_ >= 2 * (n_ + kMaxExtents) ||
        stash_handle_fds_ + want_fds > kMaxStashedHandleFds) {
      (void)fail_protocol_locked("control message: too many handles sent ahead of their messages");
      return false;
    }
    auto h = HandlesPtr(new Handles());
    std::size_t f = 0;
    for (std::uint32_t k = 0; k < count; ++k) {
      Handle& item = h->items[k];
      item.meta = pkt.meta[k];
      item.incoming = true;
      item.fd = std::move(fds[f++]);
      if (item.meta.kind == static_cast<std::uint32_t>(shm::WireHandle::ChannelEnd)) {
        item.fd2 = std::move(fds[f++]);
        if (item.meta.doorbell_gen != 0) item.fd3 = std::move(fds[f++]);
      }
    }
    h->count = count;
    stash_handle_fds_ += static_cast<std::uint32_t>(want_fds);
    ++stash_unclaimed_;
    stash_handles_.push_back(StashedHandles{m.id, m.gen, (m.aux & shm::kHandlesForReply) != 0,
                                            static_cast<std::uint32_t>(want_fds), false,
                                            std::move(h)});
    return true;
  }
  if (r->bytes != sizeof(m) || r->nfds != 1) {
    (void)fail_protocol_locked("control message malformed");
    return false;
  }
  if (m.type == static_cast<std::uint32_t>(shm::CtlType::Extent) && m.id < kMaxExtents &&
      (m.aux & ~(shm::kExtentSealed | shm::kExtentReplace)) == 0) {
    Stashed st{std::move(fds[0]), m.gen, (m.aux & shm::kExtentSealed) != 0};
    if ((m.aux & shm::kExtentReplace) != 0) {
      stash_replace_[m.id] = std::move(st);  // one per id: a newer one replaces (closes) it
    } else {
      stash_ext_[m.id] = std::move(st);
    }
  } else if (m.type == static_cast<std::uint32_t>(shm::CtlType::Doorbell)) {
    stash_doorbell_ = Stashed{std::move(fds[0]), m.gen};
  } else {
    (void)fail_protocol_locked("control message type");
    return false;
  }
  return true;
}

bool Endpoint::handles_arrived_locked(const Desc& d, HandlesOf of) {
  const bool reply = of == HandlesOf::Reply;
  StashedHandles* found = nullptr;
  auto match = [&] {
    for (auto& st : stash_handles_) {
      if (st.id == d.buffer && st.gen == d.gen && st.reply == reply && !st.claimed) {
        found = &st;
        return true;
      }
    }
    return false;
  };
  if (!drain_until(match) || found == nullptr) return false;
  // Its descriptor is accepted (the caller commits right after): no longer "sent ahead".
  found->claimed = true;
  stash_handle_fds_ -= found->fds;
  --stash_unclaimed_;
  return true;
}

HandlesPtr Endpoint::take_handles_locked(const Desc& d, HandlesOf of) {
  const bool reply = of == HandlesOf::Reply;
  for (auto it = stash_handles_.begin(); it != stash_handles_.end(); ++it) {
    if (it->id == d.buffer && it->gen == d.gen && it->reply == reply && it->claimed) {
      HandlesPtr h = std::move(it->h);
      stash_handles_.erase(it);
      return h;
    }
  }
  return nullptr;
}

Result<bool> Endpoint::send_handles_locked(Buffer& b, HandlesOf of) {
  const bool reply = of == HandlesOf::Reply;
  Handles& hs = *b.handles_;
  struct {
    shm::CtlMsg h;
    shm::HandleMeta meta[shm::kMaxHandles];
  } pkt{};
  std::array<int, os::kMaxFdsPerMsg> fds{};
  std::uint32_t count = 0;
  std::size_t nfds = 0;
  for (std::uint32_t k = 0; k < hs.count; ++k) {
    const Handle& item = hs.items[k];
    if (item.meta.kind == 0 || item.incoming) continue;  // taken, or the request's own
    if (count == seg_.geometry().max_handles)
      return fail(Errc::InvalidArgument, "send: more handles than the channel's max_handles");
    pkt.meta[count++] = item.meta;
    fds[nfds++] = item.fd.get();
    if (item.fd2) fds[nfds++] = item.fd2.get();
    if (item.fd3) fds[nfds++] = item.fd3.get();
  }
  if (count == 0) return false;
  pkt.h = shm::CtlMsg{static_cast<std::uint32_t>(shm::CtlType::Handles), b.id_, b.gen_,
                      count | (reply ? shm::kHandlesForReply : 0u)};
  MBMQ_TRY(send_ctl_locked({reinterpret_cast<const std::byte*>(&pkt),
                            sizeof(shm::CtlMsg) + count * sizeof(shm::HandleMeta)},
                           {fds.data(), nfds}));
  return true;
}

Status Endpoint::send_locked(Buffer& b, DescKind kind, OwnState lent_as) {
  if (b.ep_.get() != this || b.origin_ != Buffer::Origin::Own)
    return fail(Errc::InvalidArgument, "send: not a buffer of this channel's end");
  OwnState* st = own_state(b.id_);
  if (st == nullptr || *st != OwnState::App)
    return fail(Errc::InvalidArgument, "send: buffer state");
  const std::uint32_t limit = seg_.geometry().max_in_flight;
  if (kind == DescKind::Request && limit != 0 && requests_out_ >= limit)
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
  if (Status prep = prepare_send_locked(b); !prep) {
    // The buffer stays valid and usable, or (its bytes unreachable) becomes invalid: never a
    // valid buffer over unmapped memory.
    if ((b.id_ & kExtentBit) != 0 && !own_ext_[b.id_ & ~kExtentBit].map.valid()) {
      free_own(b.id_);
      detach_buffer(b);
    }
    return prep;
  }
  if ((b.id_ & kExtentBit) != 0) {
    OwnExtent& x = own_ext_[b.id_ & ~kExtentBit];
    if (x.sent_gen != x.gen) {
      // (P3) The extent's fd travels before the first descriptor naming it.
      shm::CtlMsg m{static_cast<std::uint32_t>(shm::CtlType::Extent), b.id_ & ~kExtentBit, x.gen,
                    x.sealed ? shm::kExtentSealed : 0u};
      int fd = x.fd.get();
      MBMQ_TRY(send_ctl_locked(bytes_of(m), {&fd, 1}));
      x.sent_gen = x.gen;
    }
  }
  std::uint16_t k = static_cast<std::uint16_t>(kind);
  if (b.handles_) {
    if (MBMQ_TRY(send_handles_locked(b, HandlesOf::Message))) k |= shm::kDescHasHandles;
    b.handles_.reset();  // sent: the receiver's copies are the live ones
  }
  MBMQ_TRY(push_locked(Desc{b.id_, b.size_, b.gen_, k, 0}));
  *st = lent_as;
  if (kind == DescKind::Request) ++requests_out_;
  return {};
}

Status Endpoint::send(Buffer&& b, DescKind kind) {
  std::lock_guard lock(mu_);
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open) return fail(closed_errc(s), "send");
  MBMQ_TRY(send_locked(b, kind,
                       kind == DescKind::Request ? OwnState::LentRequest : OwnState::LentOneWay));
  detach_buffer(b);
  MBMQ_CRASH_POINT("send.sent");
  return {};
}

Status Endpoint::reply(Buffer&& b) {
  if (b.origin_ != Buffer::Origin::Peer || b.kind_ != static_cast<std::uint16_t>(DescKind::Request))
    return fail(Errc::InvalidArgument, "reply: not a received request");
  // Keeps us alive to the end of this function (the buffer may hold the last reference): declared
  // before the lock so it is released after the unlock. Moved, not copied: two atomic
  // reference-count updates fewer per reply.
  std::shared_ptr<Endpoint> keep = std::move(b.ep_);
  std::lock_guard lock(mu_);
  if ((b.id_ & kExtentBit) != 0) {
    peer_ext_[b.id_ & ~kExtentBit].held = false;
  } else {
    peer_held_[b.id_ - static_cast<std::uint32_t>(1 - side_) * n_] = false;
  }
  std::uint32_t id = b.id_, size = b.size_, gen = b.gen_;
  if (requests_in_ > 0) --requests_in_;
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open) {
    detach_buffer(b);
    // Closed here (Channel::close) or by the peer: either way the caller will not get it; not a
    // mistake of the replier's (a server loop goes on).
    return fail(s == EpState::Protocol ? Errc::Protocol : Errc::PeerClosed, "reply");
  }
  std::uint16_t k = static_cast<std::uint16_t>(DescKind::Reply);
  // (P7b) A sealed extent cannot take the answer, nor may an untrusted caller get more than
  // copy_threshold bytes unsealed: it goes back in a replacement memfd.
  const bool extent = (id & kExtentBit) != 0;
  const bool replace =
      extent && (peer_ext_[id & ~kExtentBit].sealed || (untrusted_peer_ && size > copy_threshold_));
  // Room first when a control message precedes the descriptor (P3b, P7b): it must follow.
  // It always has room in an honest ring (free_own()): full, the peer cheated (push_locked()).
  if ((replace || b.handles_) && tx_.has_room() != shm::RingStatus::Ok) {
    detach_buffer(b);
    return fail(fail_protocol_locked("reply: ring full although every buffer's entry fits"));
  }
  // The control socket is full because the caller is slow (send_ctl_locked): the answer is kept,
  // the buffer stays the application's, and reply() says WouldBlock, to be retried. A packet
  // already sent for this reply (the replacement) is replaced by the retry's (one per id).
  auto keep_for_retry = [&] {
    if (extent) {
      peer_ext_[id & ~kExtentBit].held = true;
    } else {
      peer_held_[id - static_cast<std::uint32_t>(1 - side_) * n_] = true;
    }
    ++requests_in_;
    b.ep_ = std::move(keep);
    return fail(Errc::WouldBlock, "reply: the caller's control socket is full; retry");
  };
  Status copied;
  if (replace) {
    // A retry after back-pressure does not send a second replacement for the same generation
    // (the caller takes the first one it reads): the answer is the bytes of the first attempt.
    PeerExtent& pe = peer_ext_[id & ~kExtentBit];
    if (pe.replaced_gen != gen) {
      copied = send_replacement_locked(id & ~kExtentBit, gen, b.data_, size);
      if (!copied && copied.error().code == Errc::WouldBlock) return keep_for_retry();
      if (copied) pe.replaced_gen = gen;
    }
    k |= shm::kDescReplaced;
  } else if (shadowed(b)) {  // (P5b) an untrusted end's answer is in its private copy
    if (extent) {
      copied = os::pwrite_full(peer_ext_[id & ~kExtentBit].fd.get(), {b.data_, size}, 0);
    } else {
      std::memcpy(seg_.slot(id), b.data_, size);
    }
  }
  if (!copied) {
    detach_buffer(b);
    // The caller is not left waiting: it gets NoReply.
    (void)push_locked(Desc{id, 0, gen, static_cast<std::uint16_t>(DescKind::Reply),
                           static_cast<std::uint16_t>(shm::DescStatus::NoReply)});
    return copied;
  }
  if (b.handles_) {
    auto sent = send_handles_locked(b, HandlesOf::Reply);
    if (!sent) {
      // Too many handles for the channel: the replier's mistake, to fix and retry.
      if (sent.error().code == Errc::WouldBlock || sent.error().code == Errc::InvalidArgument) {
        Error e = sent.error();
        (void)keep_for_retry();
        return fail(e);
      }
      // The handles cannot go (ETOOMANYREFS, ENOBUFS, the caller gone): an answer without the
      // handles it announces would be a silent loss. The caller gets NoReply; we get the error.
      // A replacement already sent travels with it (flagged), so the caller consumes it rather
      // than finding it stale at its next reply.
      detach_buffer(b);
      std::uint16_t nk = static_cast<std::uint16_t>(DescKind::Reply);
      if (replace && peer_ext_[id & ~kExtentBit].replaced_gen == gen) nk |= shm::kDescReplaced;
      if (extent) peer_ext_[id & ~kExtentBit].replaced_gen = 0;
      (void)push_locked(Desc{id, 0, gen, nk, static_cast<std::uint16_t>(shm::DescStatus::NoReply)});
      return fail(sent.error());
    }
    if (*sent) k |= shm::kDescHasHandles;
    b.handles_.reset();
  }
  if (extent) peer_ext_[id & ~kExtentBit].replaced_gen = 0;
  detach_buffer(b);
  MBMQ_CRASH_POINT("reply.before_send");
  // (P7) The answer travels in the request's own buffer.
  Status pushed = push_locked(Desc{id, size, gen, k, 0});
  MBMQ_CRASH_POINT("reply.sent");
  return pushed;
}

// ---- (P5) receiving ----------------------------------------------------------------------------

const char* Endpoint::map_extent_fd(int fd, bool announced_sealed, os::Access unsealed_access,
                                    std::uint32_t payload, os::Mapping* map, bool* sealed) {
  // Only a memfd sealed against shrinking can be mapped without risking SIGBUS later.
  auto seals = os::get_seals(fd);
  if (!seals || (*seals & os::kSealsFixedSize) != os::kSealsFixedSize)
    return "extent memfd not sealed against shrinking";
  *sealed = (*seals & os::kSealsImmutable) == os::kSealsImmutable;
  if (announced_sealed && !*sealed)
    return "extent announced sealed lacks F_SEAL_WRITE|SHRINK|GROW|SEAL";
  auto fsize = os::file_size(fd);
  if (!fsize || *fsize == 0 || *fsize > shm::kMaxExtentSize) return "extent size";
  // Immutable: copy-on-write (no writable shared mapping of it can exist). Faulted in as far as
  // the payload only: the file may be a sparse 4 GiB (the peer budget).
  auto m = os::Mapping::map_shared(fd, *fsize, *sealed ? os::Access::CopyOnWrite : unsealed_access);
  if (!m) return "extent mmap failed";
  m->populate(payload);
  *map = std::move(*m);
  return nullptr;
}

const char* Endpoint::map_peer_extent(std::uint32_t e, std::uint32_t gen, std::uint32_t size) {
  PeerExtent& pe = peer_ext_[e];
  if (pe.held) return "receive: the peer reused an extent we still hold";
  if (!pe.map.valid() || pe.gen != gen) {
    (void)drain_until([&] { return stash_ext_[e].fd && stash_ext_[e].gen == gen; });
    Stashed& st = stash_ext_[e];
    if (!st.fd || st.gen != gen) return "receive: extent descriptor without its memfd";
    os::UniqueFd fd = std::move(st.fd);
    // Untrusted: read-only, answers go back with pwrite (P5b). Else shared, read-write: the
    // answer is written in place.
    os::Mapping map;
    bool sealed = false;
    if (const char* why = map_extent_fd(
            fd.get(), st.sealed, untrusted_me_ ? os::Access::ReadOnly : os::Access::ReadWrite, size,
            &map, &sealed))
      return why;
    pe.map = std::move(map);
    pe.fd = std::move(fd);
    pe.gen = gen;
    pe.sealed = sealed;
  }
  if (size > pe.map.size()) return "receive: payload larger than its extent";
  if (untrusted_me_ && size > copy_threshold_ && !pe.sealed)
    return "receive (untrusted): payload above copy_threshold not in a sealed memfd";
  return nullptr;
}

// ---- trust (P3c, P5b, P7b) ----------------------------------------------------------------------

bool Endpoint::shadowed(const Buffer& b) const noexcept {
  if (!untrusted_me_ || b.data_ == nullptr) return false;
  if ((b.id_ & kExtentBit) == 0) return b.data_ != seg_.slot(b.id_);
  const std::uint32_t e = b.id_ & ~kExtentBit;
  return b.data_ !=
         (b.origin_ == Buffer::Origin::Own ? own_ext_[e].map.data() : peer_ext_[e].map.data());
}

Status Endpoint::fresh_extent_locked(OwnExtent& x, const std::byte* src, std::size_t size,
                                     std::size_t cap) {
  MBMQ_ASSERT(size <= cap);
  auto fd = MBMQ_TRY(os::make_sealed_memfd("mbmq-extent", cap));
  auto map =
      MBMQ_TRY(os::Mapping::map_shared(fd.get(), cap, os::Access::ReadWrite, os::Prefault::Yes));
  if (size > 0) std::memcpy(map.data(), src, size);
  x.fd = std::move(fd);
  x.map = std::move(map);
  x.sealed = false;
  x.gen = take_extent_gen_locked();
  x.sent_gen = 0;
  return {};
}

Status Endpoint::seal_extent_locked(OwnExtent& x, std::size_t size) {
  // (P3c) No writable shared mapping may exist for F_SEAL_WRITE: drop ours first.
  const std::size_t cap = x.map.size();
  x.map.reset();
  Status s = seal_unmapped_locked(x, cap, size);
  if (!s && !x.map.valid()) {
    // Map the bytes back: writable and shared while the file is unsealed, else copy-on-write
    // (then it is immutable: a new generation, sent as sealed). Failing that, x.map stays empty
    // and the caller drops the buffer.
    auto seals = os::get_seals(x.fd.get());
    const bool immutable = seals && (*seals & os::kSealsImmutable) == os::kSealsImmutable;
    auto m = os::Mapping::map_shared(x.fd.get(), cap,
                                     immutable ? os::Access::CopyOnWrite : os::Access::ReadWrite);
    if (m) {
      x.map = std::move(*m);
      if (immutable && !x.sealed) {
        x.sealed = true;
        x.gen = take_extent_gen_locked();
        x.sent_gen = 0;
      }
    }
  }
  return s;
}

Status Endpoint::seal_unmapped_locked(OwnExtent& x, std::size_t cap, std::size_t size) {
  if (!os::add_seals(x.fd.get(), os::kSealWrite | os::kSealSeal)) {
    // Someone else still maps it writable (or it may not be sealed): seal a fresh copy instead.
    auto back = MBMQ_TRY(os::Mapping::map_shared(x.fd.get(), cap, os::Access::ReadOnly));
    MBMQ_TRY(fresh_extent_locked(x, back.data(), size, cap));
    x.map.reset();
    MBMQ_TRY(os::add_seals(x.fd.get(), os::kSealWrite | os::kSealSeal));
  }
  x.map = MBMQ_TRY(os::Mapping::map_shared(x.fd.get(), cap, os::Access::CopyOnWrite));
  x.sealed = true;
  x.gen = take_extent_gen_locked();
  x.sent_gen = 0;
  return {};
}

Status Endpoint::prepare_send_locked(Buffer& b) {
  if ((b.id_ & kExtentBit) == 0) {
    if (shadowed(b)) std::memcpy(seg_.slot(b.id_), b.data_, b.size_);  // (P5b) copy back
    return {};
  }
  OwnExtent& x = own_ext_[b.id_ & ~kExtentBit];
  const bool seal = untrusted_peer_ && b.size_ > copy_threshold_;
  const bool view = b.data_ == x.map.data();
  if (x.sealed) {
    // Its bytes are in our private view (or a private copy): they go out in a fresh extent.
    MBMQ_TRY(fresh_extent_locked(x, b.data_, b.size_, x.map.size()));
    if (view) b.data_ = x.map.data();  // the view was the old mapping, now gone
  } else if (shadowed(b)) {
    std::memcpy(x.map.data(), b.data_, b.size_);
  }
  if (seal) {
    Status sealed = seal_extent_locked(x, b.size_);
    if (!sealed) {
      if (x.map.valid() && (view || !shadowed(b))) {
        b.data_ = x.map.data();
        b.capacity_ = static_cast<std::uint32_t>(x.map.size());
      }
      b.gen_ = x.gen;
      return sealed;
    }
  }
  b.data_ = x.map.data();
  b.capacity_ = static_cast<std::uint32_t>(x.map.size());
  b.gen_ = x.gen;
  return {};
}

Status Endpoint::send_replacement_locked(std::uint32_t e, std::uint32_t gen, const std::byte* src,
                                         std::uint32_t size) {
  const std::size_t cap = std::max<std::size_t>(4096, (std::size_t{size} + 4095) / 4096 * 4096);
  auto fd = MBMQ_TRY(os::make_sealed_memfd("mbmq-reply", cap));
  if (size > 0) MBMQ_TRY(os::pwrite_full(fd.get(), {src, size}, 0));  // no mapping to drop
  std::uint32_t aux = shm::kExtentReplace;
  if (untrusted_peer_ && size > copy_threshold_) {
    MBMQ_TRY(os::add_seals(fd.get(), os::kSealWrite | os::kSealSeal));
    aux |= shm::kExtentSealed;
  }
  shm::CtlMsg m{static_cast<std::uint32_t>(shm::CtlType::Extent), e, gen, aux};
  int raw = fd.get();
  return send_ctl_locked(bytes_of(m), {&raw, 1});
}

const char* Endpoint::prepare_replacement_locked(const Desc& d, os::UniqueFd* fd_out,
                                                 os::Mapping* map_out, bool* sealed_out) {
  if ((d.buffer & kExtentBit) == 0) return "reply: a replaced buffer that is not an extent";
  const std::uint32_t e = d.buffer & ~kExtentBit;
  if (e >= kMaxExtents) return "reply: replaced extent id";
  (void)drain_until([&] { return stash_replace_[e].fd && stash_replace_[e].gen == d.gen; });
  Stashed& st = stash_replace_[e];
  if (!st.fd || st.gen != d.gen) return "reply: replacement announced but not sent";
  os::UniqueFd fd = std::move(st.fd);
  os::Mapping map;
  bool sealed = false;
  if (const char* why =
          map_extent_fd(fd.get(), st.sealed, os::Access::ReadWrite, d.size, &map, &sealed))
    return why;
  if (untrusted_me_ && d.size > copy_threshold_ && !sealed)
    return "reply (untrusted): answer above copy_threshold not in a sealed memfd";
  if (map.size() < d.size) return "reply: replacement smaller than the answer";
  *fd_out = std::move(fd);
  *map_out = std::move(map);
  *sealed_out = sealed;
  return nullptr;
}

void Endpoint::own_view_locked(Buffer& b, std::uint32_t size) {
  std::byte* shared = own_data(b.id_);
  std::uint32_t cap = own_capacity(b.id_);
  if ((b.id_ & kExtentBit) != 0) b.gen_ = own_ext_[b.id_ & ~kExtentBit].gen;
  b.data_ = shared;
  b.capacity_ = cap;
  if (!untrusted_me_) return;
  if ((b.id_ & kExtentBit) == 0) {
    b.data_ = slot_shadow(b.id_);
  } else {
    OwnExtent& x = own_ext_[b.id_ & ~kExtentBit];
    if (x.sealed) return;  // immutable for the peer: nothing to copy
    const std::uint32_t shadow_cap = std::min(cap, copy_threshold_);
    if (x.shadow.size() < shadow_cap) x.shadow.resize(shadow_cap);  // grows, then reused
    b.data_ = x.shadow.data();
    b.capacity_ = shadow_cap;
  }
  std::memcpy(b.data_, shared, size);  // (P5b) the one copy; later peer writes change nothing
}

Endpoint::Accepted Endpoint::accept(const Desc& d, const Buffer* call_buf,
                                    std::uint16_t* call_status) {
  const std::uint16_t kind = d.kind & static_cast<std::uint16_t>(~shm::kDescFlags);
  const bool with_handles = (d.kind & shm::kDescHasHandles) != 0;
  const bool replaced = (d.kind & shm::kDescReplaced) != 0;
  if (replaced && kind != static_cast<std::uint16_t>(DescKind::Reply))
    return bad("receive: a replacement on a descriptor that is not a reply");
  switch (static_cast<DescKind>(kind)) {
    case DescKind::Request:
    case DescKind::OneWay: {  // the peer's buffer, lent to us
      const std::uint32_t limit = seg_.geometry().max_in_flight;
      if (kind == static_cast<std::uint16_t>(DescKind::Request) && limit != 0 &&
          requests_in_ >= limit)
        return bad("receive: the peer exceeded the channel's in-flight limit");
      if ((d.buffer & kExtentBit) != 0) {
        std::uint32_t e = d.buffer & ~kExtentBit;
        if (e >= kMaxExtents) return bad("receive: invalid extent descriptor");
        if (const char* why = map_peer_extent(e, d.gen, d.size)) return bad(why);
        if (with_handles && !handles_arrived_locked(d, HandlesOf::Message))
          return bad("receive: handles announced but not sent");
        peer_ext_[e].held = true;
      } else {
        std::uint32_t first = static_cast<std::uint32_t>(1 - side_) * n_;
        if (d.buffer < first || d.buffer - first >= n_ || d.size > slot_size_)
          return bad("receive: invalid slot descriptor");
        if (peer_held_[d.buffer - first]) return bad("receive: a buffer sent twice");
        if (with_handles && !handles_arrived_locked(d, HandlesOf::Message))
          return bad("receive: handles announced but not sent");
        peer_held_[d.buffer - first] = true;
      }
      if (kind == static_cast<std::uint16_t>(DescKind::Request)) ++requests_in_;
      return Accepted::Deliver;
    }
    case DescKind::Reply:
    case DescKind::Return: {  // our buffer, coming back
      OwnState* st = own_state(d.buffer);
      if (st == nullptr) return bad("receive: reply names no buffer of ours");
      const bool extent = (d.buffer & kExtentBit) != 0;
      std::uint32_t gen = extent
                              ? own_ext_[d.buffer & ~kExtentBit].gen
                              : own_slots_[d.buffer - static_cast<std::uint32_t>(side_) * n_].gen;
      if (gen != d.gen || *st == OwnState::Free || *st == OwnState::App)
        return bad("receive: reply for a buffer not lent");
      if (kind == static_cast<std::uint16_t>(DescKind::Return)) {
        if (*st != OwnState::LentOneWay || with_handles || d.size > own_capacity(d.buffer))
          return bad("receive: invalid return");
        free_own(d.buffer);
        return Accepted::Internal;
      }
      // Every check first, then the commit: a rejected reply changes nothing of ours (P7b).
      if (d.status > static_cast<std::uint16_t>(shm::DescStatus::NoReply))
        return bad("receive: reply status");
      if (*st == OwnState::LentCall && (call_buf == nullptr || call_buf->id_ != d.buffer))
        return bad("receive: reply for a call not waiting");
      if (*st != OwnState::LentCall && *st != OwnState::Abandoned && *st != OwnState::LentRequest)
        return bad("receive: reply for a one-way message");
      os::UniqueFd rfd;
      os::Mapping rmap;
      bool rsealed = false;
      if (replaced) {
        if (const char* why = prepare_replacement_locked(d, &rfd, &rmap, &rsealed)) return bad(why);
      } else {
        if (untrusted_me_ && extent && d.size > copy_threshold_ &&
            !own_ext_[d.buffer & ~kExtentBit].sealed)
          return bad("reply (untrusted): answer above copy_threshold in shared memory");
        if (d.size > own_capacity(d.buffer)) return bad("receive: reply larger than its buffer");
      }
      if (with_handles && !handles_arrived_locked(d, HandlesOf::Reply))
        return bad("receive: handles announced but not sent");
      if (replaced) {  // commit (P7b): the old generation is stale for the peer, the fd is resent
        OwnExtent& x = own_ext_[d.buffer & ~kExtentBit];
        x.fd = std::move(rfd);
        x.map = std::move(rmap);
        x.sealed = rsealed;
        x.gen = take_extent_gen_locked();
        x.sent_gen = 0;
      }
      switch (*st) {
        case OwnState::LentCall:
          *st = OwnState::App;
          *call_status = d.status;
          if (requests_out_ > 0) --requests_out_;
          return Accepted::CallDone;
        case OwnState::Abandoned:  // the late reply to a call that timed out
          if (with_handles)
            (void)take_handles_locked(d, HandlesOf::Reply);  // closed: nobody waits for them
          free_own(d.buffer);
          if (requests_out_ > 0) --requests_out_;
          return Accepted::Internal;
        default:  // LentRequest
          *st = OwnState::App;
          if (requests_out_ > 0) --requests_out_;
          return Accepted::Deliver;
      }
    }
    case DescKind::ReleaseExtent: {
      if ((d.buffer & kExtentBit) == 0 || with_handles) return bad("receive: invalid release");
      std::uint32_t e = d.buffer & ~kExtentBit;
      if (e >= kMaxExtents || peer_ext_[e].held) return bad("receive: invalid release");
      if (peer_ext_[e].gen == d.gen) {
        peer_ext_[e].map.reset();
        peer_ext_[e].fd.reset();
      }
      return Accepted::Internal;
    }
  }
  return bad("receive: unknown descriptor kind");
}

void Endpoint::make_message(const Desc& d, Message* out) {
  Buffer& b = out->buffer;
  b.reset();
  const std::uint16_t kind = d.kind & static_cast<std::uint16_t>(~shm::kDescFlags);
  if ((d.kind & shm::kDescHasHandles) != 0)
    b.handles_ = take_handles_locked(d, kind == static_cast<std::uint16_t>(DescKind::Reply)
                                            ? HandlesOf::Reply
                                            : HandlesOf::Message);
  b.ep_ = shared_from_this();
  b.id_ = d.buffer;
  b.gen_ = d.gen;
  b.size_ = d.size;
  b.kind_ = kind;
  out->key = key_.load(std::memory_order_relaxed);
  out->error = Errc::PeerClosed;
  if (kind == static_cast<std::uint16_t>(DescKind::Reply)) {
    b.origin_ = Buffer::Origin::Own;
    own_view_locked(b, d.size);
    out->kind = Kind::Reply;
    if (d.status == static_cast<std::uint16_t>(shm::DescStatus::NoReply))
      out->error = Errc::NoReply;
    return;
  }
  b.origin_ = Buffer::Origin::Peer;
  if ((d.buffer & kExtentBit) != 0) {
    PeerExtent& pe = peer_ext_[d.buffer & ~kExtentBit];
    b.data_ = pe.map.data();
    b.capacity_ = static_cast<std::uint32_t>(pe.map.size());
    if (untrusted_me_ && !pe.sealed) {
      // (P5b) The one copy, before the application sees a byte.
      const std::uint32_t cap = std::min(b.capacity_, copy_threshold_);
      if (pe.shadow.size() < cap) pe.shadow.resize(cap);  // grows, then reused
      std::memcpy(pe.shadow.data(), pe.map.data(), d.size);
      b.data_ = pe.shadow.data();
      b.capacity_ = cap;
    }
  } else {
    b.data_ = seg_.slot(d.buffer);
    b.capacity_ = slot_size_;
    if (untrusted_me_) {
      std::memcpy(slot_shadow(d.buffer), b.data_, d.size);  // (P5b)
      b.data_ = slot_shadow(d.buffer);
    }
  }
  out->kind = kind == static_cast<std::uint16_t>(DescKind::Request) ? Kind::Request : Kind::Message;
  if (out->kind == Kind::Request) MBMQ_CRASH_POINT("receive.got_request");
}

bool Endpoint::backing(const Buffer& b, int* fd, std::uint64_t* offset) const {
  std::lock_guard lock(mu_);
  if (b.ep_.get() != this || b.data_ == nullptr) return false;
  if ((b.id_ & kExtentBit) == 0) {
    if (b.id_ >= seg_.total_slots() || b.data_ != seg_.slot(b.id_)) return false;
    *fd = seg_.fd();
    *offset = static_cast<std::uint64_t>(seg_.slot(b.id_) - seg_.base());
    return true;
  }
  const std::uint32_t e = b.id_ & ~kExtentBit;
  if (e >= kMaxExtents) return false;
  if (b.origin_ == Buffer::Origin::Own) {
    if (b.data_ != own_ext_[e].map.data() || !own_ext_[e].fd || own_ext_[e].sealed) return false;
    *fd = own_ext_[e].fd.get();
  } else {
    if (b.data_ != peer_ext_[e].map.data() || !peer_ext_[e].fd || peer_ext_[e].sealed) return false;
    *fd = peer_ext_[e].fd.get();
  }
  *offset = 0;
  return true;
}

int Endpoint::extent_fd_for_test(const Buffer& b) const {
  std::lock_guard lock(mu_);
  if (b.ep_.get() != this || (b.id_ & kExtentBit) == 0 || b.origin_ != Buffer::Origin::Own)
    return -1;
  return own_ext_[b.id_ & ~kExtentBit].fd.get();
}

Status Endpoint::forge_extent_request_for_test(int fd, std::uint32_t gen, std::uint32_t size,
                                               std::uint32_t aux) {
  std::lock_guard lock(mu_);
  shm::CtlMsg m{static_cast<std::uint32_t>(shm::CtlType::Extent), 0, gen, aux};
  MBMQ_TRY(send_ctl_locked(bytes_of(m), {&fd, 1}));
  return push_locked(
      Desc{kExtentBit | 0, size, gen, static_cast<std::uint16_t>(DescKind::Request), 0});
}

void Endpoint::pending_push(const Desc& d) noexcept {
  MBMQ_ASSERT(pending_count_ < pending_.size());  // each entry names a distinct buffer
  pending_[(pending_head_ + pending_count_++) % pending_.size()] = d;
  pending_nonempty_.store(1, std::memory_order_relaxed);
}

bool Endpoint::pending_pop(Desc* d) noexcept {
  if (pending_count_ == 0) return false;
  *d = pending_[pending_head_];
  pending_head_ = static_cast<std::uint32_t>((pending_head_ + 1) % pending_.size());
  if (--pending_count_ == 0) pending_nonempty_.store(0, std::memory_order_relaxed);
  return true;
}

Error Endpoint::fail_protocol_locked(const char* op) noexcept {
  EpState expected = EpState::Open;
  if (state_.compare_exchange_strong(expected, EpState::Protocol)) {
    why_bad_ = op;  // for the final Kind::PeerClosed message (Message::why)
    // Close the channel for both sides: the peer sees the hang-up (P8).
    if (control_) os::shutdown_socket(control_.get());
    // What the peer parked here goes now, not when the end is destroyed (the peer budget). The
    // handles of messages already accepted stay with them (they are still delivered).
    std::erase_if(stash_handles_, [](const StashedHandles& st) { return !st.claimed; });
    stash_handle_fds_ = 0;
    stash_unclaimed_ = 0;
    for (std::uint32_t e = 0; e < kMaxExtents; ++e) {
      stash_ext_[e] = Stashed{};
      stash_replace_[e] = Stashed{};
    }
    stash_doorbell_ = Stashed{};
    in_.doorbell.fetch_add(1, std::memory_order_release);
    (void)os::futex_wake(&in_.doorbell, INT_MAX);
  }
  return Error::make(Errc::Protocol, op);
}

Endpoint::Poll Endpoint::poll(Message* out) {
  if (!inbound_ready()) return Poll::Empty;
  std::lock_guard lock(mu_);
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
    if (s != EpState::Protocol && rx_.pop(&d) == shm::RingStatus::Ok) {
      Accepted a = accept(d, nullptr, nullptr);
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
  std::lock_guard lock(mu_);
  (void)fail_protocol_locked("receive: ring tail inconsistent with its entries");
  return false;
}

void Endpoint::set_consumer_sleeping(bool sleeping) noexcept {
  // Relaxed: the queue issues the seq_cst fence of (P6) after setting all of them.
  in_.consumer_sleeping.store(sleeping ? 1u : 0u, std::memory_order_relaxed);
}

// ---- waiting (P6) -----------------------------------------------------------------------------

void Endpoint::wait_inbound(Deadline deadline, WaitPolicy policy, WaitFor what) {
  auto ready = [&] { return what == WaitFor::Ring ? ring_ready() : inbound_ready(); };
  if (policy.mode != WaitMode::Sleep) {
    // The clock is first read after 64 looks: a reply that comes at once costs no clock read.
    std::int64_t start = 0;
    for (std::uint32_t i = 0;; ++i) {
      if (ready()) return;
      cpu_relax();
      if ((i & 63) == 63) {
        std::int64_t now = monotonic_ns();
        if (start == 0) start = now;
        if (!deadline.is_never() && now >= deadline.ns()) return;
        if (policy.mode == WaitMode::Adaptive && now - start >= policy.spin.count()) break;
      }
    }
  }
  // (P6) Read the word first: a wake after this read changes it, so FUTEX_WAIT returns at once.
  // Pairs with the producer's fetch_add(release) in (P4).
  std::uint32_t v = in_.doorbell.load(std::memory_order_acquire);
  in_.consumer_sleeping.store(1, std::memory_order_relaxed);
  // Pairs with the producer's fence in (P4).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (!ready() && check_ring()) {
    std::int64_t rem = deadline.remaining_ns();
    if (deadline.is_never() || rem > 0)
      (void)os::futex_wait(&in_.doorbell, v, deadline.is_never() ? -1 : rem);
  }
  in_.consumer_sleeping.store(0, std::memory_order_relaxed);
}

Status Endpoint::call(Buffer& b, Deadline deadline) {
  if (redirected_.load(std::memory_order_relaxed))
    return fail(Errc::InvalidArgument, "call: end is redirected to a queue (use send_request)");
  // One call at a time on an end: a second caller sleeps here until its own deadline (the buffer
  // is then still the caller's: it was never sent).
  std::unique_lock consumer(consumer_mu_, std::defer_lock);
  if (!consumer_mu_.lock_until(deadline))
    return fail(Errc::TimedOut, "call: another call on this channel did not finish in time");
  consumer = std::unique_lock(consumer_mu_, std::adopt_lock);
  if (redirected_.load(std::memory_order_relaxed))  // redirected while we waited for the lock
    return fail(Errc::InvalidArgument, "call: end is redirected to a queue (use send_request)");
  MBMQ_TRY(ensure_watched());
  const WaitPolicy policy = wait_policy();
  {
    std::lock_guard lock(mu_);
    EpState s = state_.load(std::memory_order_acquire);
    if (s != EpState::Open) return fail(closed_errc(s), "call");
    MBMQ_TRY(send_locked(b, DescKind::Request, OwnState::LentCall));
  }
  MBMQ_CRASH_POINT("call.sent");
  for (;;) {
    // Only the ring matters here: messages already set aside for receive() must not keep this
    // loop from sleeping or from its deadline.
    if (ring_ready()) {
      std::lock_guard lock(mu_);
      // A ring's worth per pass, then the deadline: a peer that floods descriptors (release hints,
      // returns) must not keep the call past it.
      for (std::uint32_t i = 0; i < shm::kRingCapacity; ++i) {
        if (state_.load(std::memory_order_acquire) == EpState::Protocol) break;
        Desc d;
        if (rx_.pop(&d) != shm::RingStatus::Ok) break;
        std::uint16_t status = 0;
        Accepted a = accept(d, &b, &status);
        if (a == Accepted::CallDone) {
          MBMQ_CRASH_POINT("call.got_reply");
          b.size_ = d.size;
          own_view_locked(b, d.size);
          if ((d.kind & shm::kDescHasHandles) != 0)
            b.handles_ = take_handles_locked(d, HandlesOf::Reply);
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
        OwnState* st = own_state(b.id_);
        if (st != nullptr && *st == OwnState::LentCall) {
          *st = OwnState::App;
          if (requests_out_ > 0) --requests_out_;
        }
        reclaim_lent_locked();
        return fail(closed_errc(s), "call");
      }
    }
    // After a pass over the ring (so a reply already there is taken, not abandoned).
    if (deadline.expired()) {
      std::lock_guard lock(mu_);
      // The callee may still write the buffer: give it up; its late reply frees it.
      OwnState* st = own_state(b.id_);
      if (st != nullptr && *st == OwnState::LentCall) *st = OwnState::Abandoned;
      detach_buffer(b);
      return fail(Errc::TimedOut, "call");
    }
    if (!ring_ready()) wait_inbound(deadline, policy, WaitFor::Ring);
  }
}

Status Endpoint::reply_message(Buffer&& b) {
  if (!b.ep_) return fail(Errc::InvalidArgument, "reply: empty buffer");
  Endpoint* ep = b.ep_.get();  // reply() takes the buffer's reference before anything else
  return ep->reply(std::move(b));
}

Result<Message> Endpoint::receive(Deadline deadline) {
  if (redirected_.load(std::memory_order_relaxed))
    return fail(Errc::InvalidArgument, "receive: end is redirected to a queue");
  if (!consumer_mu_.lock_until(deadline))
    return fail(Errc::TimedOut, "receive: another thread's call or receive did not finish in time");
  std::lock_guard consumer(consumer_mu_, std::adopt_lock);
  if (redirected_.load(std::memory_order_relaxed))  // redirected while we waited for the lock
    return fail(Errc::InvalidArgument, "receive: end is redirected to a queue");
  MBMQ_TRY(ensure_watched());
  const WaitPolicy policy = wait_policy();
  for (;;) {
    Message m;
    Poll p = poll(&m);
    if (p == Poll::Got || p == Poll::Ended) return m;
    if (p == Poll::Gone) return fail(closed_errc(state()), "receive");
    if (deadline.expired()) return fail(Errc::TimedOut, "receive");
    wait_inbound(deadline, policy, WaitFor::AnyMessage);
  }
}

// ---- redirection, lifecycle (P8) --------------------------------------------------------------

Status Endpoint::redirect(const std::shared_ptr<QueueCore>& queue, std::uint64_t key) {
  // Not while another thread is inside call() or receive(): its wake-ups would go to the queue
  // and the queue would take its reply. (They re-check redirected_ once they hold the lock.)
  std::unique_lock consumer(consumer_mu_, std::try_to_lock);
  if (!consumer.owns_lock())
    return fail(Errc::Busy, "redirect: another thread is in call() or receive() on this end");
  {
    std::lock_guard lock(mu_);
    EpState s = state_.load(std::memory_order_acquire);
    if (s != EpState::Open) return fail(closed_errc(s), "redirect");
    if (queue_ == queue) {
      key_.store(key, std::memory_order_relaxed);
      return {};
    }
    if (queue_) return fail(Errc::Busy, "redirect: already redirected to another queue");
    if (++my_db_gen_ == 0) ++my_db_gen_;
    shm::CtlMsg m{static_cast<std::uint32_t>(shm::CtlType::Doorbell), 0, my_db_gen_, 0};
    int fd = queue->doorbell_fd();
    MBMQ_TRY(send_ctl_locked(bytes_of(m), {&fd, 1}));
    // Pairs with the producer's acquire load in (P4): the page is on the socket before the
    // generation that names it is visible.
    in_.doorbell_gen.store(my_db_gen_, std::memory_order_release);
    queue_ = queue;
    key_.store(key, std::memory_order_relaxed);
    redirected_.store(true, std::memory_order_relaxed);
  }
  MBMQ_TRY(ensure_watched());
  queue->add(shared_from_this());
  queue->poke();
  return {};
}

WaitPolicy Endpoint::wait_policy() const noexcept { return wait_.load(); }

void Endpoint::set_wait_policy(WaitPolicy p) noexcept { wait_.store(p); }

void Endpoint::wake_local() noexcept {
  in_.doorbell.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&in_.doorbell, INT_MAX);
  std::shared_ptr<QueueCore> q;
  {
    std::lock_guard lock(mu_);
    q = queue_;
  }
  if (q) q->poke();
}

void Endpoint::on_watch(int /*fd*/, std::uint32_t /*events*/) noexcept { on_hangup(); }

void Endpoint::on_hangup() noexcept {
  EpState expected = EpState::Open;
  state_.compare_exchange_strong(expected, EpState::PeerClosed, std::memory_order_acq_rel);
  wake_local();
}

void Endpoint::close_local() noexcept {
  MBMQ_CRASH_POINT("close.before");
  std::shared_ptr<QueueCore> q;
  {
    std::lock_guard lock(mu_);
    if (state_.exchange(EpState::LocalClosed) == EpState::LocalClosed) return;
    unwatch();
    control_.reset();
    reclaim_lent_locked();
    lease_.reset();  // a listener's connection count drops now, not when the handle goes
    // Breaks the queue <-> end reference cycle: the queue drops its reference when its scan
    // finds the end gone (or when it is destroyed).
    q = std::move(queue_);
  }
  in_.doorbell.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&in_.doorbell, INT_MAX);
  if (q) q->poke();
}

void Endpoint::abandon(const char* why) noexcept {
  {
    std::lock_guard lock(mu_);
    (void)fail_protocol_locked(why);
  }
  wake_local();
}

void Endpoint::reclaim_lent_locked() noexcept {
  // (P8) Nothing the peer holds can come back: lent and abandoned buffers return to the pool,
  // extents are unmapped and closed (no ReleaseExtent: the channel is over). A call's buffer is
  // given back to its caller by call() itself.
  for (std::uint32_t k = 0; k < n_; ++k) {
    OwnState& st = own_slots_[k].state;
    if (st == OwnState::LentRequest || st == OwnState::LentOneWay || st == OwnState::Abandoned)
      free_own(static_cast<std::uint32_t>(side_) * n_ + k);
  }
  for (std::uint32_t e = 0; e < kMaxExtents; ++e) {
    OwnState& st = own_ext_[e].state;
    if (st == OwnState::LentRequest || st == OwnState::LentOneWay || st == OwnState::Abandoned)
      free_own(kExtentBit | e);
  }
  requests_out_ = 0;
}

Status Endpoint::ensure_watched() noexcept {
  int pid = os::current_pid();
  if (watch_pid_.load(std::memory_order_relaxed) == pid) return {};
  std::lock_guard lock(mu_);
  if (watch_pid_.load(std::memory_order_relaxed) == pid || !control_) return {};
  // Hang-up only, edge-triggered: a peer's close is reported once; data on the socket is read by
  // the endpoint itself.
  auto id = watch_fd(std::weak_ptr<Watched>(weak_from_this()), control_.get(),
                     WatchSpec{os::kEpollHangup | os::kEpollEdge, true, 0});
  if (!id) return fail(id.error());
  watch_id_ = *id;
  watch_pid_.store(pid, std::memory_order_relaxed);
  return {};
}

void Endpoint::detach_buffer(Buffer& b) noexcept {
  b.origin_ = Buffer::Origin::None;
  b.ep_.reset();
  b.data_ = nullptr;
  b.size_ = b.capacity_ = 0;
}

}  // namespace mbmq::detail
