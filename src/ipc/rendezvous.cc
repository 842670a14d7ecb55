// Listener and connect(): the rendezvous handshake (R1)-(R4) of include/mbmq/rendezvous.h.
#include "mbmq/rendezvous.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <string>

#include "os/fd.h"
#include "os/process.h"
#include "os/unix_socket.h"

namespace mbmq {

namespace {

constexpr std::uint64_t kHelloMagic = 0x4f4c'4548'514d'424dull;    // "MBMQHELO"
constexpr std::uint64_t kVerdictMagic = 0x5443'4944'514d'424dull;  // "MBMQDICT"
constexpr std::uint32_t kRendezvousVersion = 1;

struct Hello {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t reserved;
};
enum class Verdict : std::uint32_t { Accepted = 1, RefusedPolicy = 2, RefusedVersion = 3 };
struct VerdictMsg {
  std::uint64_t magic;
  std::uint32_t verdict;  // Verdict
  std::uint32_t reserved;
};
static_assert(sizeof(Hello) == 16 && sizeof(VerdictMsg) == 16);

std::string socket_name(std::string_view name) { return "mbmq:" + std::string(name); }

std::int64_t timeout_of(Deadline d) {
  return d.is_never() ? -1 : std::max<std::int64_t>(d.remaining_ns(), 0);
}

// One message of exactly sizeof(T) bytes and no fds, within the deadline.
template <class T>
Result<T> recv_exact(int sock, Deadline deadline, const char* what) {
  bool ready = MBMQ_TRY(os::wait_readable(sock, timeout_of(deadline)));
  if (!ready) return fail(Errc::TimedOut, what);
  T msg{};
  std::array<os::UniqueFd, 1> fds;  // any fd sent here is closed when this goes out of scope
  auto r = MBMQ_TRY(
      os::recv_msg(sock, {reinterpret_cast<std::byte*>(&msg), sizeof(msg)}, fds, os::Blocking::No));
  if (r.bytes == 0 && r.nfds == 0) return fail(Errc::PeerClosed, what);
  if (r.truncated || r.bytes != sizeof(T) || r.nfds != 0) return fail(Errc::Protocol, what);
  return msg;
}

template <class T>
Status send_plain(int sock, const T& msg) {
  return os::send_msg(sock, {reinterpret_cast<const std::byte*>(&msg), sizeof(msg)}, {});
}

bool allowed(const AccessPolicy& p, const os::PeerCred& c, unsigned my_uid) {
  if (p.allow_any || c.uid == my_uid) return true;
  return std::find(p.allow_uids.begin(), p.allow_uids.end(), c.uid) != p.allow_uids.end() ||
         std::find(p.allow_gids.begin(), p.allow_gids.end(), c.gid) != p.allow_gids.end();
}

}  // namespace

Listener::Listener(Listener&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)),
      name_(std::move(o.name_)),
      options_(std::move(o.options_)),
      refused_(o.refused_),
      failed_(o.failed_) {}

Listener& Listener::operator=(Listener&& o) noexcept {
  if (this != &o) {
    os::UniqueFd old(fd_);
    fd_ = std::exchange(o.fd_, -1);
    name_ = std::move(o.name_);
    options_ = std::move(o.options_);
    refused_ = o.refused_;
    failed_ = o.failed_;
  }
  return *this;
}

Listener::~Listener() { os::UniqueFd close_it(fd_); }

Result<Listener> Listener::create(std::string_view name, ListenOptions options) {
  os::UniqueFd fd = MBMQ_TRY(os::listen_abstract(socket_name(name), options.backlog));
  Listener l;
  l.fd_ = fd.release();
  l.name_ = std::string(name);
  l.options_ = std::move(options);
  return l;
}

Result<Channel> Listener::accept(Deadline deadline) {
  if (fd_ < 0) return fail(Errc::InvalidArgument, "Listener::accept: invalid listener");
  const unsigned my_uid = os::current_uid();
  for (;;) {
    bool ready = MBMQ_TRY(os::wait_readable(fd_, timeout_of(deadline)));
    if (!ready) return fail(Errc::TimedOut, "Listener::accept");
    auto conn = os::accept_conn(fd_);
    if (!conn) {
      if (conn.error().code == Errc::WouldBlock) continue;  // the client gave up meanwhile
      return fail(conn.error());
    }
    // (R2) Read the hello first: closing a Unix socket with unread data resets the connection,
    // and the client would lose our verdict.
    Deadline hs = Deadline::after(options_.handshake_timeout);
    if (!deadline.is_never() && deadline.ns() < hs.ns()) hs = deadline;
    auto hello = recv_exact<Hello>(conn->get(), hs, "handshake: hello");
    if (!hello || hello->magic != kHelloMagic) {
      ++failed_;
      continue;
    }
    // Who is it? The kernel recorded the peer's credentials at connect().
    auto cred = os::peer_cred(conn->get());
    Verdict verdict = !cred || !allowed(options_.access, *cred, my_uid) ? Verdict::RefusedPolicy
                      : hello->version != kRendezvousVersion            ? Verdict::RefusedVersion
                                                                        : Verdict::Accepted;
    if (verdict != Verdict::Accepted) {
      // (R3) Refused: a verdict, no fd, and the connection is closed.
      (void)send_plain(conn->get(),
                       VerdictMsg{kVerdictMagic, static_cast<std::uint32_t>(verdict), 0});
      ++refused_;
      continue;
    }
    // (R4) Accepted: a new channel; the client's end travels over this connection.
    auto ends = MBMQ_TRY(Channel::pair(options_.channel));
    if (!send_plain(conn->get(),
                    VerdictMsg{kVerdictMagic, static_cast<std::uint32_t>(Verdict::Accepted), 0}) ||
        !ends.first.send_over(conn->get())) {
      ++failed_;  // the client went away: the pair is dropped, nothing leaks
      continue;
    }
    return std::move(ends.second);
  }
}

Result<Channel> connect(std::string_view name, Deadline deadline, WaitPolicy wait) {
  // (R1)
  os::UniqueFd sock = MBMQ_TRY(os::connect_abstract(socket_name(name)));
  MBMQ_TRY(send_plain(sock.get(), Hello{kHelloMagic, kRendezvousVersion, 0}));
  auto v = MBMQ_TRY(recv_exact<VerdictMsg>(sock.get(), deadline, "connect: verdict"));
  if (v.magic != kVerdictMagic) return fail(Errc::Protocol, "connect: verdict");
  if (v.verdict == static_cast<std::uint32_t>(Verdict::RefusedPolicy))
    return fail(Errc::Refused, "connect: the listener's access policy refused this uid");
  if (v.verdict == static_cast<std::uint32_t>(Verdict::RefusedVersion))
    return fail(Errc::Refused, "connect: protocol version not supported by the listener");
  if (v.verdict != static_cast<std::uint32_t>(Verdict::Accepted))
    return fail(Errc::Protocol, "connect: verdict");
  Channel ch = MBMQ_TRY(Channel::receive_from(sock.get(), deadline));
  ch.set_wait_policy(wait);
  return ch;
}

}  // namespace mbmq
