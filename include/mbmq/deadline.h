// mbmq/deadline.h: an absolute point on CLOCK_MONOTONIC after which a wait gives up with
// Errc::TimedOut. Deadlines, not timeouts, so that a retry loop does not stretch the total wait.
//
//   channel.call(buf, mbmq::Deadline::after(std::chrono::seconds(1)));
//
// Arithmetic saturates: a duration too long to represent (Deadline::after(hours::max())) is
// never(), a very negative one is already expired, and remaining_ns() never wraps.
#pragma once

#include <chrono>
#include <cstdint>
#include <limits>
#include <ratio>
#include <type_traits>

#include "mbmq/export.h"

namespace mbmq {

// Nanoseconds on CLOCK_MONOTONIC (vDSO: no system call).
MBMQ_EXPORT std::int64_t monotonic_ns() noexcept;

namespace detail {
// d in nanoseconds, clamped to the range of std::int64_t instead of overflowing (the implicit
// conversion hours::max() -> nanoseconds wraps). NaN counts as the largest value.
template <class Rep, class Period>
constexpr std::int64_t saturating_ns(std::chrono::duration<Rep, Period> d) noexcept {
  using Limits = std::numeric_limits<std::int64_t>;
  constexpr auto kLimit = static_cast<long double>(Limits::max());
  // Types whose whole range fits in int64 nanoseconds (nanoseconds, int32 seconds, ...) convert
  // exactly; the others are compared first, in long double (range enough for any duration).
  using ToNs = std::ratio_divide<Period, std::nano>;  // nanoseconds per tick
  constexpr bool kMayOverflow =
      std::is_floating_point_v<Rep> ||
      static_cast<long double>(std::numeric_limits<Rep>::max()) * ToNs::num / ToNs::den > kLimit;
  if constexpr (kMayOverflow) {
    const long double ns = std::chrono::duration<long double, std::nano>(d).count();
    if (!(ns < kLimit)) return Limits::max();
    if (!(ns > -kLimit)) return Limits::min();
  }
  return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
}
}  // namespace detail

class Deadline {
 public:
  static constexpr Deadline never() noexcept { return Deadline(kNever); }
  static constexpr Deadline immediate() noexcept { return Deadline(0); }
  // Now + d. A deadline past the end of std::int64_t nanoseconds (~292 years of uptime) is
  // never(); now + d before boot is immediate().
  static Deadline after(std::chrono::nanoseconds d) noexcept {
    const std::int64_t now = monotonic_ns();  // >= 0
    if (d.count() >= kNever - now) return never();
    if (d.count() <= -now) return immediate();
    return Deadline(now + d.count());
  }
  // Any duration type, converted without overflow: after(std::chrono::hours::max()) is never().
  template <class Rep, class Period>
  static Deadline after(std::chrono::duration<Rep, Period> d) noexcept {
    return after(std::chrono::nanoseconds(detail::saturating_ns(d)));
  }
  static constexpr Deadline at_ns(std::int64_t monotonic) noexcept { return Deadline(monotonic); }

  constexpr bool is_never() const noexcept { return ns_ == kNever; }
  constexpr std::int64_t ns() const noexcept { return ns_; }
  // Nanoseconds left (<= 0: expired); kNever for never(). Saturates instead of overflowing (a
  // deadline from at_ns() near the ends of the range).
  std::int64_t remaining_ns() const noexcept {
    if (is_never()) return kNever;
    std::int64_t left = 0;
    if (__builtin_sub_overflow(ns_, monotonic_ns(), &left))
      return ns_ < 0 ? std::numeric_limits<std::int64_t>::min() : kNever - 1;
    return left;
  }
  bool expired() const noexcept { return !is_never() && monotonic_ns() >= ns_; }

  static constexpr std::int64_t kNever = std::numeric_limits<std::int64_t>::max();

 private:
  constexpr explicit Deadline(std::int64_t ns) noexcept : ns_(ns) {}
  std::int64_t ns_;
};

}  // namespace mbmq
