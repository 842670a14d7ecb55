// net/remote.cc: a net::Channel as an mbmq::Channel (RemoteEnd, net/remote.h;
// docs/design/net-channel.md), and mbmq::connect()'s connector for "ucx://" URLs.
//
// Every buffer a remote end hands out or delivers is an mbmq::Buffer over a Queued (a foreign
// buffer, ipc/foreign_buffer.h) that owns the net::Buffer: data() is the vector UCX sends from or
// received into, so nothing is copied by this layer. Before a net call the Queued's net::Buffer
// takes the mbmq::Buffer's size; after it, the mbmq::Buffer takes the net::Buffer's bytes (a
// call's reply is a new vector) or, if net took the buffer (sent, or given up at a deadline),
// becomes invalid: whatever the result, the caller's Buffer is valid and usable or invalid, as on
// a local end.
#include "net/remote.h"

#include <utility>

#include "ipc/listener_core.h"
#include "net/core.h"

namespace mbmq::net {
namespace detail {
namespace {

constexpr const char* kNotOurs = "Channel: a buffer that is not this remote channel's (buffer())";

}  // namespace

std::uint32_t next_buffer_id() noexcept {
  static std::atomic<std::uint32_t> next{0};
  for (;;) {
    const std::uint32_t id = (next.fetch_add(1, std::memory_order_relaxed) + 1) & ~kRequestIdBit;
    if (id != 0) return id;
  }
}

Queued* RemoteEnd::net_side(mbmq::Buffer& b) noexcept {
  auto* q = dynamic_cast<Queued*>(mbmq::detail::ForeignAccess::of(b));
  if (q == nullptr || !b.valid() || !q->buffer.valid_) return nullptr;
  q->buffer.size_ = std::min(mbmq::detail::ForeignAccess::size(b), q->buffer.bytes_.size());
  return q;
}

void RemoteEnd::settle(mbmq::Buffer& b, Queued& q) noexcept {
  if (!q.buffer.valid_) {
    b.reset();
    return;
  }
  mbmq::detail::ForeignAccess::set_bytes(b, q.buffer.bytes_.data(), q.buffer.bytes_.size());
  mbmq::detail::ForeignAccess::set_size(b, q.buffer.size_);
}

Result<mbmq::Buffer> RemoteEnd::wrap(Buffer&& b, Kind kind) {
  std::shared_ptr<Queued> q;
  try {
    q = std::make_shared<Queued>();
  } catch (const std::bad_alloc&) {
    return fail(Errc::System, "Channel (remote): no memory");  // b dropped: a request, NoReply
  }
  q->kind = kind;
  q->buffer = std::move(b);
  const std::uint32_t id = q->buffer_id();  // as a queue numbers what it delivers
  return Queued::expose(std::move(q), id);
}

Result<mbmq::Buffer> RemoteEnd::buffer(std::size_t size) {
  if (size > UINT32_MAX)
    return fail(Errc::InvalidArgument, "Channel::buffer: larger than 4 GiB - 4 KiB");
  Buffer b = MBMQ_TRY(ch.buffer(size));
  return wrap(std::move(b), Kind::Message);
}

Result<mbmq::Buffer> RemoteEnd::buffer(std::size_t size, Deadline deadline) {
  if (!ch.valid()) return fail(Errc::InvalidArgument, "Channel::buffer: closed channel");
  MBMQ_TRY(ch.core_->wait_for_credit(size, deadline));
  return buffer(size);
}

std::size_t RemoteEnd::sendable(std::size_t size) const noexcept {
  return ch.valid() ? ch.core_->sendable(size) : 0;
}

Result<std::size_t> RemoteEnd::receive_in_place() {
  if (!ch.valid()) return fail(Errc::InvalidArgument, "receive: closed channel");
  MBMQ_TRY(ch.core_->receive_check());
  return std::size_t{0};
}

template <class Op>
Status RemoteEnd::through_net(mbmq::Buffer& buf, Op op) {
  Queued* q = net_side(buf);
  if (q == nullptr) return fail(Errc::InvalidArgument, kNotOurs);
  Status s = op(q->buffer);
  settle(buf, *q);
  return s;
}

Status RemoteEnd::call(mbmq::Buffer& buf, Deadline deadline) {
  return through_net(buf, [&](Buffer& b) { return ch.call(b, deadline); });
}

Status RemoteEnd::send(mbmq::Buffer&& buf) {
  return through_net(buf, [&](Buffer& b) { return ch.send(std::move(b)); });
}

Status RemoteEnd::send_request(mbmq::Buffer&& buf) {
  // Its reply carries buf's id (the tag, net.h), as a local end's comes in the request's slot:
  // mbmq/asio.h's async_call matches replies so.
  const std::uint32_t id = buf.id();
  return through_net(buf, [&](Buffer& b) {
    b.tag_ = id;
    return ch.send_request(std::move(b));
  });
}

Result<mbmq::Message> RemoteEnd::receive(Deadline deadline) {
  Message m = MBMQ_TRY(ch.receive(deadline));
  mbmq::Message out;
  out.kind = m.kind;
  out.error = m.error;
  out.why = m.why;
  if (m.kind != Kind::PeerClosed && m.buffer.valid_)
    out.buffer = MBMQ_TRY(wrap(std::move(m.buffer), m.kind));
  return out;
}

Result<std::size_t> RemoteEnd::receive_batch(std::span<mbmq::Message> out, Deadline deadline) {
  if (out.empty()) return fail(Errc::InvalidArgument, "Channel::receive_batch: empty span");
  for (mbmq::Message& m : out) m = mbmq::Message{};  // dropped first, as a local end's
  out[0] = MBMQ_TRY(receive(deadline));
  std::size_t n = 1;
  // What is already here, without waiting; an error (TimedOut: nothing more) ends the batch, and
  // a lasting one is the next call's.
  while (n < out.size() && out[n - 1].kind != Kind::PeerClosed) {
    Result<mbmq::Message> m = receive(Deadline::immediate());
    if (!m) break;
    out[n++] = std::move(*m);
  }
  return n;
}

Status RemoteEnd::redirect(MsgQueue& queue, std::uint64_t key) { return ch.redirect(queue, key); }

Status RemoteEnd::adopt(MsgQueue& queue, std::uint64_t key) {
  return net::adopt(queue, std::move(ch), key);
}

Result<mbmq::Channel> connect_channel(std::string_view url, Deadline deadline,
                                      const mbmq::ConnectOptions& options) {
  // ServerPolicy names the uid of a local listener; a remote one has none to check. Refused
  // rather than ignored: a caller that asked for a check must not believe it was made.
  if (!options.server.expected_uids.empty() || options.server.check)
    return fail(Errc::InvalidArgument,
                "connect: ServerPolicy checks a local listener's uid; a ucx:// listener has none "
                "(mbmq/net.h, Security)");
  // Trust::Untrusted is met by construction: a remote end's payloads are in this process's own
  // memory, which the peer cannot touch after sending.
  ConnectOptions o;
  o.wait = options.wait;
  Channel c = MBMQ_TRY(net::connect(url, deadline, o));
  return as_channel(std::move(c));
}

}  // namespace detail

Result<mbmq::Channel> as_channel(Channel&& channel) {
  if (!channel.valid()) return fail(Errc::InvalidArgument, "net::as_channel: closed channel");
  std::shared_ptr<detail::RemoteEnd> r;
  try {
    r = std::make_shared<detail::RemoteEnd>();
  } catch (const std::bad_alloc&) {
    return fail(Errc::System, "net::as_channel: no memory");  // channel left as it was
  }
  r->ch = std::move(channel);
  return mbmq::detail::ChannelAccess::make_remote(std::move(r));
}

}  // namespace mbmq::net
