// net/remote.h: mbmq::net behind the core's types (docs/design/net-channel.md): a remote
// channel's message or buffer as an mbmq::Buffer (Queued, a foreign buffer: ipc/foreign_buffer.h),
// and a net::Channel as an mbmq::Channel (RemoteEnd, a foreign channel: ipc/foreign_channel.h),
// so that mbmq::connect("ucx://...") and a redirected net::Listener's Kind::Connection give the
// same Channel type as a local connection.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <new>

#include "ipc/foreign_buffer.h"
#include "ipc/foreign_channel.h"
#include "mbmq/msg_queue.h"
#include "mbmq/net.h"
#include "mbmq/rendezvous.h"
#include "net/core.h"

namespace mbmq::net::detail {

class Queued;

// Buffer::id() of remote ends' buffers: "different for any two buffers of one end in flight at
// once" (mbmq/buffer.h). One counter for every remote end of the process, in [1, 2^31): own
// buffers, received one-way messages and replies of net's own requests; a reply to a remote
// end's send_request() has its request's (the tag); a received request has its wire sequence
// with kRequestIdBit set, so that the peer's numbering never meets ours. Across ends too: a
// buffer received on one end and sent on another keeps an id no buffer of that end has.
inline constexpr std::uint32_t kRequestIdBit = 0x8000'0000u;
std::uint32_t next_buffer_id() noexcept;

// mbmq::connect("ucx://...") (registered by net/register.cc): net::connect with options.wait,
// as a remote mbmq::Channel.
Result<mbmq::Channel> connect_channel(std::string_view url, Deadline deadline,
                                      const mbmq::ConnectOptions& options);

// A net::Channel behind an mbmq::Channel (net/remote.cc). Each method translates between the
// core's Buffer/Message (foreign buffers over Queued) and net's, and forwards to `ch`.
class RemoteEnd final : public mbmq::detail::ForeignChannel {
 public:
  RemoteEnd() = default;
  RemoteEnd(const RemoteEnd&) = delete;
  RemoteEnd& operator=(const RemoteEnd&) = delete;
  ~RemoteEnd() override = default;

  Result<mbmq::Buffer> buffer(std::size_t size) override;
  Result<mbmq::Buffer> buffer(std::size_t size, Deadline deadline) override;
  Status call(mbmq::Buffer& buf, Deadline deadline) override;
  Status send(mbmq::Buffer&& buf) override;
  Status send_request(mbmq::Buffer&& buf) override;
  Result<mbmq::Message> receive(Deadline deadline) override;
  Result<std::size_t> receive_batch(std::span<mbmq::Message> out, Deadline deadline) override;
  Status redirect(MsgQueue& queue, std::uint64_t key) override;
  Status adopt(MsgQueue& queue, std::uint64_t key) override;
  std::size_t sendable(std::size_t size) const noexcept override;
  Result<std::size_t> receive_in_place() override;
  void set_wait_policy(WaitPolicy policy) override { ch.set_wait_policy(policy); }
  bool valid() const noexcept override { return ch.valid(); }
  void close() noexcept override { ch.close(); }

  // Public for ListenCore::deliver_locked, which sets its core (a redirected listener's
  // connection) without ever destroying a Channel holding one under the worker's lock.
  Channel ch;

 private:
  // A net buffer (own, or received as `kind`) as a foreign mbmq::Buffer.
  static Result<mbmq::Buffer> wrap(Buffer&& b, Kind kind);
  // The Queued behind a buffer of a remote end (any: net checks whose), its net::Buffer sized as
  // the mbmq::Buffer is now; null for a local or invalid buffer. settle(): after a net call, b
  // follows what became of q's net::Buffer (q may die there with b).
  static Queued* net_side(mbmq::Buffer& b) noexcept;
  static void settle(mbmq::Buffer& b, Queued& q) noexcept;
  // net_side, op on the net buffer (a net::Channel call), settle.
  template <class Op>
  Status through_net(mbmq::Buffer& buf, Op op);
};

// (Q1) A message of a remote channel, as the queue delivers it: the mbmq::Buffer's bytes are
// `buffer`'s vector. Also a node of its source's FIFO until delivered.
class Queued final : public mbmq::detail::ForeignBuffer {
 public:
  Kind kind = Kind::Message;
  Errc error = Errc::PeerClosed;
  const char* why = "";
  std::uint64_t ch_id = 0;
  Buffer buffer;                 // the net message's (its reply token, for a request)
  std::shared_ptr<Queued> next;  // the source's FIFO (under its mu_), or a purged chain
  // (Q6) Kind::Connection: the accepted channel, for Message::channel (a remote mbmq::Channel).
  // Never destroyed holding a worker's mu or a source's mu_: closing it takes its worker's mu.
  std::shared_ptr<RemoteEnd> conn;

  Queued() = default;
  Queued(const Queued&) = delete;
  Queued& operator=(const Queued&) = delete;
  // A chain (a purged channel's messages, up to its grant) is freed one node at a time, not by
  // recursion.
  ~Queued() override {
    while (next) {
      std::shared_ptr<Queued> rest = std::move(next->next);
      next = std::move(rest);
    }
  }

  // q's net buffer as an mbmq::Buffer over its vector (no copy), numbered `id`. noexcept.
  static mbmq::Buffer expose(std::shared_ptr<Queued> q, std::uint32_t id) noexcept {
    std::byte* data = q->buffer.bytes_.data();
    const std::size_t size = q->buffer.size_, cap = q->buffer.bytes_.size();
    return mbmq::detail::ForeignAccess::make(std::move(q), data, size, cap, id);
  }
  // Buffer::id() for this buffer as an mbmq::Buffer (next_buffer_id(), above): a received
  // request's wire sequence | kRequestIdBit; a send_request()'s reply's, its request's id (the tag
  // RemoteEnd::send_request gave it), as a local end's reply comes in its request's slot; else
  // (own buffers, one-way messages) a new number.
  std::uint32_t buffer_id() const noexcept {
    if (buffer.reply_) return static_cast<std::uint32_t>(buffer.reply_->seq) | kRequestIdBit;
    return buffer.tag_ != 0 ? buffer.tag_ : next_buffer_id();
  }

  Status grow(mbmq::Buffer& b, std::size_t n) override {
    // As net::Buffer::resize: up to the peer's limit; the bytes may move (a vector's growth).
    if (n > buffer.limit_)
      return fail(Errc::InvalidArgument, "Buffer::reserve: above the remote peer's limit");
    const std::size_t keep = mbmq::detail::ForeignAccess::size(b);
    if (n > buffer.bytes_.size()) {
      try {
        buffer.bytes_.resize(n);
      } catch (const std::bad_alloc&) {
        return fail(Errc::System, "Buffer::reserve: no memory");
      }
    }
    buffer.size_ = keep;
    mbmq::detail::ForeignAccess::set_bytes(b, buffer.bytes_.data(), buffer.bytes_.size());
    return {};
  }

  Status reply(mbmq::Buffer&& b) override {
    // Our own reference, then b lets go of it (b is invalid from here, whatever the result).
    std::shared_ptr<mbmq::detail::ForeignBuffer> self = mbmq::detail::ForeignAccess::share(b);
    Message m;
    m.kind = kind;
    buffer.size_ = std::min(mbmq::detail::ForeignAccess::size(b), buffer.bytes_.size());
    m.buffer = std::move(buffer);
    b.reset();
    return Channel::reply(std::move(m));  // credit back, the reply sent from the same vector
  }
};

}  // namespace mbmq::net::detail
