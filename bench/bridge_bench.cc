// bridge_bench: what net::Bridge (mbmq/net_bridge.h) adds to a remote round trip. 64 B calls from
// this process to a server process over UCX's TCP transport on 127.0.0.1, answered either directly
// on the accepted net::Channel, or through a Bridge by a MsgQueue loop (reply_and_wait). Runs
// alternate between the two; each prints its median, and the end the median of the medians and
// their ratio. `build/bench/bridge_bench [iterations per run] [runs]`, by hand.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "mbmq/mbmq.h"
#include "mbmq/net.h"
#include "mbmq/net_bridge.h"
#include "os/process.h"

namespace {

using mbmq::Deadline;
using mbmq::monotonic_ns;
namespace net = mbmq::net;
namespace os = mbmq::os;

constexpr std::size_t kSize = 64;
constexpr int kWarmUp = 200;

enum class Mode { Direct, Bridged };

[[noreturn]] void serve_direct(net::Listener& l, mbmq::WaitPolicy wait) {
  auto ch = l.accept(Deadline::after(std::chrono::seconds(300)));
  if (!ch) os::exit_now(2);
  ch->set_wait_policy(wait);
  for (;;) {
    auto m = ch->receive(Deadline::never());
    if (!m || m->kind == mbmq::Kind::PeerClosed) os::exit_now(0);
    if (m->kind == mbmq::Kind::Request) (void)net::Channel::reply(std::move(*m));
  }
}

[[noreturn]] void serve_bridged(net::Listener&& l, mbmq::WaitPolicy wait) {
  net::BridgeOptions opt;
  opt.channel.wait = wait;
  opt.remote_wait = wait;
  auto bridge = net::Bridge::create(std::move(l), opt);
  auto queue = mbmq::MsgQueue::create(wait);
  if (!bridge || !queue) os::exit_now(3);
  auto end = bridge->accept(Deadline::after(std::chrono::seconds(300)));
  if (!end || !queue->adopt(std::move(*end), 1)) os::exit_now(4);
  auto m = queue->wait(Deadline::never());
  for (;;) {
    if (!m || m->kind == mbmq::Kind::PeerClosed) os::exit_now(0);
    m = m->kind == mbmq::Kind::Request ? queue->reply_and_wait(std::move(*m), Deadline::never())
                                       : queue->wait(Deadline::never());
  }
}

// A server process, forked before this process loads UCX: it listens, writes its port to
// `port_fd`, and serves one client.
pid_t server(int port_fd, Mode mode, mbmq::WaitPolicy wait) {
  auto pid = os::fork_process();
  if (!pid || *pid != 0) return pid ? *pid : -1;
  os::die_with_parent();
  auto l = net::listen("ucx://127.0.0.1:0/bench");
  if (!l) os::exit_now(1);
  const std::uint32_t port = l->port();
  (void)os::write_once(port_fd, &port, sizeof port);
  if (mode == Mode::Direct) serve_direct(*l, wait);
  serve_bridged(std::move(*l), wait);
}

struct Server {
  Mode mode;
  mbmq::WaitPolicy wait;  // the client's
  const char* name;
  os::UniqueFd port_r;
  pid_t pid;
};

// The median round trip of `iters` calls to `s`, in ns; -1 on failure.
std::int64_t run(Server& s, int iters) {
  std::uint32_t port = 0;
  auto n = os::read_full(s.port_r.get(), std::as_writable_bytes(std::span(&port, 1)));
  if (!n || *n != sizeof port) return -1;
  net::ConnectOptions opt;
  opt.wait = s.wait;
  auto ch = net::connect("ucx://127.0.0.1:" + std::to_string(port) + "/bench",
                         Deadline::after(std::chrono::seconds(10)), opt);
  if (!ch) {
    std::fprintf(stderr, "connect: %s\n", ch.error().message().c_str());
    return -1;
  }
  auto b = ch->buffer(kSize);
  if (!b) return -1;
  std::vector<std::int64_t> ns;
  for (int i = 0; i < kWarmUp + iters; ++i) {
    const std::int64_t t0 = monotonic_ns();
    if (!ch->call(*b, Deadline::after(std::chrono::seconds(5)))) return -1;
    if (i >= kWarmUp) ns.push_back(monotonic_ns() - t0);
  }
  ch->close();
  (void)os::wait_process(s.pid);
  std::sort(ns.begin(), ns.end());
  return ns[ns.size() / 2];
}

double median_us(std::vector<std::int64_t> v) {
  std::sort(v.begin(), v.end());
  return static_cast<double>(v[v.size() / 2]) / 1e3;
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 3000;
  const int runs = argc > 2 ? std::atoi(argv[2]) : 5;
  if (iters < 1 || runs < 1) return 2;
  const mbmq::WaitPolicy adaptive{};
  const mbmq::WaitPolicy sleep{mbmq::WaitMode::Sleep, {}};
  struct Config {
    Mode mode;
    mbmq::WaitPolicy client, server;
    const char* name;
  };
  // In pairs: direct, then bridged, with the same policies.
  const Config configs[] = {
      {Mode::Direct, adaptive, adaptive, "direct, all adaptive"},
      {Mode::Bridged, adaptive, adaptive, "bridged, all adaptive"},
      {Mode::Direct, adaptive, sleep, "direct, server sleeps"},
      {Mode::Bridged, adaptive, sleep, "bridged, server sleeps"},
      {Mode::Direct, sleep, sleep, "direct, all sleep"},
      {Mode::Bridged, sleep, sleep, "bridged, all sleep"},
  };
  constexpr std::size_t kConfigs = sizeof configs / sizeof configs[0];
  // Every server is forked before UCX is loaded here.
  std::vector<Server> servers;
  for (int r = 0; r < runs; ++r)
    for (const Config& c : configs) {
      auto p = os::make_pipe();
      if (!p) return 1;
      const pid_t pid = server(p->second.get(), c.mode, c.server);
      if (pid < 0) return 1;
      servers.push_back(Server{c.mode, c.client, c.name, std::move(p->first), pid});
    }
  std::vector<std::int64_t> medians[kConfigs];
  for (int r = 0; r < runs; ++r)
    for (std::size_t c = 0; c < kConfigs; ++c) {
      const std::int64_t m = run(servers[static_cast<std::size_t>(r) * kConfigs + c], iters);
      if (m < 0) return 5;
      medians[c].push_back(m);
      std::printf("run %d  %-32s median %7.2f us\n", r, configs[c].name,
                  static_cast<double>(m) / 1e3);
    }
  std::printf("\n64 B round trips, %d runs of %d calls: median of the run medians\n", runs, iters);
  for (std::size_t c = 0; c < kConfigs; ++c)
    std::printf("  %-32s %7.2f us\n", configs[c].name, median_us(medians[c]));
  for (std::size_t c = 0; c + 1 < kConfigs; c += 2)
    std::printf("  bridge adds (%s): %+.2f us, %.2fx\n", configs[c + 1].name,
                median_us(medians[c + 1]) - median_us(medians[c]),
                median_us(medians[c + 1]) / median_us(medians[c]));
  return 0;
}
