// mbmq/net.h: channels across machines, over UCX (Active Messages on its TCP or RDMA
// transports). An opt-in library, mbmq::net; the core library never links UCX. Issue #19:
// docs/design/net.md and README "Across machines (UCX)".
//
// Most code needs none of this header's classes: with mbmq::net linked, mbmq::connect("ucx://...")
// returns an mbmq::Channel whose end is remote (a net::Channel underneath; mbmq/channel.h says what
// such an end does differently), and a redirected net::Listener delivers its connections as
// Message::channel. The classes below are that layer: net::listen() makes the listener, and
// net::connect() with ConnectOptions, then as_channel(), gives the options mbmq::connect() does not
// (peer_timeout, grants).
//
//   // server                                            // client
//   auto l = MBMQ_TRY(mbmq::net::listen(                 auto ch = MBMQ_TRY(mbmq::net::connect(
//       "ucx://10.0.0.1:7000/kv", {}));                      "ucx://10.0.0.1:7000/kv", deadline));
//   mbmq::net::Channel c = MBMQ_TRY(l.accept(deadline));  auto buf = MBMQ_TRY(ch.buffer(64));
//   auto msg = MBMQ_TRY(c.receive(deadline));            MBMQ_TRY(ch.call(buf, deadline));
//   MBMQ_TRY(mbmq::net::Channel::reply(std::move(msg)));  // the reply is now in buf
//
// Security: UCX authenticates nobody and encrypts nothing. Use on trusted networks only: bind an
// explicit address and list the clients allowed (ListenOptions::allow); anyone who can reach the
// port and is on the list can call the service, and anyone on the path can read and alter it.
//
// Process-wide effects: the first listen()/connect() creates the process's UCX context, with its
// malloc/mmap hooks and its signal handlers off (unless the user's UCX_* environment sets them),
// and UCX's own async thread. In a child forked after that, every call returns
// Errc::InvalidArgument ("forked child"): UCX cannot be used there.
//
// Thread safety: one thread at a time per Channel, but for close(), which another thread may call
// while one is inside a call on the same handle (that call returns, as on a local Channel); not
// while the handle is being moved, assigned, destroyed or given to net::adopt(), which take it. A
// Listener's accepted channels share its UCX worker, and so its lock.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "mbmq/deadline.h"
#include "mbmq/msg_queue.h"
#include "mbmq/result.h"
#include "mbmq/wait_policy.h"

namespace mbmq::net {

namespace detail {
class ChannelCore;
class ListenCore;
class NetSource;
class Queued;
class RemoteEnd;
struct ReplyToken;
class Spares;
}  // namespace detail
class Channel;
// Hands `channel` to `queue` (as MsgQueue::adopt a local one): redirected there, tagged with
// `key`, and kept open by the queue until it has delivered the channel's Kind::PeerClosed (or
// is destroyed). `channel` is left empty. Errors as Channel::redirect.
Status adopt(MsgQueue& queue, Channel&& channel, std::uint64_t key);
// The remote channel of a Kind::Connection message from a redirected net::Listener
// (Listener::redirect; msg.channel, a remote end), taken out of the message as a net::Channel:
// keep it, or net::adopt() it (or keep msg.channel as it is, an mbmq::Channel, or
// MsgQueue::adopt it). Errc::InvalidArgument if msg holds none, or a local end.
Result<Channel> accepted(mbmq::Message& msg);

// Waits until mbmq::net holds nothing more of the channels this process closed: close() does not
// wait for a peer to fetch what was sent (mbmq::net finishes it: docs/design/net.md, K5, K7).
// Success: each reached its peer, or was given up (the peer failed or fell silent for its
// peer_timeout, or 10 s passed: the linger's cap, so Deadline::never() returns within about
// that). Errc::TimedOut at `deadline` (they go on; an expired deadline may return TimedOut
// without a look), InvalidArgument from inside mbmq::net (a thread holding a worker's lock) or
// once exit() began. Success at once where UCX was never loaded, and in a forked child (it holds
// nothing of the parent's). exit() does this for up to 100 ms; a program that ends with _exit(),
// or is about to be killed or to exec, or wants a longer bound, calls it first.
Status finish_closes(Deadline deadline);

// `channel` as an mbmq::Channel (a remote end: mbmq/channel.h), so that code written for local
// channels serves it unchanged: what mbmq::connect("ucx://...") returns, here for a channel made
// with net::connect's own options or taken from net::Listener::accept. `channel` is left empty.
// Errc::InvalidArgument for a closed channel.
Result<mbmq::Channel> as_channel(Channel&& channel);

// A message buffer of a remote channel: private memory of this process (UCX moves the bytes; over
// TCP the kernel copies them). A call's reply arrives in the caller's own buffer.
class Buffer {
 public:
  Buffer() noexcept = default;
  Buffer(const Buffer&) = default;
  Buffer(Buffer&&) noexcept = default;
  Buffer& operator=(const Buffer&) = default;
  Buffer& operator=(Buffer&&) noexcept = default;
  // A large buffer's memory goes back to its channel's worker, for the next payload it receives
  // (docs/design/net.md, "Payload vectors"): a fresh 1 MiB costs 256 page faults.
  ~Buffer();
  std::span<std::byte> data() noexcept { return {bytes_.data(), size_}; }
  std::span<const std::byte> data() const noexcept { return {bytes_.data(), size_}; }
  std::size_t size() const noexcept { return size_; }
  std::size_t capacity() const noexcept { return bytes_.size(); }
  bool valid() const noexcept { return valid_; }
  // Sets size(), growing the buffer if needed. Errc::InvalidArgument past the channel's limit.
  Status resize(std::size_t n);
  // Handles cannot cross hosts: always Errc::InvalidArgument (the fd is closed, as locally).
  Status attach_fd(int fd);

 private:
  friend class detail::ChannelCore;
  friend class detail::NetSource;
  friend class detail::Queued;
  friend class detail::RemoteEnd;
  friend class Channel;
  std::vector<std::byte> bytes_;
  std::size_t size_ = 0;
  std::size_t limit_ = 0;
  bool valid_ = false;
  // A received request: where its reply goes (dropped unanswered, it answers NoReply).
  std::shared_ptr<detail::ReplyToken> reply_;
  // Where bytes_ goes when this buffer is destroyed (set on buffers above 32 KiB only,
  // Spares::kMin): weak, so that a buffer kept after its channel's worker is gone keeps nothing
  // else alive.
  std::weak_ptr<detail::Spares> home_;
  // The channel (its unique id) this buffer came from: made by its buffer() or received on it;
  // its bytes are that channel's traffic (0: none). made_: by buffer(), which may have left that
  // channel's earlier bytes in it (docs/design/net.md, "Payload vectors"): it is sent on that
  // channel only.
  std::uint64_t channel_ = 0;
  bool made_ = false;
  // A request's tag, given by an mbmq::Channel remote end's send_request() (its Buffer::id()), and
  // the tag of a send_request()'s reply (the request's): mbmq's async_call matches replies by it.
  // Never on the wire; 0 for net's own requests.
  std::uint32_t tag_ = 0;
};

struct Message {
  Kind kind = Kind::PeerClosed;  // Request, Message, Reply (of a send_request) or PeerClosed
  Buffer buffer;
  // Kind::PeerClosed: PeerClosed or Protocol. Kind::Reply: NoReply if the peer dropped the
  // request unanswered (the buffer is then empty), else PeerClosed (as mbmq::Message).
  Errc error = Errc::PeerClosed;
  const char* why = "";  // Kind::PeerClosed with Errc::Protocol: the rule broken
};

// How long a channel waits without a word from its peer before it ends with Errc::PeerClosed. A
// killed peer is seen at once (its host's TCP resets the connection); a partitioned one (a cable
// pulled, a host frozen) only through silence: each end sends a heartbeat after peer_timeout / 4
// without traffic, from a thread of mbmq::net when the application is not waiting. 0: never
// (Debian's UCX 1.13 alone did not see a partition within 70 s; docs/design/net.md).
inline constexpr std::chrono::milliseconds kDefaultPeerTimeout{10'000};

// Flow control (docs/design/net.md, "Flow control"): what a peer can make this end hold. Each end
// grants its peer, in the hello, kDefaultInboxMessages requests and one-way messages and
// kDefaultInboxBytes of their payload that it has not yet given back; it gives a one-way message
// back once the application has received it (batched: at half the grant, or when receive() is
// about to wait), a request once it is answered (the reply carries it; a request held unanswered
// holds its credit). A sender out of credit waits (call, send with a deadline) or gets
// Errc::WouldBlock (send), as with a local channel's full ring. A peer that sends beyond its
// grant is closed with Errc::Protocol before mbmq fetches or copies that payload. So one
// channel's inbox holds at most inbox_messages messages and max(inbox_bytes, the largest payload
// accepted) payload bytes (one message alone may be larger than inbox_bytes). Not bounded:
// UCX 1.13's own reassembly of one eager message from a sender forcing eager (docs/design/net.md).
// The defaults: 1024 messages (a window for small messages: with 16, one-way 64 B streams ran at a
// third or less of the rate, docs/design/net.md) and 16 MiB, the bound on memory.
inline constexpr std::uint32_t kDefaultInboxMessages = 1024;
inline constexpr std::uint32_t kDefaultInboxBytes = 16u << 20;

struct ConnectOptions {
  WaitPolicy wait{};
  std::chrono::milliseconds peer_timeout = kDefaultPeerTimeout;
  // What this end grants the server (>= 1 each; else connect() returns Errc::InvalidArgument).
  std::uint32_t inbox_messages = kDefaultInboxMessages;
  std::uint32_t inbox_bytes = kDefaultInboxBytes;
};

class Channel {
 public:
  Channel() noexcept = default;
  Channel(Channel&&) noexcept = default;
  Channel& operator=(Channel&&) noexcept;
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;
  ~Channel();

  // A buffer of `size` bytes, for this channel: call/send/send_request it on this channel only
  // (Errc::InvalidArgument on another, as a local channel's buffers). Its bytes are zeros, or,
  // like a local pool slot's, bytes of this channel's earlier messages (a recycled vector: no
  // channel's bytes ever reach another's buffer()). Errc::InvalidArgument above the peer's limit
  // (from the hello).
  Result<Buffer> buffer(std::size_t size);
  // Sends buf as a request and waits for the reply, which arrives in buf. Errors as
  // mbmq::Channel::call: TimedOut (buf is then invalid if UCX was still sending it, else still
  // yours; a late reply is dropped; if the peer granted no credit before the deadline, nothing
  // was sent and buf is still yours), PeerClosed (the automatic reply; buf stays usable: a copy
  // of its bytes if UCX was still sending them, so invalid only if that copy could not be
  // allocated), NoReply, Protocol, InvalidArgument.
  Status call(Buffer& buf, Deadline deadline);
  // Sends buf one-way. Errc::WouldBlock when the peer's grant is used up (its application has
  // not received what we sent): nothing was sent and buf is still yours, to retry.
  Status send(Buffer&& buf);
  // The same, but out of credit it waits for the peer to give some back until `deadline`
  // (Errc::TimedOut, buf still yours); a peer that closes or dies ends the wait (PeerClosed).
  // With credit, it may also wait (within the deadline) while 8 or more of this channel's
  // messages, of 512 KiB or more, are with the transport and not yet sent, so that a stream keeps
  // pace with the wire (docs/design/net.md, F8): as long as the transport completes some in each
  // millisecond; when it completes none (a peer that fetches nothing) or at the deadline, the
  // message goes anyway.
  Status send(Buffer&& buf, Deadline deadline);
  // Sends buf as a request without waiting: its reply arrives through receive() as a Kind::Reply
  // message (its buffer holds the reply's bytes; error is Errc::NoReply if the peer dropped the
  // request unanswered). Several may be outstanding, and their replies come in the order the
  // peer answers; match them by their contents (a request id of the application's). Each takes
  // the peer's credit as a call does (one message and its bytes) until its reply comes: out of
  // credit, Errc::WouldBlock (nothing sent, buf still yours). If the channel ends first, the
  // replies still owed never come: receive() returns Kind::PeerClosed. What this end holds for
  // them: one entry per outstanding request (at most the peer's message grant), and each reply
  // up to our limit (ConnectOptions: the listener's max_message; 64 MiB for a client) until
  // receive() takes it: the caller bounds that by how many it sends.
  Status send_request(Buffer&& buf);
  // The same, but out of credit it waits until `deadline` (Errc::TimedOut, buf still yours);
  // with credit it may wait for the transport window as send(buf, deadline) does.
  Status send_request(Buffer&& buf, Deadline deadline);
  // The next request, one-way message or reply (of a send_request); a Kind::PeerClosed message
  // ends the channel.
  Result<Message> receive(Deadline deadline);
  // Waits as receive() for the first message, then takes every message already received, up to
  // out.size(), without waiting: returns how many (>= 1) were written to out[0..n). A
  // Kind::PeerClosed message, if it comes, is the last one. Messages left in `out` from an
  // earlier batch are dropped first (an unanswered request among them answers NoReply).
  // Errc::InvalidArgument for an empty span.
  Result<std::size_t> receive_batch(std::span<Message> out, Deadline deadline);
  // Answers a Kind::Request with the bytes now in msg.buffer. Errc::PeerClosed if the caller is
  // gone.
  static Status reply(Message&& msg);
  // Routes every message of this channel (requests, one-way messages, replies to send_request(),
  // and the final Kind::PeerClosed with its error and why) to `queue`, tagged with `key`, as
  // mbmq::Channel::redirect: one server loop serves local and remote clients. The message's
  // mbmq::Buffer is the memory UCX received the payload into (no copy); MsgQueue::reply() answers
  // a request over the network (it may grow up to the caller's limit; handles: InvalidArgument,
  // "handles cannot cross hosts"); dropping it answers NoReply. A one-way message's credit goes
  // back once the queue has delivered it. This handle keeps the channel: call(), send() and
  // send_request() still work on it, receive() returns InvalidArgument; closing or destroying it
  // closes the channel and the queue delivers nothing more of it (no PeerClosed: use net::adopt
  // to let the queue keep it). A thread of mbmq::net per worker with redirected channels (one for
  // a listener's, one per connect()) progresses UCX while the server waits in the queue.
  // Errc::InvalidArgument if redirected already; PeerClosed/Protocol if the channel has ended.
  Status redirect(MsgQueue& queue, std::uint64_t key);

  void set_wait_policy(WaitPolicy policy);
  bool valid() const noexcept;  // false for an empty handle and once close() was called
  // Sends Bye and closes: the peer's calls get PeerClosed. Messages sent before it that the peer
  // has not fetched yet (large ones: the peer fetches them when it next progresses) still reach
  // it: close() does not wait for them but leaves them to mbmq::net's keeper thread, which keeps
  // the connection (and their bytes) until the peer has them, dies, falls silent for its
  // peer_timeout, or 10 s have passed (docs/design/net.md, "Failure", K5, K7); exit() waits up to
  // 100 ms for such channels, so that a process that sends, closes and exits loses nothing a
  // peer fetches in that time. Another thread may be
  // inside a call on this handle: it returns. The handle's memory (for a connect()ed channel,
  // its UCX worker too) is freed when it is destroyed or assigned.
  void close() noexcept;

 private:
  friend Result<Channel> connect(std::string_view, Deadline, const ConnectOptions&);
  friend Status adopt(MsgQueue&, Channel&&, std::uint64_t);
  friend class Listener;
  friend class detail::ListenCore;  // a redirected listener's connections (Listener::redirect)
  friend class detail::RemoteEnd;   // mbmq::Channel::buffer(size, deadline) on a remote end
  explicit Channel(std::shared_ptr<detail::ChannelCore> c) noexcept : core_(std::move(c)) {}
  // Kept after close() until the handle is destroyed or assigned (another thread may be inside
  // a call on it), as a local Channel keeps its end.
  std::shared_ptr<detail::ChannelCore> core_;
};

struct ListenOptions {
  // Client addresses (IPv4/IPv6 literals, no names) allowed to connect; empty: any. A client not
  // listed is rejected at connection request (its connect() gets Errc::Refused).
  std::vector<std::string> allow;
  std::uint32_t max_message = 64u << 20;  // the largest payload accepted from a client
  std::chrono::milliseconds handshake_timeout{1000};
  std::chrono::milliseconds peer_timeout = kDefaultPeerTimeout;  // for accepted channels
  // What each accepted channel grants its client (flow control, above; >= 1 each, else listen()
  // returns Errc::InvalidArgument).
  std::uint32_t inbox_messages = kDefaultInboxMessages;
  std::uint32_t inbox_bytes = kDefaultInboxBytes;
  // Connections the listener holds for the application at most: in handshake, accepted and not
  // yet taken by accept(), or delivered to the redirect()'s queue and not yet taken from it (each
  // an endpoint and a socket). A client connecting beyond it is rejected (its connect() gets
  // Errc::Refused; ListenerStats::refused_backlog). >= 1, else listen() returns InvalidArgument.
  std::uint32_t backlog = 128;
};

struct ListenerStats {
  std::uint64_t accepted = 0;
  std::uint64_t refused_address = 0;  // not on ListenOptions::allow
  std::uint64_t refused_backlog = 0;  // beyond ListenOptions::backlog
  std::uint64_t refused_service = 0;  // a hello naming another service, or another version
  std::uint64_t failed = 0;           // malformed hello, no hello in time, gone
};

class Listener {
 public:
  Listener() noexcept = default;
  Listener(Listener&&) noexcept = default;
  Listener& operator=(Listener&&) noexcept;
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  ~Listener();

  // The server's end of the next accepted connection. Errc::TimedOut at the deadline;
  // Errc::InvalidArgument once redirected to a queue (a thread inside accept() then returns).
  Result<Channel> accept(Deadline deadline);
  // Delivers every connection accepted from now on (and any accepted but not yet taken by
  // accept()) to `queue` as a Message{key, Kind::Connection} whose `channel` is the server's
  // end, a remote mbmq::Channel (MsgQueue::adopt it, or net::accepted(msg) takes it as a
  // net::Channel; dropped, the connection closes and the client sees PeerClosed), as
  // mbmq::Listener::redirect does with local ones: one loop serves new local and remote connections
  // and their requests, with no thread of the application in accept(). The listener's pump thread
  // (as for redirected channels) progresses the handshakes while the server waits in the queue, and
  // frees failed ones. Destroying the listener ends the deliveries (connections already delivered
  // are not affected); once the queue is destroyed, each new connection is closed at once (its
  // client sees PeerClosed). Errc::InvalidArgument if redirected already.
  Status redirect(MsgQueue& queue, std::uint64_t key);
  ListenerStats stats() const noexcept;
  // The port bound (useful after listening on port 0).
  std::uint16_t port() const noexcept;
  bool valid() const noexcept { return core_ != nullptr; }

 private:
  friend Result<Listener> listen(std::string_view, const ListenOptions&);
  std::shared_ptr<detail::ListenCore> core_;
};

// "ucx://ADDR:PORT/service": ADDR an IPv4 literal (the address to bind: explicit, never a
// wildcard by accident; 0.0.0.0 is allowed if written), PORT (0: any), service 1-255 bytes.
// Errc::InvalidArgument for a malformed URL; Errc::System if UCX cannot listen there.
Result<Listener> listen(std::string_view url, const ListenOptions& options = {});
// Connects to "ucx://HOST:PORT/service" (HOST an IPv4 literal). Errc::Refused if the listener
// rejects our address or serves no such service; Errc::PeerClosed/System if nobody listens;
// Errc::TimedOut at the deadline.
Result<Channel> connect(std::string_view url, Deadline deadline,
                        const ConnectOptions& options = {});

}  // namespace mbmq::net
