// A hostile review of net::Bridge (mbmq/net_bridge.h, src/net/bridge.cc): reproducers. Tests named
// Confirmed_* fail on the code they were written against (each is a finding of the review, see
// its comment; Confirmed_UnderTSan_* fails in the tsan preset only); the others are suspicions
// that were checked and did not hold (they pass).
// Everything that could hang is bounded by a watchdog or a child's alarm.
#include <dlfcn.h>
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/mbmq.h"
#include "mbmq/net.h"
#include "mbmq/net_bridge.h"
#include "net/net_pair.h"
#include "net/net_util.h"
#include "os/process.h"
#include "test_util.h"

// Thread creation fails (EAGAIN, as at RLIMIT_NPROC) for the thread that sets this: interposed on
// libc's pthread_create (std::thread calls it), for
// ReviewBridge.AThreadThatCannotBeCreatedLeavesNoSlotAndNoLink.
thread_local bool g_fail_pthread_create = false;

extern "C" int pthread_create(pthread_t* t, const pthread_attr_t* a, void* (*f)(void*), void* arg) {
  using Fn = int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
  static const Fn real = reinterpret_cast<Fn>(::dlsym(RTLD_NEXT, "pthread_create"));
  if (g_fail_pthread_create) return EAGAIN;
  return real(t, a, f, arg);
}

// operator new of this binary: counts this thread's allocations while g_new_count >= 0, and throws
// std::bad_alloc at allocation number g_new_fail (0: never), for
// ReviewBridge.BadAllocForTheLinkThreadIsAnErrorAndGivesTheSlotBack.
thread_local int g_new_count = -1;
thread_local int g_new_fail = 0;

// Not in sanitizer builds: they own operator new (and GCC's -Wmismatched-new-delete misreads this
// pair at -O1); the test is skipped there.
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
void* operator new(std::size_t n) {
  if (g_new_count >= 0 && ++g_new_count == g_new_fail) throw std::bad_alloc();
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
#endif

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::connect_and_accept;
using test::Connected;
using test::heap_bytes;
using test::join;
using test::make_bridge;
using test::pct;
using test::secs;
using test::url;

// A local server on a plain (not redirected) end: answers every request with its bytes unchanged
// until stopped.
class EchoServer {
 public:
  explicit EchoServer(Channel& end) : end_(end), thread_([this] { loop(); }) {}
  EchoServer(const EchoServer&) = delete;
  EchoServer& operator=(const EchoServer&) = delete;
  ~EchoServer() {
    stop_.store(true);
    thread_.join();
  }

 private:
  void loop() {
    while (!stop_.load()) {
      auto m = end_.receive(Deadline::after(50ms));
      if (!m) continue;
      if (m->kind == Kind::PeerClosed) return;
      if (m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
    }
  }
  Channel& end_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Not a test: the flooding client of AOneWayFlood..., run as a program of its own (so
// that its send buffers are not in the server's heap). Connects to $MBMQ_NET_URL, sends
// $MBMQ_REVIEW_N one-way messages of 1 MiB, then waits in a call until killed.
TEST(ReviewBridgeHelper, DISABLED_FloodingClient) {
  const char* u = std::getenv("MBMQ_NET_URL");
  const char* n = std::getenv("MBMQ_REVIEW_N");
  if (u == nullptr || n == nullptr) GTEST_SKIP() << "a helper";
  auto ch = net::connect(u, secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  for (int i = 0; i < std::atoi(n); ++i) {
    auto b = ch->buffer(1u << 20);
    ASSERT_TRUE(b);
    ASSERT_TRUE(ch->send(std::move(*b)));
  }
  auto b = ch->buffer(64);
  ASSERT_TRUE(b);
  (void)ch->call(*b, secs(120));  // progresses our worker (the sends go out); killed meanwhile
}

// FINDING (high), fixed by net's credit flow control: no back-pressure reached the remote client. A
// remote client that sends one-way messages faster than the server takes them (here: the server
// never receives) makes the server hold every one of them: the bridge stops reading its
// net::Channel while it waits (up to call_timeout per message) for a local buffer, but net's
// ChannelCore keeps delivering into an unbounded std::deque (inbox_) as the listener's worker is
// progressed by the thread in accept(), by the other links, and by the keeper. What the bridge
// itself needs is the pair's slots/extents (memfds, not heap) and one message in flight; 384 MiB
// sent => ~384 MiB of heap.
TEST(ReviewBridge, AOneWayFloodWhileTheServerDoesNotReceiveIsBoundedByTheGrant) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "mallinfo2() does not see the sanitizer's allocator";
#endif
  test::Watchdog dog("the test", 90s);
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  const std::string u = url(bridge->port());
  const std::int64_t heap0 = heap_bytes();
  constexpr int kMessages = 384;
  auto pid =
      test::spawn_helper("ReviewBridgeHelper.DISABLED_FloodingClient",
                         {"MBMQ_NET_URL=" + u, "MBMQ_REVIEW_N=" + std::to_string(kMessages)});
  ASSERT_TRUE(pid) << pid.error().message();
  auto end = bridge->accept(secs(10));  // the server's end: never received from (a busy server)
  ASSERT_TRUE(end) << end.error().message();
  // As the header asks: a thread kept in accept().
  std::atomic<bool> stop{false};
  std::thread acceptor([&] {
    while (!stop.load()) (void)bridge->accept(Deadline::after(100ms));
  });
  // Fixed (flow control, net wire v2): the client is out of credit after inbox_bytes (16 MiB by
  // default) and its next send() fails; 5 s is ample for 300 MiB to pile up as it did before.
  std::int64_t grown = 0;
  const Deadline d = secs(5);
  while (!d.expired() && grown < (300ll << 20)) {
    os::sleep_ns(50'000'000);
    grown = std::max(grown, heap_bytes() - heap0);
  }
  std::printf("server heap grew by %lld MiB for %d MiB sent; bridge forwarded %llu messages\n",
              static_cast<long long>(grown >> 20), kMessages,
              static_cast<unsigned long long>(bridge->stats().messages));
  stop.store(true);
  acceptor.join();
  (void)os::kill_process(*pid, SIGKILL);
  (void)join(*pid);
  EXPECT_LT(grown, 64ll << 20) << "the server buffers what a remote client sends, without bound";
}

// FINDING (low-medium; fails under TSan only), fixed (the bridge checks its pid): ~Bridge in a
// forked child joins std::threads that exist only in the parent. POSIX: the child has one thread;
// joining the others' ids is undefined. Release/glibc passes by accident (glibc's fork marks the
// other threads' descriptors free, tid 0, so pthread_join returns at once). Under TSan (the
// project's `threads` label runs there) the child hangs in std::thread::join at bridge.cc:78
// (TSan's ThreadRegistry::JoinThread spins forever; seen with gdb); musl's join would wait on the
// tid futex likewise. net's own objects check ucx_usable() and leave UCX alone in a forked child;
// the Bridge should check the pid it was made in and neither join nor close in another. (Also: a
// fork while a link thread holds BridgeCore::mu_ at its end would deadlock the child's ~Bridge; the
// window is a few instructions, not reproduced.) The control (the child drops a net::Channel) shows
// net is fine.
TEST(ReviewBridge, DestroyingTheBridgeInAForkedChildDoesNotHang) {
  test::Watchdog dog("the test", 60s);
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  ASSERT_TRUE(c.end) << c.end.error().message();
  ASSERT_EQ(bridge->stats().live, 1u);
  // Control: net objects are dropped in a child without trouble.
  const pid_t control = test::spawn(
      [&] {
        *c.remote = net::Channel{};
        return 0;
      },
      5);
  ASSERT_EQ(join(control), 0);
  const pid_t child = test::spawn(
      [&] {
        *bridge = net::Bridge{};  // ~Bridge in the child
        return 0;
      },
      5);
  EXPECT_EQ(join(child), 0) << "142: SIGALRM, the child hung for 5 s in ~Bridge";
}

// FINDING (medium, performance), fixed (WorkerCore W1-W3, src/net/core.h): the deployment the
// header asks for ("keep a thread in accept()") puts a second waiter on the listener's UCX worker,
// the one every link shares. A thread that wakes on the worker's event fd progresses it and
// re-arms, so the link thread whose message came sleeps on to wait_events()'s 20 ms safety-net cap.
// Bridged 64 B calls from ONE client: p99 ~20 ms with a thread in accept() (measured 20.1-25.0 ms
// in 5 runs), ~0.1 ms without. The docs present the 20 ms cap as a many-clients effect; with the
// required accept() thread it hits >= 1% of the calls of a single client. bridge_bench and
// bridge_test never keep a thread in accept() while calls run, so neither sees it.
TEST(ReviewBridge, BridgedCallsWhileAThreadWaitsInAcceptAreNotDelayedToThe20msCap) {
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "latency bounds: a sanitizer makes every call slower (Release runs it)";
#endif
  test::Watchdog dog("the test", 90s);
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  ASSERT_TRUE(c.end) << c.end.error().message();
  EchoServer server(*c.end);
  auto b = c.remote->buffer(64);
  ASSERT_TRUE(b);
  auto run = [&](int n, std::vector<double>& ms) {
    for (int i = 0; i < n; ++i) {
      const std::int64_t t0 = monotonic_ns();
      ASSERT_TRUE(c.remote->call(*b, secs(10)));
      ms.push_back(static_cast<double>(monotonic_ns() - t0) / 1e6);
    }
  };
  std::vector<double> alone, beside_accept;
  run(500, alone);
  std::atomic<bool> stop{false};
  std::thread acceptor([&] {
    while (!stop.load()) (void)bridge->accept(Deadline::after(200ms));
  });
  os::sleep_ns(20'000'000);
  run(500, beside_accept);
  stop.store(true);
  acceptor.join();
  std::printf(
      "bridged 64 B calls: nobody in accept() p50 %.3f ms p99 %.3f ms; a thread in accept() p50 "
      "%.3f ms p99 %.3f ms\n",
      pct(alone, 0.5), pct(alone, 0.99), pct(beside_accept, 0.5), pct(beside_accept, 0.99));
  // The failure was a 20 ms p50 (the safety-net poll); p99 has scheduler ticks of a loaded 2-vCPU
  // machine in it (3.9-5.5 ms seen in passing runs), so its bound sits below the cap, not at 5 ms.
  EXPECT_LT(pct(beside_accept, 0.5), 5.0) << "bridged calls wait for the 20 ms safety-net poll";
  EXPECT_LT(pct(beside_accept, 0.99), 15.0) << "bridged calls wait for the 20 ms safety-net poll";
}

// Suspicion (not confirmed if it passes): ~Bridge is bounded while a link waits in
// local.buffer(n, call_timeout) for a buffer the server holds (the server never receives; the
// remote client streams one-way messages past the pair's 16 slots). Also shows that one-way
// messages the bridge drops are counted nowhere in BridgeStats.
TEST(ReviewBridge, DestroyingTheBridgeWhileALinkWaitsForALocalBufferIsBounded) {
  test::Watchdog dog("the test", 60s);
  auto bridge = make_bridge();  // call_timeout 30 s
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  ASSERT_TRUE(c.end) << c.end.error().message();
  for (int i = 0; i < 64; ++i) {
    auto b = c.remote->buffer(64);
    ASSERT_TRUE(b);
    ASSERT_TRUE(c.remote->send(std::move(*b)));
  }
  const Deadline d = secs(10);
  while (bridge->stats().messages < 16 && !d.expired()) os::sleep_ns(5'000'000);
  os::sleep_ns(300'000'000);  // the link is now waiting for a 17th buffer
  const net::BridgeStats s = bridge->stats();
  std::printf("forwarded %llu of 64 one-way messages, no_reply %llu\n",
              static_cast<unsigned long long>(s.messages),
              static_cast<unsigned long long>(s.no_reply));
  const std::int64_t t0 = monotonic_ns();
  *bridge = net::Bridge{};
  const std::int64_t took = monotonic_ns() - t0;
  std::printf("~Bridge with a link waiting for a local buffer: %.1f ms\n",
              static_cast<double>(took) / 1e6);
  EXPECT_LT(took, 1'000'000'000);
  auto m = c.remote->receive(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed);
}

// Suspicion: after a call times out in the bridge (call_timeout), the server's late reply to it,
// arriving while the bridge is inside the next call, is taken for the next call's reply, or
// breaks the local channel (a "reply for no call"), ending the link.
TEST(ReviewBridge, ALateReplyDuringTheNextCallIsNotTakenForItsReply) {
  test::Watchdog dog("the test", 60s);
  net::BridgeOptions opt;
  opt.call_timeout = 200ms;
  auto bridge = make_bridge(opt);
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  ASSERT_TRUE(c.end) << c.end.error().message();
  Channel& end = *c.end;
  std::thread server([&] {
    auto a = end.receive(secs(10));  // held past call_timeout
    ASSERT_TRUE(a) << a.error().message();
    ASSERT_EQ(a->kind, Kind::Request);
    auto b = end.receive(secs(10));  // the next call, in flight in the bridge
    ASSERT_TRUE(b) << b.error().message();
    ASSERT_EQ(b->kind, Kind::Request);
    for (auto& x : a->buffer.data()) x = std::byte{0xaa};
    (void)MsgQueue::reply(std::move(*a));  // late: must be dropped
    os::sleep_ns(20'000'000);
    for (auto& x : b->buffer.data()) x = std::byte{0xbb};
    ASSERT_TRUE(MsgQueue::reply(std::move(*b)));
  });
  auto b1 = c.remote->buffer(32);
  ASSERT_TRUE(b1);
  Status s1 = c.remote->call(*b1, secs(10));
  ASSERT_FALSE(s1);
  EXPECT_EQ(s1.error().code, Errc::NoReply) << s1.error().message();
  auto b2 = c.remote->buffer(16);
  ASSERT_TRUE(b2);
  Status s2 = c.remote->call(*b2, secs(10));
  server.join();
  ASSERT_TRUE(s2) << s2.error().message();
  ASSERT_EQ(b2->size(), 16u);
  for (auto x : b2->data()) ASSERT_EQ(x, std::byte{0xbb});
}

// Suspicion: clients that connect and leave at once leak max_connections slots (live never comes
// back down), so a later client is refused with Busy.
TEST(ReviewBridge, ClientsThatConnectAndLeaveAtOnceGiveTheirSlotBack) {
  test::Watchdog dog("the test", 60s);
  net::BridgeOptions opt;
  opt.max_connections = 1;
  opt.poll_interval = 10ms;
  auto bridge = make_bridge(opt);
  ASSERT_TRUE(bridge) << bridge.error().message();
  const std::string u = url(bridge->port());
  for (int i = 0; i < 8; ++i) {
    std::thread t([&] {
      auto ch = net::connect(u, secs(10));
      if (ch) ch->close();
    });
    auto end = bridge->accept(secs(10));
    t.join();
    ASSERT_TRUE(end) << i << ": " << end.error().message();
    const Deadline d = secs(5);
    while (bridge->stats().live != 0 && !d.expired()) os::sleep_ns(1'000'000);
    ASSERT_EQ(bridge->stats().live, 0u) << i;
    auto m = end->receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(m->kind, Kind::PeerClosed);
  }
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.end) << c.end.error().message();
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  EchoServer server(*c.end);
  auto b = c.remote->buffer(8);
  ASSERT_TRUE(b);
  EXPECT_TRUE(c.remote->call(*b, secs(10)));
  EXPECT_EQ(bridge->stats().accepted, 9u);
  EXPECT_EQ(bridge->stats().refused_limit, 0u);
}

// Finding (low), fixed (the bridge looks at its local end after each message too): a request the
// server sends on its end (which the bridge answers NoReply, per the header) is answered only once
// the remote client has been idle for poll_interval: the bridge drains its local end in (B1) only
// after remote.receive() timed out. A remote client that keeps calling keeps the server's request
// unanswered for as long as it does.
TEST(ReviewBridge, AServerRequestOnItsEndIsAnsweredWithinPollIntervalWhileTheRemoteIsBusy) {
  test::Watchdog dog("the test", 60s);
  auto bridge = make_bridge();  // poll_interval 50 ms
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  ASSERT_TRUE(c.end) << c.end.error().message();
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(c.end->redirect(*q, 1));
  std::atomic<std::int64_t> answered_at{0};
  std::atomic<bool> stop{false};
  std::thread server([&] {
    while (!stop.load()) {
      auto m = q->wait(Deadline::after(20ms));
      if (!m) continue;
      if (m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
      if (m->kind == Kind::Reply && answered_at.load() == 0) answered_at.store(monotonic_ns());
    }
  });
  std::atomic<int> calls{0};
  std::thread client([&] {
    auto b = c.remote->buffer(64);
    ASSERT_TRUE(b);
    const std::int64_t until = monotonic_ns() + 3'000'000'000;
    while (monotonic_ns() < until) {
      ASSERT_TRUE(c.remote->call(*b, secs(10)));
      calls.fetch_add(1);
    }
  });
  os::sleep_ns(200'000'000);
  auto rb = c.end->buffer(8);
  ASSERT_TRUE(rb);
  const std::int64_t t0 = monotonic_ns();
  ASSERT_TRUE(c.end->send_request(std::move(*rb)));
  client.join();
  const Deadline d = secs(5);
  while (answered_at.load() == 0 && !d.expired()) os::sleep_ns(5'000'000);
  stop.store(true);
  server.join();
  ASSERT_NE(answered_at.load(), 0) << "the server's request was never answered";
  const double ms = static_cast<double>(answered_at.load() - t0) / 1e6;
  std::printf(
      "server's request on its end answered after %.1f ms (remote busy for ~2800 ms, %d "
      "calls)\n",
      ms, calls.load());
  EXPECT_LT(ms, 1000.0) << "answered only once the remote client went idle";
}

// Finding (medium), fixed (WorkerCore W1-W3, src/net/core.h): idle links slow an active one. Every
// link thread sleeps on the listener's one event fd; each arriving message wakes them all (each
// progresses the worker under its lock, re-arms, sleeps again), and any of them may take the
// wake-up meant for the active link (then it waits for the 20 ms cap).
TEST(ReviewBridge, IdleLinksDoNotSlowAnActiveOne) {
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "latency bounds: a sanitizer makes every call slower (Release runs it)";
#endif
  test::Watchdog dog("the test", 120s);
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  ASSERT_TRUE(c.end) << c.end.error().message();
  EchoServer server(*c.end);
  auto b = c.remote->buffer(64);
  ASSERT_TRUE(b);
  auto run = [&](int n, std::vector<double>& ms) {
    for (int i = 0; i < n; ++i) {
      const std::int64_t t0 = monotonic_ns();
      ASSERT_TRUE(c.remote->call(*b, secs(10)));
      ms.push_back(static_cast<double>(monotonic_ns() - t0) / 1e6);
    }
  };
  std::vector<double> alone, beside_idle;
  run(500, alone);
  std::vector<Connected> idle;
  for (int i = 0; i < 32; ++i) {
    idle.push_back(connect_and_accept(*bridge));
    ASSERT_TRUE(idle.back().remote) << idle.back().remote.error().message();
    ASSERT_TRUE(idle.back().end) << idle.back().end.error().message();
  }
  os::sleep_ns(100'000'000);
  run(500, beside_idle);
  std::printf(
      "bridged 64 B calls: alone p50 %.3f ms p99 %.3f ms max %.3f ms; beside 32 idle links p50 "
      "%.3f ms p99 %.3f ms max %.3f ms\n",
      pct(alone, 0.5), pct(alone, 0.99), pct(alone, 1.0), pct(beside_idle, 0.5),
      pct(beside_idle, 0.99), pct(beside_idle, 1.0));
  EXPECT_LT(pct(beside_idle, 0.5), 5.0);
  EXPECT_LT(pct(beside_idle, 0.99), 15.0);  // below the 20 ms cap; ticks of a loaded machine
}

// Suspicion: handles the server attaches to its replies (dropped by the bridge: they cannot cross
// hosts) leak in the server's process (the bridge's end never closes them).
TEST(ReviewBridge, HandlesAttachedToRepliesAreClosedByTheBridge) {
  test::Watchdog dog("the test", 60s);
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  ASSERT_TRUE(c.end) << c.end.error().message();
  Channel& end = *c.end;
  std::atomic<bool> stop{false};
  std::thread server([&] {
    while (!stop.load()) {
      auto m = end.receive(Deadline::after(20ms));
      if (!m || m->kind != Kind::Request) continue;
      const int fd = ::dup(0);
      if (fd >= 0) (void)m->buffer.attach_fd(fd);
      (void)MsgQueue::reply(std::move(*m));
    }
  });
  auto b = c.remote->buffer(16);
  ASSERT_TRUE(b);
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(c.remote->call(*b, secs(10)));
  const std::size_t fds0 = os::open_fd_count();
  for (int i = 0; i < 300; ++i) ASSERT_TRUE(c.remote->call(*b, secs(10)));
  const std::size_t fds1 = os::open_fd_count();
  stop.store(true);
  server.join();
  std::printf("fds: %zu -> %zu over 300 replies with an fd each\n", fds0, fds1);
  EXPECT_LE(fds1, fds0 + 4);
}

// Suspicion: a link thread that cannot be created (the std::system_error path of accept()) leaks
// the slot, the link or the remote connection.
TEST(ReviewBridge, AThreadThatCannotBeCreatedLeavesNoSlotAndNoLink) {
  test::Watchdog dog("the test", 60s);
  net::BridgeOptions opt;
  opt.max_connections = 1;
  auto bridge = make_bridge(opt);
  ASSERT_TRUE(bridge) << bridge.error().message();
  {  // warm-up: net's keeper thread exists before thread creation is made to fail
    auto w = connect_and_accept(*bridge);
    ASSERT_TRUE(w.remote) << w.remote.error().message();
    ASSERT_TRUE(w.end) << w.end.error().message();
  }
  const Deadline d = secs(5);
  while (bridge->stats().live != 0 && !d.expired()) os::sleep_ns(1'000'000);
  ASSERT_EQ(bridge->stats().live, 0u);
  Result<net::Channel> remote = fail(Errc::TimedOut, "not run");
  const std::string u = url(bridge->port());
  std::thread t([&] { remote = net::connect(u, secs(10)); });
  g_fail_pthread_create = true;
  auto end = bridge->accept(secs(10));
  g_fail_pthread_create = false;
  t.join();
  ASSERT_FALSE(end);
  EXPECT_EQ(end.error().code, Errc::System) << end.error().message();
  EXPECT_EQ(bridge->stats().live, 0u);
  if (remote) {  // its channel was closed: its call ends with PeerClosed, not at its deadline
    auto b = remote->buffer(8);
    Status s = b ? remote->call(*b, secs(5)) : Status(fail(b.error()));
    ASSERT_FALSE(s);
    EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
  }
  auto c = connect_and_accept(*bridge);  // the one slot is free
  ASSERT_TRUE(c.end) << c.end.error().message();
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  EchoServer server(*c.end);
  auto b = c.remote->buffer(8);
  ASSERT_TRUE(b);
  EXPECT_TRUE(c.remote->call(*b, secs(10)));
}

// FINDING (low: out of memory only), fixed (catch (...), joinable()): accept() catches
// std::system_error from std::thread's constructor, not std::bad_alloc (its state is allocated
// before pthread_create). Then the exception escapes accept() (a Result API) with the Link left in
// links_: live_ stays counted (a max_connections slot lost for good), the remote connection stays
// open with no thread reading it (its client's calls end only at their own deadline), and ~Bridge
// calls join() on the Link's non-joinable std::thread: std::system_error inside a noexcept
// destructor, std::terminate. Reproduced by failing the last operator new of accept() (its
// allocations counted in a dry run with the client's connect() already complete, so that the count
// does not depend on timing); ~Bridge is run in a forked child (glibc: joining the parent's threads
// there returns at once).
TEST(ReviewBridge, BadAllocForTheLinkThreadIsAnErrorAndGivesTheSlotBack) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizers own operator new and join";
#endif
  test::Watchdog dog("the test", 60s);
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  const std::string u = url(bridge->port());
  // An idle link: its thread progresses the listener's worker, so that a connect() completes
  // with nobody in accept().
  auto c0 = connect_and_accept(*bridge);
  ASSERT_TRUE(c0.remote) << c0.remote.error().message();
  ASSERT_TRUE(c0.end) << c0.end.error().message();
  // Connects, then accepts with this thread's allocations counted; fail_at > 0 makes that
  // allocation throw.
  auto accept_counted = [&](int fail_at, int& count, Result<net::Channel>& remote,
                            bool& threw) -> Result<Channel> {
    remote = net::connect(u, secs(10));
    threw = false;
    if (!remote) return fail(remote.error());
    g_new_fail = fail_at;
    g_new_count = 0;
    Result<Channel> end = fail(Errc::TimedOut, "threw");
    try {
      end = bridge->accept(secs(10));
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    count = g_new_count;
    g_new_count = -1;
    g_new_fail = 0;
    return end;
  };
  int n = 0;
  bool threw = false;
  Result<net::Channel> r1 = fail(Errc::TimedOut, "");
  {
    auto end = accept_counted(0, n, r1, threw);
    ASSERT_TRUE(end) << end.error().message();
    ASSERT_GT(n, 0);
  }
  r1->close();
  const Deadline d = secs(5);
  while (bridge->stats().live != 1 && !d.expired()) os::sleep_ns(1'000'000);
  ASSERT_EQ(bridge->stats().live, 1u);
  int n2 = 0;
  Result<net::Channel> r2 = fail(Errc::TimedOut, "");
  auto end2 = accept_counted(n, n2, r2, threw);
  ASSERT_TRUE(r2) << r2.error().message();
  std::printf("accept(): %d allocations; the last one failed: %s, live %llu\n", n,
              threw ? "std::bad_alloc escaped accept()" : "no exception",
              static_cast<unsigned long long>(bridge->stats().live));
  EXPECT_FALSE(threw) << "an exception out of a Result API";
  EXPECT_EQ(bridge->stats().live, 1u) << "the slot is lost";
  if (r2) {  // nobody forwards for it: its call ends at its own deadline, not with PeerClosed
    auto b = r2->buffer(8);
    Status s = b ? r2->call(*b, secs(2)) : Status(fail(b.error()));
    EXPECT_FALSE(s);
    if (!s) {
      EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
    }
  }
  const pid_t child = test::spawn(
      [&] {
        *bridge = net::Bridge{};
        return 0;
      },
      10);
  EXPECT_EQ(join(child), 0) << "134: SIGABRT, std::terminate in ~Bridge";
  if (threw) (void)new net::Bridge(std::move(*bridge));  // leaked: its destructor would terminate
}

}  // namespace
}  // namespace mbmq
