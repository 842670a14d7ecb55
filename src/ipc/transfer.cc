// Moving a channel end to another process: over an AF_UNIX socket (send_over/receive_from), or
// inside a Buffer as a handle (P3b). Either way the segment memfd and the control socket travel
// with SCM_RIGHTS, with the end's private ring positions beside them (shm::HandleMeta).
#include <cstring>

#include "ipc/endpoint.h"
#include "ipc/foreign_channel.h"
#include "mbmq/channel.h"
#include "os/mutex.h"
#include "os/unix_socket.h"

namespace mbmq {

namespace {
constexpr std::uint64_t kTransferMagic = 0x4e45'4242'4d42'4d01ull;
struct TransferMsg {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t reserved;
  shm::HandleMeta end;
};
static_assert(sizeof(TransferMsg) == 48);
}  // namespace

namespace detail {

Status Endpoint::export_end(shm::HandleMeta* meta, os::UniqueFd* seg, os::UniqueFd* ctl,
                            BellFds* bell) {
  os::LockGuard lock(mu_);
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open) return fail(closed_errc(s), "export channel end");
  if (queue_) return fail(Errc::Busy, "export channel end: redirected to a queue");
  if (const char* why = table_.busy()) return fail(Errc::Busy, why);
  if (rx_.maybe_nonempty()) return fail(Errc::Busy, "export channel end: messages pending");
  // What was taken off the control socket ahead of its descriptors cannot travel: only a quiet
  // end moves (the peer's queue doorbell, which has no descriptor, travels below).
  if (const char* why = ctl_.busy()) return fail(Errc::Busy, why);
  *meta = shm::HandleMeta{static_cast<std::uint32_t>(shm::WireHandle::ChannelEnd),
                          static_cast<std::uint32_t>(side_),
                          tx_.tail(),
                          rx_.head(),
                          table_.next_extent_gen(),
                          0,
                          0,
                          0};
  // The peer's queue doorbell, opened or still stashed: the new owner wakes the same queue.
  const bool opened = peer_bell_.is_open();
  const BellFds& db = opened ? peer_bell_.fds() : ctl_.doorbell().fds;
  const std::uint32_t db_gen = opened ? peer_bell_.gen() : ctl_.doorbell().gen;
  const std::uint32_t db_slot = opened ? peer_bell_.slot() : ctl_.doorbell().slot;
  os::UniqueFd seg_dup = MBMQ_TRY(os::dup_fd(seg_.fd()));
  os::UniqueFd ctl_dup = MBMQ_TRY(os::dup_fd(ctl_.fd()));
  BellFds db_dup;
  if (db && db_gen != 0) {
    db_dup = MBMQ_TRY(db.dup());
    meta->doorbell_gen = db_gen;
    meta->doorbell_slot = db_slot;
  }
  *seg = std::move(seg_dup);
  *ctl = std::move(ctl_dup);
  *bell = std::move(db_dup);
  return {};
}

Result<std::shared_ptr<Endpoint>> Endpoint::import_end(const shm::HandleMeta& m,
                                                       os::UniqueFd seg_fd, os::UniqueFd ctl,
                                                       BellFds bell, WaitPolicy wait) {
  if (m.side > 1 || m.reserved != 0 || !seg_fd || !ctl || (m.doorbell_gen != 0) != !!bell ||
      (m.doorbell_gen == 0 && m.doorbell_slot != 0))
    return fail(Errc::Protocol, "import channel end: malformed");
  if (!os::is_unix_seqpacket(ctl.get()))
    return fail(Errc::Protocol, "import channel end: the control fd is not a SEQPACKET socket");
  shm::Segment seg = MBMQ_TRY(shm::Segment::attach(std::move(seg_fd)));
  // The sender's private ring positions must agree with what it published.
  shm::Direction& out = seg.dir(static_cast<int>(m.side));
  shm::Direction& in = seg.dir(1 - static_cast<int>(m.side));
  if (out.tail.load(std::memory_order_acquire) != m.tx_tail ||
      in.head.load(std::memory_order_acquire) != m.rx_head)
    return fail(Errc::Protocol, "import channel end: ring positions do not match the segment");
  auto ep = MBMQ_TRY(Endpoint::make({std::move(seg), std::move(ctl), static_cast<int>(m.side), wait,
                                     m.tx_tail, m.rx_head, m.next_extent_gen}));
  if (bell) {
    // Checked like any doorbell, when first used (P4q).
    os::LockGuard lock(ep->mu_);
    ep->ctl_.stash_doorbell(StashedBell{std::move(bell), m.doorbell_gen, m.doorbell_slot});
  }
  return ep;
}

}  // namespace detail

Status Channel::send_over(int unix_socket) {
  if (!ep_) {
    if (remote_) return fail(Errc::InvalidArgument, detail::kRemoteCannotMove);
    return fail(Errc::InvalidArgument, "send_over: closed channel");
  }
  TransferMsg m{kTransferMagic, shm::kLayoutVersion, 0, {}};
  os::UniqueFd seg, ctl;
  detail::BellFds db;
  MBMQ_TRY(ep_->export_end(&m.end, &seg, &ctl, &db));
  const auto bell = db.raw();
  int fds[shm::kChannelEndFds + shm::kDoorbellFds] = {seg.get(), ctl.get(), bell[0], bell[1],
                                                      bell[2]};
  MBMQ_TRY(os::send_msg(unix_socket, {reinterpret_cast<const std::byte*>(&m), sizeof(m)},
                        {fds, db ? std::size(fds) : shm::kChannelEndFds}));
  // Our copies of the fds close; the receiver's keep the connection open.
  close();
  return {};
}

Result<Channel> Channel::receive_from(int unix_socket, Deadline deadline) {
  bool ready = MBMQ_TRY(os::wait_readable(
      unix_socket, deadline.is_never() ? -1 : std::max<std::int64_t>(deadline.remaining_ns(), 0)));
  if (!ready) return fail(Errc::TimedOut, "receive_from");
  TransferMsg m{};
  std::array<os::UniqueFd, shm::kChannelEndFds + shm::kDoorbellFds> fds;
  auto r = MBMQ_TRY(os::recv_msg(unix_socket, {reinterpret_cast<std::byte*>(&m), sizeof(m)}, fds,
                                 os::Blocking::Yes));
  if (r.bytes == 0 && r.nfds == 0) return fail(Errc::PeerClosed, "receive_from");
  const std::size_t want = shm::kChannelEndFds + (m.end.doorbell_gen != 0 ? shm::kDoorbellFds : 0);
  if (r.truncated || r.bytes != sizeof(m) || r.nfds != want || m.magic != kTransferMagic ||
      m.version != shm::kLayoutVersion ||
      m.end.kind != static_cast<std::uint32_t>(shm::WireHandle::ChannelEnd))
    return fail(Errc::Protocol, "receive_from: malformed transfer message");
  // The wait policy is this process's choice, never the sender's (WaitPolicy{}: adaptive).
  detail::BellFds bell{std::move(fds[2]), std::move(fds[3]), std::move(fds[4])};
  auto ep = MBMQ_TRY(detail::Endpoint::import_end(m.end, std::move(fds[0]), std::move(fds[1]),
                                                  std::move(bell), WaitPolicy{}));
  return Channel(std::move(ep));
}

}  // namespace mbmq
