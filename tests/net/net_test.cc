// mbmq::net over UCX's TCP transport on loopback, between two processes (issue #19). Each test
// forks its peer before this process loads UCX (a child forked after cannot use it: tested too).
#include "mbmq/net.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "net/net_pair.h"
#include "net/net_util.h"
#include "os/process.h"
#include "support/fast.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::Pipe;
using test::secs;
using test::spawn;
using test::spawn_helper;
using test::url;

// The server's answer to a request: every byte + 1, and one byte more.
void answer(net::Buffer& b) {
  test::add_to_each(b.data(), 1);
  const std::size_t n = b.size();
  if (b.resize(n + 1)) b.data()[n] = std::byte{0x5a};
}

// Serves `service` on 127.0.0.1: tells the parent its port, accepts one client, answers its
// requests until it leaves, checks its one-way message. Exits 0 when all went as expected.
int serve_one(const Pipe& port_pipe, net::ListenOptions opt = {}) {
  auto l = net::listen("ucx://127.0.0.1:0/svc", opt);
  if (!l) return 10;
  port_pipe.put(l->port());
  auto ch = l->accept(secs(20));
  if (!ch) return 11;
  int messages = 0;
  for (;;) {
    auto m = ch->receive(secs(20));
    if (!m) return 12;
    if (m->kind == Kind::PeerClosed) return m->error == Errc::PeerClosed && messages == 1 ? 0 : 13;
    if (m->kind == Kind::Message) {
      if (m->buffer.size() != 3 || m->buffer.data()[2] != std::byte{7}) return 14;
      ++messages;
      continue;
    }
    answer(m->buffer);
    if (!net::Channel::reply(std::move(*m))) return 15;
  }
}

TEST(NetChannel, CallsAreAnsweredInTheCallersBufferAcrossProcesses) {
  Pipe p = Pipe::make();
  pid_t server = spawn([&] { return serve_one(p); });
  p.w.reset();  // a child that fails before writing its port: get() sees the end, not a hang
  const std::uint32_t port = p.get();
  ASSERT_NE(port, 0u);
  auto ch = net::connect(url(port), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  // 64 B and 4 KiB go eagerly; 1 MiB and 8 MiB by UCX's rendezvous.
  for (std::size_t size :
       {std::size_t{64}, std::size_t{4096}, std::size_t{1} << 20, std::size_t{8} << 20}) {
    auto b = ch->buffer(size);
    ASSERT_TRUE(b) << b.error().message();
    test::fill(b->data(), size);
    ASSERT_TRUE(ch->call(*b, secs(10))) << size;
    ASSERT_EQ(b->size(), size + 1);
    bool same = true;
    for (std::size_t i = 0; i < size; ++i)
      same = same && b->data()[i] ==
                         static_cast<std::byte>(static_cast<unsigned>(test::pattern(size, i)) + 1);
    EXPECT_TRUE(same) << size;
    EXPECT_EQ(b->data()[size], std::byte{0x5a});
    // The same buffer again: the reply arrived in it, ready for the next call.
    ASSERT_TRUE(b->resize(16));
    ASSERT_TRUE(ch->call(*b, secs(10)));
    EXPECT_EQ(b->size(), 17u);
  }
  auto msg = ch->buffer(3);
  ASSERT_TRUE(msg);
  msg->data()[2] = std::byte{7};
  ASSERT_TRUE(ch->send(std::move(*msg)));
  ch->close();
  EXPECT_EQ(join(server), 0);
}

TEST(NetChannel, AKilledServerFailsTheCallInFlightWithPeerClosed) {
  Pipe port_pipe = Pipe::make();
  Pipe got = Pipe::make();
  pid_t server = spawn([&]() -> int {
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    if (!l) return 10;
    port_pipe.put(l->port());
    auto ch = l->accept(secs(20));
    if (!ch) return 11;
    auto m = ch->receive(secs(20));  // the request, never answered: we are killed holding it
    if (!m) return 12;
    got.put(1);
    os::sleep_ns(30'000'000'000);
    return 13;
  });
  port_pipe.w.reset();
  got.w.reset();
  const std::uint32_t port = port_pipe.get();
  ASSERT_NE(port, 0u);
  auto ch = net::connect(url(port), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  std::thread killer([&] {
    if (got.get() == 1) (void)os::kill_process(server, SIGKILL);
  });
  auto b = ch->buffer(64);
  ASSERT_TRUE(b);
  std::int64_t t0 = 0;
  const std::int64_t start = monotonic_ns();
  Status s = ch->call(*b, secs(25));
  t0 = monotonic_ns() - start;
  killer.join();
  EXPECT_EQ(join(server), 128 + SIGKILL);
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::PeerClosed) << s.error().message();
  EXPECT_LT(t0, 10'000'000'000) << "the death took " << t0 / 1'000'000 << " ms to be seen";
  EXPECT_TRUE(b->valid());  // the automatic reply leaves the buffer usable
  auto again = ch->call(*b, secs(5));
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::PeerClosed);
}

// send_request() (#19): a server killed while holding several requests (one of them 2 MiB,
// rendezvous) ends the client's receive() with PeerClosed, promptly, and no reply comes after it.
TEST(NetChannel, AKilledServerHoldingRequestsEndsReceiveWithPeerClosed) {
  Pipe port_pipe = Pipe::make();
  Pipe got = Pipe::make();
  pid_t server = spawn([&]() -> int {
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    if (!l) return 10;
    port_pipe.put(l->port());
    auto ch = l->accept(secs(20));
    if (!ch) return 11;
    std::vector<net::Message> held;
    while (held.size() < 3) {
      auto m = ch->receive(secs(20));
      if (!m || m->kind != Kind::Request) return 12;
      held.push_back(std::move(*m));  // never answered: we are killed holding them
    }
    got.put(1);
    os::sleep_ns(30'000'000'000);
    return 13;
  });
  port_pipe.w.reset();
  got.w.reset();
  const std::uint32_t port = port_pipe.get();
  ASSERT_NE(port, 0u);
  auto ch = net::connect(url(port), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  for (std::size_t size : {std::size_t{64}, std::size_t{2} << 20, std::size_t{64}}) {
    auto b = ch->buffer(size);
    ASSERT_TRUE(b);
    ASSERT_TRUE(ch->send_request(std::move(*b)));
  }
  std::int64_t killed_at = 0;
  std::thread killer([&] {
    if (got.get() == 1) {
      killed_at = monotonic_ns();
      (void)os::kill_process(server, SIGKILL);
    }
  });
  auto m = ch->receive(secs(25));
  const std::int64_t seen = monotonic_ns();
  killer.join();
  EXPECT_EQ(join(server), 128 + SIGKILL);
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed) << "a reply came from a server that answered nothing";
  EXPECT_EQ(m->error, Errc::PeerClosed);
  ASSERT_NE(killed_at, 0);
  EXPECT_LT(seen - killed_at, 10'000'000'000)
      << "the death took " << (seen - killed_at) / 1'000'000 << " ms to be seen";
  std::printf("PeerClosed %.1f ms after the kill, 3 requests outstanding\n",
              static_cast<double>(seen - killed_at) / 1e6);
  auto after = ch->receive(secs(1));
  EXPECT_FALSE(after) << "something after the end";
}

// Flow control (docs/design/net.md (F6)): a sender waiting for credit from a receiver that never
// receives learns at once that the receiver was killed.
TEST(NetChannel, AKilledReceiverEndsASenderWaitingForCredit) {
  Pipe port_pipe = Pipe::make();
  pid_t server = spawn([&]() -> int {
    net::ListenOptions lo;
    lo.inbox_messages = 2;
    auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
    if (!l) return 10;
    port_pipe.put(l->port());
    auto ch = l->accept(secs(20));
    if (!ch) return 11;
    os::sleep_ns(30'000'000'000);  // never receives; killed
    return 13;
  });
  port_pipe.w.reset();
  const std::uint32_t port = port_pipe.get();
  ASSERT_NE(port, 0u);
  auto ch = net::connect(url(port), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  for (int i = 0; i < 2; ++i) {
    auto b = ch->buffer(64);
    ASSERT_TRUE(b);
    ASSERT_TRUE(ch->send(std::move(*b)));
  }
  auto b = ch->buffer(64);
  ASSERT_TRUE(b);
  Status st = ch->send(std::move(*b));
  ASSERT_FALSE(st);
  ASSERT_EQ(st.error().code, Errc::WouldBlock) << st.error().message();
  (void)os::kill_process(server, SIGKILL);
  const std::int64_t start = monotonic_ns();
  st = ch->send(std::move(*b), secs(20));
  const std::int64_t took = monotonic_ns() - start;
  EXPECT_EQ(join(server), 128 + SIGKILL);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::PeerClosed) << st.error().message();
  EXPECT_LT(took, 5'000'000'000) << "the death took " << took / 1'000'000 << " ms to be seen";
  EXPECT_TRUE(b->valid()) << "nothing was sent: the buffer is still the caller's";
}

// A server that holds the request: the call ends at its deadline with TimedOut, and a reply
// that comes later is dropped, not taken for the next call's.
TEST(NetChannel, ACallEndsAtItsDeadlineAndALateReplyIsDropped) {
  Pipe port_pipe = Pipe::make();
  pid_t server = spawn([&]() -> int {
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    if (!l) return 10;
    port_pipe.put(l->port());
    auto ch = l->accept(secs(20));
    if (!ch) return 11;
    auto first = ch->receive(secs(20));
    if (!first || first->kind != Kind::Request) return 12;
    auto second = ch->receive(secs(20));  // the next call, sent after the first timed out
    if (!second || second->kind != Kind::Request) return 13;
    if (!net::Channel::reply(std::move(*first))) return 14;  // late: must be dropped
    answer(second->buffer);
    if (!net::Channel::reply(std::move(*second))) return 15;
    auto end = ch->receive(secs(20));
    return end && end->kind == Kind::PeerClosed ? 0 : 16;
  });
  port_pipe.w.reset();
  const std::uint32_t port = port_pipe.get();
  ASSERT_NE(port, 0u);
  auto ch = net::connect(url(port), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  auto b = ch->buffer(16);
  ASSERT_TRUE(b);
  const std::int64_t start = monotonic_ns();
  Status s = ch->call(*b, Deadline::after(std::chrono::milliseconds(200)));
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::TimedOut);
  EXPECT_LT(monotonic_ns() - start, 5'000'000'000);
  auto c = ch->buffer(32);
  ASSERT_TRUE(c);
  ASSERT_TRUE(ch->call(*c, secs(10)));
  EXPECT_EQ(c->size(), 33u);  // the second call's answer, not the first's (16 bytes)
  ch->close();
  EXPECT_EQ(join(server), 0);
}

// peer_timeout must not end a live channel that is merely quiet or busy: here the server works on
// a request (not waiting on the channel) for 2.5x peer_timeout, and the client then idles as long;
// the keeper threads' heartbeats keep both ends open.
TEST(NetChannel, HeartbeatsKeepABusyOrIdleChannelOpenPastPeerTimeout) {
  constexpr auto kTimeout = std::chrono::milliseconds(800);
  Pipe port_pipe = Pipe::make();
  pid_t server = spawn([&]() -> int {
    net::ListenOptions opt;
    opt.peer_timeout = kTimeout;
    auto l = net::listen("ucx://127.0.0.1:0/svc", opt);
    if (!l) return 10;
    port_pipe.put(l->port());
    auto ch = l->accept(secs(20));
    if (!ch) return 11;
    for (int i = 0; i < 2; ++i) {
      auto m = ch->receive(secs(20));
      if (!m || m->kind != Kind::Request) return 12 + i;
      if (i == 0) os::sleep_ns(2'000'000'000);  // busy, not waiting: only the keeper runs
      answer(m->buffer);
      if (!net::Channel::reply(std::move(*m))) return 14;
    }
    auto end = ch->receive(secs(20));
    return end && end->kind == Kind::PeerClosed && end->error == Errc::PeerClosed ? 0 : 15;
  });
  port_pipe.w.reset();
  const std::uint32_t port = port_pipe.get();
  ASSERT_NE(port, 0u);
  net::ConnectOptions opt;
  opt.peer_timeout = kTimeout;
  auto ch = net::connect(url(port), secs(10), opt);
  ASSERT_TRUE(ch) << ch.error().message();
  auto b = ch->buffer(8);
  ASSERT_TRUE(b);
  ASSERT_TRUE(ch->call(*b, secs(10)));
  os::sleep_ns(2'000'000'000);  // idle, not waiting
  ASSERT_TRUE(ch->call(*b, secs(10)));
  EXPECT_EQ(b->size(), 10u);
  ch->close();
  EXPECT_EQ(join(server), 0);
}

TEST(NetChannel, AKilledClientEndsTheServersChannelWithPeerClosed) {
  Pipe port_pipe = Pipe::make();
  pid_t client = spawn([&]() -> int {
    const std::uint32_t port = port_pipe.get();
    auto ch = net::connect(url(port), secs(10));
    if (!ch) return 10;
    auto b = ch->buffer(64);
    if (!b) return 11;
    (void)ch->call(*b, secs(30));  // killed while waiting
    return 12;
  });
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  port_pipe.put(l->port());
  auto ch = l->accept(secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  auto m = ch->receive(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Request);
  ASSERT_TRUE(os::kill_process(client, SIGKILL));
  EXPECT_EQ(join(client), 128 + SIGKILL);
  const std::int64_t start = monotonic_ns();
  auto end = ch->receive(secs(20));
  ASSERT_TRUE(end) << end.error().message();
  EXPECT_EQ(end->kind, Kind::PeerClosed);
  EXPECT_LT(monotonic_ns() - start, 10'000'000'000);
  auto r = net::Channel::reply(std::move(*m));  // its caller is gone
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::PeerClosed);
}

TEST(NetChannel, AWrongServiceOrAnAddressNotAllowedIsRefused) {
  Pipe port_pipe = Pipe::make();
  pid_t server = spawn([&]() -> int {
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    if (!l) return 10;
    net::ListenOptions strict;
    strict.allow = {"10.255.255.1"};  // not us
    auto l2 = net::listen("ucx://127.0.0.1:0/svc", strict);
    if (!l2) return 11;
    port_pipe.put(l->port());
    port_pipe.put(l2->port());
    // Serve handshakes until the parent is done (it kills us).
    for (;;) {
      (void)l->accept(Deadline::after(std::chrono::milliseconds(20)));
      (void)l2->accept(Deadline::after(std::chrono::milliseconds(20)));
    }
  });
  port_pipe.w.reset();
  const std::uint32_t port = port_pipe.get();
  const std::uint32_t strict_port = port_pipe.get();
  ASSERT_NE(port, 0u);
  auto wrong = net::connect(url(port, "other"), secs(10));
  ASSERT_FALSE(wrong);
  EXPECT_EQ(wrong.error().code, Errc::Refused) << wrong.error().message();
  EXPECT_NE(std::string(wrong.error().op).find("service"), std::string::npos) << wrong.error().op;
  auto refused = net::connect(url(strict_port), secs(10));
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error().code, Errc::Refused) << refused.error().message();
  EXPECT_NE(std::string(refused.error().op).find("allow-list"), std::string::npos)
      << refused.error().op;
  (void)os::kill_process(server, SIGKILL);
  (void)join(server);
}

// A server killed and started again binds the same port at once (UCX_TCP_CM_REUSEADDR=y, set
// by mbmq::net), and its old clients see PeerClosed, its new ones are served.
TEST(NetChannel, ARestartedServerListensOnTheSamePortAtOnce) {
  // Both servers are forked now, before this process loads UCX (a child forked after could not
  // use it); the second waits for the first one's port, then for the word to start.
  Pipe p1 = Pipe::make();
  Pipe p2 = Pipe::make();
  Pipe go = Pipe::make();
  pid_t first = spawn([&] { return serve_one(p1); });
  pid_t second = spawn([&]() -> int {
    const std::uint32_t port = go.get();
    if (port == 0) return 19;
    // The first attempt must succeed: no retry loop hides a port still held by the dead server.
    const std::int64_t t0 = monotonic_ns();
    auto l = net::listen(url(port));
    if (!l) return 20;
    p2.put(static_cast<std::uint32_t>((monotonic_ns() - t0) / 1'000'000));
    auto ch = l->accept(secs(20));
    if (!ch) return 21;
    auto m = ch->receive(secs(20));
    if (!m || m->kind != Kind::Request) return 22;
    answer(m->buffer);
    if (!net::Channel::reply(std::move(*m))) return 23;
    auto end = ch->receive(secs(20));
    return end && end->kind == Kind::PeerClosed ? 0 : 24;
  });
  p1.w.reset();
  p2.w.reset();
  go.r.reset();
  const std::uint32_t port = p1.get();
  ASSERT_NE(port, 0u);
  auto old = net::connect(url(port), secs(10));
  ASSERT_TRUE(old) << old.error().message();
  auto b = old->buffer(64);
  ASSERT_TRUE(b);
  ASSERT_TRUE(old->call(*b, secs(10)));
  ASSERT_TRUE(os::kill_process(first, SIGKILL));
  EXPECT_EQ(join(first), 128 + SIGKILL);
  go.put(port);
  const std::uint32_t listen_ms = p2.get();
  auto gone = old->call(*b, secs(10));
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.error().code, Errc::PeerClosed);
  auto fresh = net::connect(url(port), secs(10));
  ASSERT_TRUE(fresh) << fresh.error().message();
  auto c = fresh->buffer(8);
  ASSERT_TRUE(c);
  ASSERT_TRUE(fresh->call(*c, secs(10)));
  EXPECT_EQ(c->size(), 9u);
  fresh->close();
  EXPECT_EQ(join(second), 0);
  EXPECT_LT(listen_ms, 1000u);  // the target is 100 ms; generous on a loaded machine
  std::printf("restarted server listened in %u ms\n", listen_ms);
}

// Minor page faults of this process so far (getrusage).
long minor_faults() {
  rusage ru{};
  (void)::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_minflt;
}

// In a child: listens on 127.0.0.1, sends its port through `port_pipe`, accepts one channel
// and returns body(channel) (10, 11: no listener, no connection).
template <class Body>
int serve_accepted(const Pipe& port_pipe, Body body) {
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  if (!l) return 10;
  port_pipe.put(l->port());
  auto ch = l->accept(secs(20));
  if (!ch) return 11;
  return body(*ch);
}

// 16 MiB calls: after the first, each side's payload lands in a vector it has used before (the
// channel's spare: a finished send's, the call's old buffer) rather than in fresh pages. Before
// the spare the client took 1,024 minor faults per call (a fresh vector per reply; 64 MiB ones
// cost 66-100 ms each on this VM); the server 0 (malloc reused its freed 16 MiB: above its 32 MiB
// mmap threshold it would not). Both must stay far below that. (With anonymous transparent huge
// pages always on, fresh pages would fault only a few times: then this shows nothing either way,
// and says so.)
TEST(NetChannel, LargeCallsLandInPagesUsedBeforeNotFreshOnes) {
  if (test::kSanitized)
    GTEST_SKIP() << "memory bounds: a sanitizer's allocator keeps freed memory resident and maps "
                    "its own (Release runs it)";
  constexpr std::size_t kSize = 16u << 20;
  constexpr int kWarm = 2, kCalls = 4;
  Pipe p = Pipe::make(), faults = Pipe::make();
  pid_t server = spawn([&]() -> int {
    return serve_accepted(p, [&](net::Channel& ch) -> int {
      long f0 = 0;
      for (int i = 0;; ++i) {
        if (i == kWarm) f0 = minor_faults();
        auto m = ch.receive(secs(20));
        if (!m) return 12;
        if (m->kind == Kind::PeerClosed) return 0;
        if (m->buffer.size() != kSize) return 13;
        m->buffer.data()[0] = std::byte{0x42};
        if (!net::Channel::reply(std::move(*m))) return 14;
        if (i == kWarm + kCalls - 1) faults.put(static_cast<std::uint32_t>(minor_faults() - f0));
      }
    });
  });
  p.w.reset();
  faults.w.reset();
  auto ch = net::connect(url(p.get()), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  auto b = ch->buffer(kSize);
  ASSERT_TRUE(b);
  long f0 = 0;
  for (int i = 0; i < kWarm + kCalls; ++i) {
    if (i == kWarm) f0 = minor_faults();
    b->data()[0] = std::byte{1};
    ASSERT_TRUE(ch->call(*b, secs(20))) << i;
    ASSERT_EQ(b->size(), kSize);
    ASSERT_EQ(b->data()[0], std::byte{0x42});
  }
  const long client = (minor_faults() - f0) / kCalls;
  const long server_per_call = static_cast<long>(faults.get(~0u)) / kCalls;
  ch->close();
  EXPECT_EQ(join(server), 0);
  std::string thp = "?";
  if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
    char line[128] = {};
    if (std::fgets(line, sizeof line, f) != nullptr) thp = line;
    (void)std::fclose(f);
    if (!thp.empty() && thp.back() == '\n') thp.pop_back();
  }
  std::printf("16 MiB calls: minor faults per call: client %ld, server %ld (THP: %s)\n", client,
              server_per_call, thp.c_str());
  EXPECT_LT(client, 128);
  EXPECT_LT(server_per_call, 128);
}

// One-way 34 MiB messages, each received and dropped: after the first, each lands in the vector
// of the one dropped before it (a large net::Buffer gives its vector back to its worker's Spares
// when destroyed) rather than in fresh pages. 34 MiB is above glibc's largest mmap threshold, so
// without that every message was a fresh mapping: 8,705 minor faults (and its zeroing) per
// message on the receiver (the throughput change it made was within this VM's noise).
TEST(NetChannel, DroppedReceivedBuffersReceiveTheNextPayloadsNotFreshPages) {
  if (test::kSanitized)
    GTEST_SKIP() << "memory bounds: a sanitizer's allocator keeps freed memory resident and maps "
                    "its own (Release runs it)";
  constexpr std::size_t kSize = 34u << 20;
  constexpr int kWarm = 2, kMsgs = 4;
  Pipe p = Pipe::make(), faults = Pipe::make();
  pid_t server = spawn([&]() -> int {
    return serve_accepted(p, [&](net::Channel& ch) -> int {
      long f0 = 0;
      for (int i = 0; i < kWarm + kMsgs; ++i) {
        auto m = ch.receive(secs(20));
        if (!m || m->kind != Kind::Message || m->buffer.size() != kSize) return 12;
        if (m->buffer.data()[0] != std::byte{0x5a} ||
            m->buffer.data()[kSize - 1] != std::byte{0x5a})
          return 13;
        // Dropped here: its vector goes back for the next message (the warm-up's first is fresh).
        if (i == kWarm - 1) f0 = minor_faults();
      }
      faults.put(static_cast<std::uint32_t>(minor_faults() - f0));
      auto end = ch.receive(secs(20));
      return end && end->kind == Kind::PeerClosed ? 0 : 14;
    });
  });
  p.w.reset();
  faults.w.reset();
  auto ch = net::connect(url(p.get()), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  for (int i = 0; i < kWarm + kMsgs; ++i) {
    auto b = ch->buffer(kSize);
    ASSERT_TRUE(b);
    std::memset(b->data().data(), 0x5a, kSize);
    ASSERT_TRUE(ch->send(std::move(*b), secs(20))) << i;
  }
  const long server_per_msg = static_cast<long>(faults.get(~0u)) / kMsgs;
  ch->close();
  EXPECT_EQ(join(server), 0);
  std::printf(
      "34 MiB one-way messages dropped by the receiver: minor faults per message %ld "
      "(a fresh vector: 8704)\n",
      server_per_msg);
  EXPECT_LT(server_per_msg, 256);
}

// Hostile review (review1) of the spare payload vector (net/channel.cc take_spare_locked): it went
// to any payload above 64 KiB, whatever its capacity. Here our own 34 MiB one-way sends finish
// (each one's vector becomes the spare) while the peer's 100 KiB messages arrive and wait in our
// inbox: each of them landed in, and held, a recycled 34 MiB vector (6 rounds: 204 MiB), and the
// grant ("the bytes bound the memory", net.h) no longer bounded the inbox. Now the spare takes
// only a payload of at least half its size. 34 MiB is above glibc's largest mmap threshold, so a
// vector freed goes back to the kernel at once.
TEST(NetReview, SmallMessagesInTheInboxDoNotPinALargeRecycledVector) {
  if (test::kSanitized)
    GTEST_SKIP() << "memory bounds: a sanitizer's allocator keeps freed memory resident and maps "
                    "its own (Release runs it)";
  constexpr std::size_t kBig = 34u << 20;
  constexpr std::size_t kSmall = 100u << 10;
  constexpr int kRounds = 6;
  Pipe p = Pipe::make();
  pid_t server = spawn([&]() -> int {
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    if (!l) return 10;
    p.put(l->port());
    auto ch = l->accept(secs(20));
    if (!ch) return 11;
    for (;;) {
      auto m = ch->receive(secs(60));
      if (!m) return 12;
      if (m->kind == Kind::PeerClosed) return 0;
      if (m->kind == Kind::Message) {
        if (m->buffer.size() != kBig) return 13;
        auto s = ch->buffer(kSmall);
        if (!s) return 14;
        std::memset(s->data().data(), 0x22, kSmall);
        if (!ch->send(std::move(*s), secs(20))) return 15;
        continue;
      }
      if (!net::Channel::reply(std::move(*m))) return 16;
    }
  });
  p.w.reset();
  auto ch = net::connect(url(p.get()), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  {  // warm UCX up (its pools, the first rendezvous) before the baseline
    auto c = ch->buffer(8);
    ASSERT_TRUE(c);
    ASSERT_TRUE(ch->call(*c, secs(20)));
  }
  const std::size_t rss0 = os::resident_bytes();
  for (int i = 0; i < kRounds; ++i) {
    auto b = ch->buffer(kBig);
    ASSERT_TRUE(b) << i;
    std::memset(b->data().data(), 0x11, kBig);  // a real payload: every page written
    ASSERT_TRUE(ch->send(std::move(*b), secs(20))) << i;
    // The server has the big one, and its small one-way message came before this reply.
    auto c = ch->buffer(8);
    ASSERT_TRUE(c);
    ASSERT_TRUE(ch->call(*c, secs(20))) << i;
  }
  const std::size_t rss1 = os::resident_bytes();
  // Nothing received yet: the inbox holds kRounds messages of 100 KiB each.
  for (int i = 0; i < kRounds; ++i) {
    auto m = ch->receive(secs(10));
    ASSERT_TRUE(m) << i;
    ASSERT_EQ(m->kind, Kind::Message) << i;
    ASSERT_EQ(m->buffer.size(), kSmall) << i;
  }
  ch->close();
  EXPECT_EQ(join(server), 0);
  const double grew_mib = (static_cast<double>(rss1) - static_cast<double>(rss0)) / (1 << 20);
  std::printf("an inbox of %d x 100 KiB messages: resident memory grew by %.1f MiB\n", kRounds,
              grew_mib);
  // Before the spare: ~0.6 MiB of payload (and UCX's noise). Allow two big vectors.
  EXPECT_LT(grew_mib, 2.0 * (kBig >> 20));
}

// Hostile review (review1): Channel::buffer(n) above 64 KiB returned the channel's spare, which
// held an earlier payload's bytes, not a zeroed vector: a server that forwards one client's
// message on another client's channel would hand the first client's bytes to the second channel's
// next buffer(). Since 2026-12-02 a recycled vector is zeroed only when its bytes are another
// channel's (this channel's stay, as a local pool slot's do: the zeroing was most of the CPU the
// one-way sender spent beyond raw UCX's), and a buffer() is sent on its own channel only. Here two
// channels of one listener share its worker's spares: channel 0 receives a 1 MiB message of 0xab
// and drops it; channel 1's buffer() gets that vector, zeroed; channel 0's does not need zeroing;
// and channel 0's buffer() sent on channel 1 is InvalidArgument.
TEST(NetReview, BufferNeverHandsOutAnotherChannelsBytes) {
  constexpr std::size_t kSize = 1u << 20;
  auto m = test::make_many(2, {}, {});
  ASSERT_TRUE(m);
  auto count_nonzero = [](const net::Buffer& b) {
    std::size_t k = 0;
    for (std::byte x : b.data()) k += x != std::byte{0};
    return k;
  };
  auto send_secret = [&] {
    auto b = m->client[0].buffer(kSize);
    ASSERT_TRUE(b);
    std::memset(b->data().data(), 0xab, kSize);
    ASSERT_TRUE(m->client[0].send(std::move(*b), secs(10)));
    auto got = m->server[0].receive(secs(10));
    ASSERT_TRUE(got) << got.error().message();
    ASSERT_EQ(got->kind, Kind::Message);
    ASSERT_EQ(got->buffer.size(), kSize);
    // dropped here: its vector goes to the worker's spares, as channel 0's bytes
  };
  send_secret();
  auto other = m->server[1].buffer(kSize);
  ASSERT_TRUE(other);
  const std::size_t stale_other = count_nonzero(*other);
  send_secret();
  auto own = m->server[0].buffer(kSize);
  ASSERT_TRUE(own);
  const std::size_t stale_own = count_nonzero(*own);
  std::printf(
      "buffer() after channel 0 dropped a 1 MiB payload: channel 1's holds %zu non-zero bytes, "
      "channel 0's %zu (its own, not zeroed)\n",
      stale_other, stale_own);
  EXPECT_EQ(stale_other, 0u) << "another channel's bytes in a buffer()";
  EXPECT_EQ(stale_own, kSize) << "channel 0's buffer() did not get its own vector back unzeroed";
  auto st = m->server[1].send(std::move(*own));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::InvalidArgument) << st.error().message();
  EXPECT_TRUE(own->valid());
  net::Buffer call_buf = std::move(*own);
  st = m->server[1].call(call_buf, Deadline::after(std::chrono::milliseconds(100)));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::InvalidArgument) << st.error().message();
  ASSERT_TRUE(m->server[0].send(std::move(call_buf), secs(10)));  // on its own channel: fine
}

// Hostile review (review1): a call that times out while UCX still reads its 8 MiB request (the
// server does not look for 300 ms): its bytes go with the send (SendOp::owned) and, once UCX is
// done, become the channel's spare. Every payload after must arrive intact both ways: were the
// vector recycled while UCX still read it, the next payload written into it would corrupt the
// first request, or the reply landing in it would be overwritten.
TEST(NetReview, ATimedOutCallsInFlightRequestIsRecycledOnlyOnceSent) {
  constexpr std::size_t kSize = 8u << 20;
  constexpr int kCalls = 6;
  // Byte i of call `call`'s request: (i * 131 + call * 17) & 0xff, a row of 256 repeated.
  auto pattern = [](int call) {
    std::array<std::byte, 256> row;
    for (std::size_t i = 0; i < row.size(); ++i)
      row[i] = static_cast<std::byte>((i * 131 + static_cast<std::size_t>(call) * 17) & 0xff);
    return row;
  };
  Pipe p = Pipe::make(), go = Pipe::make();
  pid_t server = spawn([&]() -> int {
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    if (!l) return 10;
    p.put(l->port());
    auto ch = l->accept(secs(20));
    if (!ch) return 11;
    if (go.get(0) != 1) return 16;  // the first call has timed out meanwhile
    for (int call = 0;; ++call) {
      auto m = ch->receive(secs(30));
      if (!m) return 12;
      if (m->kind == Kind::PeerClosed) return call == kCalls + 1 ? 0 : 13;
      if (m->buffer.size() != kSize) return 14;
      if (test::mismatches_repeating(m->buffer.data(), pattern(call)) != 0) return 20 + call;
      answer(m->buffer);
      if (!net::Channel::reply(std::move(*m))) return 15;
    }
  });
  p.w.reset();
  go.r.reset();
  auto ch = net::connect(url(p.get()), secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  {
    auto b = ch->buffer(kSize);
    ASSERT_TRUE(b);
    test::fill_repeating(b->data(), pattern(0));
    Status s = ch->call(*b, Deadline::after(std::chrono::milliseconds(100)));
    go.put(1);
    ASSERT_FALSE(s);
    ASSERT_EQ(s.error().code, Errc::TimedOut);
  }
  for (int call = 1; call <= kCalls; ++call) {
    auto b = ch->buffer(kSize);
    ASSERT_TRUE(b) << call;
    test::fill_repeating(b->data(), pattern(call));
    ASSERT_TRUE(ch->call(*b, secs(20))) << call;
    ASSERT_EQ(b->size(), kSize + 1) << call;
    // The first kSize bytes, each one more than sent (answer()).
    ASSERT_EQ(test::mismatches_repeating(b->data().first(kSize), pattern(call), 1), 0u) << call;
  }
  ch->close();
  EXPECT_EQ(join(server), 0);
}

// Hostile review (review1): a peer must not choose how much memory our end keeps. Each client
// sends one 34 MiB request to an echo server and then idles: the reply's vector (the request's)
// becomes a spare once UCX has sent it. When the spare was each channel's, a listener with N such
// clients kept N x 34 MiB (3 here: 102 MiB), none of it in flight; now it is the worker's, one
// for all the listener's channels: at most one payload (34 MiB, and 2 MiB of slack).
TEST(NetReview, IdleServerChannelsKeepAtMostOneSparePayloadBetweenThem) {
  if (test::kSanitized)
    GTEST_SKIP() << "memory bounds: a sanitizer's allocator keeps freed memory resident and maps "
                    "its own (Release runs it)";
  constexpr std::size_t kBig = 34u << 20;
  constexpr int kClients = 3;
  Pipe p = Pipe::make(), grew = Pipe::make();
  pid_t server = spawn([&]() -> int {
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    if (!l) return 10;
    p.put(l->port());
    std::vector<net::Channel> chans;
    std::size_t rss0 = 0;
    for (int c = 0; c < kClients; ++c) {
      auto ch = l->accept(secs(20));
      if (!ch) return 11;
      if (c == 0) rss0 = os::resident_bytes();
      auto m = ch->receive(secs(20));
      if (!m || m->kind != Kind::Request || m->buffer.size() != kBig) return 12;
      m->buffer.data()[0] = std::byte{0x42};
      if (!net::Channel::reply(std::move(*m))) return 13;  // the echo
      auto done = ch->receive(secs(20));  // a one-way message the client sends after the reply
      if (!done || done->kind != Kind::Message) return 14;
      chans.push_back(std::move(*ch));
    }
    grew.put(static_cast<std::uint32_t>((os::resident_bytes() - rss0) >> 20));
    for (auto& ch : chans) {
      auto end = ch.receive(secs(20));
      if (!end || end->kind != Kind::PeerClosed) return 15;
    }
    return 0;
  });
  p.w.reset();
  grew.w.reset();
  const std::uint32_t port = p.get();
  std::vector<net::Channel> clients;
  for (int c = 0; c < kClients; ++c) {
    auto ch = net::connect(url(port), secs(10));
    ASSERT_TRUE(ch) << ch.error().message();
    auto b = ch->buffer(kBig);
    ASSERT_TRUE(b);
    std::memset(b->data().data(), 0x33, kBig);
    ASSERT_TRUE(ch->call(*b, secs(20))) << c;
    ASSERT_EQ(b->size(), kBig);
    ASSERT_EQ(b->data()[0], std::byte{0x42});
    auto done = ch->buffer(1);
    ASSERT_TRUE(done);
    ASSERT_TRUE(ch->send(std::move(*done), secs(10)));
    clients.push_back(std::move(*ch));
  }
  const std::uint32_t grew_mib = grew.get(~0u);
  for (auto& ch : clients) ch.close();
  EXPECT_EQ(join(server), 0);
  std::printf("server: %d idle channels after one 34 MiB echo each: resident grew %u MiB\n",
              kClients, grew_mib);
  EXPECT_LE(grew_mib, (kBig >> 20) + 2) << "more than one spare payload for the listener";
}

// Hostile review (review1): send_done() found the channel to recycle into by the UCX endpoint
// handle (now the spare is the worker's, with no lookup). A 16 MiB send to a client killed before
// it fetched it is cancelled when that channel fails; the channel is then destroyed and a second
// client accepted on the same worker (a new endpoint, possibly at the same address). The cancelled
// send's vector must never become the second channel's spare: the second channel's buffer() must
// hold none of the first client's bytes (0x5e), and nothing may touch freed memory (run under ASan
// too).
TEST(NetReview, ACancelledSendToADeadClientNeverReachesAnotherChannelsBuffer) {
  constexpr std::size_t kBig = 16u << 20, kSize = 1u << 20;
  Pipe p1 = Pipe::make(), p2 = Pipe::make();
  pid_t first = spawn([&]() -> int {
    auto ch = net::connect(url(p1.get()), secs(10));
    if (!ch) return 1;
    ::pause();  // never receives: the server's 16 MiB stays unfetched until we are killed
    return 0;
  });
  pid_t second = spawn([&]() -> int {
    const std::uint32_t port = p2.get();  // only once the first client is dead and its channel gone
    auto ch = net::connect(url(port), secs(10));
    if (!ch) return 1;
    auto b = ch->buffer(kSize);
    if (!b) return 2;
    std::memset(b->data().data(), 0x77, kSize);
    if (!ch->call(*b, secs(20))) return 3;
    auto done = ch->buffer(1);  // the reply is here: the server may look and close
    if (!done || !ch->send(std::move(*done), secs(10))) return 5;
    auto end = ch->receive(secs(20));
    return end && end->kind == Kind::PeerClosed ? 0 : 4;
  });
  p1.r.reset();
  p2.r.reset();
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l);
  p1.put(l->port());
  {
    auto ch1 = l->accept(secs(20));
    ASSERT_TRUE(ch1);
    auto b = ch1->buffer(kBig);
    ASSERT_TRUE(b);
    std::memset(b->data().data(), 0x5e, kBig);
    ASSERT_TRUE(ch1->send(std::move(*b), secs(5)));
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ASSERT_TRUE(os::kill_process(first, SIGKILL));
    auto end = ch1->receive(secs(20));
    ASSERT_TRUE(end);
    EXPECT_EQ(end->kind, Kind::PeerClosed);
  }  // ch1 destroyed: its endpoint closed
  EXPECT_EQ(join(first), 128 + SIGKILL);
  p2.put(l->port());
  auto ch2 = l->accept(secs(20));
  ASSERT_TRUE(ch2);
  auto m = ch2->receive(secs(20));
  ASSERT_TRUE(m);
  ASSERT_EQ(m->kind, Kind::Request);
  ASSERT_TRUE(net::Channel::reply(std::move(*m)));
  auto done = ch2->receive(secs(20));
  ASSERT_TRUE(done);
  ASSERT_EQ(done->kind, Kind::Message);
  // Whatever ch2's spare now holds, it must be ch2's own traffic (0x77), never 0x5e.
  for (std::size_t size : {kSize, kBig}) {
    auto fresh = ch2->buffer(size);
    ASSERT_TRUE(fresh);
    std::size_t foreign = 0;
    for (std::byte x : fresh->data()) foreign += x == std::byte{0x5e};
    EXPECT_EQ(foreign, 0u) << size;
  }
  ch2->close();
  EXPECT_EQ(join(second), 0);
}

// Not a test: the client NetChannel.ConnectKillCycles... runs as a fresh program (posix_spawn of
// this binary), since a child forked after UCX is loaded could not use it. It connects to
// $MBMQ_NET_URL, calls, and waits for the server to kill it.
TEST(NetHelper, DISABLED_ClientThatWaitsToBeKilled) {
  const char* u = std::getenv("MBMQ_NET_URL");
  if (u == nullptr) GTEST_SKIP() << "a helper of ConnectKillCycles";
  auto ch = net::connect(u, secs(10));
  ASSERT_TRUE(ch) << ch.error().message();
  auto b = ch->buffer(64);
  ASSERT_TRUE(b);
  (void)ch->call(*b, secs(60));
}

// Not a test: a client of NetChannel.ManyClients..., run as a fresh program. 50 calls to
// $MBMQ_NET_URL, each answer checked.
TEST(NetHelper, DISABLED_ClientThatCalls) {
  const char* u = std::getenv("MBMQ_NET_URL");
  if (u == nullptr) GTEST_SKIP() << "a helper of ManyClients";
  auto ch = net::connect(u, secs(20));
  ASSERT_TRUE(ch) << ch.error().message();
  for (std::uint64_t i = 0; i < 50; ++i) {
    auto b = ch->buffer(100 + i);
    ASSERT_TRUE(b);
    test::fill(b->data(), i);
    ASSERT_TRUE(ch->call(*b, secs(20))) << i;
    ASSERT_EQ(b->size(), 101 + i);
    for (std::size_t k = 0; k < 100 + i; ++k)
      ASSERT_EQ(b->data()[k],
                static_cast<std::byte>(static_cast<unsigned>(test::pattern(i, k)) + 1));
  }
}

std::size_t thread_count() { return os::dir_listing("/proc/self/task").size(); }

// Clients connect, call, and are killed holding a call, 30 times: each time the server's channel
// ends with PeerClosed promptly, and the server is left with the fds and threads it had.
TEST(NetChannel, ConnectKillCyclesLeakNoFdsOrThreadsAndDeathIsSeenPromptly) {
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  const std::string env = "MBMQ_NET_URL=" + url(l->port());
  std::vector<std::int64_t> seen_ns;
  std::size_t fds0 = 0, threads0 = 0, sockets0 = 0, anon0 = 0;
  constexpr int kCycles = 31;  // the first one warms up (UCX's and the keeper's threads)
  for (int i = 0; i < kCycles; ++i) {
    if (i == 1) {
      fds0 = os::open_fd_count();
      threads0 = thread_count();
      sockets0 = os::open_fd_count("socket:");
      anon0 = os::open_fd_count("anon_inode:");
    }
    auto pid = spawn_helper("NetHelper.DISABLED_ClientThatWaitsToBeKilled", {env});
    ASSERT_TRUE(pid) << pid.error().message();
    auto ch = l->accept(secs(20));
    ASSERT_TRUE(ch) << ch.error().message();
    auto m = ch->receive(secs(20));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Request);
    const std::int64_t t0 = monotonic_ns();
    ASSERT_TRUE(os::kill_process(*pid, SIGKILL));
    auto end = ch->receive(secs(20));
    ASSERT_TRUE(end) << end.error().message();
    EXPECT_EQ(end->kind, Kind::PeerClosed);
    seen_ns.push_back(monotonic_ns() - t0);
    EXPECT_EQ(join(*pid), 128 + SIGKILL);
  }
  // Closed endpoints' sockets may linger in UCX until the listener's worker is progressed again
  // (as a server's next accept() does; sleeping instead, one socket of 31 stayed 10 s, 1 run of
  // 3 on a busy machine): wait for the counts, generously, in accept().
  const Deadline d = secs(10);
  while ((os::open_fd_count() > fds0 || thread_count() > threads0) && !d.expired())
    (void)l->accept(Deadline::after(std::chrono::milliseconds(10)));
  // Which kind, if any, stayed (CI saw 3 more fds than after the first cycle, once, under load).
  EXPECT_LE(os::open_fd_count(), fds0)
      << "sockets " << sockets0 << " -> " << os::open_fd_count("socket:") << ", anon inodes "
      << anon0 << " -> " << os::open_fd_count("anon_inode:") << ", pipes "
      << os::open_fd_count("pipe:");
  EXPECT_LE(thread_count(), threads0);
  std::sort(seen_ns.begin(), seen_ns.end());
  std::printf("kill -> PeerClosed over %zu cycles: median %.2f ms, max %.2f ms\n", seen_ns.size(),
              static_cast<double>(seen_ns[seen_ns.size() / 2]) / 1e6,
              static_cast<double>(seen_ns.back()) / 1e6);
  EXPECT_LT(seen_ns[seen_ns.size() / 2], 1'000'000'000);  // the p99 bar is 100 ms
}

// Eight client programs at once; the server serves each accepted channel from a thread of its
// own. The channels share the listener's UCX worker (and its lock): none starves or mixes up
// another's calls.
TEST(NetChannel, ManyClientsAreServedByThreadsSharingTheListenersWorker) {
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  const std::string env = "MBMQ_NET_URL=" + url(l->port());
  constexpr int kClients = 8;
  std::vector<pid_t> pids;
  for (int i = 0; i < kClients; ++i) {
    auto pid = spawn_helper("NetHelper.DISABLED_ClientThatCalls", {env});
    ASSERT_TRUE(pid) << pid.error().message();
    pids.push_back(*pid);
  }
  std::atomic<int> answered{0}, ended{0};
  std::vector<std::thread> servers;
  for (int i = 0; i < kClients; ++i) {
    auto ch = l->accept(secs(30));
    ASSERT_TRUE(ch) << ch.error().message();
    servers.emplace_back([&answered, &ended, c = std::move(*ch)]() mutable {
      for (;;) {
        auto m = c.receive(secs(30));
        if (!m) return;
        if (m->kind == Kind::PeerClosed) {
          ended.fetch_add(1);
          return;
        }
        answer(m->buffer);
        if (net::Channel::reply(std::move(*m))) answered.fetch_add(1);
      }
    });
  }
  for (pid_t pid : pids) EXPECT_EQ(join(pid), 0);
  for (auto& t : servers) t.join();
  EXPECT_EQ(answered.load(), kClients * 50);
  EXPECT_EQ(ended.load(), kClients);
}

TEST(NetChannel, MalformedUrlsAndHandlesAreInvalidArgument) {
  for (const char* u : {"tcp://127.0.0.1:1/x", "ucx://127.0.0.1/x", "ucx://127.0.0.1:99999/x",
                        "ucx://127.0.0.1:1/", "ucx://localhost:1/x"}) {
    auto ch = net::connect(u, secs(1));
    ASSERT_FALSE(ch) << u;
    EXPECT_EQ(ch.error().code, Errc::InvalidArgument) << u;
  }
  net::Buffer b;
  auto pipe = os::make_pipe();
  ASSERT_TRUE(pipe);
  auto a = b.attach_fd(pipe->first.release());
  ASSERT_FALSE(a);
  EXPECT_EQ(a.error().code, Errc::InvalidArgument);
}

// Loading UCX installs no signal handler and, in a child forked after, every call fails at once
// with a clear error instead of touching UCX.
TEST(NetChannel, UcxLeavesSignalsAloneAndAForkedChildGetsAClearError) {
  // Compared with what was there before (ASan has handlers of its own), not with SIG_DFL.
  constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGHUP};
  void (*before[std::size(kSignals)])(int) = {};
  for (std::size_t i = 0; i < std::size(kSignals); ++i) {
    struct sigaction sa {};
    ASSERT_EQ(::sigaction(kSignals[i], nullptr, &sa), 0);
    before[i] = sa.sa_handler;
  }
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  for (std::size_t i = 0; i < std::size(kSignals); ++i) {
    struct sigaction sa {};
    ASSERT_EQ(::sigaction(kSignals[i], nullptr, &sa), 0);
    EXPECT_EQ(sa.sa_handler, before[i]) << "UCX installed a handler for signal " << kSignals[i];
  }
  const std::uint16_t port = l->port();
  pid_t child = spawn(
      [&]() -> int {
        auto ch = net::connect(url(port), secs(5));
        if (ch || ch.error().code != Errc::InvalidArgument) return 1;
        auto a = l->accept(Deadline::immediate());  // an object inherited from the parent
        if (a || a.error().code != Errc::InvalidArgument) return 3;
        return std::strstr(ch.error().op, "forked") != nullptr ? 0 : 2;
      },
      20);
  EXPECT_EQ(join(child), 0);
}

}  // namespace
}  // namespace mbmq
