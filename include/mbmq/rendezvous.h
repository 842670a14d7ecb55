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
// The namespace has no file permissions, in either direction:
//  - who may connect is decided by the listener from SO_PEERCRED (the kernel's word for the
//    connecting process's uid/gid), by default "same uid only" (AccessPolicy);
//  - who may listen is not decided by anyone: any process can bind a name first (squat it) and
//    would get the client's hello and everything sent on the channel. So connect() checks the
//    listener's uid (SO_PEERCRED of the connected socket: the listener's credentials at listen())
//    before it sends anything, by default "our uid or root" (ServerPolicy).
//
// The listener's side of the handshake runs on the process's watcher thread (ipc/peer_watch.h),
// with non-blocking I/O only: a slow or silent client costs the server loop nothing, and the
// accepted channel arrives ready to use, as Kind::Connection on the queue the listener is
// redirected to (or from accept(), which waits on a private queue).
//
// Handshake (R1-R4), each step bounded by a deadline:
//  (R1) The client connects (SOCK_SEQPACKET; connect(2) waits for room in a full backlog until the
//       deadline), checks the listener's SO_PEERCRED against its ServerPolicy (Errc::Refused
//       naming the uid found, nothing sent), and sends Hello{magic, protocol version, flags}
//       (flags: its end is to be Trust::Untrusted).
//  (R2) The listener accepts and reads SO_PEERCRED at once: a uid its AccessPolicy refuses gets
//       Verdict{refused: policy} and is closed without taking a handshake slot (R3). An allowed
//       connection whose hello is already there goes on to the checks below at once; a silent one
//       takes a handshake slot (at most max_handshakes, and max_handshakes_per_uid per uid; past
//       either, Verdict{refused: busy}) until its hello comes, or handshake_timeout passes (then
//       it is dropped and counted). Then the protocol version, then the connection limit.
//  (R3) Refused (policy, version, limit or busy): it reads the hello if it is there (a Unix socket
//       closed with unread data resets the connection), sends Verdict{refused, reason} with no fd
//       and closes. The client reads the verdict whether it came before or after its hello (a
//       hello sent to a closed connection fails with EPIPE; a reset is reported once, ahead of the
//       queued verdict), and connect() returns Errc::Refused saying why; for "busy" it tries
//       again until its deadline. Nothing else was created on either side.
//  (R4) Accepted: it makes a channel pair, sends Verdict{accepted}, then the client's end with
//       Channel::send_over (the sealed segment memfd and the control socket, SCM_RIGHTS), and
//       closes the rendezvous connection; the channel lives on its own control socket.
//  A stat query (mbmq/introspect.h, `mbmq stat`) takes the same path to (R2), then sends a
//  StatQuery where the hello goes and gets one stat reply instead of a verdict: steps (Q1)-(Q4)
//  of docs/design/introspection.md.
//
// Limits, enforced by the listener and reported in stats() and to the refused client:
//   max_connections  accepted channels alive at once in this process (the server's ends not yet
//                    destroyed, adopted ones included); beyond it, Verdict{refused: limit}.
//                    By default derived from the fd table (below).
//   max_handshakes   silent connections in R2 at once, max_handshakes_per_uid of them per uid;
//                    beyond either, Verdict{refused: busy}.
// Per channel (ChannelOptions): slots_per_side bounds the buffers, hence the calls, each side can
// have in flight; max_in_flight lowers that for requests; max_handles bounds fds per message.
//
// File descriptors. Each accepted connection costs the server's process kFdsPerConnection = 5
// fds while idle: the segment memfd and the control socket of its end, and the three fds of the
// client's queue doorbell (ready page, wait page, signal socket) once the client redirects its
// end to a MsgQueue (2 without). On top, while in
// use: one memfd per large-buffer extent mapped (up to 64 of the client's and 64 of the server's
// own) and fds travelling as handles. A handshake holds 1 fd (the connection) from accept to
// R4, and R4 briefly 6 more (the new pair's segment memfd, its duplicate, the socketpair, and
// the duplicates sent of the client's end). With max_connections = 0 (the default) the listener
// takes
//   min(1024, ((soft RLIMIT_NOFILE - fds open at create()) * 3/4 - max_handshakes - 6) / 5)
// (at least 1): idle clients are refused with "connection limit" while a quarter of the free fd
// table stays for the application. With the usual soft limit of 1,024 that is about 138.
// Should the table fill all the same (extents, the application's own files), accept4() fails
// with EMFILE: the listener then stops watching its socket and retries after a delay (10 ms,
// doubling to 200 ms; stats().fd_backoffs), rather than waking up for it in a loop; connections
// wait in the kernel's backlog meanwhile, and a client's connect() ends at its deadline.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "mbmq/channel.h"
#include "mbmq/deadline.h"
#include "mbmq/export.h"
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

// What each accepted connection costs the server's process in fds while idle (see above).
inline constexpr std::uint32_t kFdsPerConnection = 5;

struct ListenOptions {
  AccessPolicy access{};
  ChannelOptions channel{};  // for the channels made for accepted connections
  // Per silent connection, for R2. Any length (hours, milliseconds::max()) is safe.
  std::chrono::milliseconds handshake_timeout{1000};
  int backlog = 128;
  std::uint32_t max_connections = 0;  // 0: derived from RLIMIT_NOFILE at create() (see above)
  std::uint32_t max_handshakes = 64;
  std::uint32_t max_handshakes_per_uid = 0;  // 0: max_handshakes / 4, at least 1
};

struct ListenerStats {
  std::uint64_t accepted = 0;
  std::uint64_t refused_policy = 0;   // uid/gid not allowed (R2, at accept)
  std::uint64_t refused_version = 0;  // protocol version not spoken here (R3)
  std::uint64_t refused_limit = 0;    // max_connections reached (R3)
  std::uint64_t refused_busy = 0;     // handshake slots (all, or its uid's) taken; out of fds
  std::uint64_t failed = 0;           // no hello in time, garbage, client gone
  std::uint64_t live = 0;             // accepted channels alive now (counted against the limit)
  std::uint64_t fd_backoffs = 0;      // accept4() found the fd table full: paused (see above)
};

class MBMQ_EXPORT Listener {
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
  std::uint64_t refused() const noexcept;  // all four refusals
  // The connection limit in force (ListenOptions::max_connections, or the derived one).
  std::uint32_t max_connections() const noexcept;
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

// The listener's credentials as the kernel recorded them when it called listen() (SO_PEERCRED of
// the connected socket; effective ids, in this process's namespaces).
struct PeerIdentity {
  int pid = 0;
  unsigned uid = 0;
  unsigned gid = 0;
};

// Whom connect() talks to: checked right after connect(2), before the hello is sent, so a process
// squatting the name learns nothing but our credentials (which the kernel gives it at connect).
// A listener that fails it: Errc::Refused, the message naming its uid.
struct ServerPolicy {
  // The uids the listener may run as. Empty (the default): our own (real or effective) uid, or
  // root, who can read our memory anyway.
  std::vector<unsigned> expected_uids;
  bool allow_any = false;  // any listener: only where the name is known to be safe
  // If set, it alone decides (the two fields above are ignored): true to go on. Runs on the
  // calling thread, inside connect().
  std::function<bool(const PeerIdentity&)> check;
};

struct ConnectOptions {
  WaitPolicy wait{};                 // how call()/receive() wait on the new end
  Trust trust = Trust::Cooperative;  // this end's trust mode (see below)
  ServerPolicy server{};             // who may be listening (see above)
};

// Connects to the listener called `name`. Errc::Refused if the listener is not one
// options.server trusts (before anything is sent; the message names the uid found), or if its
// policy refuses us, or it is at its connection limit (each message says which);
// Errc::System/ECONNREFUSED if nobody listens; Errc::TimedOut at the deadline (including a full
// backlog: a listener that does not accept). A listener that answers "busy" (handshake slots
// taken, out of fds) is asked again, with pauses of 1 ms doubling to 50 ms, while the deadline
// leaves room for the next pause; then Errc::Refused saying so. options.trust is this end's trust
// mode (see channel.h): Trust::Untrusted protects us from the server's replies; it is asked for in
// the hello and checked in the segment we get (Errc::Refused if not granted).
MBMQ_EXPORT Result<Channel> connect(std::string_view name, Deadline deadline,
                                    const ConnectOptions& options);
// The same with ConnectOptions{wait, trust, ServerPolicy{}} (the default server policy).
MBMQ_EXPORT Result<Channel> connect(std::string_view name, Deadline deadline, WaitPolicy wait = {},
                                    Trust trust = Trust::Cooperative);

}  // namespace mbmq
