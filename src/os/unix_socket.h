// os/unix_socket.h: AF_UNIX sockets and SCM_RIGHTS fd passing. Every received fd is wrapped in a
// UniqueFd before anything else can fail, and always arrives O_CLOEXEC (MSG_CMSG_CLOEXEC).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>

#include "mbmq/result.h"
#include "os/fd.h"

namespace mbmq::os {

// 8 handles of up to 5 fds each (a channel end: segment, control socket, and the three fds of
// its peer's queue doorbell).
inline constexpr std::size_t kMaxFdsPerMsg = 40;

enum class Blocking { Yes, No };

// socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC): message boundaries are kept, and closing
// one end (or the death of its last holder) is seen on the other end as POLLHUP/POLLRDHUP.
Result<std::pair<UniqueFd, UniqueFd>> seqpacket_pair();

// Sends one message with `fds` attached (SCM_RIGHTS). MSG_NOSIGNAL: a closed peer is EPIPE, not
// SIGPIPE. Errc::PeerClosed for EPIPE/ECONNRESET. Blocking::No (MSG_DONTWAIT): Errc::WouldBlock
// when the socket's send buffer is full (a peer that does not read).
Status send_msg(int sock, std::span<const std::byte> bytes, std::span<const int> fds,
                Blocking blocking = Blocking::Yes);
// SO_SNDBUF (the kernel doubles the value, capped by net.core.wmem_max); returns the size the
// kernel reports afterwards.
Result<int> set_send_buffer(int sock, int bytes);

struct Received {
  std::size_t bytes = 0;  // 0 with no fds: the peer closed (orderly end of stream)
  std::size_t nfds = 0;
  bool truncated = false;  // message or fds did not fit: the caller treats it as a protocol error
};
// Receives one message into `bytes`; received fds go to fds_out[0..nfds). Blocking::No returns
// Errc::WouldBlock when nothing is queued.
Result<Received> recv_msg(int sock, std::span<std::byte> bytes, std::span<UniqueFd> fds_out,
                          Blocking blocking);

}  // namespace mbmq::os

namespace mbmq::os {
// shutdown(SHUT_RDWR): ends the connection for every holder of the socket (the peer sees a
// hang-up at once). Used when a peer broke the protocol.
void shutdown_socket(int sock) noexcept;
// shutdown(SHUT_WR): a FIN after the bytes already queued, while reading stays possible (after
// SHUT_RDWR, Linux answers any further byte from the peer with a reset; a lingering close that
// must deliver its last answer uses this instead).
void shutdown_write(int sock) noexcept;
// Waits until sock is readable or hung up, at most timeout_ns (< 0: no limit).
Result<bool> wait_readable(int sock, std::int64_t timeout_ns);
// poll() for POLLOUT (any fd); false on timeout (timeout_ns < 0: forever).
Result<bool> wait_writable(int fd, std::int64_t timeout_ns);
}  // namespace mbmq::os

namespace mbmq::os {
// socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC): the Unix-socket baseline of the benchmark.
Result<std::pair<UniqueFd, UniqueFd>> stream_pair();
}  // namespace mbmq::os

namespace mbmq::os {

// Rendezvous sockets in the Linux abstract namespace (no file is ever created: the name vanishes
// with the last socket, so a restarted server can bind again at once).
// A name longer than 100 bytes or containing NUL is Errc::InvalidArgument.
Result<UniqueFd> listen_abstract(std::string_view name, int backlog);
// Errc::System with ECONNREFUSED (nobody listens) or ENOENT-like errors as the kernel gives them.
// A listener whose backlog is full (it does not accept, e.g. its fd table is full) makes
// connect(2) wait: at most timeout_ns (< 0: no limit), then Errc::TimedOut.
Result<UniqueFd> connect_abstract(std::string_view name, std::int64_t timeout_ns = -1);
// accept4(SOCK_CLOEXEC); Errc::WouldBlock when nothing is pending. Errc::System with EMFILE/ENFILE
// when the fd table is full: the connection stays in the backlog, and the listener readable.
Result<UniqueFd> accept_conn(int listener);

struct PeerCred {
  int pid = 0;
  unsigned uid = 0;
  unsigned gid = 0;
};
// True if fd is an AF_UNIX SOCK_SEQPACKET socket (a control socket received from a peer).
bool is_unix_seqpacket(int fd) noexcept;
// True if fd is an AF_UNIX SOCK_DGRAM socket (a queue's signal sender received from a peer).
bool is_unix_dgram(int fd) noexcept;

// A queue's signal (P4q): an AF_UNIX SOCK_DGRAM socket bound to an autobound abstract name (the
// queue's fd), and senders connected to it, one per channel, so that what a peer does to its own
// sender (shutdown, close) concerns its channel only.
Result<UniqueFd> dgram_receiver();
Result<UniqueFd> dgram_sender_to(int receiver);
// One byte, MSG_DONTWAIT | MSG_NOSIGNAL. Never blocks, whatever the fd's flags; every failure (a
// full receiver is already readable; a closed one has no reader) is ignored.
void signal_byte(int sock) noexcept;
// Reads (MSG_DONTWAIT) and discards what is queued on sock, at most 64 datagrams; how many.
std::size_t drain_bytes(int sock) noexcept;

// SO_PEERCRED of a connected AF_UNIX socket: who was at the other end when it connected.
Result<PeerCred> peer_cred(int sock);

}  // namespace mbmq::os
