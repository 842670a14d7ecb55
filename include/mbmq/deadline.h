// mbmq/deadline.h: an absolute point on CLOCK_MONOTONIC after which a wait gives up with
// Errc::TimedOut. Deadlines, not timeouts, so that a retry loop does not stretch the total wait.
//
//   channel.call(buf, mbmq::Deadline::after(std::chrono::seconds(1)));
#pragma once

#include <chrono>
#include <cstdint>
#include <limits>

namespace mbmq {

// Nanoseconds on CLOCK_MONOTONIC (vDSO: no system call).
std::int64_t monotonic_ns() noexcept;

class Deadline {
 public:
  static constexpr Deadline never() noexcept { return Deadline(kNever); }
  static constexpr Deadline immediate() noexcept { return Deadline(0); }
  static Deadline after(std::chrono::nanoseconds d) noexcept {
    return Deadline(monotonic_ns() + static_cast<std::int64_t>(d.count()));
  }
  static constexpr Deadline at_ns(std::int64_t monotonic) noexcept { return Deadline(monotonic); }

  constexpr bool is_never() const noexcept { return ns_ == kNever; }
  constexpr std::int64_t ns() const noexcept { return ns_; }
  // Nanoseconds left (<= 0: expired); kNever for never().
  std::int64_t remaining_ns() const noexcept { return is_never() ? kNever : ns_ - monotonic_ns(); }
  bool expired() const noexcept { return !is_never() && monotonic_ns() >= ns_; }

  static constexpr std::int64_t kNever = std::numeric_limits<std::int64_t>::max();

 private:
  constexpr explicit Deadline(std::int64_t ns) noexcept : ns_(ns) {}
  std::int64_t ns_;
};

}  // namespace mbmq
