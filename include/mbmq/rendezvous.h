// mbmq/rendezvous.h: channels between processes that did not fork from each other, with no daemon.
//
//   // server                                         // client
//   auto l = MBMQ_TRY(mbmq::Listener::create("kv"));   auto ch = MBMQ_TRY(mbmq::connect("kv",
//   mbmq::Channel ch = MBMQ_TRY(l.accept(deadline));        mbmq::Deadline::after(1s)));
//
// Names live in the Linux abstract Unix-socket namespace ("\0mbmq:" + name): no file is created, so
// nothing is left behind after a crash and a restarted server can listen on the same name at once.
// The namespace has no file permissions: access is decided by the listener from SO_PEERCRED (the
// kernel's word for the connecting process's uid/gid), by default "same uid only".
//
// Handshake (R1-R4), each step bounded by a deadline:
//  (R1) The client connects (SOCK_SEQPACKET) and sends Hello{magic, protocol version}.
//  (R2) The listener reads Hello (within its handshake timeout), then SO_PEERCRED, and checks its
//       AccessPolicy. (Hello first: a Unix socket closed with unread data resets the connection,
//       and the client would lose the verdict.)
//  (R3) Refused (policy or version): it sends Verdict{refused, reason} with no fd and closes; the
//       client's connect() returns Errc::Refused. Nothing else was created on either side.
//  (R4) Accepted: it makes a channel pair, sends Verdict{accepted}, then the client's end with
//       Channel::send_over (the sealed segment memfd and the control socket, SCM_RIGHTS), and
//       closes the rendezvous connection; the channel lives on its own control socket.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "mbmq/channel.h"
#include "mbmq/deadline.h"
#include "mbmq/result.h"

namespace mbmq {

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
};

class Listener {
 public:
  Listener() noexcept = default;
  // Errc::System/EADDRINUSE if another live listener has the name.
  static Result<Listener> create(std::string_view name, ListenOptions options = {});

  // The server's end of a new channel for the next accepted connection. Refused and broken
  // handshakes are answered or dropped and counted, not returned. Errc::TimedOut at the deadline.
  Result<Channel> accept(Deadline deadline);

  std::uint64_t refused() const noexcept { return refused_; }
  std::uint64_t failed_handshakes() const noexcept { return failed_; }
  const std::string& name() const noexcept { return name_; }
  bool valid() const noexcept { return fd_ >= 0; }

  Listener(Listener&& o) noexcept;
  Listener& operator=(Listener&& o) noexcept;
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;
  ~Listener();

 private:
  int fd_ = -1;
  std::string name_;
  ListenOptions options_;
  std::uint64_t refused_ = 0, failed_ = 0;
};

// Connects to the listener called `name`. Errc::Refused if its policy refuses us,
// Errc::System/ECONNREFUSED if nobody listens, Errc::TimedOut at the deadline.
Result<Channel> connect(std::string_view name, Deadline deadline, WaitPolicy wait = {});

}  // namespace mbmq
