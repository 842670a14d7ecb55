// Hostile review (rev-net2) of three changes to mbmq::net: one poller per worker (W1-W3), the
// keeper finishing unfinished flush closes (K4), and the flow-control fixes. Reproducers: each
// wait has a deadline, so a test fails rather than hangs. Client and server in this one process.
//
// On the code reviewed (Release, 2 CPUs): CONFIRMED (fail): SmallServerInboxThrottlesServerSends
// (capped_grant), IdleGenSleepersChurn (about 2x the wake-ups of separate workers),
// IdlePollerBesideBusyChannelCost (800-2200 wake-ups of an idle receiver per 3000 calls on
// another channel; round trips +6-32 %, noisy; W2 fixed since, the test still disabled: see it),
// HelloAckStuckWithoutKeeper (peer_timeout 0; intermittent, about 1 run in 3; accept() is not among
// the changes reviewed; fixed since, now AcceptReturnsOnlyOnceTheHelloAckHasLeft). NOT CONFIRMED
// (pass): the others.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_pair.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::make_many;
using test::make_pair;
using test::Many;
using test::RawClient;
using test::secs;
using test::sized;
using test::url;

std::int64_t now_ns() { return mbmq::monotonic_ns(); }

// (W1-W3) Four threads receive (Sleep policy) on four channels of one listener worker, plus a
// fifth in accept(): one polls the fd, the others sleep on gen. Messages arrive one at a time;
// each should wake its receiver well under the 20 ms safety cap (the point of W1-W3).
TEST(ReviewNet2, SharedWorkerWakeLatencyUnderCap) {
  net::ListenOptions lo;
  // Both peer_timeouts 0: no keeper progresses either end (a client's peer_timeout, sent in its
  // hello, would have the keeper progress the listener's worker, K1): only the waiters below
  // progress the listener's worker.
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(4, lo, co);
  ASSERT_TRUE(m);
  for (auto& s : m->server) s.set_wait_policy({WaitMode::Sleep, {}});
  constexpr int kRounds = 40;
  std::atomic<std::int64_t> sent_at{0};
  std::vector<std::int64_t> lat;
  std::atomic<bool> stop{false};
  std::vector<std::thread> rx;
  std::vector<std::vector<std::int64_t>> lats(4);
  for (std::size_t i = 0; i < 4; ++i)
    rx.emplace_back([&, i] {
      while (!stop.load()) {
        auto r = m->server[i].receive(Deadline::after(200ms));
        if (r && r->kind == Kind::Message) lats[i].push_back(now_ns() - sent_at.load());
      }
    });
  std::thread acc([&] {
    while (!stop.load()) (void)m->l.accept(Deadline::after(200ms));
  });
  struct Join {  // also after a failed ASSERT (else terminate, the finding lost): stop, join
    std::atomic<bool>& stop;
    std::vector<std::thread>& rx;
    std::thread& acc;
    ~Join() {
      stop.store(true);
      for (auto& t : rx)
        if (t.joinable()) t.join();
      if (acc.joinable()) acc.join();
    }
  } join{stop, rx, acc};
  std::this_thread::sleep_for(50ms);
  for (int k = 0; k < kRounds; ++k) {
    const auto i = static_cast<std::size_t>(k % 4);
    sent_at.store(now_ns());
    ASSERT_TRUE(m->client[i].send(sized(m->client[i], 64)));
    std::this_thread::sleep_for(8ms);
  }
  std::this_thread::sleep_for(50ms);
  stop.store(true);
  for (auto& t : rx) t.join();
  acc.join();
  int slow = 0, got = 0;
  std::int64_t worst = 0;
  for (auto& v : lats)
    for (auto x : v) {
      ++got;
      worst = std::max(worst, x);
      if (x > 12'000'000) ++slow;
    }
  std::printf("received %d/%d, worst %.2f ms, %d over 12 ms\n", got, kRounds,
              static_cast<double>(worst) / 1e6, slow);
  EXPECT_EQ(got, kRounds);
  // Release only: under a sanitizer on a loaded 2-CPU CI machine wake-ups are late for other causes
  if (!test::kSanitized) {
    EXPECT_LE(slow, 2) << "receivers slept on a drained fd / unbumped gen until the 20 ms cap";
  }
}

// ChannelCore::close() waits for its flush with raw ucp_worker_progress (no W1 gen bump, no W2
// signal). On a listener's shared worker, while one channel's close lingers 100 ms (its peer
// never fetches a rendezvous send), messages for a sibling channel are taken by that loop.
TEST(ReviewNet2, LingeringCloseOnSharedWorkerDelaysSiblingReceivers) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;  // both 0: no keeper progresses client 0's worker; nobody else does
  auto m = make_many(3, lo, co);
  ASSERT_TRUE(m);
  for (auto& s : m->server) s.set_wait_policy({WaitMode::Sleep, {}});
  // A rendezvous-sized message client 0 never fetches: the close's flush cannot finish.
  ASSERT_TRUE(m->server[0].send(sized(m->server[0], 4u << 20)));
  std::atomic<std::int64_t> sent_at{0};
  std::atomic<bool> stop{false};
  std::vector<std::int64_t> lat1, lat2;
  std::thread r1([&] {
    while (!stop.load()) {
      auto r = m->server[1].receive(Deadline::after(300ms));
      if (r && r->kind == Kind::Message) lat1.push_back(now_ns() - sent_at.load());
    }
  });
  std::thread r2([&] {  // a gen sleeper beside r1 (or the poller)
    while (!stop.load()) {
      auto r = m->server[2].receive(Deadline::after(300ms));
      if (r && r->kind == Kind::Message) lat2.push_back(now_ns() - sent_at.load());
    }
  });
  std::this_thread::sleep_for(30ms);
  const std::int64_t t0 = now_ns();
  std::thread closer([&] { m->server[0].close(); });
  struct Join {  // also after a failed ASSERT (else terminate, the finding lost): stop, join
    std::atomic<bool>& stop;
    std::thread& closer;
    std::thread& r1;
    std::thread& r2;
    ~Join() {
      stop.store(true);
      for (std::thread* t : {&closer, &r1, &r2})
        if (t->joinable()) t->join();
    }
  } join{stop, closer, r1, r2};
  std::this_thread::sleep_for(5ms);
  int sent = 0;
  while (now_ns() - t0 < 90'000'000) {
    const auto i = static_cast<std::size_t>(1 + (sent % 2));
    sent_at.store(now_ns());
    ASSERT_TRUE(m->client[i].send(sized(m->client[i], 64)));
    ++sent;
    std::this_thread::sleep_for(7ms);
  }
  closer.join();
  const std::int64_t close_ns = now_ns() - t0;
  std::this_thread::sleep_for(50ms);
  stop.store(true);
  r1.join();
  r2.join();
  std::int64_t worst = 0;
  int slow = 0;
  for (auto* v : {&lat1, &lat2})
    for (auto x : *v) {
      worst = std::max(worst, x);
      if (x > 12'000'000) ++slow;
    }
  std::printf("close took %.1f ms; %zu/%d received, worst %.2f ms, %d over 12 ms\n",
              static_cast<double>(close_ns) / 1e6, lat1.size() + lat2.size(), sent,
              static_cast<double>(worst) / 1e6, slow);
  EXPECT_EQ(static_cast<int>(lat1.size() + lat2.size()), sent);
  // Release only: under a sanitizer on a loaded 2-CPU CI machine wake-ups are late for other causes
  if (!test::kSanitized) {
    EXPECT_LE(slow, 1) << "close()'s progress loop took sibling events without waking anyone";
  }
}

// (K4) The keeper progresses a listener's worker (an unfinished close) every tick while the
// application calls on a sibling channel of that worker; then the stuck peer goes away and the
// close finishes, the keeper lets the worker go; then the listener and channels go. No crash,
// no hang, no call failure.
TEST(ReviewNet2, KeeperFinishesCloseWhileSiblingsCall) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(2, lo, co);
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->server[0].send(sized(m->server[0], 4u << 20)));
  const std::int64_t t0 = now_ns();
  m->server[0].close();  // 100 ms, then handed to the keeper
  const std::int64_t close_ns = now_ns() - t0;
  // 1 s: a loaded CI machine under ASan; not handed to the keeper, close() would wait the 10 s
  // linger out (kLingerMaxNs; the peer never fetches, no peer_timeout)
  EXPECT_LT(close_ns, 1'000'000'000);
  std::atomic<bool> stop{false};
  std::thread srv([&] {
    while (!stop.load()) {
      auto r = m->server[1].receive(Deadline::after(100ms));
      if (r && r->kind == Kind::Request) (void)net::Channel::reply(std::move(*r));
    }
  });
  struct Join {  // also after a failed ASSERT (else terminate, the finding lost): stop, join
    std::atomic<bool>& stop;
    std::thread& t;
    ~Join() {
      stop.store(true);
      if (t.joinable()) t.join();
    }
  } join{stop, srv};
  int ok = 0;
  const std::int64_t until = now_ns() + 800'000'000;  // several keeper ticks
  while (now_ns() < until) {
    auto b = sized(m->client[1], 64);
    const Status s = m->client[1].call(b, secs(5));
    ASSERT_TRUE(s) << s.error().message();
    ++ok;
  }
  m->client[0].close();  // the stuck peer goes: the keeper's close finishes (or fails)
  std::this_thread::sleep_for(600ms);
  for (int i = 0; i < 200; ++i) {
    auto b = sized(m->client[1], 64);
    ASSERT_TRUE(m->client[1].call(b, secs(5)));
  }
  stop.store(true);
  srv.join();
  std::printf("%d calls beside the keeper's close\n", ok);
  m->server.clear();
  m->client.clear();
  m->l = net::Listener{};
}

// (K4) A peer that never fetches (stopped, here: never progressed) and never fails: every
// channel closed against it leaves a worker (its fds, its UCX resources) with the keeper for as
// long as that peer lives. Counts the process's fds after closing N such channels.
TEST(ReviewNet2, KeeperReleasesStuckClosesWhenPeersGo) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto count_fds = [] {
    int n = 0;
    for (int fd = 0; fd < 4096; ++fd)
      if (fcntl(fd, F_GETFD) != -1) ++n;
    return n;
  };
  std::vector<Many> keep;
  const int before = count_fds();
  for (int i = 0; i < 8; ++i) {
    auto m = make_many(1, lo, co);
    ASSERT_TRUE(m);
    // The client sends a big message the server never fetches; the client closes.
    ASSERT_TRUE(m->client[0].send(sized(m->client[0], 4u << 20)));
    m->client[0].close();
    keep.push_back(std::move(*m));
  }
  std::this_thread::sleep_for(600ms);
  const int after = count_fds();
  std::printf("fds: %d before, %d with 8 closed clients held by the keeper\n", before, after);
  // Informational: the listeners (the stuck peers) are still alive; each closed client's worker
  // is kept. Bounded by the peers' lifetimes, as documented.
  keep.clear();
  std::this_thread::sleep_for(600ms);
  std::printf("fds after the peers went: %d\n", count_fds());
  EXPECT_LE(count_fds(), before + 8);
}

// (F1) capped_grant: a server whose inbox is 2 messages (to bound what each client may queue at
// it) may now have only 2 one-way messages out to a client that granted it 1024: its own inbox
// option throttles what it sends.
// Fixed: capped_grant caps by max(our grant, the default).
TEST(ReviewNet2, ASmallServerInboxDoesNotThrottleServerSends) {
  net::ListenOptions lo;
  lo.inbox_messages = 2;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  int sent = 0;
  for (int i = 0; i < 10; ++i) {
    if (!p->server.send(sized(p->server, 64))) break;
    ++sent;
  }
  std::printf("server sent %d of 10 to a client granting 1024\n", sent);
  EXPECT_EQ(sent, 10) << "our inbox option capped the peer's grant to us";
}

// call() out of credit, and the channel closed by the peer while it waits: the call returns the
// closed error promptly (not at its deadline) and sends nothing.
TEST(ReviewNet2, CallWaitingForCreditSeesClose) {
  net::ListenOptions lo;
  lo.inbox_messages = 1;
  net::ConnectOptions co;
  co.inbox_messages = 1;
  auto p = make_pair(lo, co);
  ASSERT_TRUE(p);
  ASSERT_TRUE(p->client.send(sized(p->client, 64)));  // the one credit
  std::thread closer([&] {
    std::this_thread::sleep_for(100ms);
    p->server.close();
  });
  auto b = sized(p->client, 64);
  const std::int64_t t0 = now_ns();
  const Status s = p->client.call(b, secs(5));
  const std::int64_t took = now_ns() - t0;
  closer.join();
  EXPECT_FALSE(s);
  EXPECT_LT(took, 1'000'000'000) << "call() waited for credit past the peer's close";
}

// Idle cost of W1-W3: 8 receivers idle on one listener worker (one poller, 7 gen sleepers) vs 8
// idle on 8 client workers (each its own poller). Each gen sleeper wakes at its own 20 ms cap
// and again whenever the poller wakes at its cap (W3 wakes them all), so the shared worker's
// idle receivers wake about twice as often, and every wake takes mu and progresses the worker.
// Fixed: W3 hands the poller's role to one gen sleeper, not all.
TEST(ReviewNet2, IdleGenSleepersDoNotChurn) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(8, lo, co);
  ASSERT_TRUE(m);
  auto idle = [](std::vector<net::Channel>& chs) {
    for (auto& c : chs) c.set_wait_policy({WaitMode::Sleep, {}});
    std::vector<std::thread> ts;
    rusage a{}, b{};
    getrusage(RUSAGE_SELF, &a);
    for (auto& c : chs) ts.emplace_back([&c] { (void)c.receive(Deadline::after(1000ms)); });
    for (auto& t : ts) t.join();
    getrusage(RUSAGE_SELF, &b);
    return b.ru_nvcsw - a.ru_nvcsw;
  };
  const long shared = idle(m->server);
  const long own = idle(m->client);
  std::printf("voluntary switches in 1 s, 8 idle receivers: shared worker %ld, own workers %ld\n",
              shared, own);
  EXPECT_LE(shared, own * 3 / 2) << "idle gen sleepers churn (W3 wakes all at every poller cap)";
}

// accept() returned once the hello was answered, but the HelloAck could still be queued in the
// listener's worker (the server's endpoint still wiring up): with peer_timeout 0 on both ends (no
// keeper progressing the listener's worker once the channel is accepted) and a server that does
// not touch the channel (or the listener) at once, the client's connect() timed out (about 1 run
// in 3).
// Fixed: accept() hands a channel out only once its HelloAck's send has completed (N4); until
// then the keeper's handshake tick progresses the listener's worker too (N4), whatever the
// peer_timeouts.
TEST(ReviewNet2, AcceptReturnsOnlyOnceTheHelloAckHasLeft) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  // Seen only when an earlier connection was made in this process (the first one's HelloAck
  // leaves at once): a warm-up pair first.
  auto warm = make_pair();
  ASSERT_TRUE(warm);
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  std::optional<Result<net::Channel>> c;
  // jthread: ends by its deadline, also after a failed ASSERT (else terminate, the finding lost)
  std::jthread t([&] {
    net::ConnectOptions co;
    co.peer_timeout = 0ms;
    // 5 s: a loaded CI machine under ASan. Both peer_timeouts 0: once accept() has returned,
    // nothing but the keeper's handshake tick (N4: only while the HelloAck has not left)
    // progresses the listener's worker before this thread is joined
    c.emplace(net::connect(url(l->port()), Deadline::after(5000ms), co));
  });
  auto s = l->accept(secs(10));
  ASSERT_TRUE(s) << s.error().message();
  std::this_thread::sleep_for(2000ms);  // the server is busy elsewhere for 2 s
  t.join();
  EXPECT_TRUE(*c) << (*c).error().message();
}

// (W1-W3) stress: Sleep and Adaptive receivers, a server answering calls and accept(), all on
// one listener worker; messages to random channels at random short gaps, some in bursts. Each
// should be received well under the 20 ms cap (a lost wake-up shows as ~20 ms).
TEST(ReviewNet2, MixedWaitersNoLostWakeups) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(4, lo, co);
  ASSERT_TRUE(m);
  m->server[0].set_wait_policy({WaitMode::Sleep, {}});
  m->server[1].set_wait_policy({WaitMode::Sleep, {}});
  m->server[2].set_wait_policy({WaitMode::Adaptive, 50us});
  m->server[3].set_wait_policy({WaitMode::Sleep, {}});
  std::atomic<bool> stop{false};
  std::vector<std::atomic<std::int64_t>> sent_at(3);
  std::vector<std::vector<std::int64_t>> lats(3);
  std::vector<std::thread> ts;
  for (std::size_t i = 0; i < 3; ++i)
    ts.emplace_back([&, i] {
      while (!stop.load()) {
        auto r = m->server[i].receive(Deadline::after(200ms));
        if (r && r->kind == Kind::Message) lats[i].push_back(now_ns() - sent_at[i].load());
      }
    });
  ts.emplace_back([&] {
    while (!stop.load()) {
      auto r = m->server[3].receive(Deadline::after(200ms));
      if (r && r->kind == Kind::Request) (void)net::Channel::reply(std::move(*r));
    }
  });
  ts.emplace_back([&] {
    while (!stop.load()) (void)m->l.accept(Deadline::after(200ms));
  });
  std::thread caller([&] {  // calls on channel 3 now and then
    while (!stop.load()) {
      auto b = sized(m->client[3], 64);
      (void)m->client[3].call(b, secs(5));
      std::this_thread::sleep_for(3ms);
    }
  });
  std::this_thread::sleep_for(50ms);
  std::uint32_t x = 12345;
  int sent = 0;
  for (int k = 0; k < 150; ++k) {
    x = x * 1103515245u + 12345u;
    const std::size_t i = (x >> 16) % 3;
    // One message in flight per channel: the previous one had >= 25 ms.
    sent_at[i].store(now_ns());
    ASSERT_TRUE(m->client[i].send(sized(m->client[i], 64)));
    ++sent;
    std::this_thread::sleep_for(std::chrono::milliseconds(9 + (x >> 8) % 4));
  }
  std::this_thread::sleep_for(100ms);
  stop.store(true);
  caller.join();
  for (auto& t : ts) t.join();
  int got = 0, slow = 0;
  std::int64_t worst = 0;
  for (auto& v : lats)
    for (auto l : v) {
      ++got;
      worst = std::max(worst, l);
      if (l > 12'000'000) ++slow;
    }
  std::printf("received %d/%d, worst %.2f ms, %d over 12 ms\n", got, sent,
              static_cast<double>(worst) / 1e6, slow);
  EXPECT_EQ(got, sent);
  EXPECT_LE(slow, 3);
}

// Flow: a call that times out, then its late reply; a request dropped unanswered (NoReply); a
// message received. Afterwards the client's whole grant (2 messages) is usable again: nothing
// leaked, nothing given back twice (a double give-back would close the channel as Protocol).
TEST(ReviewNet2, CreditAfterTimedOutCallLateReplyAndNoReply) {
  net::ListenOptions lo;
  lo.inbox_messages = 2;
  net::ConnectOptions co;
  co.inbox_messages = 2;
  auto p = make_pair(lo, co);
  ASSERT_TRUE(p);
  auto b = sized(p->client, 64);
  EXPECT_FALSE(p->client.call(b, Deadline::after(100ms)));  // the server does not answer yet
  auto r = p->server.receive(secs(5));
  ASSERT_TRUE(r);
  ASSERT_EQ(r->kind, Kind::Request);
  ASSERT_TRUE(net::Channel::reply(std::move(*r)));  // late
  std::thread srv([&] {
    { auto q = p->server.receive(secs(5)); }  // a request dropped at once: NoReply
    auto q2 = p->server.receive(secs(5));     // a message
  });
  auto b2 = sized(p->client, 64);
  const Status s2 = p->client.call(b2, secs(5));
  EXPECT_FALSE(s2);
  if (!s2) {
    EXPECT_EQ(s2.error().code, Errc::NoReply) << s2.error().message();
  }
  ASSERT_TRUE(p->client.send(sized(p->client, 64), secs(5)));
  srv.join();
  std::this_thread::sleep_for(100ms);
  (void)p->client.receive(Deadline::after(50ms));  // progress: the credit comes in
  int sent = 0;
  for (int i = 0; i < 2; ++i)
    if (p->client.send(sized(p->client, 64))) ++sent;
  EXPECT_EQ(sent, 2);
  auto b3 = sized(p->client, 8);
  EXPECT_TRUE(b3.valid()) << "the client channel closed";
}

// (W2) Every event a non-poller progresses while the poller sleeps signals the event fd: beside
// a server answering calls on channel 0, an idle receiver on channel 1 of the same worker (the
// poller) is woken for each of them (a futile wake, mu taken, the worker progressed). Round
// trips with and without that idle receiver.
// W2 is fixed (a non-poller signals only for news of what the poller waits on: net/core.h,
// progress_locked): counted in this test, the old rule would have signalled 2,000+ times per
// 3,000 calls where the server thread spins, the new one 0. The test still fails, and stays
// disabled, because what it measures is not only W2: (1) on a loaded machine the server's spin
// budget runs out between calls, it sleeps as a gen sleeper, and each request then wakes the
// idle thread, the poller, through the fd itself (its own event, not a signal), which hands it
// on (W1): ~2,900 poller wake-ups and ~2,900 gen wake-ups per 3,000 calls, inherent to one
// poller per worker; (2) on a quiet machine the idle thread still made ~2,000 voluntary switches
// (RUSAGE_THREAD) while it took the worker's mutex only ~50-400 times after a poll and the gen
// futex woke it < 50 times; what it blocks on was not found (a bounded try_lock spin before
// blocking on the mutex did not change it). Not a flaky test to land.
TEST(ReviewNet2, DISABLED_IdlePollerBesideBusyChannelCost) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(2, lo, co);
  ASSERT_TRUE(m);
  std::atomic<bool> stop{false};
  std::thread srv([&] {
    while (!stop.load()) {
      auto r = m->server[0].receive(Deadline::after(100ms));
      if (r && r->kind == Kind::Request) (void)net::Channel::reply(std::move(*r));
    }
  });
  auto run = [&] {
    const std::int64_t t0 = now_ns();
    for (int i = 0; i < 3000; ++i) {
      auto b = sized(m->client[0], 64);
      if (!m->client[0].call(b, secs(5))) return std::int64_t{-1};
    }
    return (now_ns() - t0) / 3000;
  };
  (void)run();  // warm-up
  rusage a0{}, b0{};
  getrusage(RUSAGE_SELF, &a0);
  const std::int64_t alone = run();
  getrusage(RUSAGE_SELF, &b0);
  std::atomic<bool> stop_idle{false};
  rusage a{}, b{};
  std::thread idle([&] {
    m->server[1].set_wait_policy({WaitMode::Sleep, {}});
    while (!stop_idle.load()) (void)m->server[1].receive(Deadline::after(100ms));
  });
  std::this_thread::sleep_for(20ms);
  getrusage(RUSAGE_SELF, &a);
  const std::int64_t beside = run();
  getrusage(RUSAGE_SELF, &b);
  stop_idle.store(true);
  idle.join();
  stop.store(true);
  srv.join();
  std::printf("round trip %lld ns alone (%ld switches), %lld ns beside an idle receiver (%ld)\n",
              static_cast<long long>(alone), b0.ru_nvcsw - a0.ru_nvcsw,
              static_cast<long long>(beside), b.ru_nvcsw - a.ru_nvcsw);
  EXPECT_LT(beside, alone * 3 / 2);
  // An idle receiver should sleep through 3000 calls on another channel (a few cap wake-ups).
  EXPECT_LT(b.ru_nvcsw - a.ru_nvcsw, 300) << "the idle poller is woken (W2) for others' events";
}

// ---- rev-net3: W2 signalling only for the poller's news (merge 7b8242b) ----

// (W2 (d)) named close() as the only change of a waiter's state outside a progress. The keeper's
// (K2) peer_timeout failure is another: fail_locked from the keeper thread, no progress; a
// receive() sleeping as the poller on that channel slept on until the 20 ms cap (30 of 30 runs).
// Now fail_locked wakes the waiters. A watcher polls buffer() (which reads state_ under the lock,
// without progressing) to see when the channel closed; receive() must return within a few ms.
TEST(ReviewNet2, KeeperPeerTimeoutWakesASleepingReceiverAtOnce) {
  net::ListenOptions lo;
  lo.peer_timeout = 100ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  std::vector<double> late_ms;
  // 10 rounds in Release, one of them allowed late (the bound below); the sanitizers check no time
  const int kRounds = test::sized(10, 6);
  for (int k = 0; k < kRounds; ++k) {
    RawClient raw;  // speaks once (its hello), then is silent: no heartbeats
    ASSERT_TRUE(raw.connect(l->port()));
    std::optional<Result<net::Channel>> s;
    std::thread acc([&] { s.emplace(l->accept(secs(5))); });
    raw.hello(net::detail::Grant{4, 1u << 16});
    acc.join();
    ASSERT_TRUE(*s) << (*s).error().message();
    net::Channel ch = std::move(**s);
    ch.set_wait_policy({WaitMode::Sleep, {}});
    std::atomic<std::int64_t> closed_at{0};
    std::thread watcher([&] {  // until it sees the close (or 5 s), even if receive() returned
      for (Deadline dl = secs(5); !dl.expired();) {
        if (!ch.buffer(1)) {
          closed_at.store(now_ns());
          return;
        }
        os::sleep_ns(50'000);
      }
    });
    auto r = ch.receive(secs(3));
    const std::int64_t returned = now_ns();
    watcher.join();
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(r->kind, Kind::PeerClosed);
    ASSERT_NE(closed_at.load(), 0);
    late_ms.push_back(static_cast<double>(returned - closed_at.load()) / 1e6);
  }
  std::string all;
  for (double x : late_ms) all += std::to_string(x) + " ";
  std::printf("receive() returned after the keeper closed its channel by (ms): %s\n", all.c_str());
  // Half the 20 ms cap it tells apart. 3 ms was too tight since the worker's lock is handed over
  // (WorkerMutex::hand_over: a thread that progressed sleeps up to 2 ms until a waiter, here the
  // watcher polling buffer(), has taken the lock): 3.2-3.7 ms in about 1 run of 10 at load 3-4,
  // either thread late (the watcher as often as receive()).
  // Release only, and one round of 10 may be late (a loaded 2-CPU CI machine): the cap's wake-up
  // is late by 0-20 ms at random, so 9 of 10 under 10 ms pass it 1 time in 93 (6 of 6: 1 in 64).
  if (test::kSanitized) return;
  std::sort(late_ms.begin(), late_ms.end());
  EXPECT_LT(late_ms[late_ms.size() - 2], 10.0)
      << "the sleeping poller was not woken by the keeper's failure (the 20 ms cap woke it)";
}

// (N4) + (W2): accept() sleeps as the poller keyed on its ListenCore. A channel in ready_ whose
// HelloAck has not left is acceptable once it fails (acceptable_locked: state_ != Open), but its
// failure's callbacks (on_am Bye, on_ep_error, recv_done) call news_locked(the channel), not the
// listener, and a cancelled HelloAck's send_done none: with another thread progressing the worker
// (a spinning receiver), accept() is not signalled and sleeps until the 20 ms cap. Raw clients say
// hello, stay silent a while (their side of the wire-up not progressed: the HelloAck may wait),
// then say Bye; accept() should hand the closed channel out within a few ms of the Bye.
// Does not discriminate: passes unloaded; with two busy loops it fails, but as often with the
// suggested fix (fail_locked: news_locked(nullptr)) applied -- scheduling, not the lost wake-up.
// The gap is shown by reading the code (report), not by this test; fail_locked now wakes every
// waiter (news_locked(nullptr)). Disabled: a measurement for a quiet machine, not a CI check.
TEST(ReviewNet2, DISABLED_AcceptIsWokenWhenAnUnackedReadyChannelFails) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(1, lo, co);
  ASSERT_TRUE(m);
  m->server[0].set_wait_policy({WaitMode::Spin, {}});
  std::atomic<bool> stop{false};
  std::thread spinner([&] {
    while (!stop.load()) (void)m->server[0].receive(Deadline::after(100ms));
  });
  std::atomic<std::int64_t> acc_at{0};
  std::atomic<int> accepted{0};
  std::vector<net::Channel> keep;
  std::thread acc([&] {
    while (!stop.load()) {
      auto s = m->l.accept(Deadline::after(200ms));
      if (s) {
        acc_at.store(now_ns());
        keep.push_back(std::move(*s));
        accepted.fetch_add(1);
      }
    }
  });
  std::this_thread::sleep_for(20ms);
  std::vector<double> lat;
  int before_bye = 0;
  for (int k = 0; k < 30; ++k) {
    const int before = accepted.load();
    RawClient raw;
    ASSERT_TRUE(raw.connect(m->l.port()));
    raw.hello(net::detail::Grant{4, 1u << 16});
    std::this_thread::sleep_for(std::chrono::milliseconds(1 + k % 4));
    namespace d = net::detail;
    const d::WireHeader bye{d::kMagic, d::kVersion, static_cast<std::uint8_t>(d::WireKind::Bye),
                            0,         0,           0};
    const std::int64_t t_bye = now_ns();
    raw.finish(raw.send(bye, nullptr, 0));
    for (Deadline dl = Deadline::after(500ms); accepted.load() == before && !dl.expired();)
      os::sleep_ns(100'000);
    if (accepted.load() == before) continue;
    if (acc_at.load() < t_bye) {
      ++before_bye;
      continue;
    }
    lat.push_back(static_cast<double>(acc_at.load() - t_bye) / 1e6);
  }
  stop.store(true);
  acc.join();
  spinner.join();
  std::string all;
  for (double x : lat) all += std::to_string(x) + " ";
  std::printf("%d handed out before their Bye; after it, accept() returned in (ms): %s\n",
              before_bye, all.c_str());
  int slow = 0;
  for (double x : lat) slow += x > 12.0 ? 1 : 0;
  EXPECT_EQ(slow, 0) << "accept() slept until the cap though a ready channel had become acceptable";
}

// (W2 (b)): "what T did not take is still there" -- a thread progressing for others stops when
// ucp_worker_progress returns 0 and signals the poller only for the poller's news. If UCX leaves
// work behind that no fd event announces again (a partly read TCP stream of a multi-fragment or
// rendezvous message, under edge-triggered epoll), the poller sleeps until the cap. A Sleep
// receiver on channel 0 beside a spinning receiver on channel 1 (which takes every event), one
// message at a time to channel 0, 1 KiB to 1 MiB: each should arrive well under the cap. Passed
// 15 of 15 runs unloaded; beside two busy loops 3 of 15 had an outlier of 25-29 ms (scheduling).
// Disabled: a measurement for a quiet machine, not a CI check.
TEST(ReviewNet2, DISABLED_PollerBesideSpinnerGetsLargeMessagesWithoutCap) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(2, lo, co);
  ASSERT_TRUE(m);
  m->server[0].set_wait_policy({WaitMode::Sleep, {}});
  m->server[1].set_wait_policy({WaitMode::Spin, {}});
  std::atomic<bool> stop{false};
  std::thread spinner([&] {
    while (!stop.load()) (void)m->server[1].receive(Deadline::after(100ms));
  });
  // The client's worker must be progressed too (both peer_timeouts 0: no keeper progresses it)
  // for a large send to go.
  std::thread client_rx([&] {
    while (!stop.load()) (void)m->client[0].receive(Deadline::after(100ms));
  });
  std::atomic<std::int64_t> sent_at{0};
  std::atomic<int> got{0};
  std::vector<std::pair<std::size_t, double>> lat;
  std::thread rx([&] {
    while (!stop.load()) {
      auto r = m->server[0].receive(Deadline::after(200ms));
      if (r && r->kind == Kind::Message) {
        lat.emplace_back(r->buffer.size(), static_cast<double>(now_ns() - sent_at.load()) / 1e6);
        got.fetch_add(1);
      }
    }
  });
  std::this_thread::sleep_for(20ms);
  const std::size_t sizes[] = {1024, 9000, 16384, 65536, 200000, 1u << 20};
  int sent = 0;
  for (int k = 0; k < 60; ++k) {
    const std::size_t n = sizes[k % 6];
    const int before = got.load();
    sent_at.store(now_ns());
    ASSERT_TRUE(m->client[0].send(sized(m->client[0], n), secs(2)));
    ++sent;
    for (Deadline dl = Deadline::after(500ms); got.load() == before && !dl.expired();)
      os::sleep_ns(50'000);
    if (got.load() == before) std::printf("%zu B not received in 500 ms\n", n);
    std::this_thread::sleep_for(3ms);
  }
  stop.store(true);
  rx.join();
  spinner.join();
  client_rx.join();
  int slow = 0;
  for (auto& [n, ms] : lat)
    if (ms > 12.0) {
      ++slow;
      std::printf("slow: %zu B in %.2f ms\n", n, ms);
    }
  std::printf("received %d/%d, %d over 12 ms\n", got.load(), sent, slow);
  EXPECT_EQ(got.load(), sent);
  // Rare single outliers of 25-30 ms (over the cap: scheduling) were seen with two busy loops.
  EXPECT_LE(slow, 2);
}

}  // namespace
}  // namespace mbmq
