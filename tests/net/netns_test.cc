// mbmq::net between two network namespaces joined by a veth pair, made and removed by the test
// itself (root only; skipped with a message otherwise), UCX_TLS=tcp: what loopback cannot show,
// a partition (the link taken down: no FIN, no reset, only silence) and a hostile client.
// The test process never loads UCX: its children do, each in its namespace.
#include "netns.h"  // bench/netns.h: the namespaces, veth pair and enter()

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "mbmq/net.h"
#include "net/net_util.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::Pipe;
using test::secs;
using test::spawn;

using netns::enter;
using netns::sh;

// Whether a child can enter namespace a as the tests' children do (setns, and a mount namespace
// with its own /sys: a container may forbid either).
bool can_enter(const netns::Pair& ns) {
  return join(spawn([&] { return enter(ns.a, ns.va) ? 0 : 1; }, 10)) == 0;
}

#define MBMQ_NEED_NETNS(pair)                                                                 \
  if (::geteuid() != 0) GTEST_SKIP() << "needs root (ip netns, veth): run the suite as root"; \
  if (!(pair).ok || !can_enter(pair))                                                         \
  GTEST_SKIP() << "ip netns / veth / setns+sysfs remount unavailable here (no iproute2, no "  \
                  "CAP_NET_ADMIN or CAP_SYS_ADMIN?)"

constexpr std::uint32_t kPeerTimeoutMs = 1000;

// A partition: the client's link goes down mid-conversation. Nothing tells TCP; the heartbeat
// (peer_timeout 1 s) must end the call in flight with PeerClosed within peer_timeout + 1 s, and the
// server's channel too.
TEST(NetNamespaces, APartitionEndsACallInFlightWithinPeerTimeout) {
  netns::Pair ns;
  MBMQ_NEED_NETNS(ns);
  ::setenv("UCX_TLS", "tcp", 1);
  Pipe port = Pipe::make(), ready = Pipe::make(), go = Pipe::make(), took = Pipe::make(),
       server_saw = Pipe::make();
  pid_t server = spawn(
      [&]() -> int {
        if (!enter(ns.a, ns.va)) return 10;
        net::ListenOptions opt;
        opt.peer_timeout = std::chrono::milliseconds(kPeerTimeoutMs);
        auto l = net::listen("ucx://" + ns.ip_a + ":0/svc", opt);
        if (!l) {
          std::fprintf(stderr, "server: %s\n", l.error().message().c_str());
          return 11;
        }
        port.put(l->port());
        auto ch = l->accept(secs(20));
        if (!ch) return 12;
        auto m = ch->receive(secs(20));  // the first call: answered
        if (!m || m->kind != Kind::Request) return 13;
        if (!net::Channel::reply(std::move(*m))) return 14;
        // The second call never arrives (the link is down); silence must end the channel.
        const std::int64_t t0 = monotonic_ns();
        auto end = ch->receive(secs(30));
        if (!end) return 15;
        server_saw.put(static_cast<std::uint32_t>((monotonic_ns() - t0) / 1'000'000));
        return end->kind == Kind::PeerClosed ? 0 : 16;
      },
      60);
  pid_t client = spawn(
      [&]() -> int {
        if (!enter(ns.b, ns.vb)) return 10;
        const std::uint32_t p = port.get();
        net::ConnectOptions opt;
        opt.peer_timeout = std::chrono::milliseconds(kPeerTimeoutMs);
        auto ch =
            net::connect("ucx://" + ns.ip_a + ":" + std::to_string(p) + "/svc", secs(10), opt);
        if (!ch) {
          std::fprintf(stderr, "client: %s\n", ch.error().message().c_str());
          return 11;
        }
        auto b = ch->buffer(64);
        if (!b || !ch->call(*b, secs(10))) return 12;
        ready.put(1);
        if (go.get() != 1) return 13;
        const std::int64_t t0 = monotonic_ns();
        Status s = ch->call(*b, secs(30));
        took.put(static_cast<std::uint32_t>((monotonic_ns() - t0) / 1'000'000));
        return !s && s.error().code == Errc::PeerClosed ? 0 : 14;
      },
      60);
  port.w.reset();
  ready.w.reset();
  took.w.reset();
  server_saw.w.reset();
  if (ready.get() != 1) {
    (void)os::kill_process(server, SIGKILL);
    const int c = join(client);
    FAIL() << "the first call failed: client exit " << c << ", server exit " << join(server);
  }
  ASSERT_EQ(sh("ip -n " + ns.b + " link set " + ns.vb + " down"), 0);
  go.put(1);
  const std::uint32_t client_ms = took.get(0xffffffffu);
  const std::uint32_t server_ms = server_saw.get();
  EXPECT_EQ(join(client), 0);
  EXPECT_EQ(join(server), 0);
  std::printf("partition seen by the caller in %u ms, by the server in %u ms (peer_timeout %u)\n",
              client_ms, server_ms, kPeerTimeoutMs);
  EXPECT_LE(client_ms, kPeerTimeoutMs + 1000);
  EXPECT_LE(server_ms, kPeerTimeoutMs + 1000);
}

// Kill either side across the veth: the other one's call (client) or receive (server) ends with
// PeerClosed promptly (the dead host's kernel resets the TCP connection), far below peer_timeout.
TEST(NetNamespaces, AKilledPeerInTheOtherNamespaceIsSeenPromptly) {
  netns::Pair ns;
  MBMQ_NEED_NETNS(ns);
  ::setenv("UCX_TLS", "tcp", 1);
  for (const bool kill_server : {true, false}) {
    Pipe port = Pipe::make(), holding = Pipe::make(), took = Pipe::make();
    pid_t server = spawn(
        [&]() -> int {
          if (!enter(ns.a, ns.va)) return 10;
          auto l = net::listen("ucx://" + ns.ip_a + ":0/svc");  // peer_timeout: the default 10 s
          if (!l) return 11;
          port.put(l->port());
          auto ch = l->accept(secs(20));
          if (!ch) return 12;
          auto m = ch->receive(secs(20));
          if (!m || m->kind != Kind::Request) return 13;
          holding.put(1);
          const std::int64_t t0 = monotonic_ns();
          auto end = ch->receive(secs(30));  // the client is killed (or we are)
          took.put(static_cast<std::uint32_t>((monotonic_ns() - t0) / 1'000'000));
          return end && end->kind == Kind::PeerClosed ? 0 : 14;
        },
        60);
    pid_t client = spawn(
        [&]() -> int {
          if (!enter(ns.b, ns.vb)) return 10;
          const std::uint32_t p = port.get();
          auto ch = net::connect("ucx://" + ns.ip_a + ":" + std::to_string(p) + "/svc", secs(10));
          if (!ch) return 11;
          auto b = ch->buffer(64);
          if (!b) return 12;
          const std::int64_t t0 = monotonic_ns();
          Status s = ch->call(*b, secs(30));  // never answered: the server is killed (or we are)
          took.put(static_cast<std::uint32_t>((monotonic_ns() - t0) / 1'000'000));
          return !s && s.error().code == Errc::PeerClosed ? 0 : 13;
        },
        60);
    port.w.reset();
    holding.w.reset();
    took.w.reset();
    ASSERT_EQ(holding.get(), 1u) << "the call did not reach the server";
    const pid_t victim = kill_server ? server : client;
    const pid_t survivor = kill_server ? client : server;
    const std::int64_t t0 = monotonic_ns();
    ASSERT_TRUE(os::kill_process(victim, SIGKILL));
    EXPECT_EQ(join(victim), 128 + SIGKILL);
    const std::uint32_t ms = took.get(0xffffffffu);
    EXPECT_EQ(join(survivor), 0);
    const std::int64_t seen_ms = (monotonic_ns() - t0) / 1'000'000;
    std::printf("killed %s: the other side saw PeerClosed %lld ms after the kill\n",
                kill_server ? "server" : "client", static_cast<long long>(seen_ms));
    EXPECT_NE(ms, 0xffffffffu);
    EXPECT_LT(seen_ms, 3000) << "not via peer_timeout (10 s): the reset must be seen";
  }
}

}  // namespace
}  // namespace mbmq
