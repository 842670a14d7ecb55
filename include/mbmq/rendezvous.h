// mbmq/rendezvous.h: channels between processes that did not fork from each other, with no daemon.
//
//   // server: one loop for connections and requests   // client
//   auto l = MBMQ_TRY(mbmq::Listener::create("kv"));    auto ch = MBMQ_TRY(mbmq::connect("kv",
//   MBMQ_TRY(l.redirect(queue, 0));                          mbmq::Deadline::after(1s)));
//   msg = queue.wait(...);  // Kind::Connection: queue.adopt(std::move(msg.channel), key)
//   (or, without a queue: mbmq::Channel ch = MBMQ_TRY(l.accept(deadline));)
//
// Names live in the Linux abstract Unix-socket namespace ("\0mbmq:" + name): no file is created, so
// nothing is left behind after a crash and a restarted server can listen on the same name at once.
// The namespace has no file permissions: access is decided by the listener from SO_PEERCRED (the
// kernel's word for the connecting process's uid/gid), by default "same uid only".
//
// The listener's side of the handshake runs on the process's watcher thread (ipc/peer_watch.h),
// with non-blocking I/O only: a slow or silent client costs the server loop nothing, and the
// accepted channel arrives ready to use, as Kind::Connection on the queue the listener is
// redirected to (or from accept(), which waits on a private queue).
//
// Handshake (R1-R4), each step bounded by a deadline:
//  (R1) The client connects (SOCK_SEQPACKET) and sends Hello{magic, protocol version, flags}
//       (flags: its end is to be Trust::Untrusted).
//  (R2) The listener reads Hello (a connection with no hello within handshake_timeout is dropped
//       and counted), then SO_PEERCRED, and checks its AccessPolicy, then its connection limit.
//       (Hello first: a Unix socket closed with unread data resets the connection, and the
//       client would lose the verdict.)
//  (R3) Refused (policy, version or limit): it sends Verdict{refused, reason} with no fd and
//       closes; the client's connect() returns Errc::Refused saying why. Nothing else was created
//       on either side.
//  (R4) Accepted: it makes a channel pair, sends Verdict{accepted}, then the client's end with
//       Channel::send_over (the sealed segment memfd and the control socket, SCM_RIGHTS), and
//       closes the rendezvous connection; the channel lives on its own control socket.
//
// Limits, enforced by the listener and reported in stats() and to the refused client:
//   max_connections  accepted channels alive at once in this process (the server's ends not yet
//                    destroyed, adopted ones included); beyond it, Verdict{refused: limit}.
//   max_handshakes   connections in R1-R2 at once; beyond it, new ones are closed unanswered.
// Per channel (ChannelOptions): slots_per_side bounds the buffers, hence the calls, each side can
// have in flight; max_in_flight lowers that for requests; max_handles bounds fds per message.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "mbmq/channel.h"
#include "mbmq/deadline.h"
#include "mbmq/msg_queue.h"
#include "mbmq/result.h"

namespace mbmq {

namespace detail {
class ListenCore;
class QueueCore;
}  // namespace detail

struct AccessPolicy {
  bool allow_any = false;            // accept every uid (the kernel still names it)
  std::vector<unsigned> allow_uids;  // besides the listener's own uid
  std::vector<unsigned> allow_gids;  // a peer whose primary gid is listed is accepted too
};

struct ListenOptions {
  AccessPolicy access{};
  ChannelOptions channel{};  // for the channels made for accepted connections
  std::chrono::milliseconds handshake_timeout{1000};  // per connection, for R2
  int backlog = 128;
  std::uint32_t max_connections = 1024;
  std::uint32_t max_handshakes = 64;
};

struct ListenerStats {
  std::uint64_t accepted = 0;
  std::uint64_t refused_policy = 0;   // uid/gid not allowed (R3)
  std::uint64_t refused_version = 0;  // protocol version not spoken here (R3)
  std::uint64_t refused_limit = 0;    // max_connections reached (R3)
  std::uint64_t failed = 0;           // no hello in time, garbage, handshake limit, client gone
  std::uint64_t live = 0;             // accepted channels alive now (counted against the limit)
};

class Listener {
 public:
  Listener() noexcept = default;
  // Errc::System/EADDRINUSE if another live listener has the name.
  static Result<Listener> create(std::string_view name, ListenOptions options = {});

  // The server's end of a new channel for the next accepted connection. Refused and broken
  // handshakes are answered or dropped and counted, not returned. Errc::TimedOut at the deadline;
  // Errc::InvalidArgument once redirected to a queue.
  Result<Channel> accept(Deadline deadline);
  // Delivers every accepted connection to `queue` as a Message{key, Kind::Connection, channel}
  // (connections already accepted and not yet taken go there too). Once only.
  Status redirect(MsgQueue& queue, std::uint64_t key);

  ListenerStats stats() const noexcept;
  std::uint64_t refused() const noexcept;  // all three refusals
  std::uint64_t failed_handshakes() const noexcept { return stats().failed; }
  const std::string& name() const noexcept { return name_; }
  bool valid() const noexcept { return core_ != nullptr; }

  Listener(Listener&& o) noexcept = default;
  Listener& operator=(Listener&& o) noexcept;
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  // Stops listening: the name is free at once; handshakes in progress are dropped, accepted
  // channels not yet taken are closed (their clients see PeerClosed).
  ~Listener();

 private:
  std::shared_ptr<detail::ListenCore> core_;
  std::shared_ptr<detail::QueueCore> own_queue_;  // accept()'s, until redirected
  std::string name_;
};

// Connects to the listener called `name`. Errc::Refused if its policy refuses us,
// Errc::System/ECONNREFUSED if nobody listens, Errc::TimedOut at the deadline. `trust` is this
// end's trust mode (see channel.h): Trust::Untrusted protects us from the server's replies; it is
// asked for in the hello and checked in the segment we get (Errc::Refused if not granted).
Result<Channel> connect(std::string_view name, Deadline deadline, WaitPolicy wait = {},
                        Trust trust = Trust::Cooperative);

}  // namespace mbmq
