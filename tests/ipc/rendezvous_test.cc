// Named rendezvous between processes that did not share the channel by fork: listen/connect, the
// SO_PEERCRED policy, the handshake deadline, and names that are free again at once.
#include <gtest/gtest.h>

#include <atomic>
#include <climits>
#include <cstdio>
#include <string>
#include <thread>

#include "ipc/peer_watch.h"
#include "ipc/test_access.h"
#include "os/process.h"
#include "os/unix_socket.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::secs;
using test::spawn;

std::string unique_name(const char* what) {
  static int n = 0;
  return std::string("test-") + what + "-" + std::to_string(os::current_pid()) + "-" +
         std::to_string(n++);
}

int call_n(Channel& ch, int n) {
  auto b = ch.buffer(128);
  if (!b) return 40;
  for (int i = 0; i < n; ++i) {
    test::fill(b->data(), static_cast<std::uint64_t>(i));
    if (!ch.call(*b, secs(10))) return 41;
    if (!test::check(b->data(), static_cast<std::uint64_t>(i) + 1)) return 42;
  }
  return 0;
}

void serve_n(Channel& ch, int n) {
  for (int i = 0; i < n; ++i) {
    auto m = ch.receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Request);
    test::fill(m->buffer.data(), static_cast<std::uint64_t>(i) + 1);
    ASSERT_TRUE(MsgQueue::reply(std::move(*m)));
  }
}

TEST(Rendezvous, AProcessConnectsByNameAndCalls) {
  std::string name = unique_name("call");
  auto l = Listener::create(name);
  ASSERT_TRUE(l) << l.error().message();
  pid_t pid = spawn([&] {
    *l = Listener();  // the client keeps nothing of the server's
    auto ch = connect(name, secs(5));
    return ch ? call_n(*ch, 10) : 30;
  });
  auto ch = l->accept(secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  serve_n(*ch, 10);
  EXPECT_EQ(join(pid), 0);
}

TEST(Rendezvous, AnotherUidIsRefusedOnBothSidesAndGetsNoFd) {
  if (os::current_uid() != 0) GTEST_SKIP() << "needs root to play another uid";
  std::string name = unique_name("refuse");
  auto l = Listener::create(name);
  ASSERT_TRUE(l);
  const std::size_t fds0 = os::open_fd_count();
  pid_t pid = spawn([&] {
    if (!os::become_user(65534, 65534)) return 30;
    auto before = os::open_fd_count();
    auto ch = connect(name, secs(5));
    if (ch) return 31;
    if (ch.error().code != Errc::Refused) {
      std::fprintf(stderr, "client: %s\n", ch.error().message().c_str());
      return 32;
    }
    return os::open_fd_count() == before ? 0 : 33;  // no fd arrived with the refusal
  });
  auto ch = l->accept(Deadline::after(std::chrono::milliseconds(500)));
  ASSERT_FALSE(ch);
  EXPECT_EQ(ch.error().code, Errc::TimedOut);
  EXPECT_EQ(join(pid), 0);
  // The watcher thread sends the verdict, then closes its end: the client may have read it and
  // exited a moment before that close.
  for (Deadline d = secs(2); os::open_fd_count() != fds0 && !d.expired();)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(l->refused(), 1u);
  EXPECT_EQ(os::open_fd_count(), fds0);
}

TEST(Rendezvous, AnAllowListedUidIsAccepted) {
  if (os::current_uid() != 0) GTEST_SKIP() << "needs root to play another uid";
  std::string name = unique_name("allow");
  ListenOptions opt;
  opt.access.allow_uids = {65534};
  auto l = Listener::create(name, opt);
  ASSERT_TRUE(l);
  pid_t pid = spawn([&] {
    if (!os::become_user(65534, 65534)) return 30;
    auto ch = connect(name, secs(5));
    return ch ? call_n(*ch, 3) : 31;
  });
  auto ch = l->accept(secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  serve_n(*ch, 3);
  EXPECT_EQ(join(pid), 0);
}

TEST(Rendezvous, TheNameIsFreeAgainAsSoonAsTheListenerGoes) {
  std::string name = unique_name("reuse");
  auto a = Listener::create(name);
  ASSERT_TRUE(a);
  auto clash = Listener::create(name);
  ASSERT_FALSE(clash);
  EXPECT_EQ(clash.error().code, Errc::System);
  *a = Listener();
  auto b = Listener::create(name);
  EXPECT_TRUE(b) << b.error().message();
}

TEST(Rendezvous, ConnectingToNobodyFailsAtOnce) {
  auto t0 = monotonic_ns();
  auto ch = connect(unique_name("nobody"), secs(5));
  ASSERT_FALSE(ch);
  EXPECT_EQ(ch.error().code, Errc::System);
  EXPECT_LT(monotonic_ns() - t0, 1'000'000'000);
}

// #19: the core never speaks UCX; a ucx:// URL names mbmq::net, and the error says so.
TEST(Rendezvous, AUcxUrlIsInvalidArgumentPointingAtMbmqNet) {
  auto ch = connect("ucx://127.0.0.1:7000/kv", secs(5));
  ASSERT_FALSE(ch);
  EXPECT_EQ(ch.error().code, Errc::InvalidArgument);
  EXPECT_NE(std::string(ch.error().op).find("mbmq::net"), std::string::npos) << ch.error().op;
  auto l = Listener::create("ucx://127.0.0.1:7000/kv");
  ASSERT_FALSE(l);
  EXPECT_EQ(l.error().code, Errc::InvalidArgument);
  EXPECT_NE(std::string(l.error().op).find("mbmq::net"), std::string::npos) << l.error().op;
}

TEST(Rendezvous, ASilentClientCostsTheListenerOnlyItsHandshakeDeadline) {
  std::string name = unique_name("silent");
  ListenOptions opt;
  opt.handshake_timeout = std::chrono::milliseconds(50);
  auto l = Listener::create(name, opt);
  ASSERT_TRUE(l);
  auto silent = os::connect_abstract("mbmq:" + name);  // connects, never says hello
  ASSERT_TRUE(silent);
  pid_t pid = spawn([&] {
    *l = Listener();
    ::usleep(100'000);
    auto ch = connect(name, secs(5));
    return ch ? call_n(*ch, 2) : 30;
  });
  auto ch = l->accept(secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_EQ(l->failed_handshakes(), 1u);
  serve_n(*ch, 2);
  EXPECT_EQ(join(pid), 0);
}

TEST(Rendezvous, AnAdoptedChannelLivesInTheQueueUntilItsClientLeaves) {
  std::string name = unique_name("adopt");
  auto l = Listener::create(name);
  auto q = MsgQueue::create();
  ASSERT_TRUE(l && q);
  pid_t pid = spawn([&] {
    *l = Listener();
    auto ch = connect(name, secs(5));
    return ch ? call_n(*ch, 1) : 30;  // connect, one call (so that it is adopted), then leave
  });
  auto ch = l->accept(secs(10));
  ASSERT_TRUE(ch);
  ASSERT_TRUE(q->adopt(std::move(*ch), 9));
  EXPECT_EQ(q->channel_count(), 1u);
  auto m = q->wait(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Request);
  EXPECT_EQ(m->key, 9u);
  test::fill(m->buffer.data(), 1);
  m = q->reply_and_wait(std::move(*m), secs(10));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed);
  EXPECT_EQ(m->key, 9u);
  EXPECT_EQ(q->channel_count(), 0u);
  EXPECT_EQ(join(pid), 0);
}

TEST(Rendezvous, ARedirectedListenerDeliversConnectionsAndRequestsToOneLoop) {
  std::string name = unique_name("loop");
  constexpr int kClients = 3, kCalls = 5;
  // The clients are forked before this process has its watcher thread (the listener starts
  // it), and wait for a go. Forked while that thread handled an earlier client's handshake, a
  // child could inherit ASan's allocator lock held and deadlock in its first malloc (seen, with
  // gdb, in GCC 12's libasan: the third client hung in SizeClassAllocator64::GetFromAllocator).
  auto go = os::make_pipe();
  ASSERT_TRUE(go);
  std::vector<pid_t> pids;
  for (int c = 0; c < kClients; ++c) {
    pids.push_back(spawn([&] {
      go->second.reset();
      std::byte b{};
      if (!os::read_full(go->first.get(), {&b, 1}) || b != std::byte{1}) return 31;
      auto ch = connect(name, secs(5));
      return ch ? call_n(*ch, kCalls) : 30;
    }));
  }
  go->first.reset();
  auto l = Listener::create(name);
  auto q = MsgQueue::create();
  ASSERT_TRUE(l && q);
  ASSERT_TRUE(l->redirect(*q, 77));
  EXPECT_FALSE(l->accept(Deadline::immediate()));  // accept() is the queue's job now
  const std::byte ones[kClients] = {std::byte{1}, std::byte{1}, std::byte{1}};
  ASSERT_TRUE(os::write_full(go->second.get(), {ones, kClients}));
  int connections = 0, requests = 0, closed = 0;
  std::uint64_t next_key = 1;
  std::vector<std::span<std::byte>> segs;
  while (closed < kClients) {
    auto m = q->wait(secs(10));
    if (!m) {  // say what the clients did before failing (killing any that still runs)
      std::string codes;
      for (pid_t p : pids) (void)os::kill_process(p, SIGKILL);
      for (pid_t p : pids) {
        codes += ' ';  // (not " " + ...: GCC 12 warns falsely about that, -Wrestrict)
        codes += std::to_string(join(p));
      }
      std::string rings;
      for (auto seg : segs) {
        auto* d0 = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset);
        auto* d1 = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset +
                                                     sizeof(shm::Direction));
        rings += " [c->s tail " + std::to_string(d0->tail.load()) + " head " +
                 std::to_string(d0->head.load()) + " sleeping " +
                 std::to_string(d0->consumer_sleeping.load()) + " dbgen " +
                 std::to_string(d0->doorbell_gen.load()) + " seq@head " +
                 std::to_string(d0->ring[d0->head.load() % shm::kRingCapacity].seq.load()) +
                 "; s->c tail " + std::to_string(d1->tail.load()) + " head " +
                 std::to_string(d1->head.load()) + "]";
      }
      FAIL() << rings << m.error().message() << " after " << connections << " connections, "
             << requests << " requests, " << closed << " closed; client exit codes:" << codes
             << " (30: connect failed); listener stats: accepted " << l->stats().accepted
             << ", failed " << l->stats().failed;
    }
    switch (m->kind) {
      case Kind::Connection:
        EXPECT_EQ(m->key, 77u);
        ASSERT_TRUE(m->channel.valid());
        segs.push_back(detail::TestAccess::segment(m->channel));
        ASSERT_TRUE(q->adopt(std::move(m->channel), next_key++));
        ++connections;
        break;
      case Kind::Request: {
        EXPECT_NE(m->key, 77u);
        // call_n numbers its calls from 0 on each client: the answer is the pattern of i + 1.
        std::uint64_t i = 0;
        while (i < kCalls && !test::check(m->buffer.data(), i)) ++i;
        ASSERT_LT(i, static_cast<std::uint64_t>(kCalls));
        test::fill(m->buffer.data(), i + 1);
        ASSERT_TRUE(MsgQueue::reply(std::move(*m)));
        ++requests;
        break;
      }
      case Kind::PeerClosed:
        ++closed;
        break;
      default:
        FAIL() << "unexpected kind";
    }
  }
  EXPECT_EQ(connections, kClients);
  EXPECT_EQ(requests, kClients * kCalls);
  for (pid_t p : pids) EXPECT_EQ(join(p), 0);
  EXPECT_EQ(l->stats().accepted, static_cast<std::uint64_t>(kClients));
  // Every adopted channel is dropped after its PeerClosed; the last one may still be in the
  // watcher thread's hands for a moment (README: "freed ... when that delivery returns").
  for (int i = 0; i < 1000 && l->stats().live != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(l->stats().live, 0u);
}

TEST(Rendezvous, TheConnectionLimitRefusesWithAClearErrorUntilAChannelCloses) {
  std::string name = unique_name("limit");
  ListenOptions opt;
  opt.max_connections = 2;
  auto l = Listener::create(name, opt);
  ASSERT_TRUE(l);
  // The clients run in children (the handshake needs this process's watcher thread free).
  auto client = [&](int expect) {
    return spawn([&, expect] {
      *l = Listener();
      auto ch = connect(name, secs(5));
      if (expect == 0) return ch ? 0 : 30;
      if (ch) return 31;
      std::fprintf(stderr, "refused client: %s\n", ch.error().message().c_str());
      return ch.error().code == Errc::Refused &&
                     ch.error().message().find("connection limit") != std::string::npos
                 ? 0
                 : 32;
    });
  };
  pid_t p1 = client(0), p2 = client(0);
  EXPECT_EQ(join(p1), 0);
  EXPECT_EQ(join(p2), 0);
  auto c1 = l->accept(secs(5));
  auto c2 = l->accept(secs(5));
  ASSERT_TRUE(c1 && c2);
  EXPECT_EQ(l->stats().live, 2u);
  EXPECT_EQ(join(client(1)), 0);
  EXPECT_EQ(l->stats().refused_limit, 1u);
  c1->close();  // a closed end gives its place back
  EXPECT_EQ(l->stats().live, 1u);
  pid_t p3 = client(0);
  EXPECT_EQ(join(p3), 0);
  EXPECT_TRUE(l->accept(secs(5)));
}

// ---- Who is listening (ServerPolicy), and the verdict in any order --------------------------

// A listener run by uid 65534 that accepts root, in a child; returns its pid once it listens.
pid_t nobody_listener(const std::string& name, int ready_fd, int calls) {
  return spawn([=] {
    if (!os::become_user(65534, 65534)) return 30;
    ListenOptions opt;
    opt.access.allow_uids = {0};
    auto l = Listener::create(name, opt);
    const std::byte one{1};
    if (!l || !os::write_full(ready_fd, {&one, 1})) return 31;
    for (int c = 0; c < calls; ++c) {
      auto ch = l->accept(secs(10));
      if (!ch) return 32;
      for (;;) {  // answer until the client leaves
        auto m = ch->receive(secs(10));
        if (!m || m->kind != Kind::Request) break;
        test::fill(m->buffer.data(), 1);
        if (auto r = MsgQueue::reply(std::move(*m)); !r) {
          std::fprintf(stderr, "server reply: %s\n", r.error().message().c_str());
          return 33;
        }
      }
    }
    return 0;
  });
}

bool await_byte(int fd) {
  std::byte b{};
  auto n = os::read_full(fd, {&b, 1});
  return n && *n == 1;
}

TEST(Rendezvous, AClientTrustsTheListenerUidsItNamesOrItsCallbackAccepts) {
  if (os::current_uid() != 0) GTEST_SKIP() << "needs root to play another uid";
  std::string name = unique_name("expect");
  auto ready = os::make_pipe();
  ASSERT_TRUE(ready);
  pid_t server = nobody_listener(name, ready->second.get(), 3);
  ready->second.reset();
  ASSERT_TRUE(await_byte(ready->first.get()));
  auto call_once = [](Channel& ch) {
    auto b = ch.buffer(64);
    return b && ch.call(*b, secs(5)) && test::check(b->data(), 1);
  };
  // By default: refused, naming the uid.
  auto ch = connect(name, secs(5));
  ASSERT_FALSE(ch);
  EXPECT_EQ(ch.error().code, Errc::Refused);
  EXPECT_NE(ch.error().message().find("uid 65534"), std::string::npos) << ch.error().message();
  // Expected uids.
  ConnectOptions o;
  o.server.expected_uids = {65534};
  ch = connect(name, secs(5), o);
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_TRUE(call_once(*ch));
  ch->close();
  // Expected uids that do not include it: refused, even though we are root.
  o.server.expected_uids = {0, 1000};
  ch = connect(name, secs(5), o);
  ASSERT_FALSE(ch);
  EXPECT_EQ(ch.error().code, Errc::Refused);
  // A callback, given pid, uid and gid, decides alone.
  PeerIdentity seen{};
  o.server.check = [&](const PeerIdentity& who) {
    seen = who;
    return false;
  };
  ch = connect(name, secs(5), o);
  ASSERT_FALSE(ch);
  EXPECT_EQ(ch.error().code, Errc::Refused);
  EXPECT_EQ(seen.pid, server);
  EXPECT_EQ(seen.uid, 65534u);
  EXPECT_EQ(seen.gid, 65534u);
  o.server.check = [](const PeerIdentity& who) { return who.uid == 65534; };
  ch = connect(name, secs(5), o);
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_TRUE(call_once(*ch));
  ch->close();
  // allow_any.
  ConnectOptions any;
  any.server.allow_any = true;
  ch = connect(name, secs(5), any);
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_TRUE(call_once(*ch));
  ch->close();
  EXPECT_EQ(join(server), 0);
}

// A fake listener on `name` (this process's uid) that answers each of up to `n` connections with
// the verdict `v` (rendezvous.h, R3) as `how` says, then closes it; it stops early once *stop.
enum class Answer { AfterReadingHello, WithoutReadingHello, BeforeHello };
struct RawVerdict {
  std::uint64_t magic = 0x5443'4944'514d'424dull;
  std::uint32_t verdict = 0, reserved = 0;
};
struct FakeListener {
  std::atomic<int> answered{0};
  std::atomic<bool> stop{false};
  std::thread thread;
};
void start_fake_listener(FakeListener& f, const std::string& name, int n, std::uint32_t v,
                         Answer how) {
  auto l = os::listen_abstract("mbmq:" + name, 8);
  ASSERT_TRUE(l);
  f.thread = std::thread([&f, l = std::move(*l), n, v, how] {
    for (int i = 0; i < n && !f.stop.load();) {
      auto r = os::wait_readable(l.get(), 10'000'000);
      if (!r || !*r) continue;
      auto c = os::accept_conn(l.get());
      if (!c) return;
      ++i;
      std::array<std::byte, 16> hello{};
      std::array<os::UniqueFd, 1> none;
      if (how != Answer::BeforeHello) {
        auto ready = os::wait_readable(c->get(), 5'000'000'000);
        if (!ready || !*ready) return;
        if (how == Answer::AfterReadingHello)
          (void)os::recv_msg(c->get(), hello, none, os::Blocking::No);
      }
      RawVerdict verdict;
      verdict.verdict = v;
      (void)os::send_msg(c->get(), {reinterpret_cast<const std::byte*>(&verdict), 16}, {});
      f.answered.fetch_add(1);
    }  // each connection closes here, its hello unread for WithoutReadingHello: a reset
  });
}

TEST(Rendezvous, ARefusalIsReadWhetherItCameBeforeOrAfterTheHello) {
  const std::uint32_t kRefusedPolicy = 2;
  // After the hello, read: the plain case.
  {
    FakeListener f;
    std::string name = unique_name("after");
    start_fake_listener(f, name, 1, kRefusedPolicy, Answer::AfterReadingHello);
    auto ch = connect(name, secs(5));
    f.thread.join();
    ASSERT_FALSE(ch);
    EXPECT_EQ(ch.error().code, Errc::Refused) << ch.error().message();
  }
  // After the hello, unread: the close resets the connection; the verdict is still read.
  {
    FakeListener f;
    std::string name = unique_name("reset");
    start_fake_listener(f, name, 1, kRefusedPolicy, Answer::WithoutReadingHello);
    auto ch = connect(name, secs(5));
    f.thread.join();
    ASSERT_FALSE(ch);
    EXPECT_EQ(ch.error().code, Errc::Refused) << ch.error().message();
  }
  // Before the hello: the listener has answered and closed while the client checked who it is
  // (the callback waits for that), so the hello fails with EPIPE; the verdict is still read.
  {
    FakeListener f;
    std::string name = unique_name("before");
    start_fake_listener(f, name, 1, kRefusedPolicy, Answer::BeforeHello);
    ConnectOptions o;
    o.server.check = [&](const PeerIdentity&) {
      f.thread.join();  // the verdict is sent and the connection closed
      return true;
    };
    auto ch = connect(name, secs(5), o);
    ASSERT_FALSE(ch);
    EXPECT_EQ(ch.error().code, Errc::Refused) << ch.error().message();
    EXPECT_NE(ch.error().message().find("access policy"), std::string::npos);
    EXPECT_EQ(f.answered.load(), 1);
  }
}

TEST(Rendezvous, ABusyListenerIsAskedAgainUntilTheDeadline) {
  FakeListener f;
  std::string name = unique_name("busy");
  const std::uint32_t kRefusedBusy = 5;
  start_fake_listener(f, name, 1000, kRefusedBusy, Answer::AfterReadingHello);
  const auto t0 = monotonic_ns();
  auto ch = connect(name, Deadline::after(std::chrono::milliseconds(200)));
  const auto took = monotonic_ns() - t0;
  const int attempts = f.answered.load();
  f.stop.store(true);
  f.thread.join();
  ASSERT_FALSE(ch);
  EXPECT_EQ(ch.error().code, Errc::Refused);
  EXPECT_NE(ch.error().message().find("busy"), std::string::npos) << ch.error().message();
  EXPECT_GE(took, 150'000'000);
  EXPECT_LT(took, 1'000'000'000);
  // Pauses of 1, 2, 4 ... 50 ms: about 7 attempts in 200 ms, not a busy loop.
  std::printf("attempts within 200 ms: %d\n", attempts);
  EXPECT_GE(attempts, 3);
  EXPECT_LE(attempts, 20);
}

// A listener that never accepts (its backlog is full): connect() ends at its deadline. Before,
// connect(2) slept until the listener accepted, whatever the deadline.
TEST(Rendezvous, ConnectingToAListenerThatNeverAcceptsEndsAtTheDeadline) {
  std::string name = unique_name("backlog");
  auto l = os::listen_abstract("mbmq:" + name, 1);
  ASSERT_TRUE(l);
  std::vector<os::UniqueFd> queued;
  for (int i = 0; i < 16; ++i) {
    auto c = os::connect_abstract("mbmq:" + name, 20'000'000);
    if (!c) {
      EXPECT_EQ(c.error().code, Errc::TimedOut);
      break;
    }
    queued.push_back(std::move(*c));
  }
  ASSERT_LT(queued.size(), 16u) << "the backlog never filled";
  const auto t0 = monotonic_ns();
  auto ch = connect(name, Deadline::after(std::chrono::milliseconds(200)));
  const auto took = monotonic_ns() - t0;
  ASSERT_FALSE(ch);
  EXPECT_EQ(ch.error().code, Errc::TimedOut) << ch.error().message();
  EXPECT_GE(took, 190'000'000);
  EXPECT_LT(took, 1'000'000'000);
}

// The watcher's epoll timeout (ipc/peer_watch.h): never negative, never 0 before the deadline,
// never past it, whatever the distance. The old arithmetic cast ms to int: 2^32 ms + 5 became 5,
// and 2^32 ms became 0 (a busy loop); ~24.8 to 49.7 days became negative (no limit at all).
TEST(Rendezvous, TheWatcherTimeoutIsClampedNotWrapped) {
  using detail::timeout_ms_until;
  constexpr std::int64_t kMs = 1'000'000;
  const std::int64_t now = 1'000'000'000'000;
  EXPECT_EQ(timeout_ms_until(now, now), 0);
  EXPECT_EQ(timeout_ms_until(now - 1, now), 0);
  EXPECT_EQ(timeout_ms_until(INT64_MIN, now), 0);
  EXPECT_EQ(timeout_ms_until(now + 1, now), 1);  // rounded up: never early
  EXPECT_EQ(timeout_ms_until(now + kMs, now), 1);
  EXPECT_EQ(timeout_ms_until(now + kMs + 1, now), 2);
  EXPECT_EQ(timeout_ms_until(now + std::int64_t{INT_MAX} * kMs, now), INT_MAX);
  EXPECT_EQ(timeout_ms_until(now + (std::int64_t{1} << 31) * kMs, now), INT_MAX);
  EXPECT_EQ(timeout_ms_until(now + (std::int64_t{1} << 32) * kMs, now), INT_MAX);
  EXPECT_EQ(timeout_ms_until(now + ((std::int64_t{1} << 32) + 5) * kMs, now), INT_MAX);
  EXPECT_EQ(timeout_ms_until(INT64_MAX, now), INT_MAX);
  EXPECT_EQ(timeout_ms_until(INT64_MAX, INT64_MIN), INT_MAX);  // the difference overflows
  EXPECT_EQ(timeout_ms_until(INT64_MAX, 0), INT_MAX);
}

// The default max_connections (rendezvous.h, "File descriptors"): idle connections (3 fds) and
// handshakes fit in three quarters of the fds free at create(), and never more than 1024.
TEST(Rendezvous, TheDefaultConnectionLimitFollowsTheFdTable) {
  auto limit_with = [](std::uint64_t fds) {
    auto p = os::make_pipe();
    if (!p) return -1;
    pid_t pid = spawn([&] {
      if (!os::set_fd_limit(fds)) return 1;
      auto l = Listener::create(unique_name("derive"));
      if (!l) return 2;
      const std::uint32_t n = l->max_connections();
      return os::write_full(p->second.get(), {reinterpret_cast<const std::byte*>(&n), sizeof n})
                 ? 0
                 : 3;
    });
    p->second.reset();
    std::uint32_t n = 0;
    auto got = os::read_full(p->first.get(), {reinterpret_cast<std::byte*>(&n), sizeof n});
    return join(pid) == 0 && got && *got == sizeof n ? static_cast<int>(n) : -1;
  };
  const int at_128 = limit_with(128), at_1024 = limit_with(1024), at_8k = limit_with(8192);
  std::printf("default max_connections: %d with 128 fds, %d with 1024, %d with 8192\n", at_128,
              at_1024, at_8k);
  EXPECT_GE(at_128, 1);
  // Within the budget (a few fds open): kFdsPerConnection each.
  const int per = static_cast<int>(kFdsPerConnection);
  EXPECT_LE(at_128 * per + 64 + 7, 128 * 3 / 4 + 16);
  EXPECT_GT(at_1024, 100);
  EXPECT_LE(at_1024 * per + 64 + 7, 1024 * 3 / 4 + 16);
  if (at_8k != -1) {  // -1: the hard limit is below 8192 here
    EXPECT_EQ(at_8k, 1024);
  }
  ListenOptions explicit_limit;
  explicit_limit.max_connections = 5000;  // an explicit value is taken as it is
  auto l = Listener::create(unique_name("explicit"), explicit_limit);
  ASSERT_TRUE(l);
  EXPECT_EQ(l->max_connections(), 5000u);
}

}  // namespace
}  // namespace mbmq
