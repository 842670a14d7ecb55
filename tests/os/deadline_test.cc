// Deadline arithmetic saturates instead of overflowing, and os:: waits turn a timeout into
// poll()'s milliseconds without waking early or wrapping. (Waits under a stream of signals:
// tests/ipc/eintr_test.cc.)
#include "mbmq/deadline.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <limits>
#include <thread>

#include "os/unix_socket.h"

namespace mbmq {
namespace {

using std::chrono::hours;
using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;
constexpr std::int64_t kMaxNs = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t kMinNs = std::numeric_limits<std::int64_t>::min();

TEST(Deadline, AfterAnOrdinaryDurationIsThatFarAhead) {
  const std::int64_t before = monotonic_ns();
  Deadline d = Deadline::after(seconds(1));
  const std::int64_t after = monotonic_ns();
  EXPECT_FALSE(d.is_never());
  EXPECT_FALSE(d.expired());
  EXPECT_GE(d.ns(), before + 1'000'000'000);
  EXPECT_LE(d.ns(), after + 1'000'000'000);
  EXPECT_GT(d.remaining_ns(), 0);
  EXPECT_LE(d.remaining_ns(), 1'000'000'000);
}

TEST(Deadline, AfterTheLargestNanosecondsIsNeverNotThePast) {
  // monotonic_ns() + nanoseconds::max() used to wrap to a large negative: already expired.
  Deadline d = Deadline::after(nanoseconds::max());
  EXPECT_TRUE(d.is_never());
  EXPECT_FALSE(d.expired());
  EXPECT_EQ(d.remaining_ns(), Deadline::kNever);
  EXPECT_TRUE(Deadline::after(nanoseconds(kMaxNs - 1)).is_never());
}

TEST(Deadline, AfterDurationsTooLongForNanosecondsIsNever) {
  // hours::max() -> nanoseconds overflows in the conversion itself, before any addition.
  EXPECT_TRUE(Deadline::after(hours::max()).is_never());
  EXPECT_TRUE(Deadline::after(seconds::max()).is_never());
  EXPECT_TRUE(Deadline::after(milliseconds::max()).is_never());
  EXPECT_TRUE(Deadline::after(std::chrono::microseconds::max()).is_never());
  EXPECT_TRUE(Deadline::after(hours(24 * 365 * 300)).is_never());  // past 2^63 ns
  EXPECT_TRUE(Deadline::after(std::chrono::duration<double>(1e300)).is_never());
  EXPECT_TRUE(
      Deadline::after(std::chrono::duration<double>(std::numeric_limits<double>::infinity()))
          .is_never());
  for (Deadline d : {Deadline::after(hours::max()), Deadline::after(seconds::max())}) {
    EXPECT_FALSE(d.expired());
    EXPECT_GT(d.remaining_ns(), 0);
  }
}

TEST(Deadline, DurationsConvertExactlyUpToTheEdgeOfTheRange) {
  EXPECT_EQ(detail::saturating_ns(nanoseconds::max()), kMaxNs);
  EXPECT_EQ(detail::saturating_ns(nanoseconds::min()), kMinNs);
  EXPECT_EQ(detail::saturating_ns(seconds(9'223'372'036)), 9'223'372'036'000'000'000);
  EXPECT_EQ(detail::saturating_ns(seconds(9'223'372'037)), kMaxNs);
  EXPECT_EQ(detail::saturating_ns(seconds(-9'223'372'036)), -9'223'372'036'000'000'000);
  EXPECT_EQ(detail::saturating_ns(seconds(-9'223'372'037)), kMinNs);
  EXPECT_EQ(detail::saturating_ns(hours::max()), kMaxNs);
  EXPECT_EQ(detail::saturating_ns(hours::min()), kMinNs);
  EXPECT_EQ(detail::saturating_ns(std::chrono::duration<int>(2'000'000'000)),
            2'000'000'000'000'000'000);
  EXPECT_EQ(detail::saturating_ns(std::chrono::duration<double>(1.5)), 1'500'000'000);
  EXPECT_EQ(detail::saturating_ns(std::chrono::duration<double>(-1e300)), kMinNs);
  EXPECT_EQ(detail::saturating_ns(std::chrono::duration<std::int64_t, std::pico>::max()),
            kMaxNs / 1000);
}

TEST(Deadline, AFarButRepresentableDeadlineStaysFinite) {
  // 100 years: fits in int64 nanoseconds (292 years), so it is a real deadline, not never().
  Deadline d = Deadline::after(hours(24 * 365 * 100));
  EXPECT_FALSE(d.is_never());
  EXPECT_FALSE(d.expired());
  EXPECT_GT(d.remaining_ns(), std::int64_t{99} * 365 * 24 * 3600 * 1'000'000'000);
}

TEST(Deadline, NegativeDurationsAreExpiredWithoutWrapping) {
  for (Deadline d :
       {Deadline::after(nanoseconds::min()), Deadline::after(hours::min()),
        Deadline::after(seconds(-5)), Deadline::after(std::chrono::duration<double>(-1e300))}) {
    EXPECT_FALSE(d.is_never());
    EXPECT_TRUE(d.expired());
    EXPECT_LE(d.remaining_ns(), 0);
  }
}

TEST(Deadline, RemainingNsSaturatesAtTheEndsOfTheRange) {
  // ns_ - now used to overflow for a deadline near the bottom of the range: "expired" became a
  // huge positive time left.
  EXPECT_EQ(Deadline::at_ns(kMinNs).remaining_ns(), kMinNs);
  EXPECT_LT(Deadline::at_ns(kMinNs + 1).remaining_ns(), 0);
  EXPECT_TRUE(Deadline::at_ns(kMinNs).expired());
  EXPECT_GT(Deadline::at_ns(kMaxNs - 1).remaining_ns(), 0);
  EXPECT_FALSE(Deadline::at_ns(kMaxNs - 1).expired());
  EXPECT_EQ(Deadline::never().remaining_ns(), Deadline::kNever);
  EXPECT_LE(Deadline::immediate().remaining_ns(), 0);
}

TEST(WaitTimeout, AHugeTimeoutDoesNotWrapIntoAShortOne) {
  // (2^32 + 1) ms: the old int conversion kept the low 32 bits, a 1 ms poll, and reported a
  // timeout at once.
  auto s = os::stream_pair();
  ASSERT_TRUE(s);
  const std::int64_t huge = ((std::int64_t{1} << 32) + 1) * 1'000'000;
  // Before the writer starts: its 100 ms begin after t0 (taken after the thread's start, under
  // ASan on a loaded CI the main thread came back 30 ms late and "waited" 70 ms).
  const std::int64_t t0 = monotonic_ns();
  std::thread writer([fd = s->second.get()] {
    std::this_thread::sleep_for(milliseconds(100));
    const std::byte b{1};
    (void)os::send_msg(fd, {&b, 1}, {});
  });
  auto r = os::wait_readable(s->first.get(), huge);
  const std::int64_t waited = monotonic_ns() - t0;
  writer.join();
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_TRUE(*r);
  EXPECT_GE(waited, 90'000'000);  // woken by the byte, not by a wrapped timeout
}

TEST(WaitTimeout, TheLargestTimeoutDoesNotOverflow) {
  auto s = os::stream_pair();
  ASSERT_TRUE(s);
  const std::byte b{1};
  ASSERT_TRUE(os::send_msg(s->second.get(), {&b, 1}, {}));
  auto r = os::wait_readable(s->first.get(), kMaxNs);  // ready at once
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_TRUE(*r);
  auto w = os::wait_writable(s->first.get(), kMaxNs);
  ASSERT_TRUE(w) << w.error().message();
  EXPECT_TRUE(*w);
}

TEST(WaitTimeout, ATimeoutNeverEndsEarly) {
  // Sub-millisecond remainders round up: poll() counts whole milliseconds.
  auto s = os::stream_pair();
  ASSERT_TRUE(s);
  for (std::int64_t t : {std::int64_t{1}, std::int64_t{400'000}, std::int64_t{1'500'000},
                         std::int64_t{20'000'001}}) {
    SCOPED_TRACE(t);
    const std::int64_t t0 = monotonic_ns();
    auto r = os::wait_readable(s->first.get(), t);
    const std::int64_t waited = monotonic_ns() - t0;
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_FALSE(*r);
    EXPECT_GE(waited, t);
  }
  auto r = os::wait_readable(s->first.get(), 0);  // a poll, no wait
  ASSERT_TRUE(r);
  EXPECT_FALSE(*r);
}

}  // namespace
}  // namespace mbmq
