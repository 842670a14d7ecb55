// A hostile review of net::Channel::redirect / net::adopt (remote channels delivered through a
// MsgQueue; net/redirect.cc). Six tests failed on the reviewed code (86d3193), each a bug, now
// fixed: each says "Fixed:" and what it showed before. The others pass: properties the code was
// suspected of breaking and survives. One measurement is disabled (DISABLED_IdleRedirected...).
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "ipc/queue_core.h"
#include "mbmq/mbmq.h"
#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::secs;
using test::url;

using test::connect_one;
using test::QueueServer;
using test::Remote;
using test::remote_call;
using test::task_count;

// QueueCore::sources_ (private), for counting: the explicit-instantiation rule (net_access.h).
template <typename Tag, typename Tag::type M>
struct RobQ {
  friend typename Tag::type get(Tag) { return M; }
};
struct SourcesOf {
  using type = std::vector<std::shared_ptr<detail::QueueSource>> detail::QueueCore::*;
  friend type get(SourcesOf);
};
template struct RobQ<SourcesOf, &detail::QueueCore::sources_>;
struct QueueMuOf {
  using type = detail::SpinMutex detail::QueueCore::*;
  friend type get(QueueMuOf);
};
template struct RobQ<QueueMuOf, &detail::QueueCore::mu_>;
// The queue's sources, after a look (which lets go of the detached ones). Read unlocked: call it
// with no other thread waiting on the queue.
std::size_t sources_of(MsgQueue& q) {
  (void)q.wait(Deadline::immediate());
  return ((*detail::QueueAccess::core(q)).*get(SourcesOf{})).size();
}

// A raw client, hello'd and accepted: the accepted channel in *out.
bool raw_accept(net::Listener& l, test::RawClient& raw, net::Channel* out) {
  if (!raw.connect(l.port())) return false;
  raw.hello({64, 64u << 20});
  for (Deadline d = secs(5); !d.expired();) {
    raw.progress_for(5ms);
    auto c = l.accept(Deadline::after(5ms));
    if (c) {
      *out = std::move(*c);
      return true;
    }
  }
  return false;
}

// ---- the end of a channel whose last payload was still being fetched --------------------------
//
// Suspected: a rendezvous payload keeps an (invalid) place in the inbox until fetched, and
// tap_flush_locked() pushes the end only once `inbox_.empty()`; a channel failing mid-fetch would
// never deliver its PeerClosed. It survives: close_ep_locked() erases the unfilled places.
TEST(ReviewRedirect, PeerClosedReachesTheQueueWhenAPayloadWasStillComing) {
  // Under ASan, LeakSanitizer's own tracer crashed at this test's exit, after it passed, in 2 of 2
  // ctest runs ("Tracer caught signal 11" on the main thread, with UCX's and mbmq::net's threads
  // alive), as ReviewNetSib.DeferredPayloadOfAClosedChannel... once did: run in Release only.
  if (test::kSanitized) GTEST_SKIP() << "LeakSanitizer's tracer crashes at exit (see above)";
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  test::RawClient raw;
  net::Channel ch;
  ASSERT_TRUE(raw_accept(*l, raw, &ch));
  ASSERT_TRUE(net::adopt(*q, std::move(ch), 100));
  namespace d = net::detail;
  // An 8 MiB one-way message, forced rendezvous (its place is kept, the payload fetched later),
  // then at once a header with a bad magic: the channel fails before the payload is fetched.
  std::vector<std::byte> big(8u << 20, std::byte{1});
  const d::WireHeader msg{d::kMagic, d::kVersion, static_cast<std::uint8_t>(d::WireKind::Message),
                          0,         0,           0};
  void* r1 = raw.send(msg, big.data(), big.size(), UCP_AM_SEND_FLAG_RNDV);
  const d::WireHeader bad{0xdeadbeefu, d::kVersion, static_cast<std::uint8_t>(d::WireKind::Message),
                          0,           0,           0};
  void* r2 = raw.send(bad, nullptr, 0);
  std::optional<Message> end;
  int others = 0;
  for (Deadline dl = secs(5); !dl.expired() && !end;) {
    raw.progress_for(1ms);
    auto e = q->wait(Deadline::after(5ms));
    if (!e) continue;
    if (e->kind == Kind::PeerClosed)
      end.emplace(std::move(*e));
    else
      ++others;
  }
  const bool server_closed_it = raw.failed.load();
  raw.finish(r2);
  raw.finish(r1);
  ASSERT_TRUE(end) << "no PeerClosed on the queue within 5 s (the server did "
                   << (server_closed_it ? "" : "NOT ") << "close the channel: the client's "
                   << "endpoint " << (server_closed_it ? "failed" : "is fine") << "; " << others
                   << " other messages came)";
  EXPECT_EQ(end->key, 100u);
  EXPECT_EQ(end->error, Errc::Protocol);
}

// ---- a NetSource left behind by a delivered end -------------------------------------------------
//
// Suspected: take() erases a tap when it delivers its PeerClosed, but the source is detached (and
// leaves WorkerCore::sources) only when a remove_tap() leaves it empty. A redirected (not
// adopted) channel whose end was delivered, its handle kept, leaves its source in w_->sources
// after the queue is destroyed (NetSource::close() finds no tap to close). redirect() finds a
// source by the QueueCore's raw address (queue_id()): a new queue at the freed address would get
// the stale source. It survives: the stale source's weak_ptr to the queue keeps the make_shared
// block (so the address) allocated until the source goes; a new queue is never at that address.
TEST(ReviewRedirect, ANewQueueIsNotConfusedWithADestroyedOnesStaleSource) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote first = connect_one(*l);
  const void* old_core = nullptr;
  {
    auto q1 = MsgQueue::create();
    ASSERT_TRUE(q1);
    old_core = detail::QueueAccess::core(*q1).get();
    ASSERT_TRUE(first.server.redirect(*q1, 100));  // the handle is kept (not adopted)
    first.client.close();
    std::optional<Message> end;
    for (Deadline d = secs(10); !d.expired() && !end;) {
      auto m = q1->wait(Deadline::after(50ms));
      if (m && m->kind == Kind::PeerClosed) end.emplace(std::move(*m));
    }
    ASSERT_TRUE(end) << "no PeerClosed for the first channel";
  }  // q1 destroyed; first.server still open (redirected, its end delivered)
  std::vector<MsgQueue> queues;
  for (int i = 0; i < 16; ++i) {
    auto q = MsgQueue::create();
    ASSERT_TRUE(q);
    EXPECT_NE(detail::QueueAccess::core(*q).get(), old_core);
    queues.push_back(std::move(*q));
  }
  Remote second = connect_one(*l);
  ASSERT_TRUE(second.server.redirect(queues[0], 200));
  QueueServer server(queues[0]);
  EXPECT_TRUE(remote_call(second.client, 64, 3, secs(3)));
  first.server.close();
}

// ---- 1. credit of a one-way message stranded behind a request --------------------------------
//
// take() lists a channel's released credit only when it delivers a one-way message and then
// nothing more of the channel is queued (or half the grant is released). A one-way message
// delivered with a request behind it is not listed; the request's delivery lists nothing (its
// credit goes with its reply). With receive(), F5 gives it back when the application is about
// to wait with nothing queued; here nothing does. A client that sends M1 (7 MiB), call()s, then
// sends M2 (10 MiB: 7 + 10 > the 16 MiB grant) waits for M1's credit forever.
// Fixed: take() lists the channel for its credit whenever the queue drains it, whatever kind the
// last message was, and a flush at half the grant leaves it owed (net/redirect.cc). Before: the
// 10 MiB send after the call timed out (no credit in time).
TEST(ReviewRedirect, OneWayCreditIsNotStrandedBehindARequest) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l);
  ASSERT_TRUE(net::adopt(*q, std::move(r.server), 100));
  std::atomic<bool> called{false};
  Status second = fail(Errc::TimedOut, "not run");
  std::thread client([&] {
    Status s1 = r.client.send(test::filled(r.client, 7u << 20, 'a'), secs(10));
    EXPECT_TRUE(s1) << s1.error().message();
    EXPECT_TRUE(remote_call(r.client, 64, 'c'));
    called.store(true);
    second = r.client.send(test::filled(r.client, 10u << 20, 'b'), secs(5));
  });
  os::sleep_ns(700'000'000);  // M1 fetched by the pump, the request behind it: both queued
  auto m1 = q->wait(secs(10));
  ASSERT_TRUE(m1) << m1.error().message();
  EXPECT_EQ(m1->kind, Kind::Message);
  EXPECT_EQ(m1->buffer.size(), 7u << 20);
  m1->buffer.reset();  // done with it
  auto m2 = q->wait(secs(10));
  ASSERT_TRUE(m2) << m2.error().message();
  ASSERT_EQ(m2->kind, Kind::Request);
  for (std::byte& b : m2->buffer.data()) b = static_cast<std::byte>(std::to_integer<int>(b) + 1);
  ASSERT_TRUE(MsgQueue::reply(std::move(*m2)));
  auto m3 = q->wait(secs(8));  // the server waits: "about to wait with nothing queued"
  client.join();
  EXPECT_TRUE(called.load());
  EXPECT_TRUE(second) << "the 10 MiB send after the call: " << second.error().message()
                      << " (the first message's credit never went back)";
  EXPECT_TRUE(m3) << "the server never got the second message";
}

// ---- 2. fork ----
//
// A MsgQueue is usable in a forked child (QueueCore::watch_after_fork). Its NetSource is not
// fork-aware: the child's wait() delivers the parent's remote messages (which the parent delivers
// too: the same message served twice), and take() then calls ucp_worker_signal() (signal_worker)
// in the child, where UCX must not be used ("forked child", mbmq/net.h).
// Fixed: in a forked child a NetSource reads ready and take() says Gone (no UCX call, no lock):
// the child's queue lets it go. Before: the child's wait() delivered the parent's message.
TEST(ReviewRedirect, AForkedChildsQueueDeliversNoRemoteMessage) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l);
  ASSERT_TRUE(net::adopt(*q, std::move(r.server), 100));
  ASSERT_TRUE(r.client.send(test::numbered(r.client, 64, 7), secs(5)));
  os::sleep_ns(300'000'000);  // in the source's FIFO by now (the pump)
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto m = q->wait(Deadline::after(300ms));
    std::_Exit(m ? (m->key == 100 ? 3 : 4) : 0);
  }
  int status = -1;
  for (Deadline d = secs(10); !d.expired();) {
    if (::waitpid(pid, &status, WNOHANG) == pid) break;
    os::sleep_ns(1'000'000);
  }
  if (status == -1) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    ADD_FAILURE() << "the forked child hung in MsgQueue::wait";
  }
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "the forked child's wait(): "
      << (WIFEXITED(status)
              ? (WEXITSTATUS(status) == 3 ? "delivered the parent's remote message"
                                          : "exit " + std::to_string(WEXITSTATUS(status)))
              : "killed by signal " + std::to_string(WTERMSIG(status)));
  auto m = q->wait(secs(5));  // the parent has it too
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->key, 100u);
}

// ---- 3. a receive() already waiting when the channel is redirected ----
//
// net.h: once redirected, "receive() returns InvalidArgument". A receive() that was already
// waiting is not told: it waits out its whole deadline (forever, with Deadline::never(), while
// the peer lives), though nothing can come to it any more. The local Endpoint::redirect refuses
// instead ("redirect: another thread is in call() or receive() on this end", Errc::Busy); the net
// one neither refuses nor wakes the receiver.
// Fixed: redirect() wakes the channel's waiters and receive() stops once it is redirected
// (InvalidArgument). Before: receive() returned 4700 ms after the redirect, at its deadline.
TEST(ReviewRedirect, AReceiveWaitingWhenTheChannelIsRedirectedEnds) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l);
  std::atomic<std::int64_t> returned_at{0};
  std::optional<Result<net::Message>> got;
  std::thread receiver([&] {
    got.emplace(r.server.receive(secs(5)));
    returned_at.store(monotonic_ns());
  });
  os::sleep_ns(300'000'000);  // the receiver waits now
  const std::int64_t t0 = monotonic_ns();
  Status red = r.server.redirect(*q, 100);
  if (red) {
    ASSERT_TRUE(r.client.send(test::numbered(r.client, 64, 1), secs(5)));
    auto m = q->wait(secs(5));
    EXPECT_TRUE(m) << "the message went to the waiting receive() instead of the queue";
  }
  receiver.join();
  const double ms = static_cast<double>(returned_at.load() - t0) / 1e6;
  if (!red) {
    SUCCEED() << "redirect refused while a receive() waits: " << red.error().message();
    return;
  }
  EXPECT_LT(ms, 1000.0) << "the receive() waiting when its channel was redirected returned " << ms
                        << " ms after the redirect ("
                        << (*got ? "a message" : got->error().message()) << ")";
}

// ---- 5. a NetSource left in the queue by a redirect that fails late ----
//
// redirect() makes a source for a queue the worker has none for unlocked, and gives it to the
// queue (add_source) before it relocks the worker. If it then returns an error (the channel was
// closed meanwhile, or another thread redirected it first: "already redirected"), that source is
// never detached: the queue keeps it, and asks it on every look, for as long as the queue lives.
// Made deterministic here by holding the queue's lock, so that redirect() waits in add_source()
// while the channel is closed.
// Fixed: a source made for a redirect that then fails is detached on every way out (the queue
// lets it go at its next look). Before: the queue asked 3 sources on every look.
TEST(ReviewRedirect, ARedirectThatFailsLateLeavesNoSourceInTheQueue) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  constexpr int kRounds = 3;
  for (int i = 0; i < kRounds; ++i) {
    Remote r = connect_one(*l);
    ASSERT_TRUE(r.server.valid());
    Status st;
    std::thread redirector;
    {
      detail::SpinMutex& qmu = (*detail::QueueAccess::core(*q)).*get(QueueMuOf{});
      qmu.lock();
      redirector = std::thread([&] { st = r.server.redirect(*q, 1); });
      os::sleep_ns(200'000'000);  // it waits in add_source() now
      r.client.close();
      // The server's end closes under it (what its peer's Bye, a transport error or another
      // thread's close() would do): close the core, keep the handle (the redirector uses it).
      test::core_of(r.server)->close();
      qmu.unlock();
    }
    redirector.join();
    EXPECT_FALSE(st) << "redirect of a channel closed meanwhile succeeded";
    r.server.close();
  }
  const std::size_t left = sources_of(*q);
  EXPECT_EQ(left, 0u) << "no channel redirected, after " << kRounds
                      << " redirects that failed late the queue asks " << left
                      << " sources on every look (for as long as it lives)";
}

// ---- 6. an idle redirected channel slows its worker's other channels ----
//
// The pump is a waiter with no key (run_until(..., nullptr, ...)): as the poller, its poller_for
// is nullptr, so news_locked() counts every event of every channel of the worker as its news, and
// (W2) every progress by another thread that has events signals the worker's event fd
// (ucp_worker_signal, a system call) and wakes the pump, which progresses (nothing) and re-arms.
// net/core.h (W2): "a busy channel beside an idle poller no longer costs a syscall (and the poller
// a futile wake) per event": with one idle redirected channel on a listener, every other channel
// of it pays that again. Measured: round trips per second of a plain (not redirected) channel
// served by receive()/reply() (WaitMode::Sleep), alone, beside an idle redirected sibling, and
// alone again (a measurement on a shared 2-core VM: 30-45 % fewer round trips in 3 of 5 runs,
// e.g. 43,132 -> 30,475 -> 45,492 /s; the other runs were too noisy to tell).
// Partly fixed: the pump has a key of its own (WorkerCore::pump_key), so another thread's progress
// no longer signals it per event. What is left is one poller per worker: the pump, asleep on the
// worker's event fd, is woken by the fd itself for the busy sibling's events, as any idle waiter
// of a shared worker is (ReviewNet2.DISABLED_IdlePollerBesideBusyChannelCost). After the fix:
// 45,531 -> 33,585 -> 46,737 round trips/s (Release, busy 2-vCPU VM). A timing measurement, not a
// bar for a unit test: disabled, run by hand; README "Across machines" states the cost.
TEST(ReviewRedirect, DISABLED_IdleRedirectedSiblingCost) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote plain = connect_one(*l), idle = connect_one(*l);
  plain.server.set_wait_policy(WaitPolicy{WaitMode::Sleep});  // the server sleeps between calls
  std::atomic<bool> stop{false};
  std::thread echo([&] {
    while (!stop.load()) {
      auto m = plain.server.receive(Deadline::after(50ms));
      if (m && m->kind == Kind::Request) (void)net::Channel::reply(std::move(*m));
    }
  });
  auto rate = [&] {
    int n = 0;
    const std::int64_t t0 = monotonic_ns();
    while (monotonic_ns() - t0 < 1'500'000'000) {
      auto b = plain.client.buffer(64);
      if (!b || !plain.client.call(*b, secs(5))) break;
      ++n;
    }
    return static_cast<double>(n) / 1.5;
  };
  (void)rate();  // warm-up
  const double before = rate();
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(idle.server.redirect(*q, 1));  // idle: nothing is ever sent on it
  const double with_pump = rate();
  idle.server.close();  // no channel redirected: the pump ends
  os::sleep_ns(100'000'000);
  const double after = rate();
  stop.store(true);
  echo.join();
  std::printf(
      "plain channel round trips/s: %.0f alone, %.0f beside an idle redirected one, %.0f "
      "alone again\n",
      before, with_pump, after);
  EXPECT_GT(with_pump, 0.8 * std::min(before, after))
      << "round trips/s of a plain channel: " << before << " alone, " << with_pump
      << " beside an idle redirected channel of the same listener, " << after << " alone again";
}

// ---- two waiters, one remote channel's burst ----
//
// Suspected: a local peer wakes a sleeper per message (P4q), but tap_flush_locked() moves all a
// channel received in one progress to the source and wakes the queue once (one futex waiter), so
// a second server thread could sleep on (up to the 1 s safety net) while requests wait. In this
// shape it survives: the requests reach the source in separate flushes (each progress stops at
// the first event that is news), so each wakes a thread. (A burst moved in one flush, e.g. the
// messages queued behind a large payload's place, would still wake one thread only.)
TEST(ReviewRedirect, TwoWaitersShareABurstOfOneRemoteChannel) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create(WaitPolicy{WaitMode::Sleep});
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l);
  ASSERT_TRUE(net::adopt(*q, std::move(r.server), 100));
  std::atomic<bool> stop{false};
  auto serve = [&] {
    while (!stop.load()) {
      auto m = q->wait(Deadline::after(100ms));
      if (!m || m->kind != Kind::Request) continue;
      os::sleep_ns(400'000'000);  // the work
      (void)MsgQueue::reply(std::move(*m));
    }
  };
  std::thread s1(serve), s2(serve);
  os::sleep_ns(300'000'000);  // both asleep in the queue
  // The burst: an 8 MiB one-way message (its place heads the inbox until fetched), then three
  // requests behind it: all four reach the source in one flush.
  const std::int64_t t0 = monotonic_ns();
  ASSERT_TRUE(r.client.send(test::filled(r.client, 8u << 20), secs(5)));
  for (std::uint32_t i = 0; i < 3; ++i)
    ASSERT_TRUE(r.client.send_request(test::numbered(r.client, 64, i)));
  std::vector<double> at;
  for (int i = 0; i < 3; ++i) {
    auto m = r.client.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    at.push_back(static_cast<double>(monotonic_ns() - t0) / 1e6);
  }
  stop.store(true);
  s1.join();
  s2.join();
  std::printf("replies at %.0f, %.0f, %.0f ms\n", at[0], at[1], at[2]);
  EXPECT_LT(at[1] - at[0], 350.0) << "replies at " << at[0] << ", " << at[1] << ", " << at[2]
                                  << " ms: the second thread slept while requests waited";
}

// ---- 4. channel_count() ----
//
// MsgQueue::channel_count(): "How many channels are redirected here and still open". net.h's
// redirect is "as mbmq::Channel::redirect"; a remote channel redirected or adopted is not
// counted (QueueCore::live_ counts local ends only).
// Fixed: QueueCore::channel_count() adds its sources' channels. Before: 0 (2 expected).
TEST(ReviewRedirect, ChannelCountCountsRemoteChannels) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote a = connect_one(*l), b = connect_one(*l);
  ASSERT_TRUE(net::adopt(*q, std::move(a.server), 100));
  ASSERT_TRUE(b.server.redirect(*q, 101));
  EXPECT_EQ(q->channel_count(), 2u) << "two remote channels redirected here, open";
}

// ---- properties the code survives ----

// Two channels of one listener (one worker, one pump) on two queues: two sources; each queue gets
// its own channel's messages, credit goes back on both (streams beyond the grant), calls work.
TEST(ReviewRedirect, TwoChannelsOfOneListenerOnTwoQueuesAreBothServed) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 90s);
  auto qa = MsgQueue::create(), qb = MsgQueue::create();
  ASSERT_TRUE(qa && qb);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote a = connect_one(*l), b = connect_one(*l);
  ASSERT_TRUE(net::adopt(*qa, std::move(a.server), 100));
  ASSERT_TRUE(net::adopt(*qb, std::move(b.server), 200));
  QueueServer sa(*qa), sb(*qb);
  constexpr std::uint32_t kN = 3000;
  auto stream = [](net::Channel& c) {
    for (std::uint32_t i = 0; i < kN; ++i) {
      Status s = c.send(test::numbered(c, 64, i), secs(10));
      if (!s) {
        ADD_FAILURE() << "send " << i << ": " << s.error().message();
        return;
      }
      if (i % 500 == 0) {
        EXPECT_TRUE(remote_call(c, 128, static_cast<char>(i)));
      }
    }
  };
  std::thread ta([&] { stream(a.client); }), tb([&] { stream(b.client); });
  ta.join();
  tb.join();
  for (Deadline d = secs(20); !d.expired();) {
    if (sa.oneway_count(100) == kN && sb.oneway_count(200) == kN) break;
    os::sleep_ns(1'000'000);
  }
  EXPECT_EQ(sa.oneway_count(100), kN);
  EXPECT_EQ(sb.oneway_count(200), kN);
  EXPECT_EQ(sa.oneway_count(200), 0u) << "queue a got b's messages";
  EXPECT_EQ(sb.oneway_count(100), 0u) << "queue b got a's messages";
}

// The end comes exactly once, after every one-way message the client sent before closing (a
// stream past the grant, so credit goes back many times on the way).
TEST(ReviewRedirect, PeerClosedComesOnceAfterEveryMessage) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 90s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l);
  ASSERT_TRUE(net::adopt(*q, std::move(r.server), 100));
  QueueServer server(*q);
  constexpr std::uint32_t kN = 3000;
  for (std::uint32_t i = 0; i < kN; ++i) {
    Status s = r.client.send(test::numbered(r.client, i % 700 == 0 ? (2u << 20) : 64, i), secs(10));
    ASSERT_TRUE(s) << i << ": " << s.error().message();
  }
  r.client.close();
  for (Deadline d = secs(20); !d.expired() && server.end_count(100) == 0;) os::sleep_ns(1'000'000);
  os::sleep_ns(300'000'000);  // a second end, if any
  std::lock_guard lock(server.mu);
  EXPECT_EQ(server.end_counts[100], 1);
  EXPECT_EQ(server.oneway_before_end[100], kN);
  ASSERT_EQ(server.oneway[100].size(), kN);
  for (std::uint32_t i = 0; i < kN; ++i) ASSERT_EQ(server.oneway[100][i], i);
}

// A client redirects its channel while a call() of its own is in flight: the call's reply is the
// call's (not the queue's); send_request()'s replies then come to the queue.
TEST(ReviewRedirect, AClientRedirectingDuringItsOwnCallGetsTheReply) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  std::thread echo([&] {
    for (int i = 0; i < 2; ++i) {
      auto m = r.server.receive(secs(10));
      ASSERT_TRUE(m && m->kind == Kind::Request);
      if (i == 0) os::sleep_ns(300'000'000);  // the redirect happens meanwhile
      ASSERT_TRUE(net::Channel::reply(std::move(*m)));
    }
  });
  std::atomic<bool> ok{false};
  std::thread caller([&] {
    auto b = test::numbered(r.client, 64, 9);
    Status s = r.client.call(b, secs(10));
    EXPECT_TRUE(s) << s.error().message();
    ok.store(s && test::number_of(b) == 9);
  });
  os::sleep_ns(100'000'000);
  ASSERT_TRUE(r.client.redirect(*q, 5));
  caller.join();
  EXPECT_TRUE(ok.load());
  ASSERT_TRUE(r.client.send_request(test::numbered(r.client, 64, 11)));
  auto m = q->wait(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::Reply);
  EXPECT_EQ(m->key, 5u);
  echo.join();
  auto none = q->wait(Deadline::after(200ms));
  EXPECT_FALSE(none) << "the call's reply also came to the queue";
}

// close() from another thread while a thread is inside receive() or call() on the same handle:
// that call returns at once (as on a local Channel), and nothing is freed under it.
// Fixed: net::Channel::close() keeps the core until the handle is destroyed or assigned. Before:
// close() reset the handle's pointer, the core's last reference, while the other thread ran in it
// (TSan: a data race on the handle in RedirectRacingWithCloseAndThePeersClose below, under load).
TEST(ReviewRedirect, CloseFromAnotherThreadEndsAReceiveOrACallOnTheSameHandle) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 100s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  for (int i = 0; i < 8; ++i) {
    Remote r = connect_one(*l);
    ASSERT_TRUE(r.server.valid());
    net::Channel& mine = i % 2 == 0 ? r.server : r.client;  // receive() on one, call() on the other
    std::atomic<bool> inside{false}, ended_with_error{false};
    std::atomic<std::int64_t> returned_ns{0};
    std::thread t([&] {
      inside = true;
      if (i % 2 == 0) {
        auto m = mine.receive(secs(30));
        ended_with_error = !m || m->kind == Kind::PeerClosed;
      } else {
        auto b = mine.buffer(64);
        ended_with_error = b && !mine.call(*b, secs(30));  // nobody answers
      }
      returned_ns = monotonic_ns();
    });
    while (!inside.load()) {
    }
    os::sleep_ns(20'000'000);
    const std::int64_t t0 = monotonic_ns();
    mine.close();
    t.join();
    EXPECT_TRUE(ended_with_error.load()) << "round " << i;
    EXPECT_LT(returned_ns.load() - t0, 2'000'000'000) << "round " << i << ": returned late";
    EXPECT_FALSE(mine.valid());
    auto again = mine.buffer(64);
    ASSERT_FALSE(again);
    EXPECT_EQ(again.error().code, Errc::InvalidArgument);
  }
}

// A request received, then our own handle closed (and kept): its reply says PeerClosed, as when
// the handle is gone. Fixed with the above (close() keeps the core, so the reply token finds it).
// Before the fix of the fix: InvalidArgument, the closed core's error (second review of rev-q6).
TEST(ReviewRedirect, AReplyAfterOurOwnCloseIsPeerClosedWhetherOrNotTheHandleIsKept) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l);
  ASSERT_TRUE(r.server.valid());
  ASSERT_TRUE(r.client.send_request(test::filled(r.client, 64, 'r'), secs(5)));
  auto m = r.server.receive(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Request);
  r.server.close();  // the handle (and its core) kept
  Status s = net::Channel::reply(std::move(*m));
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
}

// redirect() racing with close() of the same handle (and the peer's close): no crash, no hang,
// and the pump ends once no channel is redirected.
TEST(ReviewRedirect, RedirectRacingWithCloseAndThePeersClose) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 100s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  {
    // mbmq::net's keeper thread starts with the first channel: before the count.
    Remote warm = connect_one(*l);
    ASSERT_TRUE(warm.server.valid());
  }
  const int before = task_count();
  {
    auto q = MsgQueue::create();
    ASSERT_TRUE(q);
    for (int i = 0; i < 20; ++i) {
      Remote r = connect_one(*l);
      ASSERT_TRUE(r.server.valid());
      std::atomic<int> go{0};
      std::thread t1([&] {
        while (go.load() == 0) {
        }
        (void)r.server.redirect(*q, 100 + static_cast<std::uint64_t>(i));
      });
      std::thread t2([&] {
        while (go.load() == 0) {
        }
        if (i % 2 == 0) r.server.close();
        r.client.close();
      });
      go.store(1);
      t1.join();
      t2.join();
      while (q->wait(Deadline::after(20ms))) {
      }
      r.server.close();
    }
  }
  int now = task_count();
  for (Deadline d = secs(5); !d.expired() && now > before; now = task_count())
    os::sleep_ns(1'000'000);
  EXPECT_LE(now, before) << "a pump thread outlived its channels";
}

// Two queues on one worker (one pump): destroying one closes its channels only; the other queue's
// channel goes on being served, and the pump ends only with the last redirected channel.
TEST(ReviewRedirect, OneOfTwoQueuesOnAWorkerDestroyedTheOtherGoesOn) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  Remote a = connect_one(*l), b = connect_one(*l);
  std::shared_ptr<net::detail::WorkerCore> w = test::core_of(b.server)->w_;
  auto qb = MsgQueue::create();
  ASSERT_TRUE(qb);
  ASSERT_TRUE(net::adopt(*qb, std::move(b.server), 200));
  QueueServer sb(*qb);
  {
    auto qa = MsgQueue::create();
    ASSERT_TRUE(qa);
    ASSERT_TRUE(net::adopt(*qa, std::move(a.server), 100));
    QueueServer sa(*qa);
    EXPECT_TRUE(remote_call(a.client, 64, 1));
    EXPECT_TRUE(remote_call(b.client, 64, 2));
  }
  auto buf = a.client.buffer(64);
  if (buf) {
    Status s = a.client.call(*buf, secs(5));
    EXPECT_FALSE(s) << "a's queue is gone, its channel should be closed";
  }
  for (int i = 0; i < 50; ++i) EXPECT_TRUE(remote_call(b.client, 1000, static_cast<char>(i)));
  auto pump_running = [&] {
    os::LockGuard lock(w->mu);
    return w->pump_running;
  };
  EXPECT_TRUE(pump_running()) << "the pump ended while b is still redirected";
  b.client.close();
  for (Deadline d = secs(5); !d.expired() && sb.end_count(200) == 0;) os::sleep_ns(1'000'000);
  EXPECT_EQ(sb.end_count(200), 1);
  for (Deadline d = secs(5); !d.expired() && pump_running();) os::sleep_ns(1'000'000);
  EXPECT_FALSE(pump_running()) << "the pump did not end with the last channel";
}

// The stranded credit of 1. in a plain workload, no sleeps: each round sends a large one-way
// message then call()s (a request queued behind the message's place, so both reach the source
// together: the message is delivered with the request still queued, and neither lists its
// credit). The next large send() then waits for credit that never comes (often within a few
// rounds: 5 of 15 runs of 12 rounds stalled, 3 of 3 of 60). Only the pump progresses the listener's
// worker (peer_timeout 0).
// Fixed with the test above. Before: round 17, a 12 MiB send timed out.
TEST(ReviewRedirect, LargeOneWayMessagesBetweenCallsDoNotStall) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 100s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l, co);
  ASSERT_TRUE(net::adopt(*q, std::move(r.server), 100));
  QueueServer server(*q);
  // 40 under the sanitizers (150 took 68 s under TSan and 45 s under ASan, a tenth of CI's test
  // time): the stall showed within 17 rounds, in 8 of the 18 runs of 12 rounds or more.
  const std::uint32_t kRounds = test::kSanitized ? 40 : 150;
  for (std::uint32_t i = 0; i < kRounds; ++i) {
    const std::size_t size = (i % 3 == 0) ? (2u << 20) : (i % 3 == 1) ? (6u << 20) : (12u << 20);
    Status s = r.client.send(test::numbered(r.client, size, i), secs(4));
    ASSERT_TRUE(s) << "round " << i << ", a " << (size >> 20)
                   << " MiB send: " << s.error().message() << " (the server took "
                   << server.oneway_count(100)
                   << " one-way messages: their credit did not come back)";
    ASSERT_TRUE(remote_call(r.client, i % 2 == 0 ? (3u << 20) : (5u << 20), static_cast<char>(i)));
  }
  for (Deadline d = secs(20); !d.expired() && server.oneway_count(100) < kRounds;)
    os::sleep_ns(1'000'000);
  std::lock_guard lock(server.mu);
  ASSERT_EQ(server.oneway[100].size(), kRounds);
  for (std::uint32_t i = 0; i < kRounds; ++i) EXPECT_EQ(server.oneway[100][i], i);
}

// The keeper ends a silent peer (peer_timeout) outside any progress, from its own thread: the end
// is noted for the flush, the pump is woken (W2 (d): fail_locked wakes the waiters) and the queue
// gets the PeerClosed promptly.
TEST(ReviewRedirect, APeerTimeoutEndsAnAdoptedChannelOnTheQueue) {
  // Under ASan, LeakSanitizer's own tracer crashed at this test's exit, after it passed, in 2 of 2
  // ctest runs ("Tracer caught signal 11" on the main thread, with UCX's and mbmq::net's threads
  // alive), as ReviewNetSib.DeferredPayloadOfAClosedChannel... once did: run in Release only.
  if (test::kSanitized) GTEST_SKIP() << "LeakSanitizer's tracer crashes at exit (see above)";
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  net::ListenOptions lo;
  lo.peer_timeout = 300ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  test::RawClient raw;  // never sends a heartbeat
  net::Channel ch;
  ASSERT_TRUE(raw_accept(*l, raw, &ch));
  ASSERT_TRUE(net::adopt(*q, std::move(ch), 100));
  const std::int64_t t0 = monotonic_ns();
  std::optional<Message> end;
  for (Deadline d = secs(10); !d.expired() && !end;) {
    raw.progress_for(1ms);
    auto e = q->wait(Deadline::after(5ms));
    if (e && e->kind == Kind::PeerClosed) end.emplace(std::move(*e));
  }
  ASSERT_TRUE(end) << "no PeerClosed for a peer silent past peer_timeout";
  const double ms = static_cast<double>(monotonic_ns() - t0) / 1e6;
  std::printf("silent peer -> PeerClosed on the queue: %.0f ms (peer_timeout 300 ms)\n", ms);
  EXPECT_LT(ms, 3000.0);
}

// A sender faster than the server: what the queue holds untaken (source FIFO + inbox) stays
// within the grant the server gave (inbox_messages), not more.
TEST(ReviewRedirect, AFastSenderIsHeldToTheGrantWhileTheQueueDoesNotTake) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  net::ListenOptions lo;
  lo.inbox_messages = 16;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l);
  ASSERT_TRUE(net::adopt(*q, std::move(r.server), 100));
  int sent = 0;
  for (; sent < 100; ++sent) {
    Status s = r.client.send(test::numbered(r.client, 64, static_cast<std::uint32_t>(sent)),
                             Deadline::after(200ms));
    if (!s) break;
  }
  EXPECT_LE(sent, 16) << "the client sent past the grant while the server took nothing";
  EXPECT_GE(sent, 16);
  // Taken: credit goes back, the client sends again.
  std::vector<Message> held;
  for (int i = 0; i < sent; ++i) {
    auto m = q->wait(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    held.push_back(std::move(*m));
  }
  Status s = r.client.send(test::numbered(r.client, 64, 1000), secs(5));
  EXPECT_TRUE(s) << s.error().message();
}

// The queue destroyed while requests of adopted channels are queued: each caller ends (NoReply
// or PeerClosed) promptly, the adopted channels are freed and the pump thread ends.
TEST(ReviewRedirect, DestroyingTheQueueWithRequestsQueuedEndsTheCallersAndThePump) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  {
    // mbmq::net's keeper thread starts with the first channel: before the count.
    Remote warm = connect_one(*l);
    ASSERT_TRUE(warm.server.valid());
  }
  const int before = task_count();
  std::vector<Remote> rs;
  for (int i = 0; i < 4; ++i) rs.push_back(connect_one(*l));
  std::vector<std::thread> callers;
  std::atomic<int> ended{0};
  std::optional<Message> held;
  {
    auto q = MsgQueue::create();
    ASSERT_TRUE(q);
    for (std::size_t i = 0; i < rs.size(); ++i)
      ASSERT_TRUE(net::adopt(*q, std::move(rs[i].server), 100 + i));
    for (auto& r : rs)
      callers.emplace_back([&] {
        auto b = test::filled(r.client, 64);
        Status s = r.client.call(b, secs(20));
        EXPECT_FALSE(s);
        if (!s) {
          EXPECT_TRUE(s.error().code == Errc::PeerClosed || s.error().code == Errc::NoReply)
              << s.error().message();
        }
        ++ended;
      });
    os::sleep_ns(300'000'000);
    auto m = q->wait(secs(5));  // one taken and held past the queue
    ASSERT_TRUE(m) << m.error().message();
    held.emplace(std::move(*m));
  }
  const std::int64_t t0 = monotonic_ns();
  for (Deadline d = secs(5); !d.expired() && ended.load() < 3;) os::sleep_ns(1'000'000);
  EXPECT_GE(ended.load(), 3) << "callers whose requests were queued did not end";
  held.reset();  // NoReply (or nothing: its channel is closed)
  for (auto& t : callers) t.join();
  EXPECT_LT(monotonic_ns() - t0, 10'000'000'000);
  int now = task_count();
  for (Deadline d = secs(5); !d.expired() && now > before; now = task_count())
    os::sleep_ns(1'000'000);
  EXPECT_LE(now, before) << "the pump thread did not end";
}

}  // namespace
}  // namespace mbmq

namespace mbmq {
namespace {

// Second review (read, not run): credit the application released through receive() before the
// redirect, kept back by F5's half-grant batching (a request was queued behind), was never given
// back: the queue lists a channel for credit only for what it delivered itself. A peer that then
// sends only requests waits on that credit for good. Fixed: redirect() flushes what receive()
// released. Before: the 70,000-byte call below timed out (40,000 of a 100,000-byte grant held).
TEST(ReviewRedirect, CreditReleasedByReceiveBeforeTheRedirectIsGivenBack) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  net::ListenOptions lo;
  lo.inbox_bytes = 100'000;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  Remote r = connect_one(*l);
  ASSERT_TRUE(r.client.send(test::filled(r.client, 40'000)));       // one-way, below half the grant
  ASSERT_TRUE(r.client.send_request(test::filled(r.client, 100)));  // queued behind it
  // Both in the server's inbox before it receives the first (the second then holds F5 back).
  for (Deadline d = secs(5); !d.expired();) {
    net::detail::ChannelCore* core = test::core_of(r.server).get();
    std::size_t n = 0;
    {
      os::LockGuard lock(core->w_->mu);
      core->w_->progress_locked();
      n = test::inbox_size(*core);
    }
    if (n >= 2) break;
    os::sleep_ns(1'000'000);
  }
  auto first = r.server.receive(secs(5));
  ASSERT_TRUE(first && first->kind == Kind::Message);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(r.server.redirect(*q, 1));
  std::thread serve([&] {
    for (int i = 0; i < 2; ++i) {
      auto m = q->wait(secs(20));
      if (!m) return;
      if (m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
    }
  });
  auto b = test::filled(r.client, 70'000);
  Status s = r.client.call(b, secs(5));
  EXPECT_TRUE(s) << "a call within the grant: " << s.error().message();
  // The send_request's reply comes to the client's receive().
  auto rep = r.client.receive(secs(5));
  EXPECT_TRUE(rep && rep->kind == Kind::Reply);
  serve.join();
}

}  // namespace
}  // namespace mbmq
