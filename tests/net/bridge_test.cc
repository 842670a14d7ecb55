// net::Bridge (mbmq/net_bridge.h): remote clients over UCX's TCP transport on loopback, served by
// the same MsgQueue loop as local ones. The remote clients are threads of this process (their own
// UCX workers), or, to be killed, programs spawned from this binary (a child forked after UCX is
// loaded could not use it).
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/mbmq.h"
#include "mbmq/net.h"
#include "mbmq/net_bridge.h"
#include "net/net_pair.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::connect_and_accept;
using test::join;
using test::make_bridge;
using test::secs;
using test::url;

// The server's answer: every byte + 1, and one byte 0x5a more.
void transform(Buffer& b) {
  for (auto& x : b.data()) x = static_cast<std::byte>(static_cast<unsigned>(x) + 1);
  const std::size_t n = b.size();
  if (b.resize(n + 1)) b.data()[n] = std::byte{0x5a};
}

// One call of `size` bytes with content `seq` on a local or a remote channel; the answer checked.
template <class Ch>
::testing::AssertionResult call_and_check(Ch& ch, std::uint64_t seq, std::size_t size) {
  auto b = ch.buffer(size);
  if (!b) return ::testing::AssertionFailure() << "buffer: " << b.error().message();
  test::fill(b->data(), seq);
  if (auto s = ch.call(*b, secs(10)); !s)
    return ::testing::AssertionFailure() << "call " << seq << ": " << s.error().message();
  if (b->size() != size + 1) return ::testing::AssertionFailure() << "size " << b->size();
  for (std::size_t i = 0; i < size; ++i)
    if (b->data()[i] != static_cast<std::byte>(static_cast<unsigned>(test::pattern(seq, i)) + 1))
      return ::testing::AssertionFailure() << "byte " << i << " of call " << seq;
  if (b->data()[size] != std::byte{0x5a}) return ::testing::AssertionFailure() << "last byte";
  return ::testing::AssertionSuccess();
}

// One MsgQueue loop on a thread of its own: answers every request with transform(), unless
// `hook` takes it (returns true: it keeps or drops the message itself); records which keys ended.
class Server {
 public:
  using Hook = std::function<bool(Message&)>;
  explicit Server(Hook hook = {}) : hook_(std::move(hook)) {
    auto q = MsgQueue::create();
    EXPECT_TRUE(q);
    queue_ = std::move(*q);
    thread_ = std::thread([this] { loop(); });
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  ~Server() { stop(); }
  void stop() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
  }
  MsgQueue& queue() { return queue_; }
  // Waits until the queue delivered Kind::PeerClosed for `key`.
  bool wait_closed(std::uint64_t key, Deadline d) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, std::chrono::nanoseconds(std::max<std::int64_t>(d.remaining_ns(), 0)),
                        [&] { return closed_.count(key) != 0; });
  }
  std::uint64_t answered(std::uint64_t key) {
    std::lock_guard lock(mu_);
    return answered_[key];
  }

 private:
  void loop() {
    auto next = [&] { return queue_.wait(Deadline::after(20ms)); };
    Result<Message> m = next();
    while (!stop_.load()) {
      if (!m) {
        EXPECT_EQ(m.error().code, Errc::TimedOut) << m.error().message();
        m = next();
        continue;
      }
      const std::uint64_t key = m->key;
      if (m->kind == Kind::Request && !(hook_ && hook_(*m))) {
        transform(m->buffer);
        {
          std::lock_guard lock(mu_);
          ++answered_[key];
        }
        m = queue_.reply_and_wait(std::move(*m), Deadline::after(20ms));
        continue;
      }
      if (m->kind == Kind::PeerClosed) {
        std::lock_guard lock(mu_);
        closed_[key] = m->error;
        cv_.notify_all();
      }
      m = next();
    }
  }

  MsgQueue queue_;
  Hook hook_;
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::uint64_t, Errc> closed_;
  std::map<std::uint64_t, std::uint64_t> answered_;
  std::thread thread_;
};

// A flag one thread raises and another waits for, with a deadline.
class Event {
 public:
  void set() {
    std::lock_guard lock(mu_);
    set_ = true;
    cv_.notify_all();
  }
  bool wait(std::chrono::milliseconds limit) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, limit, [&] { return set_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

std::size_t thread_count() { return os::dir_listing("/proc/self/task").size(); }

TEST(NetBridge, OneQueueServesALocalClientAndTwoRemoteClientsAtOnce) {
  test::Watchdog dog("the test", 60s);
  Server server;
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  const std::string u = url(bridge->port());

  auto local = Channel::pair();
  ASSERT_TRUE(local);
  ASSERT_TRUE(local->second.redirect(server.queue(), 1));

  constexpr int kCalls = 300;
  std::atomic<int> ok{0};
  std::vector<std::thread> clients;
  for (int c = 0; c < 2; ++c)
    clients.emplace_back([&, c] {
      auto ch = net::connect(u, secs(10));
      ASSERT_TRUE(ch) << ch.error().message();
      for (int i = 0; i < kCalls; ++i) {
        const auto seq = static_cast<std::uint64_t>(c * 100'000 + i);
        ASSERT_TRUE(call_and_check(*ch, seq, 1 + static_cast<std::size_t>(i) * 13 % 3000));
        ok.fetch_add(1);
      }
    });
  for (std::uint64_t key : {std::uint64_t{100}, std::uint64_t{101}}) {
    auto ch = bridge->accept(secs(10));
    ASSERT_TRUE(ch) << ch.error().message();
    ASSERT_TRUE(server.queue().adopt(std::move(*ch), key));
  }
  clients.emplace_back([&] {
    for (int i = 0; i < kCalls; ++i) {
      ASSERT_TRUE(call_and_check(local->first, 500'000 + static_cast<std::uint64_t>(i), 64));
      ok.fetch_add(1);
    }
  });
  for (auto& t : clients) t.join();
  EXPECT_EQ(ok.load(), 3 * kCalls);
  EXPECT_EQ(server.answered(1), std::uint64_t{kCalls});
  EXPECT_EQ(server.answered(100), std::uint64_t{kCalls});
  EXPECT_EQ(server.answered(101), std::uint64_t{kCalls});
  // The remote clients left (their channels closed with their threads): PeerClosed for each.
  EXPECT_TRUE(server.wait_closed(100, secs(10)));
  EXPECT_TRUE(server.wait_closed(101, secs(10)));
  const net::BridgeStats s = bridge->stats();
  EXPECT_EQ(s.accepted, 2u);
  EXPECT_EQ(s.calls, 2u * kCalls);
  EXPECT_EQ(s.no_reply, 0u);
}

// Payloads above the local slot size (extents) and above UCX's eager size (rendezvous) cross the
// bridge both ways; an empty request too.
TEST(NetBridge, LargeAndEmptyPayloadsCrossTheBridge) {
  test::Watchdog dog("the test", 60s);
  Server server;
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  ASSERT_TRUE(c.end) << c.end.error().message();
  ASSERT_TRUE(server.queue().adopt(std::move(*c.end), 1));
  std::uint64_t seq = 0;
  for (std::size_t size : {std::size_t{0}, std::size_t{65'535}, std::size_t{65'537},
                           (std::size_t{1} << 20) - 3, (std::size_t{8} << 20) - 3})
    EXPECT_TRUE(call_and_check(*c.remote, seq++, size)) << size;
  EXPECT_EQ(bridge->stats().calls, 5u);
}

// One-way messages from a remote client arrive on the queue as Kind::Message, in order with its
// calls.
TEST(NetBridge, OneWayMessagesArriveOnTheQueue) {
  test::Watchdog dog("the test", 30s);
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c_ch = connect_and_accept(*bridge);
  ASSERT_TRUE(c_ch.remote) << c_ch.remote.error().message();
  auto& ch = c_ch.remote;
  auto& end = c_ch.end;
  ASSERT_TRUE(end) << end.error().message();
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(end->redirect(*q, 9));
  for (std::uint8_t i = 0; i < 20; ++i) {
    auto b = ch->buffer(3);
    ASSERT_TRUE(b);
    b->data()[0] = std::byte{i};
    ASSERT_TRUE(ch->send(std::move(*b)));
  }
  for (std::uint8_t i = 0; i < 20; ++i) {
    auto m = q->wait(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Message);
    ASSERT_EQ(m->key, 9u);
    ASSERT_EQ(m->buffer.size(), 3u);
    EXPECT_EQ(m->buffer.data()[0], std::byte{i});
  }
  // The bridge counts a message once its local send() has returned, which may be after the
  // queue delivered it (CI, 2026-12-02: 19 of 20): a moment for the count.
  for (const Deadline d = secs(5); bridge->stats().messages < 20u && !d.expired();)
    os::sleep_ns(1'000'000);
  EXPECT_EQ(bridge->stats().messages, 20u);
}

// Not a test: the client NetBridge.AKilledRemoteClient... kills, run as a fresh program. It
// connects to $MBMQ_NET_URL and calls; the server holds the call until it is killed.
TEST(BridgeHelper, DISABLED_ClientThatCallsAndIsKilled) {
  const char* u = std::getenv("MBMQ_NET_URL");
  if (u == nullptr) GTEST_SKIP() << "a helper of AKilledRemoteClient...";
  auto ch = net::connect(u, secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  auto b = ch->buffer(64);
  ASSERT_TRUE(b);
  (void)ch->call(*b, secs(60));
}

TEST(NetBridge, AKilledRemoteClientIsPeerClosedOnTheQueueAndTheOthersGoOn) {
  test::Watchdog dog("the test", 60s);
  constexpr std::uint64_t kVictim = 7, kOther = 8;
  Event got, killed;
  Server server([&](Message& m) {
    if (m.key != kVictim) return false;
    got.set();
    // The call is in flight (held here) while the client is killed; then it is answered, to a
    // client that is gone.
    EXPECT_TRUE(killed.wait(20s));
    return false;
  });
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();
  const std::string u = url(bridge->port());

  auto c_other = connect_and_accept(*bridge);
  ASSERT_TRUE(c_other.remote) << c_other.remote.error().message();
  auto& other = c_other.remote;
  auto& other_end = c_other.end;
  ASSERT_TRUE(other_end) << other_end.error().message();
  ASSERT_TRUE(server.queue().adopt(std::move(*other_end), kOther));
  EXPECT_TRUE(call_and_check(*other, 1, 64));

  auto pid =
      test::spawn_helper("BridgeHelper.DISABLED_ClientThatCallsAndIsKilled", {"MBMQ_NET_URL=" + u});
  ASSERT_TRUE(pid) << pid.error().message();
  auto victim_end = bridge->accept(secs(10));
  ASSERT_TRUE(victim_end) << victim_end.error().message();
  ASSERT_TRUE(server.queue().adopt(std::move(*victim_end), kVictim));
  ASSERT_TRUE(got.wait(10s));
  ASSERT_TRUE(os::kill_process(*pid, SIGKILL));
  EXPECT_EQ(join(*pid), 128 + SIGKILL);
  const std::int64_t t0 = monotonic_ns();
  killed.set();
  EXPECT_TRUE(server.wait_closed(kVictim, secs(10)));
  std::printf("kill -> PeerClosed on the queue: %.1f ms\n",
              static_cast<double>(monotonic_ns() - t0) / 1e6);
  for (std::uint64_t i = 2; i < 50; ++i) EXPECT_TRUE(call_and_check(*other, i, 100));
  // The victim's link counts itself out after closing the local end the queue saw (B4), so the
  // count may lag the PeerClosed (2 instead of 1 once, CI 2026-12-02): up to 5 s for it.
  for (const Deadline end = secs(5); bridge->stats().live != 1 && !end.expired();)
    std::this_thread::sleep_for(1ms);
  EXPECT_EQ(bridge->stats().live, 1u);
}

TEST(NetBridge, TheServerClosingItsEndEndsTheRemoteCallWithPeerClosed) {
  test::Watchdog dog("the test", 60s);
  constexpr std::uint64_t kBusy = 3, kIdle = 4;
  std::mutex mu;
  Channel busy_end;  // the server's handle, closed while a call is in flight
  Server server([&](Message& m) {
    if (m.key != kBusy) return false;
    std::lock_guard lock(mu);
    busy_end.close();
    return true;  // the request is dropped after the close: the caller must see PeerClosed
  });
  auto bridge = make_bridge();
  ASSERT_TRUE(bridge) << bridge.error().message();

  auto c_busy = connect_and_accept(*bridge);
  ASSERT_TRUE(c_busy.remote) << c_busy.remote.error().message();
  auto& busy = c_busy.remote;
  auto& end = c_busy.end;
  ASSERT_TRUE(end) << end.error().message();
  {
    std::lock_guard lock(mu);
    busy_end = std::move(*end);
    ASSERT_TRUE(busy_end.redirect(server.queue(), kBusy));
  }
  auto c_idle = connect_and_accept(*bridge);
  ASSERT_TRUE(c_idle.remote) << c_idle.remote.error().message();
  auto& idle = c_idle.remote;
  auto& idle_end = c_idle.end;
  ASSERT_TRUE(idle_end) << idle_end.error().message();
  ASSERT_TRUE(idle_end->redirect(server.queue(), kIdle));
  EXPECT_TRUE(call_and_check(*idle, 1, 64));

  // A call in flight when the server closes its end.
  auto b = busy->buffer(64);
  ASSERT_TRUE(b);
  std::int64_t t0 = monotonic_ns();
  Status s = busy->call(*b, secs(20));
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
  EXPECT_LT(monotonic_ns() - t0, 5'000'000'000);

  // An idle client: its channel is closed within poll_interval, and its next call (or one that
  // races the close) ends with PeerClosed.
  idle_end->close();
  t0 = monotonic_ns();
  auto r = idle->receive(secs(10));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->kind, Kind::PeerClosed);
  std::printf("idle remote client sees the server's close after %.1f ms\n",
              static_cast<double>(monotonic_ns() - t0) / 1e6);
  auto b2 = idle->buffer(64);
  Status s2 = b2 ? idle->call(*b2, secs(10)) : Status(fail(b2.error()));
  ASSERT_FALSE(s2);
  EXPECT_EQ(s2.error().code, Errc::PeerClosed) << s2.error().message();
}

TEST(NetBridge, DestroyingTheBridgeWithLiveConnectionsJoinsEveryThreadAndLeaksNothing) {
  test::Watchdog dog("the test", 60s);
  // Warm up: UCX's context, its async thread, mbmq::net's keeper and the core's watcher stay.
  {
    Server server;
    auto bridge = make_bridge();
    ASSERT_TRUE(bridge) << bridge.error().message();
    auto c_ch = connect_and_accept(*bridge);
    ASSERT_TRUE(c_ch.remote) << c_ch.remote.error().message();
    auto& ch = c_ch.remote;
    auto& end = c_ch.end;
    ASSERT_TRUE(end);
    ASSERT_TRUE(server.queue().adopt(std::move(*end), 1));
    EXPECT_TRUE(call_and_check(*ch, 1, 64));
  }
  const Deadline settle = secs(10);
  std::size_t fds0 = os::open_fd_count(), threads0 = thread_count();
  // Closed endpoints' sockets may linger in UCX for a moment: the lowest counts seen.
  while (!settle.expired()) {
    os::sleep_ns(20'000'000);
    const std::size_t f = os::open_fd_count(), t = thread_count();
    if (f >= fds0 && t >= threads0) break;
    fds0 = std::min(fds0, f);
    threads0 = std::min(threads0, t);
  }

  std::vector<Message> held;  // requests the server keeps: their calls are in flight
  std::mutex mu;
  Event got;
  auto server = std::make_unique<Server>([&](Message& m) {
    if (m.key < 20) return false;
    std::lock_guard lock(mu);
    held.push_back(std::move(m));
    got.set();
    return true;
  });
  constexpr int kClients = 4;
  std::vector<net::Channel> clients;
  {
    auto bridge = make_bridge();
    ASSERT_TRUE(bridge) << bridge.error().message();
    for (int i = 0; i < kClients; ++i) {
      auto c_ch = connect_and_accept(*bridge);
      ASSERT_TRUE(c_ch.remote) << c_ch.remote.error().message();
      auto& ch = c_ch.remote;
      auto& end = c_ch.end;
      ASSERT_TRUE(end) << end.error().message();
      ASSERT_TRUE(server->queue().adopt(std::move(*end), 10 + static_cast<std::uint64_t>(i)));
      EXPECT_TRUE(call_and_check(*ch, 1, 64));
      clients.push_back(std::move(*ch));
    }
    // One more, with a call held by the server when the bridge goes.
    auto c_held_ch = connect_and_accept(*bridge);
    ASSERT_TRUE(c_held_ch.remote) << c_held_ch.remote.error().message();
    auto& held_ch = c_held_ch.remote;
    auto& end = c_held_ch.end;
    ASSERT_TRUE(end);
    ASSERT_TRUE(server->queue().adopt(std::move(*end), 20));
    std::thread caller([&] {
      auto b = held_ch->buffer(64);
      ASSERT_TRUE(b);
      Status s = held_ch->call(*b, secs(20));
      ASSERT_FALSE(s);
      EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
    });
    ASSERT_TRUE(got.wait(10s));
    EXPECT_EQ(bridge->stats().live, kClients + 1u);
    const std::int64_t t0 = monotonic_ns();
    *bridge = net::Bridge{};  // destroyed
    const std::int64_t took = monotonic_ns() - t0;
    std::printf("~Bridge with %d connections: %.1f ms\n", kClients + 1,
                static_cast<double>(took) / 1e6);
    EXPECT_LT(took, 2'000'000'000);
    caller.join();
  }
  // Every remote client sees PeerClosed; every local end on the queue too.
  for (auto& ch : clients) {
    auto m = ch.receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(m->kind, Kind::PeerClosed);
  }
  for (std::uint64_t k = 10; k < 10 + kClients; ++k) EXPECT_TRUE(server->wait_closed(k, secs(10)));
  EXPECT_TRUE(server->wait_closed(20, secs(10)));
  clients.clear();
  server->stop();
  {
    std::lock_guard lock(mu);
    held.clear();
  }
  server.reset();  // its queue's fds
  const Deadline d = secs(10);
  while ((os::open_fd_count() > fds0 || thread_count() > threads0) && !d.expired())
    os::sleep_ns(10'000'000);
  EXPECT_LE(os::open_fd_count(), fds0);
  EXPECT_LE(thread_count(), threads0);
}

TEST(NetBridge, ConnectionsPastTheLimitAreClosedWithBusyAndTheOthersGoOn) {
  test::Watchdog dog("the test", 60s);
  Server server;
  net::BridgeOptions opt;
  opt.max_connections = 2;
  auto bridge = make_bridge(opt);
  ASSERT_TRUE(bridge) << bridge.error().message();
  std::vector<net::Channel> in;
  for (std::uint64_t k = 1; k <= 2; ++k) {
    auto c_ch = connect_and_accept(*bridge);
    ASSERT_TRUE(c_ch.remote) << c_ch.remote.error().message();
    auto& ch = c_ch.remote;
    auto& end = c_ch.end;
    ASSERT_TRUE(end) << end.error().message();
    ASSERT_TRUE(server.queue().adopt(std::move(*end), k));
    in.push_back(std::move(*ch));
  }
  // The third: closed by the bridge as soon as it is accepted; accept() says why. Its client sees
  // PeerClosed, from connect() if the close overtakes the hello's answer, else from its first call.
  auto c_third = connect_and_accept(*bridge);
  auto& refused = c_third.end;
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::Busy);
  EXPECT_NE(std::string(refused.error().op).find("max_connections"), std::string::npos);
  auto& third = c_third.remote;
  if (third) {
    auto b = third->buffer(64);
    Status s = b ? third->call(*b, secs(10)) : Status(fail(b.error()));
    ASSERT_FALSE(s);
    EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
  } else {
    EXPECT_EQ(third.error().code, Errc::PeerClosed) << third.error().message();
  }
  EXPECT_EQ(bridge->stats().refused_limit, 1u);
  for (auto& ch : in) EXPECT_TRUE(call_and_check(ch, 3, 64));

  // One leaves: its slot is free again once its thread ended.
  in[0].close();
  EXPECT_TRUE(server.wait_closed(1, secs(10)));
  const Deadline d = secs(10);
  while (bridge->stats().live != 1 && !d.expired()) os::sleep_ns(1'000'000);
  ASSERT_EQ(bridge->stats().live, 1u);
  auto c_fourth = connect_and_accept(*bridge);
  ASSERT_TRUE(c_fourth.remote) << c_fourth.remote.error().message();
  auto& fourth = c_fourth.remote;
  auto& end = c_fourth.end;
  ASSERT_TRUE(end) << end.error().message();
  ASSERT_TRUE(server.queue().adopt(std::move(*end), 4));
  EXPECT_TRUE(call_and_check(*fourth, 4, 64));
  EXPECT_TRUE(call_and_check(in[1], 5, 64));
}

// A request the server holds past call_timeout is answered NoReply by the bridge (the bridge's
// wait is bounded whatever the remote caller's deadline); the link goes on, and the server's late
// answer is dropped.
TEST(NetBridge, ARequestHeldPastCallTimeoutIsAnsweredNoReplyAndTheLinkGoesOn) {
  test::Watchdog dog("the test", 30s);
  std::mutex mu;
  std::vector<Message> held;
  Server server([&](Message& m) {
    if (m.buffer.size() != 1) return false;
    std::lock_guard lock(mu);
    held.push_back(std::move(m));  // held, answered only after the bridge gave up
    return true;
  });
  net::BridgeOptions opt;
  opt.call_timeout = 200ms;
  auto bridge = make_bridge(opt);
  ASSERT_TRUE(bridge) << bridge.error().message();
  auto c = connect_and_accept(*bridge);
  ASSERT_TRUE(c.remote) << c.remote.error().message();
  ASSERT_TRUE(c.end) << c.end.error().message();
  ASSERT_TRUE(server.queue().adopt(std::move(*c.end), 1));
  auto b = c.remote->buffer(1);
  ASSERT_TRUE(b);
  const std::int64_t t0 = monotonic_ns();
  Status s = c.remote->call(*b, secs(10));
  const std::int64_t took = monotonic_ns() - t0;
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::NoReply) << s.error().message();
  EXPECT_GE(took, 190'000'000);
  EXPECT_LT(took, 5'000'000'000);
  EXPECT_EQ(bridge->stats().no_reply, 1u);
  {
    std::lock_guard lock(mu);
    ASSERT_EQ(held.size(), 1u);
    (void)MsgQueue::reply(std::move(held[0]));  // late: dropped by the bridge's end
    held.clear();
  }
  for (std::uint64_t i = 0; i < 10; ++i) EXPECT_TRUE(call_and_check(*c.remote, i, 64));
}

TEST(NetBridge, BadOptionsAreInvalidArgument) {
  net::BridgeOptions opt;
  opt.max_connections = 0;
  auto b = make_bridge(opt);
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, Errc::InvalidArgument);
  auto none = net::Bridge::create(net::Listener{});
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::InvalidArgument);
  net::Bridge empty;
  auto a = empty.accept(Deadline::immediate());
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, Errc::InvalidArgument);
}

}  // namespace
}  // namespace mbmq
