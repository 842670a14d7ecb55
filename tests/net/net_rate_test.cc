// Issue #19: mbmq::net over a rate-limited link. Two network namespaces joined by a veth pair
// (bench/netns.h), each end shaped by `tc qdisc ... tbf rate 40mbit` (both directions),
// UCX_TLS=tcp; the server in namespace a, the client in b. Root only (skips otherwise), as the
// other netns tests. What must hold on a slow link:
//   - calls carry their payloads intact (64 B, 1 MiB), and the shaping is in effect (a 1 MiB call,
//     2 MiB on the wire, cannot be faster than 40 Mbit/s allows: this checks the set-up, not us);
//   - a call whose transfer cannot finish before its deadline ends with TimedOut at the deadline
//     (within 150 ms of it), not when the transfer ends;
//   - the channel still works afterwards (the late reply is dropped, its credit comes back);
//   - a server killed while an 8 MiB call is on the slow link is PeerClosed within 2 s.
#include <gtest/gtest.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "mbmq/net.h"
#include "net/net_util.h"
#include "netns.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::Pipe;
using test::secs;
using test::spawn;

constexpr const char* kRate = "40mbit";
constexpr double kRateBitsPerS = 40e6;

void fill(std::span<std::byte> b, unsigned seed) {
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::byte>((i * 131 + seed) & 0xff);
}
bool echoed(std::span<const std::byte> b, unsigned seed) {
  // The server adds 1 to the first byte of every request.
  for (std::size_t i = 0; i < b.size(); ++i) {
    auto want = static_cast<std::byte>((i * 131 + seed) & 0xff);
    if (i == 0) want = static_cast<std::byte>(static_cast<unsigned>(want) + 1);
    if (b[i] != want) return false;
  }
  return true;
}

// What the client found, step by step (one pipe write each, in this order).
enum Step : std::uint32_t {
  kSmallOk = 1,   // then: its round trip in µs
  kLargeOk,       // then: the 1 MiB round trip in µs
  kTimedOut,      // then: how long past the deadline call() returned, in µs (or ~0: not TimedOut)
  kAfterOk,       // then: a 64 B call's round trip, on the same channel after the timed-out one
  kHolding,       // an 8 MiB call is on the link: kill the server now
  kPeerClosed,    // then: kill -> PeerClosed, in µs of the client's clock (monotonic, shared)
  kFailed = 100,  // then: which step (its number) failed
};

TEST(NetRate, ARateLimitedLinkCarriesCallsIntactAndHonoursDeadlines) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root (ip netns, veth, tc): run the suite as root";
  netns::Pair ns("r");
  if (!ns.ok) GTEST_SKIP() << "ip netns / veth unavailable here (iproute2? CAP_NET_ADMIN?)";
  const std::string tbf = std::string(" root tbf rate ") + kRate + " burst 32kbit latency 2000ms";
  if (netns::sh("ip netns exec " + ns.a + " tc qdisc add dev " + ns.va + tbf) != 0 ||
      netns::sh("ip netns exec " + ns.b + " tc qdisc add dev " + ns.vb + tbf) != 0)
    GTEST_SKIP() << "tc (iproute2) or the tbf qdisc (sch_tbf) unavailable here";
  ::setenv("UCX_TLS", "tcp", 1);
  Pipe port = Pipe::make(), steps = Pipe::make();
  const pid_t server = spawn(
      [&]() -> int {
        if (!netns::enter(ns.a, ns.va)) return 9;
        auto l = net::listen("ucx://" + ns.ip_a + ":0/rate");
        if (!l) return 10;
        port.put(l->port());
        auto ch = l->accept(secs(30));
        if (!ch) return 11;
        for (;;) {
          auto m = ch->receive(secs(60));
          if (!m) return 12;
          if (m->kind == Kind::PeerClosed) return 0;
          if (m->kind != Kind::Request) continue;
          auto d = m->buffer.data();
          d[0] = static_cast<std::byte>(static_cast<unsigned>(d[0]) + 1);
          (void)net::Channel::reply(std::move(*m));  // the late one's caller has gone: dropped
        }
      },
      120);
  const pid_t client = spawn(
      [&]() -> int {
        if (!netns::enter(ns.b, ns.vb)) return 9;
        const std::uint32_t p = port.get();
        auto ch = net::connect("ucx://" + ns.ip_a + ":" + std::to_string(p) + "/rate", secs(20));
        auto failed = [&](Step s) {
          steps.put(kFailed);
          steps.put(s);
          return 20 + static_cast<int>(s);
        };
        if (!ch) return failed(kSmallOk);
        auto round = [&](std::size_t size, unsigned seed, Deadline d, Status* st) -> std::int64_t {
          auto b = ch->buffer(size);
          if (!b) {
            *st = fail(b.error());
            return -1;
          }
          fill(b->data(), seed);
          const std::int64_t t0 = monotonic_ns();
          *st = ch->call(*b, d);
          const std::int64_t took = monotonic_ns() - t0;
          if (*st && !echoed(b->data(), seed)) *st = fail(Errc::Protocol, "payload");
          return took;
        };
        Status st;
        std::int64_t took = round(64, 1, secs(10), &st);
        if (!st) return failed(kSmallOk);
        steps.put(kSmallOk);
        steps.put(static_cast<std::uint32_t>(took / 1000));
        took = round(1u << 20, 2, secs(20), &st);
        if (!st) return failed(kLargeOk);
        steps.put(kLargeOk);
        steps.put(static_cast<std::uint32_t>(took / 1000));
        // 8 MiB each way at 40 Mbit/s: 3.4 s on the wire; the deadline is 200 ms.
        const Deadline d = Deadline::after(std::chrono::milliseconds(200));
        (void)round(8u << 20, 3, d, &st);
        const std::int64_t late = monotonic_ns() - d.ns();
        steps.put(kTimedOut);
        steps.put(!st && st.error().code == Errc::TimedOut
                      ? static_cast<std::uint32_t>(std::max<std::int64_t>(late, 0) / 1000)
                      : ~0u);
        took = round(64, 4, secs(30), &st);  // behind what is left of the 8 MiB on the link
        if (!st) return failed(kAfterOk);
        steps.put(kAfterOk);
        steps.put(static_cast<std::uint32_t>(took / 1000));
        // An 8 MiB call on the slow link while the server is killed.
        auto big = ch->buffer(8u << 20);
        if (!big) return failed(kHolding);
        fill(big->data(), 5);
        steps.put(kHolding);
        st = ch->call(*big, secs(30));
        const std::int64_t at = monotonic_ns();
        if (st || st.error().code != Errc::PeerClosed) return failed(kPeerClosed);
        steps.put(kPeerClosed);
        steps.put(static_cast<std::uint32_t>(at / 1000 % 4'000'000'000u));
        return 0;
      },
      120);
  port.w.reset();
  steps.w.reset();
  auto expect = [&](Step s) {
    const std::uint32_t got = steps.get(0);
    if (got == kFailed) ADD_FAILURE() << "the client failed at step " << steps.get(0);
    return got == s;
  };
  std::int64_t t_kill = 0;
  std::uint32_t small_us = 0, large_us = 0, late_us = 0, after_us = 0, closed_at = 0;
  bool ok = expect(kSmallOk) && (small_us = steps.get(0), expect(kLargeOk)) &&
            (large_us = steps.get(0), expect(kTimedOut)) &&
            (late_us = steps.get(~0u), expect(kAfterOk)) && (after_us = steps.get(0), true) &&
            expect(kHolding);
  if (ok) {
    os::sleep_ns(300'000'000);  // the 8 MiB call is on the link
    t_kill = monotonic_ns();
    ASSERT_TRUE(os::kill_process(server, SIGKILL));
    ok = expect(kPeerClosed);
    if (ok) closed_at = steps.get(0);
  } else {
    (void)os::kill_process(server, SIGKILL);
  }
  (void)join(server);
  EXPECT_EQ(join(client), 0);
  ASSERT_TRUE(ok);
  const double kill_to_closed_ms =
      static_cast<double>(static_cast<std::int64_t>(closed_at) - t_kill / 1000 % 4'000'000'000) /
      1e3;
  const double floor_ms = 2.0 * (1 << 20) * 8 / kRateBitsPerS * 1e3;
  std::printf(
      "tbf %s both ways: 64 B call %.2f ms; 1 MiB call %.0f ms (the link allows >= %.0f ms); an "
      "8 MiB call with a 200 ms deadline: TimedOut %.1f ms after it, then a 64 B call %.0f ms; "
      "kill -> PeerClosed during an 8 MiB call: %.0f ms\n",
      kRate, small_us / 1e3, large_us / 1e3, floor_ms, late_us / 1e3, after_us / 1e3,
      kill_to_closed_ms);
  EXPECT_GE(large_us / 1e3, floor_ms * 0.8) << "the tbf qdisc did not shape the link";
  EXPECT_NE(late_us, ~0u) << "the 8 MiB call did not end TimedOut";
  EXPECT_LE(late_us, 150'000u) << "the deadline was not honoured on the slow link";
  EXPECT_LE(kill_to_closed_ms, 2000.0);
}

}  // namespace
}  // namespace mbmq
