#include "os/tcp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>

#include "os/syscall_count.h"
#include "os/unix_socket.h"

namespace mbmq::os {

namespace {
Result<UniqueFd> tcp_socket() {
  count_syscall();
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail(Error::from_syscall("socket(AF_INET)", errno));
  return fd;
}
Status no_delay(int fd) {
  int one = 1;
  count_syscall();
  if (::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0)
    return fail(Error::from_syscall("setsockopt(TCP_NODELAY)", errno));
  return {};
}

// connect() on a blocking socket. A signal (EINTR) does not stop the kernel's attempt, which
// carries on in the background (calling connect() again says EALREADY): wait for the socket to
// become writable, then take the attempt's outcome from SO_ERROR. Failing with EINTR instead
// made any process that gets signals (a profiler, a timer) fail connects that take a while.
Status connect_blocking(int fd, const sockaddr* a, socklen_t len, const char* op) {
  count_syscall();
  if (::connect(fd, a, len) == 0) return {};
  if (errno != EINTR) return fail(Error::from_syscall(op, errno));
  (void)MBMQ_TRY(wait_writable(fd, -1));  // no limit: true, or an error
  int err = 0;
  socklen_t err_len = sizeof err;
  count_syscall();
  if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &err_len) != 0)
    return fail(Error::from_syscall("getsockopt(SO_ERROR)", errno));
  if (err != 0) return fail(Error::from_syscall(op, err));
  return {};
}

// accept4() on a blocking listener, retrying EINTR.
Result<UniqueFd> accept_blocking(int listener) {
  for (;;) {
    count_syscall();
    UniqueFd s(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    if (s) return s;
    if (errno != EINTR) return fail(Error::from_syscall("accept4", errno));
  }
}
}  // namespace

Result<std::pair<UniqueFd, UniqueFd>> tcp_loopback_pair() {
  UniqueFd listener = MBMQ_TRY(tcp_socket());
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  socklen_t len = sizeof a;
  count_syscall();
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(&a), len) != 0)
    return fail(Error::from_syscall("bind(127.0.0.1)", errno));
  count_syscall();
  if (::listen(listener.get(), 1) != 0) return fail(Error::from_syscall("listen", errno));
  count_syscall();
  if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0)
    return fail(Error::from_syscall("getsockname", errno));
  UniqueFd client = MBMQ_TRY(tcp_socket());
  MBMQ_TRY(
      connect_blocking(client.get(), reinterpret_cast<sockaddr*>(&a), len, "connect(127.0.0.1)"));
  UniqueFd server = MBMQ_TRY(accept_blocking(listener.get()));
  MBMQ_TRY(no_delay(client.get()));
  MBMQ_TRY(no_delay(server.get()));
  return std::pair<UniqueFd, UniqueFd>{std::move(client), std::move(server)};
}

namespace {
Result<sockaddr_in> ipv4(const char* host, std::uint16_t port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  if (::inet_pton(AF_INET, host, &a.sin_addr) != 1)
    return fail(Errc::InvalidArgument, "tcp: host is not an IPv4 address");
  return a;
}
}  // namespace

Result<UniqueFd> tcp_listen(const char* host, std::uint16_t port, int backlog,
                            std::uint16_t* bound_port) {
  sockaddr_in a = MBMQ_TRY(ipv4(host, port));
  UniqueFd l = MBMQ_TRY(tcp_socket());
  int one = 1;
  count_syscall();
  (void)::setsockopt(l.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  socklen_t len = sizeof a;
  count_syscall();
  if (::bind(l.get(), reinterpret_cast<sockaddr*>(&a), len) != 0)
    return fail(Error::from_syscall("bind", errno));
  count_syscall();
  if (::listen(l.get(), backlog) != 0) return fail(Error::from_syscall("listen", errno));
  count_syscall();
  if (::getsockname(l.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0)
    return fail(Error::from_syscall("getsockname", errno));
  if (bound_port != nullptr) *bound_port = ntohs(a.sin_port);
  return l;
}

Result<UniqueFd> tcp_accept(int listener) {
  UniqueFd s = MBMQ_TRY(accept_blocking(listener));
  MBMQ_TRY(no_delay(s.get()));
  return s;
}

Result<UniqueFd> tcp_connect(const char* host, std::uint16_t port) {
  sockaddr_in a = MBMQ_TRY(ipv4(host, port));
  UniqueFd s = MBMQ_TRY(tcp_socket());
  MBMQ_TRY(connect_blocking(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a, "connect"));
  MBMQ_TRY(no_delay(s.get()));
  return s;
}

Status tcp_cork(int fd, bool on) {
  int v = on ? 1 : 0;
  count_syscall();
  if (::setsockopt(fd, IPPROTO_TCP, TCP_CORK, &v, sizeof v) != 0)
    return fail(Error::from_syscall("setsockopt(TCP_CORK)", errno));
  return {};
}

}  // namespace mbmq::os
