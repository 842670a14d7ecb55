// mbmq/net_bridge.h: Bridge, remote clients served by the same MsgQueue loop as local ones (a
// first slice of issue #19's "one server loop"). Each connection a net::Listener accepts becomes an
// ordinary local mbmq::Channel end, which the server redirects to its queue like any other: its
// remote client's requests arrive there as Kind::Request, are answered with reply() or
// reply_and_wait(), and its departure arrives as Kind::PeerClosed.
//
//   auto bridge = MBMQ_TRY(mbmq::net::Bridge::create(
//       MBMQ_TRY(mbmq::net::listen("ucx://10.0.0.1:7000/kv", {}))));
//   // an accepting thread:                          // the server loop, local clients too:
//   mbmq::Channel ch = MBMQ_TRY(bridge.accept(d));    msg = MBMQ_TRY(queue.wait(d));
//   MBMQ_TRY(queue.adopt(std::move(ch), key++));      ... msg = queue.reply_and_wait(...)
//
// How: accept() makes a Channel::pair(), returns one end (the server's) and gives the other, with
// the accepted net::Channel, to a thread of the bridge, which forwards (B1)-(B4), see bridge.cc:
// a remote request is copied into a buffer of the local pair and call()ed; the reply is copied
// back into the net message and sent with net::Channel::reply. Costs, on the server's host: one
// thread per remote client, one memcpy of each payload each way, and a local round trip (two
// thread wake-ups unless the server spins) on top of the network's (docs/design/net.md, "Bridge").
//
// Closing, either way: a remote client that leaves (or dies, or is partitioned past its
// peer_timeout) closes the local end: the server's queue gets Kind::PeerClosed. A server that
// closes its end (or drops it, or whose queue is destroyed) gets the remote channel closed: the
// client's call in flight, or its next one, ends with Errc::PeerClosed.
//
// Not carried across: the server's end can only answer. Requests and one-way messages the server
// sends on it (send, send_request) are dropped (a request is answered NoReply). Handles cannot
// cross hosts (net::Buffer::attach_fd); handles attached to a reply are dropped.
//
// Keep a thread in accept(), as with net::Listener: a connecting client's hello is answered while
// the listener's worker progresses there (a connect() waits for that answer).
//
// Thread safety: accept() from one thread at a time; stats() from any. Destroy the bridge when no
// thread is inside accept(). Memory ordering: as for the two channels it joins.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>

#include "mbmq/channel.h"
#include "mbmq/deadline.h"
#include "mbmq/net.h"
#include "mbmq/result.h"
#include "mbmq/wait_policy.h"

namespace mbmq::net {

namespace detail {
class BridgeCore;
}  // namespace detail

struct BridgeOptions {
  // Remote connections bridged at once (a thread each). Past it, accept() closes the new
  // connection at once (its client's first call gets Errc::PeerClosed) and returns Errc::Busy, so
  // that a flood of clients cannot make the server create threads without bound. 1-65536.
  std::uint32_t max_connections = 256;
  // The bound on each local call made for a remote request (the remote caller's own deadline is
  // not sent over the wire; its call ends at it regardless). Past it the request is answered
  // NoReply and the server's late reply is dropped. While the server holds a request, the bridge
  // does not see its remote client leave; it does when the answer comes, or at this bound.
  std::chrono::milliseconds call_timeout{30'000};
  // How often an idle bridge thread looks at its local end (has the server closed it?) and at the
  // bridge (is it being destroyed?): the delay before an idle remote client learns that the server
  // closed its end, and the longest wait of ~Bridge(). 1 ms - 1 s.
  std::chrono::milliseconds poll_interval{50};
  // Options of each local pair (the bridge's end is the first, trust[0]; the server's the second).
  // channel.wait is how a bridge thread waits for the server's reply. Sleep by default, as
  // remote_wait: a thread per client spinning after each message costs the server's cores more
  // than the wake-up saves (on the busy 2-vCPU test machine, bridged round trips were 5-13x
  // slower with every side adaptive than with the bridge's sides asleep: docs/design/net.md).
  ChannelOptions channel{.wait = {WaitMode::Sleep, {}}};
  // How a bridge thread waits for its remote client's next message (net::Channel::set_wait_policy).
  WaitPolicy remote_wait{WaitMode::Sleep, {}};
};

struct BridgeStats {
  std::uint64_t accepted = 0;       // connections bridged
  std::uint64_t refused_limit = 0;  // closed at once: max_connections were live
  std::uint64_t live = 0;           // bridged connections whose thread still runs
  std::uint64_t calls = 0;          // remote requests answered by the server
  std::uint64_t messages = 0;       // remote one-way messages forwarded
  std::uint64_t no_reply = 0;       // remote requests answered NoReply (dropped, timed out, ...)
};

class Bridge {
 public:
  Bridge() noexcept;
  Bridge(Bridge&&) noexcept;
  Bridge& operator=(Bridge&&) noexcept;
  Bridge(const Bridge&) = delete;
  Bridge& operator=(const Bridge&) = delete;
  // Stops every bridge thread and joins it, within about poll_interval + 200 ms (a thread inside a
  // local call is interrupted by closing its end): each remote client sees PeerClosed and each
  // local end its server holds sees PeerClosed. Then the listener is closed.
  ~Bridge();

  // Takes the listener over. Errc::InvalidArgument for an invalid listener or options out of
  // range.
  static Result<Bridge> create(Listener&& listener, const BridgeOptions& options = {});

  // The server's end of the next accepted remote connection: redirect it to a queue (or adopt()
  // it) and serve it as any local channel. Errc::TimedOut at the deadline; Errc::Busy when
  // max_connections were live (that connection was closed); Errc::System if the local pair or the
  // thread cannot be made (the connection was closed).
  Result<mbmq::Channel> accept(Deadline deadline);

  BridgeStats stats() const noexcept;
  // The listener's port and counts (see net::Listener).
  std::uint16_t port() const noexcept;
  ListenerStats listener_stats() const noexcept;
  bool valid() const noexcept { return core_ != nullptr; }

 private:
  explicit Bridge(std::unique_ptr<detail::BridgeCore> c) noexcept;
  std::unique_ptr<detail::BridgeCore> core_;
};

}  // namespace mbmq::net
