#include "os/unix_socket.h"

#include <sys/socket.h>
#include <sys/un.h>

#include <cerrno>
#include <cstddef>
#include <cstring>

#include "os/fault.h"
#include "os/syscall_count.h"

namespace mbmq::os {

namespace {
Result<std::pair<UniqueFd, UniqueFd>> unix_pair(int type) {
  int sv[2];
  if (injected(Fault::SocketPair))
    return fail(Error::from_syscall("socketpair", fault_errno(Fault::SocketPair)));
  count_syscall();
  if (::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0)
    return fail(Error::from_syscall("socketpair", errno));
  return std::pair<UniqueFd, UniqueFd>{UniqueFd(sv[0]), UniqueFd(sv[1])};
}
}  // namespace

Result<std::pair<UniqueFd, UniqueFd>> seqpacket_pair() { return unix_pair(SOCK_SEQPACKET); }

namespace {
union CmsgSpace {
  cmsghdr align;
  char buf[CMSG_SPACE(sizeof(int) * kMaxFdsPerMsg)];
};
}  // namespace

Status send_msg(int sock, std::span<const std::byte> bytes, std::span<const int> fds,
                Blocking blocking) {
  if (fds.size() > kMaxFdsPerMsg) return fail(Errc::InvalidArgument, "send_msg: too many fds");
  iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  CmsgSpace space{};
  if (!fds.empty()) {
    msg.msg_control = space.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    if (injected(Fault::SendMsg))
      return fail(Error::from_syscall("sendmsg", fault_errno(Fault::SendMsg)));
    count_syscall();
    ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL | (blocking == Blocking::No ? MSG_DONTWAIT : 0));
    if (n >= 0) return {};
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return fail(Errc::WouldBlock, "sendmsg");
    if (errno == EPIPE || errno == ECONNRESET) return fail(Errc::PeerClosed, "sendmsg");
    return fail(Error::from_syscall("sendmsg", errno));
  }
}

Result<Received> recv_msg(int sock, std::span<std::byte> bytes, std::span<UniqueFd> fds_out,
                          Blocking blocking) {
  iovec iov{bytes.data(), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  CmsgSpace space{};
  msg.msg_control = space.buf;
  msg.msg_controllen = sizeof(space.buf);
  int flags = MSG_CMSG_CLOEXEC | (blocking == Blocking::No ? MSG_DONTWAIT : 0);
  ssize_t n;
  for (;;) {
    if (injected(Fault::RecvMsg))
      return fail(Error::from_syscall("recvmsg", fault_errno(Fault::RecvMsg)));
    count_syscall();
    n = ::recvmsg(sock, &msg, flags);
    if (n >= 0) break;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return fail(Errc::WouldBlock, "recvmsg");
    if (errno == ECONNRESET) return fail(Errc::PeerClosed, "recvmsg");
    return fail(Error::from_syscall("recvmsg", errno));
  }
  Received r;
  r.bytes = static_cast<std::size_t>(n);
  // Take ownership of every fd first, so none leaks whatever happens next.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (r.nfds < fds_out.size()) {
        fds_out[r.nfds++] = UniqueFd(fd);
      } else {
        UniqueFd discard(fd);
        r.truncated = true;
      }
    }
  }
  if ((msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) r.truncated = true;
  return r;
}

}  // namespace mbmq::os

#include <poll.h>

#include <chrono>
#include <climits>

#include "mbmq/deadline.h"

namespace mbmq::os {

void shutdown_socket(int sock) noexcept {
  count_syscall();
  ::shutdown(sock, SHUT_RDWR);
}

void shutdown_write(int sock) noexcept {
  count_syscall();
  ::shutdown(sock, SHUT_WR);
}

namespace {
// poll()'s timeout for what is left of `d`: whole milliseconds rounded up (so poll never wakes
// before the deadline), at most INT_MAX (~24.8 days; the caller polls again after that).
int poll_ms(Deadline d) {
  if (d.is_never()) return -1;
  const std::int64_t left = d.remaining_ns();
  if (left <= 0) return 0;
  const std::int64_t ms = left / 1'000'000 + (left % 1'000'000 != 0 ? 1 : 0);
  return ms > INT_MAX ? INT_MAX : static_cast<int>(ms);
}

// Waits against an absolute deadline, not a timeout: a signal (EINTR) retries with the time
// left. Retrying with the original timeout made a process that gets signals more often than
// its timeout (a profiler, an interval timer) wait forever.
Result<bool> wait_for(int fd, short events, std::int64_t timeout_ns) {
  const Deadline d =
      timeout_ns < 0 ? Deadline::never() : Deadline::after(std::chrono::nanoseconds(timeout_ns));
  pollfd p{fd, events, 0};
  for (;;) {
    count_syscall();
    int r = ::poll(&p, 1, poll_ms(d));
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return fail(Error::from_syscall("poll", errno));
    // EINTR, or a timeout: clamped to INT_MAX ms, or (never seen) ahead of our clock.
    if (d.expired()) return false;
  }
}
}  // namespace

Result<bool> wait_readable(int sock, std::int64_t timeout_ns) {
  return wait_for(sock, POLLIN, timeout_ns);
}
Result<bool> wait_writable(int fd, std::int64_t timeout_ns) {
  return wait_for(fd, POLLOUT, timeout_ns);
}

}  // namespace mbmq::os

namespace mbmq::os {
Result<std::pair<UniqueFd, UniqueFd>> stream_pair() { return unix_pair(SOCK_STREAM); }
}  // namespace mbmq::os

#include <sys/time.h>

#include <cstdint>

namespace mbmq::os {

namespace {
Result<sockaddr_un> abstract_addr(std::string_view name, socklen_t* len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  if (name.empty() || name.size() > 100 || name.find('\0') != std::string_view::npos)
    return fail(Errc::InvalidArgument, "rendezvous name: 1..100 bytes, no NUL");
  // sun_path[0] = '\0' selects the abstract namespace; the name follows, not NUL-terminated.
  std::memcpy(a.sun_path + 1, name.data(), name.size());
  *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return a;
}
}  // namespace

Result<UniqueFd> listen_abstract(std::string_view name, int backlog) {
  socklen_t len = 0;
  sockaddr_un a = MBMQ_TRY(abstract_addr(name, &len));
  count_syscall();
  // Non-blocking: accept_conn() is called after poll() says a connection waits, and must not
  // block if the connecting side went away in between.
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return fail(Error::from_syscall("socket", errno));
  count_syscall();
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), len) != 0)
    return fail(Error::from_syscall("bind", errno));
  count_syscall();
  if (::listen(fd.get(), backlog) != 0) return fail(Error::from_syscall("listen", errno));
  return fd;
}

Result<UniqueFd> connect_abstract(std::string_view name, std::int64_t timeout_ns) {
  socklen_t len = 0;
  sockaddr_un a = MBMQ_TRY(abstract_addr(name, &len));
  count_syscall();
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd) return fail(Error::from_syscall("socket", errno));
  // A Unix-socket connect(2) to a full backlog sleeps until the listener accepts, bounded only by
  // SO_SNDTIMEO (then EAGAIN). Non-blocking connect cannot be waited for (no EINPROGRESS here).
  const std::int64_t start = timeout_ns >= 0 ? monotonic_ns() : 0;
  for (bool again = false;; again = true) {
    if (timeout_ns >= 0) {
      const std::int64_t left = timeout_ns - (monotonic_ns() - start);
      if (again && left <= 0)
        return fail(Errc::TimedOut, "connect: the listener's backlog is full");
      // At least 1 us (a zero SO_SNDTIMEO means no limit): an expired deadline still connects to
      // a listener with room in its backlog.
      const std::int64_t ns = left < 1000 ? 1000 : left;
      const std::int64_t s = ns / 1'000'000'000 < INT32_MAX ? ns / 1'000'000'000 : INT32_MAX;
      timeval tv{static_cast<time_t>(s),
                 static_cast<suseconds_t>(s == INT32_MAX ? 0 : ns % 1'000'000'000 / 1000)};
      count_syscall();
      if (::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0)
        return fail(Error::from_syscall("setsockopt(SO_SNDTIMEO)", errno));
    }
    count_syscall();
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), len) == 0) break;
    if (errno == EINTR) continue;  // with the time left
    if (errno == EAGAIN && timeout_ns >= 0)
      return fail(Errc::TimedOut, "connect: the listener's backlog is full");
    return fail(Error::from_syscall("connect", errno));
  }
  if (timeout_ns >= 0) {
    // Back to no limit: the connection's own sends are bounded by their callers' deadlines.
    timeval none{0, 0};
    count_syscall();
    (void)::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &none, sizeof(none));
  }
  return fd;
}

Result<UniqueFd> accept_conn(int listener) {
  for (;;) {
    count_syscall();
    int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);  // the new socket blocks
    if (fd >= 0) return UniqueFd(fd);
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return fail(Errc::WouldBlock, "accept");
    return fail(Error::from_syscall("accept4", errno));
  }
}

Result<int> set_send_buffer(int sock, int bytes) {
  count_syscall();
  if (::setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes)) != 0)
    return fail(Error::from_syscall("setsockopt(SO_SNDBUF)", errno));
  int got = 0;
  socklen_t len = sizeof(got);
  count_syscall();
  if (::getsockopt(sock, SOL_SOCKET, SO_SNDBUF, &got, &len) != 0)
    return fail(Error::from_syscall("getsockopt(SO_SNDBUF)", errno));
  return got;
}

namespace {
bool is_unix_of_type(int fd, int want) noexcept {
  int type = 0, domain = 0;
  socklen_t len = sizeof(type);
  count_syscall();
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) return false;
  len = sizeof(domain);
  count_syscall();
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) return false;
  return type == want && domain == AF_UNIX;
}
}  // namespace

bool is_unix_seqpacket(int fd) noexcept { return is_unix_of_type(fd, SOCK_SEQPACKET); }

bool is_unix_dgram(int fd) noexcept { return is_unix_of_type(fd, SOCK_DGRAM); }

Result<UniqueFd> dgram_receiver() {
  count_syscall();
  UniqueFd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return fail(Error::from_syscall("socket", errno));
  // Autobind: the kernel picks an unused abstract name. Anyone on the machine may send to it:
  // a spurious wake-up at worst.
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  count_syscall();
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&a), sizeof(sa_family_t)) != 0)
    return fail(Error::from_syscall("bind", errno));
  return fd;
}

Result<UniqueFd> dgram_sender_to(int receiver) {
  sockaddr_un a{};
  socklen_t len = sizeof(a);
  count_syscall();
  if (::getsockname(receiver, reinterpret_cast<sockaddr*>(&a), &len) != 0)
    return fail(Error::from_syscall("getsockname", errno));
  count_syscall();
  UniqueFd fd(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail(Error::from_syscall("socket", errno));
  count_syscall();
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&a), len) != 0)
    return fail(Error::from_syscall("connect", errno));
  return fd;
}

void signal_byte(int sock) noexcept {
  const char one = 1;
  count_syscall();
  (void)::send(sock, &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
}

std::size_t drain_bytes(int sock) noexcept {
  std::size_t n = 0;
  char buf[16];
  while (n < 64) {
    count_syscall();
    if (::recv(sock, buf, sizeof(buf), MSG_DONTWAIT) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    ++n;
  }
  return n;
}

Result<PeerCred> peer_cred(int sock) {
  ucred c{};
  socklen_t len = sizeof(c);
  count_syscall();
  if (::getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &c, &len) != 0)
    return fail(Error::from_syscall("getsockopt(SO_PEERCRED)", errno));
  return PeerCred{c.pid, c.uid, c.gid};
}

}  // namespace mbmq::os
