// mbmq/result.h: the error vocabulary of mbmq. No function in the library throws; every fallible
// call returns Result<T>, shaped like std::expected (built on tl::expected from Debian's
// libexpected-dev, since libstdc++ 12 ships <expected> only for C++23).
//
//   mbmq::Result<mbmq::Buffer> b = channel.buffer(4096);
//   if (!b) fprintf(stderr, "%s\n", b.error().message().c_str());
//
// Inside functions that themselves return Result, MBMQ_TRY(expr) unwraps or returns the error.
#pragma once

#include <cstdint>
#include <string>
#include <tl/expected.hpp>
#include <utility>

#include "mbmq/export.h"

namespace mbmq {

// The four kinds of failure: expected outcomes (TimedOut, WouldBlock, PeerClosed, NoReply), system
// errors (System + errno), bad data from the peer (Protocol: that channel is closed), misuse by the
// caller (InvalidArgument, NoBuffers, Busy).
enum class Errc : std::uint8_t {
  TimedOut = 1,     // the deadline passed first
  WouldBlock,       // nothing to do without waiting (a try_ call, or a full ring)
  PeerClosed,       // the other end closed, exited or died; also the "automatic reply"
  NoReply,          // the callee released the request without answering it
  Protocol,         // the peer wrote something invalid into shared memory; the channel is closed
  System,           // a system call failed; sys_errno says why
  InvalidArgument,  // the call itself is wrong (size too large, wrong state, ...)
  NoBuffers,        // the channel's buffer pool is exhausted
  Busy,             // the object is in use in a way that forbids the operation
  Refused,          // a listener's access policy refused the connection
};

MBMQ_EXPORT const char* errc_name(Errc code) noexcept;

struct MBMQ_EXPORT Error {
  Errc code{Errc::System};
  int sys_errno{0};    // errno for Errc::System, else 0
  const char* op{""};  // static string naming what failed ("memfd_create", "ring.pop", ...)

  static Error from_syscall(const char* op, int err) noexcept { return {Errc::System, err, op}; }
  static Error make(Errc code, const char* op) noexcept { return {code, 0, op}; }
  // "peer-closed (call)" or "system error in mmap: Cannot allocate memory". Allocates: not for the
  // hot path.
  std::string message() const;
};

// tl::expected, marked [[nodiscard]]: dropping a returned Result or Status is a compile-time
// warning (an error with -Werror, as in CI): an error is handled, or dropped with (void) on
// purpose.
template <class T>
class [[nodiscard]] Result : public tl::expected<T, Error> {
  using Base = tl::expected<T, Error>;

 public:
  using Base::Base;
  Result(const Base& b) : Base(b) {}        // NOLINT(google-explicit-constructor)
  Result(Base&& b) : Base(std::move(b)) {}  // NOLINT(google-explicit-constructor)
};
using Status = Result<void>;

inline tl::unexpected<Error> fail(Errc code, const char* op) noexcept {
  return tl::unexpected<Error>(Error::make(code, op));
}
inline tl::unexpected<Error> fail(Error e) noexcept { return tl::unexpected<Error>(e); }

namespace detail {
template <class T>
T unwrap(Result<T>&& r) {
  return std::move(*r);
}
inline void unwrap(Status&&) {}
}  // namespace detail

}  // namespace mbmq

// Evaluates expr (a Result); on error returns the error from the enclosing function, else yields
// the value (or nothing for Status). A GNU statement expression, as SerenityOS's TRY.
#define MBMQ_TRY(...)                                                         \
  __extension__({                                                             \
    auto mbmq_try_r_ = (__VA_ARGS__);                                         \
    if (!mbmq_try_r_) [[unlikely]]                                            \
      return ::tl::unexpected<::mbmq::Error>(std::move(mbmq_try_r_).error()); \
    ::mbmq::detail::unwrap(std::move(mbmq_try_r_));                           \
  })

// Our own bug, never the peer's: abort with a message.
#define MBMQ_ASSERT(cond)                                     \
  do {                                                        \
    if (!(cond)) [[unlikely]]                                 \
      ::mbmq::detail::assert_fail(#cond, __FILE__, __LINE__); \
  } while (0)

namespace mbmq::detail {
[[noreturn]] MBMQ_EXPORT void assert_fail(const char* cond, const char* file, int line) noexcept;
}
