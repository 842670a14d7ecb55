// mbmq/channel.h: Channel, one end of a bidirectional connection between two endpoints, each in
// one process, over a shared-memory segment (see docs/PROTOCOL.md and src/shm/layout.h).
//
//   auto [client, server] = MBMQ_TRY(mbmq::Channel::pair());
//   pid_t pid = fork();
//   if (pid == 0) { client = {}; /* serve on `server` */ }
//   else { server = {}; /* call on `client` */ }
//
// After fork(), each process must drop the end it does not use: a peer's hang-up is noticed when
// the last copy of its end is closed.
//
// Thread safety: call(), send() and buffer() may be used from several threads; calls on one
// channel are serialized (one outstanding call() per channel; use more channels, or
// send_request() with a queue, for concurrency): a second thread's call() sleeps until the first
// one's ends, or until its own deadline. close() may be called while other threads are inside
// call() or receive(): they return Errc::InvalidArgument.
//
// Memory ordering: everything written into a buffer before send()/call() is visible to the peer
// when it receives that buffer, and everything the peer wrote before replying is visible when
// call() returns.
//
// A remote end: mbmq::connect("ucx://HOST:PORT/service", deadline) with mbmq::net linked
// (mbmq/net.h), or the Kind::Connection of a redirected mbmq::net::Listener, or
// mbmq::net::as_channel(). The same methods, results and errors, over UCX instead of shared
// memory, except:
//  - its buffers are private memory of this process that UCX sends from and receives into (over
//    TCP the kernel copies them); a call's reply arrives in `buf` but may move its bytes (data()
//    changes; as an untrusted end's private copy may);
//  - a call() that times out may leave `buf` valid (UCX had sent its bytes: they are ours again)
//    instead of giving it up;
//  - buffer(size) never waits (no pool); buffer(size, deadline) waits until the peer's grant
//    (flow control, mbmq/net.h) has room for a message of that size, so a streaming producer
//    that takes its buffers so is paced as by a local pool; send() gets Errc::WouldBlock when
//    the grant is used up;
//  - reserve() is Errc::InvalidArgument (no shared slots to write in place); receive_in_place()
//    returns 0 at once (take messages with receive() or receive_batch(), as an untrusted end);
//    send_over() and Buffer::attach() of a remote end are Errc::InvalidArgument (an end cannot
//    leave its process), and its buffers carry no handles ("handles cannot cross hosts");
//  - Buffer::id() keeps buffer.h's promise (a reply to send_request() carries its request's id,
//    so mbmq/asio.h's async_call serves remote ends), but the numbers come from one 31-bit
//    counter for the process's remote ends, not from slots: a buffer held while 2^31 others are
//    made may share its id with a new one;
//  - close() does not wait for the peer to fetch what it sent: mbmq::net finishes that (its
//    linger, mbmq/net.h), and exit() waits up to 100 ms for it;
//  - thread safety is mbmq::net::Channel's: one thread at a time, but for close().
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <utility>

#include "mbmq/buffer.h"
#include "mbmq/deadline.h"
#include "mbmq/export.h"
#include "mbmq/result.h"
#include "mbmq/stream.h"
#include "mbmq/wait_policy.h"

namespace mbmq {

class MsgQueue;
struct Message;
namespace detail {
class Endpoint;
class ForeignChannel;
struct TestAccess;
struct ChannelAccess;
}  // namespace detail

// What an end does with the payloads its peer sends it (requests, one-way messages and replies),
// chosen for the receiving end. See docs/PROTOCOL.md (P3c, P5b, P7b).
//   Cooperative  zero copy: the application reads the peer's bytes in shared memory (the
//                default, for peers that trust each other, e.g. the same program or uid).
//   Untrusted    nothing the peer does after sending can change what the application sees:
//                payloads up to copy_threshold are copied once into this end's private memory
//                (and the answer copied back); larger ones must arrive as memfds the sender has
//                unmapped and sealed (F_SEAL_WRITE|SHRINK|GROW|SEAL), which this end checks and
//                maps copy-on-write: zero copies. A peer that sends anything else gets its
//                channel closed with Errc::Protocol. The sending side seals by itself, knowing
//                the receiver's mode from the segment header.
enum class Trust : std::uint8_t { Cooperative = 0, Untrusted = 1 };

struct ChannelOptions {
  std::uint32_t slots_per_side = 16;    // pool buffers each side can have in flight (<= 448)
  std::uint32_t slot_size = 64 * 1024;  // larger buffers become memfd extents
  WaitPolicy wait{};                    // how call()/receive() wait on this end
  // Requests (call/send_request) one side may have outstanding at once; 0: as many as it has
  // buffers (slots_per_side + 64 extents). Past it, the sender gets Errc::Busy; a peer that
  // ignores it gets its channel closed with Errc::Protocol.
  std::uint32_t max_in_flight = 0;
  // Handles (fds, Channel ends) one message may carry, <= Buffer::kMaxHandles. Past it, attach
  // fails with Errc::InvalidArgument at send; a peer that ignores it: Errc::Protocol.
  std::uint32_t max_handles = 8;
  // Trust of each end (see Trust): trust[0] is the first end of pair() (the client's end of a
  // Listener's channel), trust[1] the second (the listener's, i.e. the server's).
  std::array<Trust, 2> trust{Trust::Cooperative, Trust::Cooperative};
  // Untrusted ends: payloads up to this many bytes are copied; larger ones travel sealed.
  // 0 (the default): up to 64 MiB (one memcpy, measured faster than a sealed memfd's fresh pages
  // on 4 KiB-page machines, and than a Unix socket; README "trust modes"). The memory it costs:
  // a private copy per extent buffer the untrusted end holds, the size of the payload copied
  // (at least slot_size, at most the threshold), plus copies kept for reuse after their buffers
  // went back, at most 128 MiB per end in all (beyond, they are freed). A copy that cannot be
  // allocated closes the channel (Errc::Protocol, "why" says so). Set it (>= slot_size, pool
  // buffers cannot be sealed) to send larger payloads as sealed memfds instead, zero copies;
  // those of 2 MiB and more go on huge pages where the machine has some free (vm.nr_hugepages;
  // else 4 KiB pages, much slower to prepare: README "trust modes").
  std::uint32_t copy_threshold = 0;
};

class MBMQ_EXPORT Channel {
 public:
  Channel() noexcept = default;
  Channel(Channel&&) noexcept = default;
  Channel& operator=(Channel&&) noexcept;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;
  ~Channel();

  // Two connected ends in this process (usable across fork()).
  static Result<std::pair<Channel, Channel>> pair(const ChannelOptions& options = {});

  // A buffer of `size` bytes owned by this end. Errc::NoBuffers when the pool and extent table are
  // exhausted; Errc::InvalidArgument above 4 GiB - 4 KiB.
  Result<Buffer> buffer(std::size_t size);
  // The same, but when every buffer is out (lent to the peer) it waits, per this end's
  // WaitPolicy, until one comes back or `deadline` passes (Errc::TimedOut): back-pressure for a
  // producer that streams one-way messages faster than the peer takes them. A peer that closes
  // or dies ends the wait with Errc::PeerClosed (or Protocol). On an end redirected to a queue,
  // extents (sizes above slot_size) come back through the queue: they are seen only while some
  // thread runs the queue's wait(); pool slots come back without it.
  Result<Buffer> buffer(std::size_t size, Deadline deadline);
  // Up to out.size() buffers of `size` bytes at once, for a batch (send_batch): waits as above
  // for the first, then takes what is free without waiting; returns how many were put in
  // out[0..n). Buffers left in `out` are dropped first. Pool slots come under one lock; a size
  // above slot_size makes one extent per call.
  Result<std::size_t> buffers(std::size_t size, std::span<Buffer> out, Deadline deadline);

  // Sends `buf` as a request and waits for the reply, which arrives in `buf` itself. Errors:
  // TimedOut (the buffer is then given up: `buf` becomes invalid, its slot is reclaimed when the
  // late reply comes; but if another thread's call on this channel held it until the deadline,
  // nothing was sent and `buf` is still yours), PeerClosed (the automatic reply: `buf` stays
  // usable), NoReply, Protocol, WouldBlock (the peer is not consuming: nothing sent, `buf` is
  // still yours), InvalidArgument (a buffer of another channel, this end is redirected to a
  // queue, or it was closed: also what a call in progress on another thread returns then).
  // Whatever the error, `buf` is either valid and usable or invalid, never over unmapped memory.
  Status call(Buffer& buf, Deadline deadline);
  // Sends `buf` one-way; the receiver gives it back when done with it. Errc::Busy past the
  // in-flight limit (call, send_request); Errc::WouldBlock when the ring is full, or the peer's
  // control socket is (a message with handles or a new extent to a peer that is not consuming):
  // nothing was sent and `buf` is still yours, to retry.
  Status send(Buffer&& buf);
  // Sends bufs one-way, in order, as one batch: one lock and one wake-up check for all, so the
  // peer's spinning receiver sees them as they land and a sleeping one is woken once. Returns how
  // many were sent: a prefix of bufs, each moved from (invalid); the rest are untouched, still
  // the caller's (stopped by back-pressure, Errc::WouldBlock, or an error that the next send
  // reports). An error only when none was sent (as send()). A buffer sealed on its way to an
  // untrusted peer (an extent above copy_threshold, docs/PROTOCOL.md P3c) goes only first in a
  // batch: the call stops before it, so that a failure to seal is the next call's error. A sent
  // Buffer left in bufs keeps a reference to this end (its segment stays mapped after close())
  // until buffers() reuses it or it is destroyed: reuse one span for the stream.
  Result<std::size_t> send_batch(std::span<Buffer> bufs);
  // The stream's own path (mbmq/stream.h). Reserves in `r` up to `max` (at most
  // Reservation::kMaxSlots) pool slots for one-way messages of `size` bytes (<= slot_size, else
  // Errc::InvalidArgument), to write in place and commit: waits for the first as buffers() does
  // (per this end's WaitPolicy, until `deadline`: Errc::TimedOut; PeerClosed or Protocol if the
  // channel ends; InvalidArgument for max == 0 or an end closed here), then takes what is free
  // without waiting. Returns r.size(). What r still held is given back first. No Buffer per
  // message, and one lock per batch on each side of the write.
  Result<std::size_t> reserve(Reservation& r, std::size_t size, std::size_t max, Deadline deadline);
  // Sends `buf` as a request without waiting; the reply arrives as Kind::Reply on the queue this
  // end is redirected to.
  Status send_request(Buffer&& buf);

  // Waits for the next request or one-way message on a channel that is not redirected. Answer a
  // request with reply(); a Message of Kind::PeerClosed ends the channel.
  Result<Message> receive(Deadline deadline);
  // Waits as receive() for the first message, then takes every message already there, up to
  // out.size(), without waiting: returns how many (>= 1) were written to out[0..n). A
  // Kind::PeerClosed message, if it comes, is the last one. Messages left in `out` from an earlier
  // batch are dropped first (reuse one span: no allocation per batch). Dropping a one-way message
  // gives its buffer back without a system call or a descriptor (docs/PROTOCOL.md, P7r).
  Result<std::size_t> receive_batch(std::span<Message> out, Deadline deadline);
  // Waits as receive() for the next message. If it is a one-way message in a pool slot of the
  // peer's, with no handles, it and those behind it, up to InPlace::kMaxMessages, are taken into
  // `in` to be read in place (mbmq/stream.h): returns how many (>= 1). 0: the next message is of
  // another kind (a request, an extent, handles, the final PeerClosed), or messages of any kind
  // were set aside earlier (buffer(), reserve() and call() do when they look at the ring for
  // their own buffers), or this end copies every payload (Trust::Untrusted: 0 at once whenever
  // anything is inbound): take them with receive() or receive_batch(). Once receive() has
  // delivered the final PeerClosed, the error receive() then gives (PeerClosed, Protocol). The
  // messages `in` held are given back first, together (P7r, as receive_batch()).
  Result<std::size_t> receive_in_place(InPlace& in, Deadline deadline);
  // Routes every message arriving on this end (requests, one-way messages, replies to
  // send_request(), and the final peer-closed) to `queue`, tagged with `key`.
  Status redirect(MsgQueue& queue, std::uint64_t key);

  void set_wait_policy(WaitPolicy policy);
  bool valid() const noexcept;  // false once closed
  // Whether this is a remote end (see the top of this header), open or closed.
  bool is_remote() const noexcept { return ep_ == nullptr && remote_ != nullptr; }
  // Closes this end now. The peer's pending and future calls return PeerClosed once every copy
  // of this end (e.g. across fork) is closed. Safe while other threads are inside call() or
  // receive() on it, or about to enter them: they return Errc::InvalidArgument ("closed"). The
  // end's control socket and lent buffers are released now; its mapping of the segment when the
  // handle is destroyed or assigned (a thread may still be reading the ring).
  void close() noexcept;

  // Moves this end to another process over a connected AF_UNIX socket (SCM_RIGHTS). The end must
  // be quiet: not redirected, no buffers of its own outstanding, no peer buffers held or cached
  // (Errc::Busy). On success *this is closed.
  Status send_over(int unix_socket);
  // Receives an end sent with send_over(); validates the segment (Errc::Protocol if invalid).
  static Result<Channel> receive_from(int unix_socket, Deadline deadline = Deadline::never());

 private:
  friend class MsgQueue;
  friend struct detail::TestAccess;
  friend struct detail::ChannelAccess;
  explicit Channel(std::shared_ptr<detail::Endpoint> ep) noexcept : ep_(std::move(ep)) {}
  explicit Channel(std::shared_ptr<detail::ForeignChannel> r) noexcept : remote_(std::move(r)) {}
  Result<std::size_t> remote_buffers(std::size_t size, std::span<Buffer> out, Deadline deadline);
  Result<std::size_t> remote_send_batch(std::span<Buffer> bufs);
  std::shared_ptr<detail::Endpoint> ep_;
  // A remote end instead (ep_ then null): ipc/foreign_channel.h. Looked at only where ep_ is
  // null, so a local end's methods take no extra branch.
  std::shared_ptr<detail::ForeignChannel> remote_;
};

}  // namespace mbmq
