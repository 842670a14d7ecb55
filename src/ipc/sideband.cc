// Sideband: the control socket's outbox and inbox (see ipc/sideband.h).
#include "ipc/sideband.h"

#include <algorithm>

#include "os/unix_socket.h"

namespace mbmq::detail {

namespace {
std::span<const std::byte> bytes_of(const shm::CtlMsg& m) {
  return {reinterpret_cast<const std::byte*>(&m), sizeof(m)};
}
}  // namespace

Sideband::Sideband(os::UniqueFd control, Limits limits) noexcept
    : control_(std::move(control)), limits_(limits) {}

void Sideband::fail_channel() noexcept {
  stopped_ = true;
  if (control_) os::shutdown_socket(control_.get());
  std::erase_if(handles_, [](const StashedHandles& st) { return !st.claimed; });
  ahead_fds_ = 0;
  ahead_packets_ = 0;
  for (std::uint32_t e = 0; e < shm::kMaxExtents; ++e) {
    extents_[e] = Stashed{};
    replacements_[e] = Stashed{};
  }
  doorbell_ = StashedBell{};
}

// ---- outbox ------------------------------------------------------------------------------------

Status Sideband::send(std::span<const std::byte> bytes, std::span<const int> fds) {
  if (!control_) return fail(Errc::PeerClosed, "control socket closed");
  return os::send_msg(control_.get(), bytes, fds, os::Blocking::No);
}

Status Sideband::send_extent(std::uint32_t e, std::uint32_t gen, std::uint32_t aux, int fd) {
  const shm::CtlMsg m{static_cast<std::uint32_t>(shm::CtlType::Extent), e, gen, aux};
  return send(bytes_of(m), {&fd, 1});
}

Status Sideband::send_doorbell(std::uint32_t gen, std::uint32_t q, std::span<const int> fds) {
  const shm::CtlMsg m{static_cast<std::uint32_t>(shm::CtlType::Doorbell), q, gen, 0};
  return send(bytes_of(m), fds);
}

Status Sideband::check_handles(const Handles& hs) const {
  std::uint32_t count = 0;
  for (std::uint32_t k = 0; k < hs.count; ++k)
    if (hs.items[k].meta.kind != 0 && !hs.items[k].incoming) ++count;  // as send_handles()
  if (count > limits_.max_handles)
    return fail(Errc::InvalidArgument, "send: more handles than the channel's max_handles");
  return {};
}

Result<bool> Sideband::send_handles(BufferId id, std::uint32_t gen, HandlesOf of,
                                    const Handles& hs) {
  struct {
    shm::CtlMsg h;
    shm::HandleMeta meta[shm::kMaxHandles];
  } pkt{};
  std::array<int, os::kMaxFdsPerMsg> fds{};
  // At most max_handles (<= kMaxHandles) of them below: the same count as check_handles().
  MBMQ_TRY(check_handles(hs));
  std::uint32_t count = 0;
  std::size_t nfds = 0;
  for (std::uint32_t k = 0; k < hs.count; ++k) {
    const Handle& item = hs.items[k];
    if (item.meta.kind == 0 || item.incoming) continue;  // taken, or the request's own
    pkt.meta[count++] = item.meta;
    fds[nfds++] = item.fd.get();
    if (item.fd2) fds[nfds++] = item.fd2.get();
    if (item.bell)
      for (int fd : item.bell.raw()) fds[nfds++] = fd;
  }
  if (count == 0) return false;
  pkt.h = shm::CtlMsg{static_cast<std::uint32_t>(shm::CtlType::Handles), id.raw(), gen,
                      count | (of == HandlesOf::Reply ? shm::kHandlesForReply : 0u)};
  MBMQ_TRY(send({reinterpret_cast<const std::byte*>(&pkt),
                 sizeof(shm::CtlMsg) + count * sizeof(shm::HandleMeta)},
                {fds.data(), nfds}));
  return true;
}

// ---- inbox -------------------------------------------------------------------------------------

Sideband::Read Sideband::read_once() {
  if (!control_ || stopped_) return Read::Nothing;
  struct {
    shm::CtlMsg h;
    shm::HandleMeta meta[shm::kMaxHandles];
  } pkt{};
  std::array<os::UniqueFd, os::kMaxFdsPerMsg> fds;
  auto r = os::recv_msg(control_.get(), {reinterpret_cast<std::byte*>(&pkt), sizeof(pkt)}, fds,
                        os::Blocking::No);
  // A peer that closed its end with our messages unread in its queue makes the kernel report
  // ECONNRESET once, ahead of the messages it had sent us: read on past it.
  if (!r && r.error().code == Errc::PeerClosed) return Read::Got;
  if (!r || (r->bytes == 0 && r->nfds == 0)) return Read::Nothing;  // none, or hung up (P8)
  const shm::CtlMsg& m = pkt.h;
  if (r->truncated || r->bytes < sizeof(m)) return bad("control message malformed");
  if (m.type == static_cast<std::uint32_t>(shm::CtlType::Handles))
    return read_handles(m, pkt.meta, r->bytes, fds, r->nfds);
  if (m.type == static_cast<std::uint32_t>(shm::CtlType::Doorbell)) {
    if (r->bytes != sizeof(m) || r->nfds != shm::kDoorbellFds || m.aux != 0)
      return bad("control message malformed");
    // One stashed: a newer one replaces (closes) the older. Checked when used (PeerBell::open).
    doorbell_ = StashedBell{{std::move(fds[0]), std::move(fds[1]), std::move(fds[2])}, m.gen, m.id};
    return Read::Got;
  }
  if (r->bytes != sizeof(m) || r->nfds != 1) return bad("control message malformed");
  if (m.type == static_cast<std::uint32_t>(shm::CtlType::Extent) && m.id < shm::kMaxExtents &&
      (m.aux & ~(shm::kExtentSealed | shm::kExtentReplace)) == 0) {
    Stashed st{std::move(fds[0]), m.gen, (m.aux & shm::kExtentSealed) != 0};
    // One per id: a newer one replaces (closes) the older.
    ((m.aux & shm::kExtentReplace) != 0 ? replacements_ : extents_)[m.id] = std::move(st);
    return Read::Got;
  }
  return bad("control message type");
}

Sideband::Read Sideband::read_handles(const shm::CtlMsg& m, const shm::HandleMeta* meta,
                                      std::size_t bytes, std::span<os::UniqueFd> fds,
                                      std::size_t nfds) {
  // (P3b) Every size and count must agree before anything is kept.
  const std::uint32_t count = m.aux & 0xff;
  std::size_t want_fds = 0;
  bool ok = count >= 1 && count <= limits_.max_handles &&
            (m.aux & ~(0xffu | shm::kHandlesForReply)) == 0 &&
            bytes == sizeof(m) + count * sizeof(shm::HandleMeta);
  for (std::uint32_t k = 0; ok && k < count; ++k) {
    if (meta[k].kind == static_cast<std::uint32_t>(shm::WireHandle::Fd) ||
        meta[k].kind == static_cast<std::uint32_t>(shm::WireHandle::FileRange)) {
      want_fds += 1;
    } else if (meta[k].kind == static_cast<std::uint32_t>(shm::WireHandle::ChannelEnd)) {
      want_fds += shm::kChannelEndFds + (meta[k].doorbell_gen != 0 ? shm::kDoorbellFds : 0);
    } else {
      ok = false;
    }
  }
  if (!ok || nfds != want_fds) return bad("control message: handles malformed or over max_handles");
  // Only packets sent ahead of their descriptors count: those of accepted messages (pending for
  // receive()) are bounded by the buffers in flight.
  if (ahead_packets_ >= limits_.max_ahead_packets || ahead_fds_ + want_fds > limits_.max_ahead_fds)
    return bad("control message: too many handles sent ahead of their messages");
  auto h = HandlesPtr(new Handles());
  std::size_t f = 0;
  for (std::uint32_t k = 0; k < count; ++k) {
    Handle& item = h->items[k];
    item.meta = meta[k];
    item.incoming = true;
    item.fd = std::move(fds[f++]);
    if (item.meta.kind == static_cast<std::uint32_t>(shm::WireHandle::ChannelEnd)) {
      item.fd2 = std::move(fds[f++]);
      if (item.meta.doorbell_gen != 0) {
        item.bell.ready = std::move(fds[f++]);
        item.bell.wait = std::move(fds[f++]);
        item.bell.signal = std::move(fds[f++]);
      }
    }
  }
  h->count = count;
  ahead_fds_ += static_cast<std::uint32_t>(want_fds);
  ++ahead_packets_;
  const HandlesOf of = (m.aux & shm::kHandlesForReply) != 0 ? HandlesOf::Reply : HandlesOf::Message;
  handles_.push_back(StashedHandles{BufferId::from_wire(m.id), m.gen, of,
                                    static_cast<std::uint32_t>(want_fds), false, std::move(h)});
  return Read::Got;
}

Sideband::StashedHandles* Sideband::find_handles(BufferId id, std::uint32_t gen, HandlesOf of,
                                                 bool claimed) {
  for (auto& st : handles_)
    if (st.id == id && st.gen == gen && st.of == of && st.claimed == claimed) return &st;
  return nullptr;
}

bool Sideband::has_handles(BufferId id, std::uint32_t gen, HandlesOf of) const noexcept {
  return std::any_of(handles_.begin(), handles_.end(), [&](const StashedHandles& st) {
    return st.id == id && st.gen == gen && st.of == of && !st.claimed;
  });
}

void Sideband::claim_handles(BufferId id, std::uint32_t gen, HandlesOf of) noexcept {
  StashedHandles* st = find_handles(id, gen, of, false);
  if (st == nullptr) return;
  st->claimed = true;
  ahead_fds_ -= st->fds;
  --ahead_packets_;
}

HandlesPtr Sideband::take_handles(BufferId id, std::uint32_t gen, HandlesOf of) noexcept {
  StashedHandles* st = find_handles(id, gen, of, true);
  if (st == nullptr) return nullptr;
  HandlesPtr h = std::move(st->h);
  handles_.erase(handles_.begin() + (st - handles_.data()));
  return h;
}

const char* Sideband::busy() const noexcept {
  if (!handles_.empty()) return "export channel end: handles pending";
  for (std::uint32_t e = 0; e < shm::kMaxExtents; ++e)
    if (extents_[e].fd || replacements_[e].fd) return "export channel end: extents pending";
  return nullptr;
}

}  // namespace mbmq::detail
