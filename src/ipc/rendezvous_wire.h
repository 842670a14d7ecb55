// ipc/rendezvous_wire.h: the messages of the rendezvous handshake (R1)-(R4) of
// include/mbmq/rendezvous.h, shared by its two sides: the listener's (ipc/listener_core.cc, on the
// watcher thread) and the client's (connect() in ipc/rendezvous.cc). Each is one SEQPACKET
// message of a fixed size, without fds until the channel end itself (R4).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "mbmq/result.h"
#include "os/fd.h"
#include "os/unix_socket.h"
#include "shm/layout.h"

namespace mbmq::detail {

inline constexpr std::uint64_t kHelloMagic = 0x4f4c'4548'514d'424dull;    // "MBMQHELO"
inline constexpr std::uint64_t kVerdictMagic = 0x5443'4944'514d'424dull;  // "MBMQDICT"
// v4: the channel segment's layout v9 (src/shm/layout.h). A client of another layout would be
// accepted, then fail on the segment it receives; bumped with the layout, it is refused at its
// hello instead (RefusedVersion, counted).
inline constexpr std::uint32_t kRendezvousVersion = 4;
static_assert(shm::kLayoutVersion == 9, "a new segment layout: bump kRendezvousVersion with it");
inline constexpr std::uint32_t kHelloUntrusted = 1;  // the client's end is to be Trust::Untrusted

struct Hello {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t flags;  // kHelloUntrusted; other bits must be 0
};
enum class Verdict : std::uint32_t {
  Accepted = 1,
  RefusedPolicy = 2,
  RefusedVersion = 3,
  RefusedLimit = 4,
  RefusedBusy = 5,  // handshake slots taken, or out of fds: the client may ask again
};
struct VerdictMsg {
  std::uint64_t magic;
  std::uint32_t verdict;  // Verdict
  std::uint32_t reserved;
};
static_assert(sizeof(Hello) == 16 && sizeof(VerdictMsg) == 16);

// The abstract socket address a listener called `name` binds.
inline std::string socket_name(std::string_view name) { return "mbmq:" + std::string(name); }

// One message of exactly sizeof(T) bytes and no fds, already queued on `sock` (non-blocking).
template <class T>
Result<T> recv_now(int sock, const char* what) {
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

}  // namespace mbmq::detail
