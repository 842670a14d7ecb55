// Named rendezvous between processes that did not share the channel by fork: listen/connect, the
// SO_PEERCRED policy, the handshake deadline, and names that are free again at once.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <thread>

#include "os/process.h"
#include "os/unix_socket.h"
#include "ipc/test_access.h"
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
  EXPECT_EQ(l->refused(), 1u);
  EXPECT_EQ(join(pid), 0);
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
      for (pid_t p : pids) codes += " " + std::to_string(join(p));
      std::string rings;
      for (auto seg : segs) {
        auto* d0 = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset);
        auto* d1 = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset + sizeof(shm::Direction));
        rings += " [c->s tail " + std::to_string(d0->tail.load()) + " head " +
                 std::to_string(d0->head.load()) + " sleeping " +
                 std::to_string(d0->consumer_sleeping.load()) + " dbgen " +
                 std::to_string(d0->doorbell_gen.load()) + " seq@head " +
                 std::to_string(d0->ring[d0->head.load() % shm::kRingCapacity].seq.load()) +
                 "; s->c tail " + std::to_string(d1->tail.load()) + " head " +
                 std::to_string(d1->head.load()) + "]";
      }
      FAIL() << rings << m.error().message() << " after " << connections << " connections, " << requests
             << " requests, " << closed << " closed; client exit codes:" << codes
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

}  // namespace
}  // namespace mbmq
