// Moving a channel end to another process over an AF_UNIX socket: the segment memfd and the
// control socket travel with SCM_RIGHTS, with the end's private ring positions beside them.
#include <cstring>

#include "ipc/endpoint.h"
#include "mbmq/channel.h"
#include "os/unix_socket.h"

namespace mbmq {

namespace {
constexpr std::uint64_t kTransferMagic = 0x4e45'4242'4d42'4d01ull;
struct TransferMsg {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t side;
  std::uint32_t tx_tail;
  std::uint32_t rx_head;
  std::uint32_t next_extent_gen;
  std::uint32_t wait_mode;
  std::int64_t spin_ns;
};
static_assert(sizeof(TransferMsg) == 40);
}  // namespace

namespace detail {

Status Endpoint::send_over(int unix_socket) {
  std::lock_guard lock(mu_);
  EpState s = state_.load(std::memory_order_acquire);
  if (s != EpState::Open)
    return fail(s == EpState::Protocol ? Errc::Protocol : Errc::PeerClosed, "send_over");
  if (queue_) return fail(Errc::Busy, "send_over: end is redirected to a queue");
  for (const auto& o : own_slots_)
    if (o.state != OwnState::Free) return fail(Errc::Busy, "send_over: buffers outstanding");
  for (const auto& x : own_ext_)
    if (x.state != OwnState::Free) return fail(Errc::Busy, "send_over: buffers outstanding");
  for (bool h : peer_held_)
    if (h) return fail(Errc::Busy, "send_over: peer buffers held");
  for (const auto& pe : peer_ext_)
    if (pe.map.valid()) return fail(Errc::Busy, "send_over: peer extents mapped");
  if (pending_count_ != 0) return fail(Errc::Busy, "send_over: messages pending");
  TransferMsg m{kTransferMagic,
                shm::kLayoutVersion,
                static_cast<std::uint32_t>(side_),
                tx_.tail(),
                rx_.head(),
                next_extent_gen_,
                static_cast<std::uint32_t>(wait_policy().mode),
                static_cast<std::int64_t>(wait_policy().spin.count())};
  int fds[2] = {seg_.fd(), control_.get()};
  MBMQ_TRY(os::send_msg(unix_socket, {reinterpret_cast<const std::byte*>(&m), sizeof(m)}, fds));
  return {};
}

}  // namespace detail

Status Channel::send_over(int unix_socket) {
  if (!ep_) return fail(Errc::InvalidArgument, "send_over: closed channel");
  MBMQ_TRY(ep_->send_over(unix_socket));
  // Our copies of the fds close; the receiver's keep the connection open.
  close();
  return {};
}

Result<Channel> Channel::receive_from(int unix_socket, Deadline deadline) {
  bool ready = MBMQ_TRY(os::wait_readable(
      unix_socket, deadline.is_never() ? -1 : std::max<std::int64_t>(deadline.remaining_ns(), 0)));
  if (!ready) return fail(Errc::TimedOut, "receive_from");
  TransferMsg m{};
  std::array<os::UniqueFd, 2> fds;
  auto r = MBMQ_TRY(os::recv_msg(unix_socket, {reinterpret_cast<std::byte*>(&m), sizeof(m)}, fds,
                                 os::Blocking::Yes));
  if (r.bytes == 0 && r.nfds == 0) return fail(Errc::PeerClosed, "receive_from");
  if (r.truncated || r.bytes != sizeof(m) || r.nfds != 2 || m.magic != kTransferMagic ||
      m.version != shm::kLayoutVersion || m.side > 1 || m.wait_mode > 2)
    return fail(Errc::Protocol, "receive_from: malformed transfer message");
  shm::Segment seg = MBMQ_TRY(shm::Segment::attach(std::move(fds[0])));
  // The sender's private ring positions must agree with what it published.
  shm::Direction& out = seg.dir(static_cast<int>(m.side));
  shm::Direction& in = seg.dir(1 - static_cast<int>(m.side));
  if (out.tail.load(std::memory_order_acquire) != m.tx_tail ||
      in.head.load(std::memory_order_acquire) != m.rx_head)
    return fail(Errc::Protocol, "receive_from: ring positions do not match the segment");
  WaitPolicy wait{static_cast<WaitMode>(m.wait_mode), std::chrono::nanoseconds(m.spin_ns)};
  auto ep =
      MBMQ_TRY(detail::Endpoint::make({std::move(seg), std::move(fds[1]), static_cast<int>(m.side),
                                       wait, m.tx_tail, m.rx_head, m.next_extent_gen}));
  return Channel(std::move(ep));
}

}  // namespace mbmq
