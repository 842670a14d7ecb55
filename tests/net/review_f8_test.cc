// Hostile review of ff03e2b (F8: the transport window of one-way sends; Spares kMin 32 KiB,
// kMaxVectors 256, give()/take() fast paths; docs/design/net.md, F8). Each test is a property;
// those the review confirmed broken say "Fixed: ... Before: ...".
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <thread>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using net::detail::ChannelCore;
using test::make_pair;
using test::number_of;
using test::numbered;
using test::secs;

std::uint32_t window_waiters(ChannelCore& c) {
  os::LockGuard lock(c.w_->mu);
  return c.*get(test::TxWindowWaitersOf{});
}
std::uint32_t tx_pending(ChannelCore& c) {
  os::LockGuard lock(c.w_->mu);
  return c.*get(test::TxPendingOf{});
}

// (1) A send that has credit when called sends, even if another thread takes the last credit
// while it waits for the window. Setup: the server's worker is not progressed (no keeper, nobody
// receives), so its 256 KiB rendezvous payloads are never fetched: 9 of them keep the window
// full; the grant leaves room for one more message. Fixed: the credit is taken before the window
// wait (ChannelCore::send_after_window). Before: the waiter released the lock without it, a
// send(buf) (no window) by another thread took it, and the waiter timed out waiting for credit
// (300 ms), where before F8 it sent at once.
// A waits for the window only until nothing of the channel's completes for kTxStallNs (1 ms), so
// the main thread must see it waiting within that millisecond; on a loaded machine it sometimes
// is not scheduled in time (9 of 120 runs, 6 at once on 2 CPUs). Such an attempt did not set up
// the race and checks nothing: the scenario is made again on a fresh pair, up to 8 times, and the
// test fails if A was never seen waiting.
// One attempt: false if A was not seen waiting (nothing checked), true once checked.
bool window_waiter_attempt() {
  net::ListenOptions lo;
  lo.inbox_messages = 10;
  // No keeper on either end: with the client's peer_timeout, the server's keeper progressed the
  // server's worker (K1), which fetched the payloads and emptied the window before A waited for
  // it ("A never waited for the window", ASan, CI 2026-12-02).
  auto p = test::make_pair_without_keepers(lo);
  EXPECT_TRUE(p);
  if (!p) return true;
  constexpr std::size_t kSize = 256 << 10;
  for (std::uint32_t i = 0; i < 9; ++i) {
    auto st = p->client.send(numbered(p->client, kSize, i));
    EXPECT_TRUE(st) << i << ": " << st.error().message();
    if (!st) return true;
  }
  ChannelCore& core = *test::core_of(p->client);
  EXPECT_GE(tx_pending(core), ChannelCore::kTxWindowMessages) << "the window is not full";
  net::Buffer a = numbered(p->client, kSize, 9);
  net::Buffer b = numbered(p->client, kSize, 10);
  std::optional<Status> a_st;
  std::atomic<std::int64_t> a_ns{0};  // set once A's send returned
  std::thread ta([&] {
    const std::int64_t t0 = monotonic_ns();
    a_st.emplace(p->client.send(std::move(a), Deadline::after(300ms)));
    a_ns = monotonic_ns() - t0;
  });
  // A is in its window wait (it saw credit for one more message). The first look that sees it
  // waiting decides (a second look could miss a wait that just ended).
  const std::int64_t until = monotonic_ns() + 2'000'000'000;
  bool a_waited = false;
  while (!(a_waited = window_waiters(core) != 0) && a_ns == 0 && monotonic_ns() < until) {
  }
  Status b_st = p->client.send(std::move(b));  // no deadline: never waits for the window
  ta.join();
  const std::uint32_t sent = 9u + (b_st ? 1u : 0u) + (*a_st ? 1u : 0u);
  if (a_waited) {
    std::printf(
        "B (send(buf), called second): %s; A (send(buf, 300 ms), called first, had credit): "
        "%s after %.1f ms\n",
        b_st ? "sent" : b_st.error().message().c_str(),
        *a_st ? "sent" : a_st->error().message().c_str(), static_cast<double>(a_ns.load()) / 1e6);
    EXPECT_TRUE(*a_st) << "a send that had credit when called failed: " << a_st->error().message();
    EXPECT_FALSE(b_st) << "the second send found the credit the first had taken";
  }
  // Neither end has a keeper: the client's worker must be progressed too for its payloads to be
  // fetched, so the two are progressed in turn.
  std::uint32_t got = 0;
  for (const Deadline end = secs(10); got < sent && !end.expired();) {
    (void)p->client.receive(Deadline::after(1ms));
    auto m = p->server.receive(Deadline::after(1ms));
    if (!m) continue;
    EXPECT_EQ(m->kind, Kind::Message) << m->why;  // not the channel's end
    if (m->kind != Kind::Message) break;
    ++got;
  }
  EXPECT_EQ(got, sent);
  return a_waited;
}

TEST(ReviewF8, AWindowWaiterKeepsTheCreditItSawAndSends) {
  int attempts = 0;
  bool checked = false;
  while (!checked && attempts < 8 && !HasFailure()) {
    ++attempts;
    checked = window_waiter_attempt();
  }
  EXPECT_TRUE(checked) << "A was never seen waiting for the window in " << attempts << " attempts";
  std::printf("attempts: %d\n", attempts);
}

// (2) A sender waiting for the window with WaitPolicy Sleep, while a sibling channel of the same
// worker (a listener's accepted channels share one) sits in receive() with Sleep too, so that
// either may be the poller: every completion of the sender's sends that the sibling's progress
// takes must wake the sender (W1/W2), else each wait runs to the 1 ms stall. Counted: sends that
// took >= 0.9 ms, and sends after which the channel was marked stalled.
// Run with and without the sibling (the control): a lost wake-up shows as more slow sends with.
struct StreamStats {
  std::uint32_t slow = 0, stalled = 0;
  double mbps = 0;
};
StreamStats sleeping_stream(bool with_sibling) {
  StreamStats out;
  net::ListenOptions lo;
  auto m = test::make_many(2, lo, {});
  EXPECT_TRUE(m);
  if (!m) return out;
  WaitPolicy sleep;
  sleep.mode = WaitMode::Sleep;
  m->server[0].set_wait_policy(sleep);
  m->server[1].set_wait_policy(sleep);
  constexpr std::uint32_t kCount = 2000;
  constexpr std::size_t kSize = 64 << 10;
  std::atomic<bool> stop{false};
  std::thread sibling([&] {
    while (with_sibling && !stop.load()) (void)m->server[1].receive(Deadline::after(50ms));
  });
  std::atomic<bool> rx_failed{false};
  std::thread rx([&] {
    for (std::uint32_t i = 0; i < kCount; ++i) {
      auto msg = m->client[0].receive(secs(20));
      if (!msg || msg->kind != Kind::Message || number_of(msg->buffer) != i) {
        rx_failed = true;
        return;
      }
    }
  });
  ChannelCore& core = *test::core_of(m->server[0]);
  const std::int64_t t0 = monotonic_ns();
  for (std::uint32_t i = 0; i < kCount; ++i) {
    const std::int64_t s0 = monotonic_ns();
    auto st = m->server[0].send(numbered(m->server[0], kSize, i), secs(20));
    EXPECT_TRUE(st) << st.error().message();
    if (!st) break;
    if (monotonic_ns() - s0 >= 900'000) ++out.slow;
    os::LockGuard lock(core.w_->mu);
    if (core.*get(test::TxStalledOf{})) ++out.stalled;
  }
  const double secs_taken = static_cast<double>(monotonic_ns() - t0) / 1e9;
  rx.join();
  stop = true;
  sibling.join();
  EXPECT_FALSE(rx_failed);
  out.mbps = kCount * static_cast<double>(kSize) / secs_taken / 1e6;
  std::printf(
      "2000 sends of 64 KiB (Sleep, %s): %.0f MB/s; %u took >= 0.9 ms, %u samples "
      "stalled\n",
      with_sibling ? "a sibling in receive()" : "no sibling", out.mbps, out.slow, out.stalled);
  return out;
}

TEST(ReviewF8, SleepingWindowWaiterIsWokenWhenASiblingProgressesItsCompletions) {
  // Timing (a lost wake-up shows as 1 ms stalls): not under a sanitizer's slowness.
  if (test::kSanitized) GTEST_SKIP() << "timing: Release build only";
  std::uint32_t with = 0, without = 0;
  for (int r = 0; r < 2; ++r) {  // (the suite's time: 2 rounds, not 3)
    with += sleeping_stream(true).slow;
    without += sleeping_stream(false).slow;
  }
  EXPECT_LE(with, 4 * without + 40) << "many more stalls with a sibling polling: lost wake-ups?";
}

// (3) The window never fails a send and an immediate deadline does not wait: with the window
// full and credit left, send(buf, immediate) and send(buf, 200 us) go, each within ~1 ms.
TEST(ReviewF8, ShortDeadlinesWithAFullWindowStillSend) {
  net::ListenOptions lo;
  lo.inbox_messages = 40;
  // No keeper on either end: with the client's peer_timeout, the server's keeper would progress
  // the server's worker (K1) and could fetch payloads, emptying the window, between the sends.
  auto p = test::make_pair_without_keepers(lo);
  ASSERT_TRUE(p);
  constexpr std::size_t kSize = 256 << 10;
  for (std::uint32_t i = 0; i < 9; ++i) ASSERT_TRUE(p->client.send(numbered(p->client, kSize, i)));
  ChannelCore& core = *test::core_of(p->client);
  ASSERT_GE(tx_pending(core), ChannelCore::kTxWindowMessages);
  std::int64_t worst = 0;
  for (std::uint32_t i = 9; i < 30; ++i) {
    const Deadline d = i % 2 == 0 ? Deadline::immediate() : Deadline::after(200us);
    const std::int64_t t0 = monotonic_ns();
    auto st = p->client.send(numbered(p->client, kSize, i), d);
    worst = std::max(worst, monotonic_ns() - t0);
    std::printf("%s%.2f", i == 9 ? "elapsed ms (immediate, 200 us alternating):" : " ",
                static_cast<double>(monotonic_ns() - t0) / 1e6);
    if (i == 29) std::printf("\n");
    ASSERT_TRUE(st) << i << ": " << st.error().message();
  }
  EXPECT_EQ(window_waiters(core), 0u) << "tx_window_waiters_ left incremented";
  std::printf("worst send with a full window and a short deadline: %.2f ms\n",
              static_cast<double>(worst) / 1e6);
  EXPECT_LT(worst, 1'000'000'000);  // (a loaded machine: the property is that each one sends)
  // Neither end has a keeper: the client's worker must be progressed too for its payloads to be
  // fetched, so the two are progressed in turn (10 s for each message).
  std::uint32_t got = 0;
  for (Deadline end = secs(10); got < 30 && !end.expired();) {
    (void)p->client.receive(Deadline::after(1ms));
    auto msg = p->server.receive(Deadline::after(1ms));
    if (!msg) {
      ASSERT_EQ(msg.error().code, Errc::TimedOut) << msg.error().message();
      continue;
    }
    ASSERT_EQ(msg->kind, Kind::Message) << msg->why;  // not the channel's end
    ASSERT_EQ(number_of(msg->buffer), got);
    ++got;
    end = secs(10);
  }
  EXPECT_EQ(got, 30u) << "message " << got << " not received within 10 s";
}

// (3d) Destroying a pair whose server never progressed (both peer_timeouts 0, nothing received)
// after the client sent 20 rendezvous payloads ends cleanly. Fixed (P1, net/core.h PendingOp): a
// callback UCX makes inside the call that posts the op only records it, and the poster finishes
// the op once. Before (also at 0ffa026, older than F8): SIGSEGV in ~WorkerCore, 4 of 4 runs. Seen
// in gdb: the server's close() progresses, on_am_locked -> start_recv_locked ->
// ucp_am_recv_data_nbx, which, the client being gone, purges the request and calls recv_done
// *inside the call* (recv_done deleted the RecvOp), then returns a request pointer, not an error:
// start_recv_locked then tracked the freed op, and ~WorkerCore's last loop deleted it again.
// send_locked had the same shape. Run in a child process (death test): it exits 0.
// `mode` 0: send(buf) only (no window); 1: send(buf, 100 us) (window waits).
void unfetched_then_destroy(int mode) {
  net::ListenOptions lo;
  lo.inbox_messages = 40;
  // No keeper on either end: the client's peer_timeout, sent in its hello, would have the
  // server's keeper progress the server's worker (K1) and fetch payloads.
  auto p = test::make_pair_without_keepers(lo);
  if (!p) std::exit(3);
  constexpr std::size_t kSize = 256 << 10;
  for (std::uint32_t i = 0; i < 20; ++i) {
    auto st = mode == 0 || i < 9
                  ? p->client.send(numbered(p->client, kSize, i))
                  : p->client.send(numbered(p->client, kSize, i), Deadline::after(100us));
    if (!st) std::exit(4);
  }
}
TEST(ReviewF8, DestroyingAPairWithUnfetchedPayloadsEndsCleanly) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        unfetched_then_destroy(0);
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "");
  EXPECT_EXIT(
      {
        unfetched_then_destroy(1);
        std::exit(0);
      },
      ::testing::ExitedWithCode(0), "");
}

// (3c) Retention: kMaxVectors 256 (was 16) with kMaxBytes unchanged lets one burst of mid-size
// payloads (here 128 KiB) keep up to 16 MiB per worker (each connect() has a worker of its own);
// with 16 vectors it was 2 MiB for these, and 16 MiB already for 1 MiB payloads. Kept as stated:
// the bound is kMaxBytes per worker (net/core.h, Spares), not trimmed when idle (noted, not
// changed: the review's suggestion, a smaller cap below 1 MiB, would bring back the misses of a
// 64 KiB stream).
TEST(ReviewF8, ABurstOfMidSizePayloadsKeepsAtMostKMaxBytesOfSpares) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  constexpr std::uint32_t kCount = 120;
  constexpr std::size_t kSize = 128 << 10;
  for (std::uint32_t i = 0; i < kCount; ++i)
    ASSERT_TRUE(p->server.send(numbered(p->server, kSize, i), secs(10)));
  std::vector<net::Message> held;
  for (std::uint32_t i = 0; i < kCount; ++i) {
    auto m = p->client.receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    held.push_back(std::move(*m));
  }
  held.clear();  // the application drops them: their vectors go to the client's worker's spares
  std::size_t kept = 0;
  {
    auto sp = test::spares_of(p->client);
    for (std::size_t c : test::capacities(*sp)) kept += c;
  }
  std::printf("after one burst of %u x 128 KiB, the client's worker keeps %.1f MiB of spares\n",
              kCount, static_cast<double>(kept) / (1 << 20));
  EXPECT_LE(kept, net::detail::Spares::kMaxBytes);
}

// (4) Accounting: after a stream of one-way messages, calls (one timed out and detached) and
// replies, once everything is received and answered, tx_pending_ and tx_bytes_ of both ends
// return to 0 (a drift would leave the window closed for good, or open).
TEST(ReviewF8, TxBytesAndPendingReturnToZero) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  std::atomic<bool> stop{false};
  std::thread server([&] {
    std::uint32_t n = 0;
    while (!stop.load()) {
      auto msg = p->server.receive(Deadline::after(20ms));
      if (!msg) continue;
      if (msg->kind == Kind::Request) {
        // The first request is answered late: its call timed out and detached its send.
        if (n++ == 0) std::this_thread::sleep_for(300ms);
        (void)msg->buffer.resize(128 << 10);
        (void)net::Channel::reply(std::move(*msg));
      }
    }
  });
  {
    auto b = p->client.buffer(256 << 10);
    ASSERT_TRUE(b);
    Status s = p->client.call(*b, Deadline::after(50ms));
    EXPECT_FALSE(s) << "the first call was meant to time out";
  }
  for (std::uint32_t i = 0; i < 200; ++i) {
    ASSERT_TRUE(p->client.send(numbered(p->client, 96 << 10, i), secs(10)));
    if (i % 20 == 0) {
      auto b = p->client.buffer(200 << 10);
      ASSERT_TRUE(b);
      ASSERT_TRUE(p->client.call(*b, secs(10)));
    }
  }
  std::this_thread::sleep_for(500ms);
  // Let both workers progress what is left (a receive with nothing to receive).
  (void)p->client.receive(Deadline::after(100ms));
  stop = true;
  server.join();
  (void)p->server.receive(Deadline::after(100ms));
  (void)p->client.receive(Deadline::after(100ms));
  for (net::Channel* c : {&p->client, &p->server}) {
    ChannelCore& core = *test::core_of(*c);
    os::LockGuard lock(core.w_->mu);
    EXPECT_EQ(core.*get(test::TxPendingOf{}), 0u);
    EXPECT_EQ(core.*get(test::TxBytesOf{}), 0u);
    EXPECT_EQ(core.*get(test::TxWindowWaitersOf{}), 0u);
  }
}

// (5) Spares full of 64 KiB vectors (256 of them are exactly kMaxBytes) keep them as they are when
// given one more, which is freed. Fixed: give() returns at once when nothing kept is smaller.
// Before: every such give() took the slow path (257 vectors constructed, 256 capacities copied
// and sorted under the spares' lock, in send_done under the worker's mu) only to free it:
// 1,136-2,033 ns against 53-64 ns with room, 76 ns after (printed; no timing asserted here).
TEST(ReviewF8, AGiveToFullSparesOfOneSizeKeepsThemAsTheyAre) {
  using net::detail::Spares;
  constexpr std::size_t k64 = 64 << 10;
  Spares s;
  std::vector<std::vector<std::byte>> pool;
  for (int i = 0; i < 2000; ++i) pool.emplace_back(k64);
  // With room: give then take back (take finds an exact one).
  std::int64_t t0 = monotonic_ns();
  for (int r = 0; r < 100; ++r)
    for (auto& v : pool) {
      s.give(std::move(v));
      v = s.take(k64);
    }
  const double room_ns =
      static_cast<double>(monotonic_ns() - t0) / (100.0 * static_cast<double>(pool.size()));
  for (std::size_t i = 0; i < Spares::kMaxVectors; ++i) s.give(std::vector<std::byte>(k64));
  ASSERT_EQ(test::capacities(s).size(), Spares::kMaxVectors);
  // Full: each give frees (the spares keep theirs), the vector comes back from malloc.
  t0 = monotonic_ns();
  for (int r = 0; r < 100; ++r)
    for (auto& v : pool) {
      if (v.capacity() == 0) v = std::vector<std::byte>(k64);
      s.give(std::move(v));  // refused: v still holds it (an rvalue reference, not moved from)
    }
  const double full_ns =
      static_cast<double>(monotonic_ns() - t0) / (100.0 * static_cast<double>(pool.size()));
  std::printf("Spares::give of 64 KiB: %.0f ns with room (+ take), %.0f ns when full\n", room_ns,
              full_ns);
  const auto caps = test::capacities(s);
  EXPECT_EQ(caps.size(), Spares::kMaxVectors);
  EXPECT_TRUE(std::all_of(caps.begin(), caps.end(), [](std::size_t c) { return c == k64; }));
}

}  // namespace
}  // namespace mbmq
