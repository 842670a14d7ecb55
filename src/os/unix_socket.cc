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

Status send_msg(int sock, std::span<const std::byte> bytes, std::span<const int> fds) {
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
    ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n >= 0) return {};
    if (errno == EINTR) continue;
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

namespace mbmq::os {

void shutdown_socket(int sock) noexcept {
  count_syscall();
  ::shutdown(sock, SHUT_RDWR);
}

namespace {
Result<bool> wait_for(int fd, short events, std::int64_t timeout_ns) {
  pollfd p{fd, events, 0};
  int ms = timeout_ns < 0 ? -1 : static_cast<int>((timeout_ns + 999'999) / 1'000'000);
  for (;;) {
    count_syscall();
    int r = ::poll(&p, 1, ms);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return fail(Error::from_syscall("poll", errno));
    return r > 0;
  }
}
}  // namespace

Result<bool> wait_readable(int fd, std::int64_t timeout_ns) {
  return wait_for(fd, POLLIN, timeout_ns);
}
Result<bool> wait_writable(int fd, std::int64_t timeout_ns) {
  return wait_for(fd, POLLOUT, timeout_ns);
}

}  // namespace mbmq::os

namespace mbmq::os {
Result<std::pair<UniqueFd, UniqueFd>> stream_pair() { return unix_pair(SOCK_STREAM); }
}  // namespace mbmq::os

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

Result<UniqueFd> connect_abstract(std::string_view name) {
  socklen_t len = 0;
  sockaddr_un a = MBMQ_TRY(abstract_addr(name, &len));
  count_syscall();
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!fd) return fail(Error::from_syscall("socket", errno));
  for (;;) {
    count_syscall();
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), len) == 0) return fd;
    if (errno == EINTR) continue;
    return fail(Error::from_syscall("connect", errno));
  }
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

bool is_unix_seqpacket(int fd) noexcept {
  int type = 0, domain = 0;
  socklen_t len = sizeof(type);
  count_syscall();
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) return false;
  len = sizeof(domain);
  count_syscall();
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) return false;
  return type == SOCK_SEQPACKET && domain == AF_UNIX;
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
