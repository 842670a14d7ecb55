// Hostile review (rev-netsib) of "a large transfer on one channel no longer holds up its sibling
// channels" (be31abd..main): deferred rendezvous vectors (WorkerCore::Deferred), the progress
// loop's early stops, WorkerMutex's hand-over. Client and server in this one process; every wait
// has a deadline, so a test fails rather than hangs. Confirmed_* (now DISABLED_*): fails on the
// code reviewed; Suspected_*: could not be made to fail reliably.
//
// On the code reviewed (main e650133, Release, 2 busy vCPUs), and on be31abd (before the change):
//   DISABLED_SiblingReceiveDeadline...   fails: max 101-336 ms for receive(5 ms) (be31abd: 329)
//   OwnReceiveDeadline...                failed: max 38-47 ms for receive(5 ms) (be31abd: 41-44);
//                                         fixed by the allocating thread (D1), see below
//   DeferredLargeMessage...     failed: the 64 B message first, 5 of 5 (be31abd: same); fixed
//                               (net-order): a rendezvous message keeps its inbox place
//   ALargeMessageSentJust...    failed: PeerClosed, message lost, 3 of 3 (be31abd: same); fixed
//                               (net-order): close() lingers for its sends (within its
//                               100 ms), and a Bye behind unreceived payloads waits for them
//   DISABLED_ShortDeadlinesHold...       fails intermittently (2 of 5: 50-59 ms for 1 ms;
//                                         be31abd 1 of 1: 57 ms); cause not pinned (VM load?)
//   NoMemoryForADeferred...     passes (be31abd: the process aborts, bad_alloc)
//   CloseWithADeferred..., Suspected_DeferredPayloadOfAClosedChannel... (ABA): pass
//     (the ABA test saw no ChannelCore address reused in 33-35 rounds: not reached, not refuted)
// Tests named DISABLED_ fail on main and failed the same way before the sibling-stall change
// (be31abd): known #19 defects, kept as reproducers (README, "Across machines", known limits):
// deadlines not honoured while deferred payloads are allocated; short deadlines beside a 64 MiB
// transfer (intermittent). (A small message overtaking a large one on the same channel and a
// large message sent just before close() lost were fixed on branch net-order: tests enabled.
// A large message lost when its receiver came back after close()'s 100 ms, ALargeMessageBefore-
// CloseReachesABusyReceiver[WithKeepers], is fixed by the keeper's linger (K5): enabled.)
// Since the allocating thread (D1, net/core.h: no application thread allocates a deferred
// payload's vector): OwnReceiveDeadline... max 6-19.5 ms for receive(5 ms) in 9 runs (bound 30):
// enabled; SiblingReceiveDeadline... max 20-35 ms (was 101-336; bound 30) and ShortDeadlines...
// max 25-47 ms for receive(1 ms) (bound 40): still over now and then, no longer from page
// faults: a thread waits for the worker's lock while another is inside one UCX progress step
// of a large TCP transfer (1-15 ms here) and the hand-over; kept DISABLED.
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "net/net_util.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::filled;
using test::make_many;
using test::Many;
using test::secs;
using test::url;

std::int64_t now_ns() { return mbmq::monotonic_ns(); }

// Diagnostics only (net/net_access.h): an unlocked read of a counter the lock guards (the channel
// is idle), and a channel's core and endpoint addresses.
std::uint32_t tx_pending(net::Channel& c) {
  return test::core_of(c).get()->*get(test::TxPendingOf{});
}
std::pair<const void*, const void*> addresses(net::Channel& c) {
  net::detail::ChannelCore* core = test::core_of(c).get();
  return {core, core == nullptr ? nullptr : static_cast<const void*>(core->*get(test::EpOf{}))};
}

// (a) A deferred payload of a channel nobody waits on is allocated by "whoever progresses next"
// (start_deferred(waiter, ownerless=true) in run_until_counted, after its verdict too). A sibling
// channel's thread in receive() with a 5 ms deadline, on an idle channel, thus pays the 64 MiB
// vector's page faults (50-130 ms here, the very stall the change set out to remove) and returns
// far past its deadline. Channel A's server thread is busy elsewhere (not in receive()), as a
// server thread processing the previous request is.
TEST(ReviewNetSib, DISABLED_SiblingReceiveDeadlineHoldsWhileAnUnwaitedChannelsPayloadIsDeferred) {
  net::ListenOptions lo;
  // Both peer_timeouts 0, so no keeper progresses either end (a client's peer_timeout, sent in
  // its hello, would have the keeper progress the listener's worker, K1): only the threads below
  // progress the listener's worker, the senders their own.
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  co.wait = WaitPolicy{WaitMode::Sleep, {}};
  constexpr std::size_t kSenders = 3;
  auto m = make_many(1 + static_cast<int>(kSenders), lo, co);
  ASSERT_TRUE(m);
  constexpr std::size_t kBig = 64u << 20;
  // Clients 1..kSenders each send one 64 MiB message, then progress their own worker (receive()
  // of nothing) so that the rendezvous can go on.
  std::atomic<bool> stop{false};
  std::vector<std::thread> senders;
  for (std::size_t i = 1; i <= kSenders; ++i) {
    senders.emplace_back([&, i] {
      net::Buffer b = filled(m->client[i], kBig, static_cast<char>('a' + i));
      Status s = m->client[i].send(std::move(b), secs(10));
      EXPECT_TRUE(s) << s.error().message();
      while (!stop.load()) (void)m->client[i].receive(Deadline::after(5ms));
    });
  }
  // Server thread of channel 0 (idle: nothing comes on it): receive() with a 5 ms deadline.
  std::vector<double> ms;
  const std::int64_t until = now_ns() + 1'500'000'000;
  while (now_ns() < until) {
    const std::int64_t t0 = now_ns();
    auto r = m->server[0].receive(Deadline::after(5ms));
    ms.push_back(static_cast<double>(now_ns() - t0) / 1e6);
    EXPECT_FALSE(r);
  }
  // Now the channels' own threads take their messages (intact).
  for (std::size_t i = 1; i <= kSenders; ++i) {
    auto r = m->server[i].receive(secs(20));
    ASSERT_TRUE(r) << r.error().message();
    ASSERT_EQ(r->buffer.size(), kBig);
    EXPECT_EQ(static_cast<char>(r->buffer.data()[kBig - 1]), static_cast<char>('a' + i));
  }
  stop.store(true);
  for (auto& t : senders) t.join();
  const double worst = *std::max_element(ms.begin(), ms.end());
  std::printf("receive(5 ms) on the idle sibling: %zu calls, max %.1f ms, p50 %.2f ms\n", ms.size(),
              worst, test::pct(ms, 0.5));
  // 5 ms asked; 25 ms allowed for a loaded VM (one UCX step is up to 15 ms).
  EXPECT_LT(worst, 30.0) << "a 5 ms receive() on an idle channel overran its deadline: it "
                            "allocated another channel's deferred 64 MiB vector";
}

// (a) Ordering on one channel: a large one-way message (deferred: no spare vector) followed by a
// small one. The small one is delivered to the inbox from the callback while the large one still
// waits for its vector (and then for its data): receive() returns them out of order. (UCX orders
// the AMs; mbmq's "UCX does ordering" no longer holds for what the application sees.)
TEST(ReviewNetSib, DeferredLargeMessageIsNotOvertakenByALaterSmallOne) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  constexpr std::size_t kBig = 8u << 20;
  int out_of_order = 0;
  for (int round = 0; round < 5; ++round) {
    std::thread t([&] {
      Status s = p->client.send(filled(p->client, kBig, 'L'), secs(10));
      EXPECT_TRUE(s) << s.error().message();
      s = p->client.send(filled(p->client, 64, 's'), secs(10));
      EXPECT_TRUE(s) << s.error().message();
      // progress the client's worker until the server has both
      for (int i = 0; i < 200; ++i) (void)p->client.receive(Deadline::after(5ms));
    });
    auto a = p->server.receive(secs(10));
    auto b = p->server.receive(secs(10));
    t.join();
    ASSERT_TRUE(a) << a.error().message();
    ASSERT_TRUE(b) << b.error().message();
    if (a->buffer.size() != kBig) ++out_of_order;
    std::printf("round %d: first %zu B, second %zu B\n", round, a->buffer.size(), b->buffer.size());
  }
  EXPECT_EQ(out_of_order, 0) << "a small message sent after a large one was received first";
}

// (a) A channel closed while its payload is deferred: the descriptor is released
// (close_ep_locked), the sender's send() completes (or fails) and nothing hangs; the worker's
// other channel still works.
TEST(ReviewNetSib, CloseWithADeferredPayloadReleasesItAndTheSiblingGoesOn) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  for (int round = 0; round < 3; ++round) {
    auto m = make_many(2, lo, co);
    ASSERT_TRUE(m);
    constexpr std::size_t kBig = 16u << 20;
    Status s = m->client[0].send(filled(m->client[0], kBig, 'z'), secs(10));
    ASSERT_TRUE(s) << s.error().message();
    // Let the RTS reach the server's socket; then close the server's end: its close() progresses
    // (the RTS is deferred in the callback) and drops it.
    for (int i = 0; i < 10; ++i) (void)m->client[0].receive(Deadline::after(2ms));
    m->server[0].close();
    // The client learns the close.
    bool closed = false;
    for (int i = 0; i < 400 && !closed; ++i) {
      auto r = m->client[0].receive(Deadline::after(5ms));
      if (r && r->kind == Kind::PeerClosed) closed = true;
      if (!r && r.error().code != Errc::TimedOut) closed = true;
    }
    EXPECT_TRUE(closed);
    // The sibling channel still answers.
    std::thread srv([&] {
      auto r = m->server[1].receive(secs(5));
      ASSERT_TRUE(r) << r.error().message();
      (void)net::Channel::reply(std::move(*r));
    });
    net::Buffer b = filled(m->client[1], 64);
    Status c = m->client[1].call(b, secs(5));
    srv.join();
    EXPECT_TRUE(c) << c.error().message();
  }
}

// (c)/(d) Deadlines with the early stops and the hand-over: a 1 ms receive() on a sibling
// channel while another thread moves 64 MiB calls on the same worker (a spare vector exists
// after the first call, so no deferral): the overrun stays within a few UCX steps.
TEST(ReviewNetSib, DISABLED_ShortDeadlinesHoldBesideA64MiBTransfer) {
  net::ListenOptions lo;
  net::ConnectOptions co;
  auto m = make_many(2, lo, co);
  ASSERT_TRUE(m);
  constexpr std::size_t kBig = 64u << 20;
  std::atomic<bool> stop{false};
  std::thread server_big([&] {
    while (!stop.load()) {
      auto r = m->server[1].receive(Deadline::after(50ms));
      if (r && r->kind == Kind::Request) (void)net::Channel::reply(std::move(*r));
    }
  });
  std::thread client_big([&] {
    net::Buffer b = filled(m->client[1], kBig);
    const std::int64_t until = now_ns() + 2'000'000'000;
    while (now_ns() < until)
      if (!m->client[1].call(b, secs(20))) break;
  });
  std::vector<double> ms;
  const std::int64_t until = now_ns() + 2'000'000'000;
  while (now_ns() < until) {
    const std::int64_t t0 = now_ns();
    (void)m->server[0].receive(Deadline::after(1ms));
    ms.push_back(static_cast<double>(now_ns() - t0) / 1e6);
  }
  client_big.join();
  stop.store(true);
  server_big.join();
  const double worst = *std::max_element(ms.begin(), ms.end());
  std::printf("receive(1 ms) beside 64 MiB calls: %zu calls, max %.1f ms, p99 %.2f ms\n", ms.size(),
              worst, test::pct(ms, 0.99));
  EXPECT_LT(worst, 40.0);
}

// (a) ABA: start_deferred_slow() pops a Deferred{ch, ep}, allocates unlocked (64 MiB: 50-130 ms),
// then matches the channel by find_locked(ep) == ch. If meanwhile the channel is closed and
// destroyed (close_ep_locked does not see the popped entry, so its descriptor is not released
// then) and a new connection is accepted whose ChannelCore and ucp_ep_h reuse the freed
// addresses (malloc's and UCX's free lists are LIFO), the old peer's payload is received into
// the NEW channel (or the new channel is failed by ucp_am_recv_data_nbx on a descriptor of a
// destroyed endpoint). Detected: the new channel, to which nothing is sent, receives a message
// or is closed.
TEST(ReviewNetSib, DeferredPayloadOfAClosedChannelNeverReachesANewChannelAtItsAddress) {
  // Under ASan, LeakSanitizer reported 1.3 GB in 40 allocations at exit (CI 2026-12-01): the
  // client's 64 MiB send, never fetched by the closed server, was cancelled by the client's force
  // close (the server's Bye) only at a later progress, and the client channel destroyed right
  // after destroyed its worker first: UCX dropped the request, the SendOp and its vector leaked
  // (64 MiB a round, for the life of the process). ~WorkerCore now progresses, then frees what is
  // left (NetLeak.APayloadInFlightWhenItsChannelFailsIsFreedWithTheChannel, review_flow_test.cc,
  // which checks that leak under ASan). Not run under a sanitizer: once (CI, 2026-12-01, 10 rounds)
  // the test passed and LeakSanitizer's own tracer then crashed at exit (signal 11), with
  // mbmq::net's and UCX's threads still running.
  if (test::kSanitized) GTEST_SKIP() << "LeakSanitizer's tracer crashed at exit once (see above)";
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(1, lo, co);  // channel 0: the sibling whose thread allocates
  ASSERT_TRUE(m);
  std::atomic<bool> stop{false};
  std::thread sibling([&] {
    while (!stop.load()) (void)m->server[0].receive(Deadline::after(5ms));
  });
  constexpr std::size_t kBig = 64u << 20;
  net::Buffer big;
  int hits = 0, rounds = 0, same_cores = 0, same_both = 0;
  // 20 rounds or 10 s (it was 40 or 20 s, 20.6 s of the CI's Release suite: the case is not
  // reached in this many rounds anyway, see the result line).
  const std::int64_t until = now_ns() + 10'000'000'000;
  for (; rounds < 20 && now_ns() < until; ++rounds) {
    std::optional<net::Channel> sa, ca;
    {
      std::optional<Result<net::Channel>> c;
      std::thread t([&] { c.emplace(net::connect(url(m->l.port()), secs(10), co)); });
      auto s = m->l.accept(secs(10));
      t.join();
      ASSERT_TRUE(s) << s.error().message();
      ASSERT_TRUE(*c) << (*c).error().message();
      sa.emplace(std::move(*s));
      ca.emplace(std::move(**c));
    }
    const auto old_addr = addresses(*sa);
    Status st = ca->send(filled(*ca, kBig, 'O'), secs(10));
    ASSERT_TRUE(st) << st.error().message();
    // The RTS reaches the server; the sibling's thread pops it and allocates (tens of ms). The
    // client keeps progressing, so that the server's flush close finishes at once and its
    // endpoint is freed.
    std::atomic<bool> a_stop{false};
    std::thread aprog([&] {
      while (!a_stop.load()) (void)ca->receive(Deadline::after(1ms));
    });
    os::sleep_ns(static_cast<std::int64_t>(2'000'000 + (rounds % 4) * 2'000'000));
    sa.reset();  // closed and destroyed while the vector is allocated
    a_stop.store(true);
    aprog.join();
    // ca is destroyed after the new accept: its core, freed last by this thread, would be the
    // first of malloc's free list this thread's accept() takes.
    // A new connection at once: its ChannelCore and endpoint may take the freed addresses.
    std::optional<Result<net::Channel>> c;
    std::thread t([&] { c.emplace(net::connect(url(m->l.port()), secs(10), co)); });
    auto s = m->l.accept(secs(10));
    t.join();
    ASSERT_TRUE(s) << s.error().message();
    ASSERT_TRUE(*c) << (*c).error().message();
    ca.reset();
    const auto new_addr = addresses(*s);
    const bool same_core = new_addr.first == old_addr.first;
    const bool same_ep = new_addr.second == old_addr.second;
    same_cores += same_core ? 1 : 0;
    same_both += same_core && same_ep ? 1 : 0;
    std::atomic<bool> client_stop{false};
    std::thread cprog([&] {
      while (!client_stop.load()) (void)(**c).receive(Deadline::after(5ms));
    });
    auto r = s->receive(Deadline::after(400ms));
    client_stop.store(true);
    cprog.join();
    if (r || r.error().code != Errc::TimedOut) {
      ++hits;
      std::printf("round %d: the new channel got %s (%zu bytes)\n", rounds,
                  r ? (r->kind == Kind::PeerClosed ? "closed" : "a message") : "an error",
                  r ? r->buffer.size() : 0u);
    }
  }
  stop.store(true);
  sibling.join();
  std::printf(
      "%d rounds, %d hits; the new channel at the old ChannelCore address %d times, at "
      "the old core and endpoint both %d times\n",
      rounds, hits, same_cores, same_both);
  EXPECT_EQ(hits, 0);
}

// (a) A vector that cannot be allocated fails the channel (Errc::System, "no memory"), outside
// UCX's callback, and the process goes on (before: std::bad_alloc thrown inside the callback).
// The address space is capped just above what the process maps, after the sender's buffer.
TEST(ReviewNetSib, NoMemoryForADeferredPayloadFailsOnlyThatChannel) {
  // It caps the address space (RLIMIT_AS): a sanitizer's shadow memory cannot live with that.
  if (test::kSanitized) GTEST_SKIP() << "caps RLIMIT_AS, which a sanitizer cannot run under";
  auto p = test::make_pair_without_keepers();
  ASSERT_TRUE(p);
  constexpr std::size_t kBig = 64u << 20;
  net::Buffer b = filled(p->client, kBig, 'q');
  std::size_t pages = 0;
  {
    std::ifstream f("/proc/self/statm");
    f >> pages;
  }
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_AS, &old), 0);
  const rlimit cap{pages * 4096 + (24u << 20), old.rlim_max};
  ASSERT_EQ(::setrlimit(RLIMIT_AS, &cap), 0);
  Status st = p->client.send(std::move(b), secs(5));
  EXPECT_TRUE(st) << st.error().message();
  Result<net::Message> r = fail(Errc::TimedOut, "not run");
  for (int i = 0; i < 100; ++i) {
    r = p->server.receive(Deadline::after(20ms));
    if (r || r.error().code != Errc::TimedOut) break;
    (void)p->client.receive(Deadline::after(2ms));
  }
  ASSERT_EQ(::setrlimit(RLIMIT_AS, &old), 0);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->kind, Kind::PeerClosed);
  std::printf("server: kind %d, why \"%s\"\n", static_cast<int>(r->kind), r->why);
}

// (a) The channel's own receive() with a short deadline while a 64 MiB payload for it arrives:
// start_deferred() allocates the vector (50-130 ms of page faults) whatever the deadline, even
// after run_until_counted has decided verdict 0 (the deadline). A deferred payload could be left
// deferred once the deadline has passed; it is not.
TEST(ReviewNetSib, OwnReceiveDeadlineHoldsWhileItsLargePayloadIsDeferred) {
  auto p = test::make_pair_without_keepers();
  ASSERT_TRUE(p);
  constexpr std::size_t kBig = 64u << 20;
  std::atomic<bool> stop{false};
  std::thread client([&] {
    Status s = p->client.send(filled(p->client, kBig, 'w'), secs(10));
    EXPECT_TRUE(s) << s.error().message();
    while (!stop.load()) (void)p->client.receive(Deadline::after(5ms));
  });
  std::vector<double> ms;
  bool got = false;
  // The allocation of the 64 MiB vector (16,384 page faults: THP is madvise-only on Debian) must
  // not happen on this thread: counted in its own minor faults, which no load on the machine
  // changes (a bound of 30 ms on each call failed under ASan beside a busy loop: 49.9 ms once in
  // 6 runs, a scheduling delay, not the allocation).
  const auto thread_faults = [] {
    rusage u{};
    (void)::getrusage(RUSAGE_THREAD, &u);
    return static_cast<long>(u.ru_minflt);
  };
  const long faults0 = thread_faults();
  const std::int64_t until = now_ns() + 10'000'000'000;
  while (!got && now_ns() < until) {
    const std::int64_t t0 = now_ns();
    auto r = p->server.receive(Deadline::after(5ms));
    ms.push_back(static_cast<double>(now_ns() - t0) / 1e6);
    if (r) {
      got = true;
      EXPECT_EQ(r->buffer.size(), kBig);
      ms.pop_back();  // the call that returned the message may take the transfer's time
    }
  }
  const long faults = thread_faults() - faults0;
  stop.store(true);
  client.join();
  EXPECT_TRUE(got);
  const double worst = ms.empty() ? 0 : *std::max_element(ms.begin(), ms.end());
  std::printf(
      "receive(5 ms) timing out while its 64 MiB payload is deferred: %zu calls, max "
      "%.1f ms, %ld page faults on the receiving thread\n",
      ms.size(), worst, faults);
  EXPECT_LT(faults, 4096) << "the 64 MiB vector was allocated on the thread in receive()";
  EXPECT_LT(worst, 1000.0) << "a receive(5 ms) took a second";
}

// (a) A large one-way message, then close(): close() sends Bye after it and waits (flush, up to
// 100 ms) for what was sent to go out. At the receiver the message's RTS is deferred and the Bye,
// eager, arrives right behind it: fail_locked(PeerClosed) -> close_ep_locked drops the deferred
// entry (ucp_am_data_release) and the message is lost; receive() returns PeerClosed only.
TEST(ReviewNetSib, ALargeMessageSentJustBeforeCloseIsDelivered) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  int lost = 0;
  for (int round = 0; round < 3; ++round) {
    auto p = test::make_pair(lo, co);
    ASSERT_TRUE(p);
    constexpr std::size_t kBig = 8u << 20;
    std::thread client([&] {
      Status s = p->client.send(filled(p->client, kBig, 'e'), secs(10));
      EXPECT_TRUE(s) << s.error().message();
      p->client.close();
    });
    auto r = p->server.receive(secs(10));
    client.join();
    ASSERT_TRUE(r) << r.error().message();
    std::printf("round %d: first receive: %s (%s), %zu bytes\n", round, r->why,
                r->kind == Kind::PeerClosed ? "PeerClosed" : "a message", r->buffer.size());
    if (r->kind == Kind::PeerClosed) ++lost;
  }
  EXPECT_EQ(lost, 0) << "a message sent before close() never reached the receiver";
}

// --- review of 39774f4 (arrival order, close linger, held Bye) ---

// (A)/(B) The receiver is busy (not in receive(); with both peer_timeouts 0 no keeper progresses
// its worker: nothing does) while the sender sends 8 MiB and close()s. The sender's close()
// lingers 100 ms, sees no fetch, sends its Bye behind the pending send and hands the rest of the
// linger to the keeper (K5), which progresses the sender's worker every millisecond (that alone,
// never the receiver's). When the receiver comes back the RTS is taken (a place kept in the
// inbox), the Bye is held behind it (bye_pending_), and the payload is fetched from the
// lingering sender. Expected: the message, then PeerClosed, within the 3 s deadline; suspected:
// the held Bye is never released (receive() runs to its deadline; with no deadline, forever) or
// the message is lost. (Written before K5, when nobody progressed the sender's worker after its
// close(): the message was lost.)
// An 8 MiB message sent, the sender's close(), the receiver busy 300 ms: the message first, then
// (if `then_peer_closed`) PeerClosed.
void large_message_before_close_reaches_a_busy_receiver(const net::ListenOptions& lo,
                                                        const net::ConnectOptions& co,
                                                        bool then_peer_closed) {
  auto p = test::make_pair(lo, co);
  ASSERT_TRUE(p);
  constexpr std::size_t kBig = 8u << 20;
  Status s = p->client.send(filled(p->client, kBig, 'e'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  const std::int64_t c0 = now_ns();
  p->client.close();
  std::printf("client close(): %.1f ms\n", static_cast<double>(now_ns() - c0) / 1e6);
  std::this_thread::sleep_for(300ms);
  const std::int64_t t0 = now_ns();
  auto r = p->server.receive(secs(3));
  const double ms1 = static_cast<double>(now_ns() - t0) / 1e6;
  ASSERT_TRUE(r) << r.error().message() << " after " << ms1 << " ms (held Bye never released?)";
  std::printf("first receive after %.1f ms: %s (\"%s\"), %zu bytes\n", ms1,
              r->kind == Kind::PeerClosed ? "PeerClosed" : "a message", r->why, r->buffer.size());
  EXPECT_NE(r->kind, Kind::PeerClosed) << "the message sent before close() was lost";
  if (then_peer_closed && r->kind != Kind::PeerClosed) {
    auto r2 = p->server.receive(secs(3));
    ASSERT_TRUE(r2) << r2.error().message();
    EXPECT_EQ(r2->kind, Kind::PeerClosed);
  }
}

TEST(ReviewNetSib, ALargeMessageBeforeCloseReachesABusyReceiver) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  large_message_before_close_reaches_a_busy_receiver(lo, co, true);
}

// Same, with the default options (keepers on both sides): the sender's keeper finishes its close.
TEST(ReviewNetSib, ALargeMessageBeforeCloseReachesABusyReceiverWithKeepers) {
  large_message_before_close_reaches_a_busy_receiver({}, {}, false);
}

// (K5) What a lingering channel holds, it lets go of: the payloads it sent and the channel
// itself, as soon as its peer is gone. The client sends 8 MiB that the server never receives
// (no keeper on either end: nothing progresses the server's worker), then close()s: the channel
// lingers (its core is still alive after close() returned). The server's channel is then
// destroyed (a force close: its socket shut); the client's linger must end, and its core be
// freed, at once (within 2 s here; the keeper ticks every millisecond for the lingering client).
TEST(ReviewNetSib, ALingeringChannelEndsWhenItsPeerGoes) {
  // Both peer_timeouts 0: with the client's (sent in its hello) the server's keeper would
  // progress the server's worker (K1), and could fetch the 8 MiB within close()'s 100 ms: then
  // the client would not linger ("close() did not linger").
  auto p = test::make_pair_without_keepers();
  ASSERT_TRUE(p);
  std::weak_ptr<net::detail::ChannelCore> core = test::core_of(p->client);
  Status s = p->client.send(filled(p->client, 8u << 20, 'k'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  p->client = net::Channel{};  // closed, and the handle lets go of its core
  EXPECT_FALSE(core.expired()) << "close() did not linger for the unfetched 8 MiB";
  const std::int64_t t0 = now_ns();
  p->server.close();
  while (!core.expired() && now_ns() - t0 < 2'000'000'000) os::sleep_ns(1'000'000);
  const double ms = static_cast<double>(now_ns() - t0) / 1e6;
  std::printf("the lingering channel was freed %.1f ms after its peer closed\n", ms);
  EXPECT_TRUE(core.expired()) << "a lingering channel outlived its peer by 2 s";
}

// (K5) A peer that stays connected but silent (its worker never progressed: a frozen process, a
// partition) ends the linger at the lingering end's peer_timeout (K2), not at the 10 s cap
// (kLingerMaxNs). The peer is a raw UCX server (test::RawServer): it answers the hello (its
// HelloAck with no peer_timeout of its own) and never progresses its worker again, so it sends
// nothing (no heartbeat) and never fetches the 8 MiB, its TCP connection up. (An mbmq::net
// listener cannot be made silent to a client with a peer_timeout: the client's, sent in its
// hello, has the server's keeper progress the server's worker (K1) and send heartbeats (K3); this
// test had such a server, whose keeper fetched the payload: the linger ended 250-283 ms after
// close() for a 300 ms peer_timeout, by that fetch, not by the timeout.) K2 ends a channel only
// once it received nothing for peer_timeout, and the last thing the client receives is the
// HelloAck, after t_hello: a linger ended before t_hello + peer_timeout was ended by something
// else (a fetch, an error). After it, K2 fires at the next keeper tick (an eighth of
// peer_timeout, later under load) and the linger ends at the next millisecond's linger_tick.
// Each bound verified to fail (2026-12-02, Release): K2's check in keep_alive_tick disabled, the
// linger ran to the 10 s cap (freed 10.1 s after close(): "outlived peer_timeout"); K2 firing at
// a quarter of peer_timeout, freed 338 ms after the hello ("before peer_timeout"); the raw server
// progressed for 300 ms after close(), it got the 8 MiB's header and the linger ended 416 ms
// after the hello ("before peer_timeout" and the header check). As written: freed 1.11-1.16 s
// after the hello, 1.07-1.10 s after close().
TEST(ReviewNetSib, ALingeringChannelEndsAtPeerTimeoutWhenItsPeerFallsSilent) {
  // 1 s: from the HelloAck to close(), nothing comes from the raw server; on a loaded machine
  // 300 ms could end the channel before the send (as in NetLeak.APayloadInFlight...).
  constexpr std::int64_t kTimeoutNs = 1'000'000'000;
  test::RawServer srv;
  ASSERT_TRUE(srv.start());
  net::ConnectOptions co;
  co.peer_timeout = std::chrono::milliseconds(kTimeoutNs / 1'000'000);
  const std::int64_t t_hello = now_ns();  // before anything the client receives
  auto c = srv.connect_client(co);
  ASSERT_TRUE(c) << c.error().message();
  net::Channel client = std::move(*c);
  // From here on nothing progresses the server's worker until it is destroyed.
  std::weak_ptr<net::detail::ChannelCore> core = test::core_of(client);
  Status s = client.send(filled(client, 8u << 20, 's'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  const std::int64_t t_close = now_ns();
  client = net::Channel{};  // closed, and the handle lets go of its core
  const std::int64_t close_ns = now_ns() - t_close;
  ASSERT_FALSE(core.expired()) << "close() did not linger for the unfetched 8 MiB (the channel "
                               << (now_ns() - t_hello) / 1'000'000 << " ms old)";
  // close() waits 100 ms for its sends, then leaves the rest to the keeper.
  EXPECT_LT(close_ns, kTimeoutNs / 2) << "close() waited for the linger";
  while (!core.expired() && now_ns() - t_close < 12'000'000'000) os::sleep_ns(1'000'000);
  const std::int64_t t_end = now_ns();
  const double after_close_ms = static_cast<double>(t_end - t_close) / 1e6;
  const double after_hello_ms = static_cast<double>(t_end - t_hello) / 1e6;
  std::printf(
      "close() took %.1f ms; the lingering channel was freed %.1f ms after close(), "
      "%.1f ms after the hello (peer_timeout 1000 ms)\n",
      static_cast<double>(close_ns) / 1e6, after_close_ms, after_hello_ms);
  ASSERT_TRUE(core.expired()) << "still lingering 12 s after close()";
  EXPECT_GE(t_end - t_hello, kTimeoutNs) << "the linger ended before peer_timeout: not by K2";
  EXPECT_LT(t_end - t_close, kTimeoutNs + 2'000'000'000)
      << "the linger outlived peer_timeout by 2 s (the 10 s cap?)";
  // The raw server was silent: the 8 MiB's header (its rendezvous request) never reached it.
  for (const net::detail::WireHeader& h : srv.received())
    EXPECT_NE(h.kind, static_cast<std::uint8_t>(net::detail::WireKind::Message));
}

// (B) "Messages ahead are still delivered" when a large one is behind them at close: a small
// message, then 8 MiB, then close(), the receiver busy 300 ms (keepers on). The small one must
// come first (and, since the keeper's linger (K5), the large one second).
TEST(ReviewNetSib, AMessageAheadOfALostLargeOneIsStillDelivered) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  Status s = p->client.send(filled(p->client, 64, 'a'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  s = p->client.send(filled(p->client, 8u << 20, 'e'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  p->client.close();
  std::this_thread::sleep_for(300ms);
  auto r = p->server.receive(secs(3));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->kind, Kind::Message);
  EXPECT_EQ(r->buffer.size(), 64u);
  auto r2 = p->server.receive(secs(3));
  ASSERT_TRUE(r2) << r2.error().message();
  std::printf("second: %s, %zu bytes\n", r2->kind == Kind::PeerClosed ? "PeerClosed" : "a message",
              r2->buffer.size());
  EXPECT_EQ(r2->kind, Kind::Message);
  EXPECT_EQ(r2->buffer.size(), 8u << 20);
  auto r3 = p->server.receive(secs(3));
  ASSERT_TRUE(r3) << r3.error().message();
  EXPECT_EQ(r3->kind, Kind::PeerClosed);
}

// (B)+(F5) Credit with kept places: a grant of 4 messages / 4 MiB, the client sends rounds of one
// 2 MiB message (rendezvous, deferred) and three 64 B ones, the server receives them. Nothing may
// stall (each send and receive within its 10 s) and the order must hold.
TEST(ReviewNetSib, SmallGrantWithKeptPlacesNeverStalls) {
  net::ListenOptions lo;
  lo.inbox_messages = 4;
  lo.inbox_bytes = 4u << 20;
  auto p = test::make_pair(lo);
  ASSERT_TRUE(p);
  constexpr int kRounds = 20;
  std::thread cl([&] {
    for (int i = 0; i < kRounds; ++i) {
      Status s = p->client.send(filled(p->client, 2u << 20, 'L'), secs(10));
      ASSERT_TRUE(s) << s.error().message();
      for (int k = 0; k < 3; ++k) {
        s = p->client.send(filled(p->client, 64, static_cast<char>('0' + k)), secs(10));
        ASSERT_TRUE(s) << s.error().message();
      }
    }
    for (int i = 0; i < 100; ++i) (void)p->client.receive(Deadline::after(5ms));
  });
  int bad = 0;
  for (int i = 0; i < kRounds * 4; ++i) {
    auto r = p->server.receive(secs(10));
    ASSERT_TRUE(r) << r.error().message() << " at " << i;
    const std::size_t want = i % 4 == 0 ? (2u << 20) : 64u;
    if (r->buffer.size() != want) ++bad;
  }
  cl.join();
  EXPECT_EQ(bad, 0);
}

// (B) A receive() behind a kept place whose payload cannot be fetched (the sender's worker is not
// progressed: no keeper, its thread idle): a 300 ms deadline is honoured, and a close() of the
// channel from another thread ends a receive(5 s) waiting there promptly.
TEST(ReviewNetSib, ReceiveBehindAnUnfetchablePayloadHonoursDeadlineAndLocalClose) {
  auto p = test::make_pair_without_keepers();
  ASSERT_TRUE(p);
  Status s = p->client.send(filled(p->client, 8u << 20, 'e'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  s = p->client.send(filled(p->client, 64, 's'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  std::int64_t t0 = now_ns();
  auto r = p->server.receive(Deadline::after(300ms));
  double ms = static_cast<double>(now_ns() - t0) / 1e6;
  std::printf("receive(300 ms): %s after %.1f ms\n", r ? "a message" : r.error().message().c_str(),
              ms);
  EXPECT_LT(ms, 400.0);
  if (r) {
    EXPECT_EQ(r->buffer.size(), 8u << 20) << "the small one overtook the large one";
    return;  // fetched after all (UCX moved it without the sender's progress)
  }
  std::thread closer([&] {
    std::this_thread::sleep_for(200ms);
    p->server.close();
  });
  t0 = now_ns();
  auto r2 = p->server.receive(secs(5));
  ms = static_cast<double>(now_ns() - t0) / 1e6;
  closer.join();
  std::printf("receive(5 s) with close() after 200 ms: %s after %.1f ms\n",
              r2 ? "a result" : r2.error().message().c_str(), ms);
  EXPECT_LT(ms, 1000.0) << "a local close() did not end a receive() waiting behind a kept place";
  if (r2) {
    EXPECT_NE(r2->buffer.size(), 64u) << "the small one was delivered past the kept place";
  }
}

// (A) A large reply, then the server's close() at once: the caller gets the reply (the Bye is
// held behind its payload), then PeerClosed.
TEST(ReviewNetSib, ALargeReplyThenCloseReachesTheCaller) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  constexpr std::size_t kBig = 8u << 20;
  std::thread srv([&] {
    auto r = p->server.receive(secs(10));
    ASSERT_TRUE(r) << r.error().message();
    Status s = r->buffer.resize(kBig);
    ASSERT_TRUE(s) << s.error().message();
    std::memset(r->buffer.data().data(), 'R', kBig);
    s = net::Channel::reply(std::move(*r));
    EXPECT_TRUE(s) << s.error().message();
    p->server.close();
  });
  net::Buffer b = filled(p->client, 64, 'c');
  Status c = p->client.call(b, secs(5));
  srv.join();
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(b.size(), kBig);
  auto m = p->client.receive(secs(3));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed);
}

// (A) The linger's send counter: after only small (eager) sends, a call() and a received reply,
// close() does not take the 100 ms budget (tx_pending_ reaches 0).
TEST(ReviewNetSib, CloseAfterSmallSendsAndACallDoesNotLinger) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  // jthread: ends by its receive's deadline, also after a failed ASSERT (else terminate)
  std::jthread srv([&] {
    for (int i = 0; i < 50; ++i) {
      auto r = p->server.receive(secs(10));
      ASSERT_TRUE(r) << r.error().message();
      if (r->kind == Kind::Request) {
        Status st = net::Channel::reply(std::move(*r));
        EXPECT_TRUE(st) << st.error().message();
      }
    }
  });
  for (int i = 0; i < 49; ++i) {
    Status s = p->client.send(filled(p->client, 64, 's'), secs(10));
    ASSERT_TRUE(s) << s.error().message();
  }
  net::Buffer b = filled(p->client, 64, 'c');
  Status c = p->client.call(b, secs(10));
  ASSERT_TRUE(c) << c.error().message();
  srv.join();
  const std::uint32_t pending = tx_pending(p->client);
  std::printf("client tx_pending_ before close(): %u\n", pending);
  EXPECT_EQ(pending, 0u) << "the linger's send counter did not come back to 0";
  // The server keeps progressing its side meanwhile (else the flush close after the Bye, which
  // is older than this commit, waits its 100 ms for the peer whatever the linger does).
  std::atomic<bool> stop{false};
  std::thread prog([&] {
    while (!stop.load()) (void)p->server.receive(Deadline::after(2ms));
  });
  std::this_thread::sleep_for(20ms);
  const std::int64_t t0 = now_ns();
  p->client.close();
  const double ms = static_cast<double>(now_ns() - t0) / 1e6;
  stop.store(true);
  prog.join();
  std::printf("close(): %.1f ms\n", ms);
  // 90 ms: a loaded CI machine, still under the linger's 100 ms; a sanitizer's 500 ms sees only
  // longer holds (tx_pending_ above is the property there)
  EXPECT_LT(ms, test::sized(90.0, 500.0))
      << "close() lingered although all its sends had completed";
}

// (A) The linger on an idle channel that never sent anything but its handshake.
TEST(ReviewNetSib, CloseOfAFreshChannelDoesNotLinger) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  std::printf("client tx_pending_ %u, server tx_pending_ %u\n", tx_pending(p->client),
              tx_pending(p->server));
  EXPECT_EQ(tx_pending(p->client), 0u);
  EXPECT_EQ(tx_pending(p->server), 0u);
  std::atomic<bool> stop{false};
  std::thread prog([&] {
    while (!stop.load()) (void)p->server.receive(Deadline::after(2ms));
  });
  std::this_thread::sleep_for(20ms);
  const std::int64_t t0 = now_ns();
  p->client.close();
  const double msc = static_cast<double>(now_ns() - t0) / 1e6;
  stop.store(true);
  prog.join();
  std::printf("client close() (server progressing): %.1f ms\n", msc);
  // 90 ms: a loaded CI machine, still under the linger's 100 ms; a sanitizer's 500 ms sees only
  // longer holds (tx_pending_ above is the property there)
  EXPECT_LT(msc, test::sized(90.0, 500.0));
}

// (B) A call's reply is not a one-way message: it must not wait behind the empty inbox head kept
// for an 8 MiB one-way message the server sent just before replying.
TEST(ReviewNetSib, CallReplyIsNotHeldBehindAnEmptyInboxHead) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  constexpr std::size_t kBig = 8u << 20;
  std::thread srv([&] {
    auto r = p->server.receive(secs(10));
    ASSERT_TRUE(r) << r.error().message();
    Status s = p->server.send(filled(p->server, kBig, 'B'), secs(10));
    EXPECT_TRUE(s) << s.error().message();
    s = net::Channel::reply(std::move(*r));
    EXPECT_TRUE(s) << s.error().message();
    for (int i = 0; i < 200; ++i) (void)p->server.receive(Deadline::after(5ms));
  });
  net::Buffer b = filled(p->client, 64, 'c');
  const std::int64_t t0 = now_ns();
  Status c = p->client.call(b, secs(5));
  const double ms = static_cast<double>(now_ns() - t0) / 1e6;
  EXPECT_TRUE(c) << c.error().message() << " after " << ms << " ms";
  auto m = p->client.receive(secs(5));
  srv.join();
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->buffer.size(), kBig);
  std::printf("call: %.1f ms\n", ms);
}

}  // namespace
}  // namespace mbmq
