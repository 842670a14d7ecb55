// mbmq::net between two network namespaces joined by a veth pair, made and removed by the test
// itself (root only; skipped with a message otherwise), UCX_TLS=tcp: what loopback cannot show,
// a partition (the link taken down: no FIN, no reset, only silence) and a hostile client.
// The test process never loads UCX: its children do, each in its namespace.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
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

int sh(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()); }

// Namespaces mq<pid>a and mq<pid>b, veth ends in each, 10.<k>.<j>.1 and .2/24; deleted (with the
// veth pair) by the destructor.
struct NetnsPair {
  std::string a, b, va, vb, ip_a, ip_b;
  bool ok = false;
  NetnsPair() {
    const unsigned pid = static_cast<unsigned>(::getpid());
    const std::string tag = std::to_string(pid);
    a = "mq" + tag + "a";
    b = "mq" + tag + "b";
    va = "mq" + tag + "x";
    vb = "mq" + tag + "y";
    const std::string net =
        "10." + std::to_string(100 + pid % 100) + "." + std::to_string(pid / 100 % 250) + ".";
    ip_a = net + "1";
    ip_b = net + "2";
    ok = sh("ip netns add " + a) == 0 && sh("ip netns add " + b) == 0 &&
         sh("ip link add " + va + " type veth peer name " + vb) == 0 &&
         sh("ip link set " + va + " netns " + a) == 0 &&
         sh("ip link set " + vb + " netns " + b) == 0 &&
         sh("ip -n " + a + " addr add " + ip_a + "/24 dev " + va) == 0 &&
         sh("ip -n " + b + " addr add " + ip_b + "/24 dev " + vb) == 0 &&
         sh("ip -n " + a + " link set " + va + " up") == 0 &&
         sh("ip -n " + b + " link set " + vb + " up") == 0 &&
         sh("ip -n " + a + " link set lo up") == 0 && sh("ip -n " + b + " link set lo up") == 0 &&
         running(a, va) && running(b, vb) && can_enter();
  }
  // Whether a child can enter namespace a as the tests' children do (setns, and a mount namespace
  // with its own /sys: a container may forbid either).
  bool can_enter() const;
  // Waits (up to 10 s) until the link has its carrier: UCX ignores a device that is not running.
  static bool running(const std::string& ns, const std::string& dev) {
    for (int i = 0; i < 1000; ++i) {
      if (sh("ip -n " + ns + " link show " + dev + " | grep -q 'state UP'") == 0) return true;
      os::sleep_ns(10'000'000);
    }
    return false;
  }
  ~NetnsPair() {
    (void)sh("ip netns del " + a);
    (void)sh("ip netns del " + b);
    (void)sh("ip link del " + va);  // if it was made but never moved into a namespace
  }
  NetnsPair(const NetnsPair&) = delete;
  NetnsPair& operator=(const NetnsPair&) = delete;
};

// In a child: moves this process into namespace `ns`, and gives UCX that namespace's veth only.
// UCX takes two namespaces of one host for one machine (same host name and boot id) and would
// try the peer's loopback (its own, here) and fail the endpoint; real hosts differ in both.
bool enter(const std::string& ns, const std::string& dev) {
  ::setenv("UCX_NET_DEVICES", dev.c_str(), 1);
  const int fd = ::open(("/var/run/netns/" + ns).c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::setns(fd, CLONE_NEWNET) == 0;
  ::close(fd);
  if (!ok) return false;
  // UCX lists devices in /sys/class/net, which shows the namespace of whoever mounted /sys: do
  // what `ip netns exec` does, a mount namespace of our own with a sysfs of the new namespace.
  return ::unshare(CLONE_NEWNS) == 0 &&
         ::mount("", "/", nullptr, MS_SLAVE | MS_REC, nullptr) == 0 &&
         ::umount2("/sys", MNT_DETACH) == 0 &&
         ::mount(ns.c_str(), "/sys", "sysfs", 0, nullptr) == 0;
}

bool NetnsPair::can_enter() const {
  return join(spawn([&] { return enter(a, va) ? 0 : 1; }, 10)) == 0;
}

#define MBMQ_NEED_NETNS(pair)                                                                 \
  if (::geteuid() != 0) GTEST_SKIP() << "needs root (ip netns, veth): run the suite as root"; \
  if (!(pair).ok)                                                                             \
  GTEST_SKIP() << "ip netns / veth / setns+sysfs remount unavailable here (no iproute2, no "  \
                  "CAP_NET_ADMIN or CAP_SYS_ADMIN?)"

constexpr std::uint32_t kPeerTimeoutMs = 1000;

// A partition: the client's link goes down mid-conversation. Nothing tells TCP; the heartbeat
// (peer_timeout 1 s) must end the call in flight with PeerClosed within peer_timeout + 1 s, and the
// server's channel too.
TEST(NetNamespaces, APartitionEndsACallInFlightWithinPeerTimeout) {
  NetnsPair ns;
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
  NetnsPair ns;
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
