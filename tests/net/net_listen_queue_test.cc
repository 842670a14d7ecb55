// mbmq::net: a Listener redirected to a MsgQueue (net::Listener::redirect, net::accepted; issue
// #19; docs/design/net.md, "Redirect to a MsgQueue", Q6). New remote connections arrive on the
// server's queue as Kind::Connection, beside its local listener's, and are adopted there: one loop,
// no thread of the application in accept().
#include <poll.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/mbmq.h"
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
using test::remote_call;
using test::secs;
using test::url;

constexpr std::uint64_t kRemoteListener = 1, kLocalListener = 2;

std::string unique_name(const char* what) {
  static int n = 0;
  return std::string("test-lq-") + what + "-" + std::to_string(os::current_pid()) + "-" +
         std::to_string(n++);
}

// The server loop: connections (remote and local) adopted with keys from 100 on (or, with
// adopt false, their remote end dropped); every request's bytes + 1 back, in place; ends counted.
class Loop {
 public:
  explicit Loop(MsgQueue& q, bool adopt = true) : q_(q), adopt_(adopt), t_([this] { run(); }) {}
  ~Loop() {
    stop_.store(true);
    t_.join();
  }
  Loop(const Loop&) = delete;
  Loop& operator=(const Loop&) = delete;

  std::atomic<int> remote{0}, local{0}, requests{0}, ends{0}, failures{0};
  std::mutex mu;
  std::set<std::uint64_t> keys;  // of the connections' messages: the listeners' keys

 private:
  void run() {
    std::uint64_t next = 100;
    while (!stop_.load()) {
      auto m = q_.wait(Deadline::after(20ms));
      if (!m) continue;
      switch (m->kind) {
        case Kind::Connection: {
          {
            std::lock_guard lock(mu);
            keys.insert(m->key);
          }
          if (m->channel.is_remote()) {  // a net::Listener's: a remote mbmq::Channel
            if (!m->channel.valid()) {
              ++failures;
              break;
            }
            ++remote;
            // Half through MsgQueue::adopt (the local servers' code), half taken out as a
            // net::Channel (net::accepted) and net::adopt()ed.
            if (adopt_ && (next % 2 == 0)) {
              if (!q_.adopt(std::move(m->channel), next++)) ++failures;
            } else if (adopt_) {
              auto ch = net::accepted(*m);
              if (!ch || m->channel.valid() || !net::adopt(q_, std::move(*ch), next++)) ++failures;
            }
          } else {
            ++local;
            if (!q_.adopt(std::move(m->channel), next++)) ++failures;
          }
          break;
        }
        case Kind::Request:
          ++requests;
          for (std::byte& b : m->buffer.data())
            b = static_cast<std::byte>(std::to_integer<int>(b) + 1);
          (void)MsgQueue::reply(std::move(*m));
          break;
        case Kind::PeerClosed:
          ++ends;
          break;
        default:
          break;
      }
    }
  }

  MsgQueue& q_;
  const bool adopt_;
  std::atomic<bool> stop_{false};
  std::thread t_;
};

bool local_call(Channel& ch, std::size_t size, char c) {
  auto b = ch.buffer(size);
  if (!b) return false;
  std::memset(b->data().data(), c, size);
  Status s = ch.call(*b, secs(10));
  if (!s) {
    ADD_FAILURE() << "local call: " << s.error().message();
    return false;
  }
  for (std::byte x : b->data())
    if (x != static_cast<std::byte>(c + 1)) return false;
  return b->size() == size;
}

template <class Pred>
bool eventually(Pred p, std::chrono::seconds limit = 10s) {
  for (const Deadline d = Deadline::after(limit); !d.expired(); os::sleep_ns(1'000'000))
    if (p()) return true;
  return p();
}

// The "one server loop serves local and remote clients", now for new connections too:
// a local and a remote listener on one queue, their clients connecting while the loop runs.
TEST(NetListenQueue, OneLoopServesNewLocalAndRemoteConnections) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto nl = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(nl) << nl.error().message();
  const std::string name = unique_name("both");
  auto ll = Listener::create(name);
  ASSERT_TRUE(ll) << ll.error().message();
  ASSERT_TRUE(nl->redirect(*q, kRemoteListener));
  ASSERT_TRUE(ll->redirect(*q, kLocalListener));
  Loop loop(*q);
  std::vector<std::thread> clients;
  std::atomic<int> ok{0};
  for (int i = 0; i < 3; ++i) {
    clients.emplace_back([&, i] {
      auto ch = net::connect(url(nl->port()), secs(10));
      ASSERT_TRUE(ch) << ch.error().message();
      int good = 0;
      for (int k = 0; k < 20; ++k)
        good += remote_call(*ch, 100 + 1000 * static_cast<std::size_t>(i), static_cast<char>(k));
      if (good == 20) ++ok;
    });
  }
  clients.emplace_back([&] {
    auto ch = connect(name, secs(10));
    ASSERT_TRUE(ch) << ch.error().message();
    int good = 0;
    for (int k = 0; k < 20; ++k) good += local_call(*ch, 64, static_cast<char>(k));
    if (good == 20) ++ok;
  });
  for (auto& t : clients) t.join();
  EXPECT_EQ(ok.load(), 4) << "every client's 20 calls answered, byte for byte";
  EXPECT_EQ(loop.remote.load(), 3);
  EXPECT_EQ(loop.local.load(), 1);
  EXPECT_EQ(loop.failures.load(), 0);
  EXPECT_EQ(loop.requests.load(), 80);
  {
    std::lock_guard lock(loop.mu);
    EXPECT_EQ(loop.keys, (std::set<std::uint64_t>{kRemoteListener, kLocalListener}));
  }
  EXPECT_EQ(nl->stats().accepted, 3u);
  // The clients are gone: each adopted channel's end reaches the loop.
  EXPECT_TRUE(eventually([&] { return loop.ends.load() == 4; })) << loop.ends.load() << " ends";
}

// Local parity (mbmq::Listener): once redirected, accept() is InvalidArgument, and a thread
// already inside accept() returns with it; a second redirect is InvalidArgument.
TEST(NetListenQueue, AcceptEndsOnceRedirectedAndASecondRedirectIsRefused) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  std::optional<Result<net::Channel>> got;
  std::atomic<std::int64_t> returned_ns{0};
  std::thread t([&] {
    got.emplace(l->accept(Deadline::never()));
    returned_ns = monotonic_ns();
  });
  os::sleep_ns(100'000'000);  // inside accept()
  const std::int64_t t0 = monotonic_ns();
  ASSERT_TRUE(l->redirect(*q, kRemoteListener));
  t.join();
  ASSERT_TRUE(got);
  ASSERT_FALSE(*got);
  EXPECT_EQ(got->error().code, Errc::InvalidArgument) << got->error().message();
  EXPECT_LT(returned_ns.load() - t0, 1'000'000'000) << "accept() returned late";
  auto again = l->accept(Deadline::immediate());
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::InvalidArgument);
  auto q2 = MsgQueue::create();
  ASSERT_TRUE(q2);
  Status s = l->redirect(*q2, 5);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::InvalidArgument) << s.error().message();
  net::Listener empty;
  EXPECT_EQ(empty.redirect(*q, 1).error().code, Errc::InvalidArgument);
  Message local;  // not a remote connection
  auto none = net::accepted(local);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::InvalidArgument);
}

// A connection the server drops unclaimed closes: its client's call ends with PeerClosed, not
// at its deadline, and nothing of it stays in the server.
TEST(NetListenQueue, AConnectionDroppedUnclaimedClosesAndItsClientSeesPeerClosed) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, kRemoteListener));
  Loop loop(*q, /*adopt=*/false);
  const std::int64_t c0 = monotonic_ns();
  auto ch = net::connect(url(l->port()), secs(10));
  ASSERT_TRUE(eventually([&] { return loop.remote.load() == 1; }));
  if (!ch) {  // the server's close overtook the end of the client's handshake
    EXPECT_EQ(ch.error().code, Errc::PeerClosed) << ch.error().message();
    EXPECT_LT(monotonic_ns() - c0, 5'000'000'000) << "connect() waited for its deadline";
    return;
  }
  auto b = ch->buffer(64);
  ASSERT_TRUE(b);
  const std::int64_t t0 = monotonic_ns();
  Status s = ch->call(*b, secs(10));
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
  EXPECT_LT(monotonic_ns() - t0, 5'000'000'000) << "the call waited for its deadline";
  EXPECT_EQ(q->channel_count(), 0u);
}

// Connections in handshake when the listener is redirected go on (the pump progresses them,
// with nobody in accept()) and reach the queue.
TEST(NetListenQueue, AConnectionInHandshakeAtTheRedirectIsDelivered) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  net::ListenOptions lo;
  lo.handshake_timeout = 5000ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  std::optional<Result<net::Channel>> c;
  std::thread t([&] { c.emplace(net::connect(url(l->port()), secs(10))); });
  os::sleep_ns(300'000'000);  // its connect() waits: nobody progresses the listener's worker
  ASSERT_TRUE(l->redirect(*q, kRemoteListener));
  Loop loop(*q);
  t.join();
  ASSERT_TRUE(*c) << (*c).error().message();
  EXPECT_TRUE(remote_call(**c, 4096, 'a'));
  EXPECT_EQ(loop.remote.load(), 1);
}

// Failed handshakes (no hello within handshake_timeout) are freed with nobody in accept(): the
// pump destroys what the keeper expired; the listener holds none of them for long.
TEST(NetListenQueue, FailedHandshakesAreFreedWithNobodyInAccept) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  net::ListenOptions lo;
  lo.handshake_timeout = 200ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, kRemoteListener));
  Loop loop(*q);
  constexpr int kSilent = 8;
  std::vector<std::unique_ptr<test::RawClient>> raws;
  for (int i = 0; i < kSilent; ++i) {
    raws.push_back(std::make_unique<test::RawClient>());
    ASSERT_TRUE(raws.back()->connect(l->port()));
  }
  // No hello from any. Each is dropped by the keeper after 200 ms and closed.
  for (const Deadline d = secs(10); !d.expired();) {
    bool all = true;
    for (auto& r : raws) {
      r->progress_for(2ms);
      all = all && r->failed.load();
    }
    if (all && l->stats().failed >= kSilent) break;
  }
  EXPECT_EQ(l->stats().failed, static_cast<std::uint64_t>(kSilent));
  for (auto& r : raws) EXPECT_TRUE(r->failed.load()) << "a silent client's endpoint stayed open";
  auto& core = *((*l).*get(test::ListenCoreOf{}));
  auto graveyard = [&] {
    os::LockGuard lock(core.w_->mu);
    return (core.*get(test::GraveyardOf{})).size();
  };
  EXPECT_TRUE(eventually([&] { return graveyard() == 0; }, 5s))
      << graveyard() << " failed connections still held by the listener";
  // And it still serves.
  auto ch = net::connect(url(l->port()), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_TRUE(remote_call(*ch, 64, 'z'));
  EXPECT_EQ(loop.remote.load(), 1);
}

// The queue destroyed while the listener is redirected: new connections are closed at once (the
// client's first call ends with PeerClosed), and accept() stays InvalidArgument.
TEST(NetListenQueue, AfterTheQueueIsDestroyedNewConnectionsAreClosed) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  {
    auto q = MsgQueue::create();
    ASSERT_TRUE(q);
    ASSERT_TRUE(l->redirect(*q, kRemoteListener));
  }
  auto ch = net::connect(url(l->port()), secs(10));
  if (ch) {  // connected, then closed by the server
    auto b = ch->buffer(64);
    ASSERT_TRUE(b);
    Status s = ch->call(*b, secs(10));
    ASSERT_FALSE(s) << "a call answered by a listener whose queue is gone";
    EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
  } else {
    EXPECT_NE(ch.error().code, Errc::TimedOut) << ch.error().message();
  }
  auto a = l->accept(Deadline::immediate());
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, Errc::InvalidArgument);
  auto& core = *((*l).*get(test::ListenCoreOf{}));
  EXPECT_TRUE(eventually([&] {
    os::LockGuard lock(core.w_->mu);
    return (core.*get(test::GraveyardOf{})).empty();
  }));
}

// The listener destroyed: its adopted connections go on being served; once they end, the pump
// thread ends too.
TEST(NetListenQueue, TheListenerDestroyedLeavesItsConnectionsServedAndThePumpEnds) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  // Warm-up: mbmq::net's own threads (keeper, allocator) exist from here on.
  {
    auto w = test::make_pair();
    ASSERT_TRUE(w);
  }
  const int pumps0 = net::detail::pumps_running();
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, kRemoteListener));
  EXPECT_EQ(net::detail::pumps_running(), pumps0 + 1);
  Loop loop(*q);
  auto ch = net::connect(url(l->port()), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_TRUE(remote_call(*ch, 64, 'a'));
  *l = net::Listener{};  // destroyed
  for (int i = 0; i < 10; ++i) EXPECT_TRUE(remote_call(*ch, 1000, static_cast<char>(i)));
  EXPECT_EQ(net::detail::pumps_running(), pumps0 + 1) << "the adopted channel still needs it";
  ch->close();
  EXPECT_TRUE(eventually([&] { return loop.ends.load() == 1; }));
  EXPECT_TRUE(eventually([&] { return net::detail::pumps_running() == pumps0; }))
      << "the pump outlived the listener and its last connection";
}

// Many clients connecting at once: each connection is delivered once, each served.
TEST(NetListenQueue, ManyClientsConnectingAtOnceAreEachDeliveredOnce) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 90s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, kRemoteListener));
  Loop loop(*q);
  constexpr int kClients = test::kSanitized ? 6 : 16;
  std::atomic<int> ok{0};
  std::vector<std::thread> ts;
  for (int i = 0; i < kClients; ++i) {
    ts.emplace_back([&, i] {
      auto ch = net::connect(url(l->port()), secs(30));
      ASSERT_TRUE(ch) << ch.error().message();
      int good = 0;
      for (int k = 0; k < 5; ++k) good += remote_call(*ch, 256, static_cast<char>(i + k), secs(30));
      if (good == 5) ++ok;
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(ok.load(), kClients);
  EXPECT_EQ(loop.remote.load(), kClients) << "a connection delivered twice, or lost";
  EXPECT_EQ(loop.requests.load(), 5 * kClients);
  EXPECT_EQ(l->stats().accepted, static_cast<std::uint64_t>(kClients));
  EXPECT_EQ(loop.failures.load(), 0);
}

// (N6) ListenOptions::backlog bounds what clients connecting in bulk make a listener hold (an
// endpoint and a socket each). Nobody in accept() (once one connection is accepted, the keeper
// progresses its worker, the listener's, and so the handshakes): the first `backlog` clients
// connect, the rest are refused and counted; once accept() takes one, the next client connects.
// Before, there was no bound.
// The clients run in a child process forked before this process loads UCX: Debian's UCX 1.13
// can abort (tcp_sockcm_ep.c:416, an assertion in its async thread) when a listener rejects
// clients of its own process (README "Not done yet"; CI hit it here once under ASan, 2026-12-03).
TEST(NetBacklog, ConnectionsBeyondTheBacklogAreRefusedUntilAcceptTakesOne) {
  // Under ASan's timing the listener's own process hit the assertion too (2 of 4 CI runs on
  // 2026-12-03, with the clients in this child): an upstream bug of UCX 1.13's reject path, not
  // ours; the Release build runs the test (0 of 30 runs failed, and every Release CI run).
  if (test::kSanitized)
    GTEST_SKIP() << "UCX 1.13 asserts in its reject path under sanitizer timing "
                    "(tcp_sockcm_ep.c:416): README, Not done yet";
  ::setenv("UCX_TLS", "tcp", 1);
  // Forked while this process has one thread (TSan refuses threads in a child forked from a
  // multi-threaded process): the watchdog starts after the fork.
  test::Pipe port = test::Pipe::make(), taken = test::Pipe::make(), ready = test::Pipe::make(),
             go = test::Pipe::make();
  // The child's exit code says which step failed (0: all as expected).
  const pid_t child = test::spawn(
      [&]() -> int {
        const std::uint32_t p = port.get();
        if (p == 0) return 2;
        auto first = net::connect(url(p), secs(10));  // accepted by the parent
        if (!first) return 3;
        if (taken.get() != 1) return 8;  // out of the backlog before the next ones
        std::vector<net::Channel> held;
        for (int i = 0; i < 3; ++i) {  // the backlog: connected, not yet accepted
          auto ch = net::connect(url(p), secs(10));
          if (!ch) return 4;
          held.push_back(std::move(*ch));
        }
        for (int i = 0; i < 2; ++i) {  // beyond it
          auto ch = net::connect(url(p), secs(10));
          if (ch || ch.error().code != Errc::Refused) return 5;
        }
        ready.put(1);
        if (go.get() != 1) return 6;  // the parent accepted one: room for one more
        auto last = net::connect(url(p), secs(10));
        return last ? 0 : 7;
      },
      60);
  ASSERT_GT(child, 0);
  test::Watchdog dog("the test", 90s);
  net::ListenOptions lo;
  lo.backlog = 3;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  port.put(l->port());
  auto s0 = l->accept(secs(10));
  ASSERT_TRUE(s0) << s0.error().message();
  taken.put(1);
  ASSERT_EQ(ready.get(), 1u) << "the child failed: exit " << test::join(child);
  EXPECT_EQ(l->stats().refused_backlog, 2u);
  auto s = l->accept(secs(10));
  ASSERT_TRUE(s) << s.error().message();
  go.put(1);
  std::vector<net::Channel> served;
  for (Deadline d = secs(10); l->stats().accepted < 5 && !d.expired();)
    if (auto c = l->accept(Deadline::after(10ms))) served.push_back(std::move(*c));
  EXPECT_EQ(test::join(child), 0);
  EXPECT_EQ(l->stats().accepted, 5u);
  net::ListenOptions zero;
  zero.backlog = 0;
  auto bad = net::listen("ucx://127.0.0.1:0/svc", zero);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::InvalidArgument);
}

// (N6) Redirected, the backlog counts connections delivered to the queue and not yet taken from
// it: a server that stops taking from its queue holds `backlog` of them, no more; once it takes
// one (MsgQueue::wait), the next client connects.
TEST(NetBacklog, ARedirectedListenerCountsConnectionsQueuedAndNotTaken) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 90s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  net::ListenOptions lo;
  lo.backlog = 3;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, kRemoteListener));
  std::vector<net::Channel> held;
  for (int i = 0; i < 3; ++i) {
    auto ch = net::connect(url(l->port()), secs(10));
    ASSERT_TRUE(ch) << i << ": " << ch.error().message();
    held.push_back(std::move(*ch));
  }
  auto refused = net::connect(url(l->port()), secs(10));
  ASSERT_FALSE(refused) << "a connection beyond the backlog";
  EXPECT_EQ(refused.error().code, Errc::Refused) << refused.error().message();
  EXPECT_EQ(l->stats().refused_backlog, 1u);
  auto m = q->wait(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Connection);
  auto taken = net::accepted(*m);
  ASSERT_TRUE(taken) << taken.error().message();
  auto ch = net::connect(url(l->port()), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_EQ(l->stats().refused_backlog, 1u);
}

// An event loop on the queue's fd sees a new remote connection: the fd becomes readable.
TEST(NetListenQueue, TheQueuesFdBecomesReadableForANewConnection) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, kRemoteListener));
  const int fd = q->fd();
  ASSERT_GE(fd, 0);
  while (q->wait(Deadline::immediate())) {  // arms the fd
  }
  std::optional<Result<net::Channel>> c;
  std::thread t([&] { c.emplace(net::connect(url(l->port()), secs(10))); });
  std::optional<Message> got;
  for (const Deadline d = secs(10); !d.expired() && !got;) {
    pollfd p{fd, POLLIN, 0};
    const int n = ::poll(&p, 1, 100);
    if (n <= 0) continue;
    for (auto m = q->wait(Deadline::immediate()); m; m = q->wait(Deadline::immediate()))
      if (m->kind == Kind::Connection) got.emplace(std::move(*m));
  }
  t.join();
  ASSERT_TRUE(got) << "no Kind::Connection through the fd";
  EXPECT_EQ(got->key, kRemoteListener);
  auto ch = net::accepted(*got);
  ASSERT_TRUE(ch) << ch.error().message();
  ASSERT_TRUE(*c) << (*c).error().message();
  ASSERT_TRUE(net::adopt(*q, std::move(*ch), 100));
  Loop loop(*q);
  EXPECT_TRUE(remote_call(**c, 64, 'q'));
}

}  // namespace
}  // namespace mbmq
