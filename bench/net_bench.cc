// net_bench: 64 B round trips between two processes on this machine, mbmq::net over UCX's TCP
// transport (127.0.0.1) beside plain blocking TCP loopback (issue #19; a first, by-hand bench:
// `build/bench/net_bench [iterations]`). Prints the median and mean round trip of each.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "mbmq/net.h"
#include "os/process.h"
#include "os/tcp.h"

namespace {

using mbmq::Deadline;
using mbmq::monotonic_ns;
namespace net = mbmq::net;
namespace os = mbmq::os;

constexpr std::size_t kSize = 64;

void report(const char* what, std::vector<std::int64_t>& ns) {
  std::sort(ns.begin(), ns.end());
  double sum = 0;
  for (auto v : ns) sum += static_cast<double>(v);
  std::printf("%-34s median %7.2f us  mean %7.2f us  p99 %7.2f us  (%zu round trips)\n", what,
              static_cast<double>(ns[ns.size() / 2]) / 1e3,
              sum / static_cast<double>(ns.size()) / 1e3,
              static_cast<double>(ns[ns.size() * 99 / 100]) / 1e3, ns.size());
}

// A server process for mbmq::net, forked before this process loads UCX: it listens, writes its
// port to `port_fd`, and answers requests with `wait` until the client leaves.
pid_t net_server(int port_fd, mbmq::WaitPolicy wait) {
  auto pid = os::fork_process();
  if (!pid || *pid != 0) return pid ? *pid : -1;
  os::die_with_parent();
  auto l = net::listen("ucx://127.0.0.1:0/bench");
  if (!l) os::exit_now(1);
  const std::uint32_t port = l->port();
  (void)os::write_once(port_fd, &port, sizeof port);
  auto ch = l->accept(Deadline::after(std::chrono::seconds(300)));
  if (!ch) os::exit_now(2);
  ch->set_wait_policy(wait);
  for (;;) {
    auto m = ch->receive(Deadline::never());
    if (!m || m->kind == mbmq::Kind::PeerClosed) os::exit_now(0);
    if (m->kind == mbmq::Kind::Request) (void)net::Channel::reply(std::move(*m));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 5000;
  const mbmq::WaitPolicy spin{mbmq::WaitMode::Spin, {}};
  const mbmq::WaitPolicy sleep{mbmq::WaitMode::Sleep, {}};
  // Both mbmq::net servers are forked before UCX is loaded here.
  auto spin_pipe = os::make_pipe();
  auto sleep_pipe = os::make_pipe();
  if (!spin_pipe || !sleep_pipe) return 1;
  const pid_t s1 = net_server(spin_pipe->second.get(), spin);
  const pid_t s2 = net_server(sleep_pipe->second.get(), sleep);

  // Plain TCP loopback, blocking (the peer sleeps in read()).
  {
    auto pair = os::tcp_loopback_pair();
    if (!pair) return 1;
    auto pid = os::fork_process();
    if (!pid) return 1;
    std::byte buf[kSize] = {};
    if (*pid == 0) {
      pair->first.reset();
      for (;;) {
        auto n = os::read_full(pair->second.get(), buf);
        if (!n || *n != kSize) os::exit_now(0);
        (void)os::write_once(pair->second.get(), buf, kSize);
      }
    }
    pair->second.reset();
    std::vector<std::int64_t> ns;
    for (int i = 0; i < iters; ++i) {
      const std::int64_t t0 = monotonic_ns();
      (void)os::write_once(pair->first.get(), buf, kSize);
      (void)os::read_full(pair->first.get(), buf);
      ns.push_back(monotonic_ns() - t0);
    }
    pair->first.reset();
    (void)os::wait_process(*pid);
    report("TCP loopback, blocking", ns);
  }

  for (auto [pipe, pid, wait, name] :
       {std::tuple{&*spin_pipe, s1, spin, "mbmq::net (UCX tcp), both spin"},
        std::tuple{&*sleep_pipe, s2, sleep, "mbmq::net (UCX tcp), both sleep"}}) {
    std::uint32_t port = 0;
    auto n = os::read_full(pipe->first.get(), std::as_writable_bytes(std::span(&port, 1)));
    if (!n || *n != sizeof port) return 2;
    net::ConnectOptions opt;
    opt.wait = wait;
    auto ch = net::connect("ucx://127.0.0.1:" + std::to_string(port) + "/bench",
                           Deadline::after(std::chrono::seconds(10)), opt);
    if (!ch) {
      std::fprintf(stderr, "connect: %s\n", ch.error().message().c_str());
      return 3;
    }
    auto b = ch->buffer(kSize);
    if (!b) return 4;
    std::vector<std::int64_t> ns;
    for (int i = 0; i < iters; ++i) {
      const std::int64_t t0 = monotonic_ns();
      if (!ch->call(*b, Deadline::after(std::chrono::seconds(5)))) return 5;
      ns.push_back(monotonic_ns() - t0);
    }
    ch->close();
    (void)os::wait_process(pid);
    report(name, ns);
  }
  return 0;
}
