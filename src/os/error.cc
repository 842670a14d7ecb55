// Error formatting, assertion failure and the monotonic clock.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

#include "mbmq/deadline.h"
#include "mbmq/result.h"

namespace mbmq {

namespace {
// The two strerror_r variants' results (see Error::message()).
[[maybe_unused]] const char* text_of(const char* gnu, const char* /*buf*/) { return gnu; }
[[maybe_unused]] const char* text_of(int xsi, const char* buf) {
  return xsi == 0 ? buf : "unknown error";
}
}  // namespace

const char* errc_name(Errc code) noexcept {
  switch (code) {
    case Errc::TimedOut:
      return "timed-out";
    case Errc::WouldBlock:
      return "would-block";
    case Errc::PeerClosed:
      return "peer-closed";
    case Errc::NoReply:
      return "no-reply";
    case Errc::Protocol:
      return "protocol-error";
    case Errc::System:
      return "system-error";
    case Errc::InvalidArgument:
      return "invalid-argument";
    case Errc::NoBuffers:
      return "no-buffers";
    case Errc::Busy:
      return "busy";
    case Errc::Refused:
      return "refused";
  }
  return "unknown-error";
}

std::string Error::message() const {
  std::string s = errc_name(code);
  if (op != nullptr && *op != '\0') {
    s += " (";
    s += op;
    s += ")";
  }
  if (sys_errno != 0) {
    s += ": ";
    // strerror() may use a static buffer (unknown errno values): not thread-safe. strerror_r is
    // GNU (returns the text, in buf or static) or XSI (returns 0 and fills buf), by libc and
    // feature macros: text_of() takes either.
    char buf[128];
    s += text_of(::strerror_r(sys_errno, buf, sizeof buf), buf);
  }
  return s;
}

namespace detail {
void assert_fail(const char* cond, const char* file, int line) noexcept {
  (void)std::fprintf(stderr, "mbmq: assertion failed: %s at %s:%d\n", cond, file, line);
  std::abort();
}
}  // namespace detail

std::int64_t monotonic_ns() noexcept {
  timespec ts{};
  // vDSO on Linux x86_64: no kernel entry, so not counted as a system call.
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

}  // namespace mbmq
