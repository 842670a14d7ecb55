#include "os/tcp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <cerrno>

#include "os/syscall_count.h"

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
  count_syscall();
  if (::connect(client.get(), reinterpret_cast<sockaddr*>(&a), len) != 0)
    return fail(Error::from_syscall("connect(127.0.0.1)", errno));
  count_syscall();
  UniqueFd server(::accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (!server) return fail(Error::from_syscall("accept4", errno));
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
  for (;;) {
    count_syscall();
    UniqueFd s(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
    if (!s && errno == EINTR) continue;
    if (!s) return fail(Error::from_syscall("accept4", errno));
    MBMQ_TRY(no_delay(s.get()));
    return s;
  }
}

Result<UniqueFd> tcp_connect(const char* host, std::uint16_t port) {
  sockaddr_in a = MBMQ_TRY(ipv4(host, port));
  UniqueFd s = MBMQ_TRY(tcp_socket());
  count_syscall();
  if (::connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0)
    return fail(Error::from_syscall("connect", errno));
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
