// Channel: a handle on one Endpoint.
#include "mbmq/channel.h"

#include "ipc/endpoint.h"
#include "ipc/foreign_channel.h"
#include "mbmq/msg_queue.h"
#include "os/unix_socket.h"

namespace mbmq {

Channel& Channel::operator=(Channel&& o) noexcept {
  if (this != &o) {
    close();
    ep_ = std::move(o.ep_);
    remote_ = std::move(o.remote_);
  }
  return *this;
}

Channel::~Channel() { close(); }

void Channel::close() noexcept {
  // The end stays allocated until the handle is destroyed or assigned: another thread may be
  // inside call() or receive() on it; it wakes and returns Errc::InvalidArgument ("closed").
  if (ep_) {
    ep_->close_local();
  } else if (remote_) {
    remote_->close();
  }
}

bool Channel::valid() const noexcept {
  if (!ep_) return remote_ != nullptr && remote_->valid();
  return ep_->state() != detail::EpState::LocalClosed;
}

Result<std::pair<Channel, Channel>> Channel::pair(const ChannelOptions& options) {
  // (P1) Side 0 creates the segment; side 1 attaches a second mapping of it, validated exactly as
  // a process receiving the end would.
  shm::Segment s0 = MBMQ_TRY(
      shm::Segment::create(options.slots_per_side, options.slot_size,
                           shm::Limits{options.max_in_flight, options.max_handles,
                                       (options.trust[0] == Trust::Untrusted ? 1u : 0u) |
                                           (options.trust[1] == Trust::Untrusted ? 2u : 0u),
                                       options.copy_threshold}));
  os::UniqueFd dup = MBMQ_TRY(os::dup_fd(s0.fd()));
  shm::Segment s1 = MBMQ_TRY(shm::Segment::attach(std::move(dup)));
  auto [c0, c1] = MBMQ_TRY(os::seqpacket_pair());
  auto e0 = MBMQ_TRY(detail::Endpoint::make({std::move(s0), std::move(c0), 0, options.wait}));
  auto e1 = MBMQ_TRY(detail::Endpoint::make({std::move(s1), std::move(c1), 1, options.wait}));
  return std::pair<Channel, Channel>{Channel(std::move(e0)), Channel(std::move(e1))};
}

Result<Buffer> Channel::buffer(std::size_t size) {
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_->buffer(size);
    return fail(Errc::InvalidArgument, "Channel::buffer: closed channel");
  }
  return ep_->alloc(size);
}

Result<Buffer> Channel::buffer(std::size_t size, Deadline deadline) {
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_->buffer(size, deadline);
    return fail(Errc::InvalidArgument, "Channel::buffer: closed channel");
  }
  return ep_->alloc_until(size, deadline);
}

Result<std::size_t> Channel::buffers(std::size_t size, std::span<Buffer> out, Deadline deadline) {
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_buffers(size, out, deadline);
    return fail(Errc::InvalidArgument, "Channel::buffer: closed channel");
  }
  return ep_->alloc_until(size, out, deadline);
}

Status Channel::call(Buffer& buf, Deadline deadline) {
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_->call(buf, deadline);
    return fail(Errc::InvalidArgument, "call: closed channel");
  }
  return ep_->call(buf, deadline);
}

Status Channel::send(Buffer&& buf) {
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_->send(std::move(buf));
    return fail(Errc::InvalidArgument, "send: closed channel");
  }
  return ep_->send(std::move(buf), shm::DescKind::OneWay);
}

Result<std::size_t> Channel::send_batch(std::span<Buffer> bufs) {
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_send_batch(bufs);
    return fail(Errc::InvalidArgument, "send: closed channel");
  }
  return ep_->send_batch(bufs);
}

Result<std::size_t> Channel::reserve(Reservation& r, std::size_t size, std::size_t max,
                                     Deadline deadline) {
  if (!ep_) [[unlikely]] {
    if (remote_) return fail(Errc::InvalidArgument, detail::kRemoteNoReserve);
    return fail(Errc::InvalidArgument, "Channel::reserve: closed channel");
  }
  return ep_->reserve(r, size, max, deadline);
}

Result<std::size_t> Channel::receive_in_place(InPlace& in, Deadline deadline) {
  if (!ep_) [[unlikely]] {
    // A remote end reads nothing in place: 0, "take it with receive()" (mbmq/channel.h).
    if (remote_) return remote_->receive_in_place();
    return fail(Errc::InvalidArgument, "receive: closed channel");
  }
  return ep_->receive_in_place(in, deadline);
}

Status Channel::send_request(Buffer&& buf) {
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_->send_request(std::move(buf));
    return fail(Errc::InvalidArgument, "send_request: closed channel");
  }
  return ep_->send(std::move(buf), shm::DescKind::Request);
}

Result<Message> Channel::receive(Deadline deadline) {
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_->receive(deadline);
    return fail(Errc::InvalidArgument, "receive: closed channel");
  }
  return ep_->receive(deadline);
}

Result<std::size_t> Channel::receive_batch(std::span<Message> out, Deadline deadline) {
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_->receive_batch(out, deadline);
    return fail(Errc::InvalidArgument, "receive: closed channel");
  }
  return ep_->receive_batch(out, deadline);
}

Status Channel::redirect(MsgQueue& queue, std::uint64_t key) {
  if (!queue.core_) return fail(Errc::InvalidArgument, "redirect: closed queue");
  if (!ep_) [[unlikely]] {
    if (remote_) return remote_->redirect(queue, key);
    return fail(Errc::InvalidArgument, "redirect: closed channel");
  }
  return ep_->redirect(queue.core_, key);
}

void Channel::set_wait_policy(WaitPolicy policy) {
  if (ep_) {
    ep_->set_wait_policy(policy);
  } else if (remote_) {
    remote_->set_wait_policy(policy);
  }
}

// ---- a remote end's batches: one message at a time (mbmq::net sends and takes each alone) ----

Result<std::size_t> Channel::remote_buffers(std::size_t size, std::span<Buffer> out,
                                            Deadline deadline) {
  for (Buffer& b : out) b.reset();
  if (out.empty()) return std::size_t{0};
  out[0] = MBMQ_TRY(remote_->buffer(size, deadline));
  // As many as the grant lets out now (out[0] counted), as a local pool gives what it has.
  const std::size_t want = std::min(out.size(), std::max<std::size_t>(1, remote_->sendable(size)));
  std::size_t n = 1;
  for (; n < want; ++n) {
    auto b = remote_->buffer(size);
    if (!b) break;
    out[n] = std::move(*b);
  }
  return n;
}

Result<std::size_t> Channel::remote_send_batch(std::span<Buffer> bufs) {
  std::size_t n = 0;
  for (; n < bufs.size(); ++n) {
    Status s = remote_->send(std::move(bufs[n]));
    if (!s) {
      if (n == 0) return fail(s.error());
      break;  // the rest stay the caller's; the next send reports the error
    }
  }
  return n;
}

}  // namespace mbmq
