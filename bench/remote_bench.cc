// mbmq-net-bench: issue #19's measurements of mbmq::net between two network namespaces joined by
// a veth pair (made and removed here; root needed), UCX_TLS=tcp. Rows, all in one run:
//   mbmq-net-spin, mbmq-net-sleep  mbmq::net::Channel::call, both ends spinning / sleeping
//   mbmq-net-queue                 the same, sleeping, but the server's end adopted by a MsgQueue
//                                  (net::adopt) and served by MsgQueue::wait/reply: the server
//                                  loop's shape that serves local and remote clients at once
//   raw-ucx                        the same request/response written straight on ucp AM, busy-poll
//   ucx_perftest                   UCX's own ucp_am_lat / ucp_am_bw (package ucx-utils); its
//                                  latency is a half round trip: doubled here
//   tcp                            plain blocking TCP sockets, the same echo
// and, only when named in --only (one-way rows to set beside mbmq-net-spin and raw-ucx):
//   mbmq-channel-spin              mbmq-net-spin's client as an mbmq::Channel from
//                                  mbmq::connect("ucx://...") (its server unchanged): what the one
//                                  Channel type adds to net::Channel
//   mbmq-net-spin-grant            mbmq-net-spin with both ends' inbox_bytes at --grant-bytes
//                                  (default 8 x the largest one-way size): raw-ucx's window of 8
//                                  in flight, where the default grant (16 MiB) lets one 16 MiB
//                                  message out at a time
//   raw-ucx-distinct               raw-ucx whose one-way messages are sent from 8 buffers in turn
//                                  and land in 8 (raw-ucx: all from one buffer into one sink, the
//                                  bytes staying in cache; distinct messages, as mbmq::net's, each
//                                  a buffer of its own, do not)
// A round trip: the client sends SIZE bytes (its first 8 a sequence number), the server echoes
// the SIZE bytes back, the client checks the number. One-way: the client sends SIZE-byte messages
// for the cell's time, then one round trip that the server answers after all of them have
// landed; MB/s = bytes / time to that answer. Every mechanism runs once per round (--rounds, 3),
// the order reversed every other round; each bar is the median of the rounds' ratios.
//
// A separate program (not `mbmq bench --remote`): the `mbmq` tool is installed by the .deb and
// must run where UCX is absent, and the raw-UCX baseline calls ucp directly. Built only where
// UCX is found, as mbmq::net itself.
//
//   sudo build/bench/mbmq-net-bench [--seconds S] [--rounds N] [--sizes 64,4K,...] [--oneway-sizes
//   ...]
//                                   [--only tcp,raw-ucx,...] [--json] [--no-pin]
//                                   [--grant-bytes N] [--raw-sweep W:B:S,...]
// --raw-sweep: raw UCX one-way streams of several shapes (W in flight, from B buffers, into S
// sinks) alternated in slices on one connection (see raw_sweep): what the window and the memory
// the copies touch cost, apart from any other difference, on a machine too noisy for rows.
//
// Pinning: the client's main thread on CPU 0, the server's on CPU 1, as `mbmq bench` does, but
// only once UCX is up (after listen()/connect()): UCX's async thread and mbmq::net's keeper
// thread keep every CPU. Pinned before, they inherit the spinning thread's CPU and starve behind
// it (measured: mbmq-net-spin one-way 16 MiB at 20 MB/s); not pinned at all, two spinning
// processes on a busy 2-vCPU machine share a CPU and a round trip waits for a scheduler tick
// (4 ms multiples measured). ucx_perftest is pinned with its own -c (the whole process).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "mbmq/net.h"
#include "mbmq/rendezvous.h"
#include "netns.h"
#include "os/process.h"
#include "os/tcp.h"
#include "remote_raw_ucx.h"

namespace {

using mbmq::Deadline;
using mbmq::monotonic_ns;
namespace net = mbmq::net;
namespace os = mbmq::os;

struct Options {
  double seconds = 0.3;
  std::vector<std::size_t> sizes{64, 4u << 10, 64u << 10, 1u << 20, 16u << 20, 64u << 20};
  std::vector<std::size_t> oneway{64u << 10, 1u << 20, 16u << 20};
  std::vector<std::string> only;
  bool json = false;
  bool pin = true;
  int rounds = 3;  // every mechanism once per round, in alternating order (see main)
  // The mbmq-net-spin-grant row's grant (both ends' inbox_bytes): 0 = 8 x the largest one-way
  // size, raw-ucx's window of 8 messages in flight at that size (see mbmq_net).
  std::uint64_t grant_bytes = 0;
  std::vector<mbmq::bench::StreamShape> raw_sweep;  // --raw-sweep (see raw_sweep)
};
Options g_opt;

// One row, sent by the client child to the parent through a pipe (fixed layout).
struct Row {
  char mechanism[32] = {};
  std::uint64_t size = 0;
  std::uint32_t oneway = 0;  // 1: a one-way throughput row
  std::uint32_t iterations = 0;
  std::uint32_t round = 0;  // set by main
  double p50_ns = 0, p99_ns = 0, max_ns = 0, min_ns = 0, mb_per_s = 0;
  char error[160] = {};
};

void set_str(char* dst, std::size_t cap, const std::string& s) {
  std::snprintf(dst, cap, "%s", s.c_str());
}

std::string human(std::size_t n) {
  if (n >= (1u << 20) && n % (1u << 20) == 0) return std::to_string(n >> 20) + " MiB";
  if (n >= 1024 && n % 1024 == 0) return std::to_string(n >> 10) + " KiB";
  return std::to_string(n) + " B";
}

double pct(const std::vector<std::int64_t>& v, double q) {
  if (v.empty()) return 0;
  const auto i = static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5);
  return static_cast<double>(v[std::min(i, v.size() - 1)]);
}

// What a client measures with: rtt(size, seq) one round trip; stream(size, until) one-way bytes.
struct ClientOps {
  std::function<bool(std::size_t, std::uint64_t)> rtt;
  std::function<std::int64_t(std::size_t, std::int64_t)> stream;
};

// Runs the round-trip cells then the one-way cells, writing a Row per cell to `out`.
void client_cells(const std::string& mech, ClientOps& ops, int out) {
  std::uint64_t seq = 10;
  auto put = [&](const Row& r) { (void)os::write_full(out, std::as_bytes(std::span(&r, 1))); };
  const auto budget = static_cast<std::int64_t>(g_opt.seconds * 1e9);
  for (std::size_t size : g_opt.sizes) {
    Row r;
    set_str(r.mechanism, sizeof r.mechanism, mech);
    r.size = size;
    // Warm-up: a fifth of the budget, at least 3 round trips.
    const std::int64_t warm_end = monotonic_ns() + budget / 5;
    bool ok = true;
    for (int i = 0; ok && (i < 3 || monotonic_ns() < warm_end); ++i) ok = ops.rtt(size, ++seq);
    std::vector<std::int64_t> lat;
    lat.reserve(200'000);
    const std::int64_t end = monotonic_ns() + budget;
    while (ok && lat.size() < 200'000 && (lat.size() < 7 || monotonic_ns() < end)) {
      const std::int64_t t0 = monotonic_ns();
      ok = ops.rtt(size, ++seq);
      lat.push_back(monotonic_ns() - t0);
    }
    if (!ok) set_str(r.error, sizeof r.error, "a round trip failed or its reply was wrong");
    std::sort(lat.begin(), lat.end());
    r.iterations = static_cast<std::uint32_t>(lat.size());
    r.p50_ns = pct(lat, 0.5);
    r.p99_ns = pct(lat, 0.99);
    r.max_ns = pct(lat, 1.0);
    r.min_ns = pct(lat, 0.0);
    if (r.p50_ns > 0) r.mb_per_s = static_cast<double>(size) * 2 / (r.p50_ns / 1e9) / 1e6;
    put(r);
    if (!ok) return;
  }
  for (std::size_t size : g_opt.oneway) {
    Row r;
    set_str(r.mechanism, sizeof r.mechanism, mech);
    r.size = size;
    r.oneway = 1;
    (void)ops.stream(size, monotonic_ns() + budget / 5);  // warm-up
    const std::int64_t t0 = monotonic_ns();
    const std::int64_t bytes = ops.stream(size, t0 + budget);
    const std::int64_t t1 = monotonic_ns();
    if (bytes < 0) {
      set_str(r.error, sizeof r.error, "the one-way stream failed");
    } else {
      r.iterations = static_cast<std::uint32_t>(bytes / static_cast<std::int64_t>(size));
      r.mb_per_s = static_cast<double>(bytes) / (static_cast<double>(t1 - t0) / 1e9) / 1e6;
    }
    put(r);
  }
}

void pin(int cpu) {
  if (g_opt.pin && os::cpu_count() >= 2) (void)os::pin_to_cpu(cpu);
}

// A child in namespace `ns`: body() is its exit code (128 + 99 if it could not enter).
pid_t child_in(const std::string& ns, const std::string& dev, int cpu,
               const std::function<int()>& body) {
  auto pid = os::fork_process();
  if (!pid) return -1;
  if (*pid != 0) return *pid;
  os::die_with_parent();
  os::ignore_sigpipe();
  ::setenv("UCX_TLS", "tcp", 1);
  if (!mbmq::netns::enter(ns, dev)) os::exit_now(99);
  (void)cpu;  // pinned by body(), once UCX's threads exist
  os::exit_now(body());
}

int join(pid_t pid) {
  auto st = os::wait_process(pid);
  if (!st) return -1;
  if (WIFEXITED(*st)) return WEXITSTATUS(*st);
  return 128 + WTERMSIG(*st);
}

void put_u32(int fd, std::uint32_t v) { (void)os::write_full(fd, std::as_bytes(std::span(&v, 1))); }
std::uint32_t get_u32(int fd) {
  std::uint32_t v = 0;
  auto n = os::read_full(fd, std::as_writable_bytes(std::span(&v, 1)));
  return n && *n == sizeof v ? v : 0;
}

// ---- one mechanism: a server child in namespace a, a client child in namespace b -------------
std::vector<Row> run_pair(const mbmq::netns::Pair& ns, const std::string& mech,
                          const std::function<int(int port_fd)>& serve,
                          const std::function<int(std::uint32_t port, int out)>& client) {
  std::vector<Row> rows;
  auto port = os::make_pipe();
  auto out = os::make_pipe();
  if (!port || !out) return rows;
  const int pw = port->second.get(), ow = out->second.get(), pr = port->first.get();
  const pid_t server = child_in(ns.a, ns.va, 1, [&] { return serve(pw); });
  const pid_t cl = child_in(ns.b, ns.vb, 0, [&] {
    const std::uint32_t p = get_u32(pr);
    if (p == 0) return 98;
    return client(p, ow);
  });
  port->second.reset();
  out->second.reset();
  port->first.reset();
  for (;;) {
    Row r;
    auto n = os::read_full(out->first.get(), std::as_writable_bytes(std::span(&r, 1)));
    if (!n || *n != sizeof r) break;
    rows.push_back(r);
  }
  const int c = join(cl);
  (void)os::kill_process(server, SIGKILL);  // servers of a client that failed may still wait
  (void)join(server);
  if (rows.empty() || c != 0) {
    Row r;
    set_str(r.mechanism, sizeof r.mechanism, mech);
    set_str(r.error, sizeof r.error, "client exit code " + std::to_string(c));
    if (rows.empty()) rows.push_back(r);
  }
  return rows;
}

std::string load();

// ---- mbmq::net --------------------------------------------------------------------------------
// grant: both ends' inbox_bytes (0: the library's default, kDefaultInboxBytes). The default
// grant lets one 16 MiB one-way message out at a time (docs/design/net.md F2), raw-ucx keeps 8
// in flight: the mbmq-net-spin-grant row grants what 8 of the largest one-way size need (the
// client's own grant too, as a sender uses at most the larger of its own and the default, F1).
template <class Ch>
int run_client(Ch& ch, const std::string& mech, int out);

// via_channel (the mbmq-channel-spin row): the client is an mbmq::Channel from
// mbmq::connect("ucx://...") (a remote end over the same net::Channel), its one-way stream paced by
// buffer(size, deadline) then send(), as a local producer's: what the one Channel type costs.
std::vector<Row> mbmq_net(const mbmq::netns::Pair& ns, const std::string& mech, mbmq::WaitMode mode,
                          bool queue = false, std::uint32_t grant = 0, bool via_channel = false) {
  const mbmq::WaitPolicy wait{mode, {}};
  auto serve = [&](int port_fd) -> int {
    net::ListenOptions lo;
    lo.max_message = (64u << 20) + 4096;
    if (grant != 0) lo.inbox_bytes = grant;
    auto l = net::listen("ucx://" + ns.ip_a + ":0/bench", lo);
    if (!l) return 10;
    if (!queue) pin(1);
    put_u32(port_fd, l->port());
    auto ch = l->accept(Deadline::after(std::chrono::seconds(30)));
    if (!ch) return 11;
    ch->set_wait_policy(wait);
    if (queue) {
      auto q = mbmq::MsgQueue::create(wait);
      if (!q || !net::adopt(*q, std::move(*ch), 1)) return 12;
      pin(1);  // after adopt(): the pump thread it starts keeps every CPU, as UCX's own
      for (;;) {
        auto m = q->wait(Deadline::never());
        if (!m || m->kind == mbmq::Kind::PeerClosed) return 0;
        if (m->kind == mbmq::Kind::Request) (void)mbmq::MsgQueue::reply(std::move(*m));
      }
    }
    for (;;) {
      auto m = ch->receive(Deadline::never());
      if (!m || m->kind == mbmq::Kind::PeerClosed) return 0;
      if (m->kind == mbmq::Kind::Request) (void)net::Channel::reply(std::move(*m));
    }
  };
  auto client = [&](std::uint32_t port, int out) -> int {
    const std::string url = "ucx://" + ns.ip_a + ":" + std::to_string(port) + "/bench";
    if (via_channel) {
      mbmq::ConnectOptions co;
      co.wait = wait;
      auto ch = mbmq::connect(url, Deadline::after(std::chrono::seconds(10)), co);
      if (!ch) {
        std::fprintf(stderr, "mbmq-net-bench: connect: %s\n", ch.error().message().c_str());
        return 20;
      }
      return run_client(*ch, mech, out);
    }
    net::ConnectOptions co;
    co.wait = wait;
    if (grant != 0) co.inbox_bytes = grant;
    auto ch = net::connect(url, Deadline::after(std::chrono::seconds(10)), co);
    if (!ch) {
      std::fprintf(stderr, "mbmq-net-bench: connect: %s\n", ch.error().message().c_str());
      return 20;
    }
    return run_client(*ch, mech, out);
  };
  return run_pair(ns, mech, serve, client);
}

// The client's cells on a net::Channel or an mbmq::Channel (a remote end).
template <class Ch>
int run_client(Ch& ch, const std::string& mech, int out) {
  {
    pin(0);
    std::size_t max = 8;
    for (auto s : g_opt.sizes) max = std::max(max, s);
    auto b = ch.buffer(max);
    if (!b) return 21;
    ClientOps ops;
    ops.rtt = [&](std::size_t n, std::uint64_t seq) {
      if (!b->resize(n)) return false;
      if (n >= 8) std::memcpy(b->data().data(), &seq, 8);
      if (!ch.call(*b, Deadline::after(std::chrono::seconds(30)))) return false;
      std::uint64_t back = 0;
      if (n >= 8) std::memcpy(&back, b->data().data(), 8);
      return b->size() == n && (n < 8 || back == seq);
    };
    ops.stream = [&](std::size_t n, std::int64_t until) -> std::int64_t {
      std::int64_t bytes = 0;
      while (monotonic_ns() < until) {
        // Out of credit (the server has not received what we sent yet), wait for some back:
        // flow control is part of what a one-way stream costs.
        if constexpr (std::is_same_v<Ch, mbmq::Channel>) {
          auto m = ch.buffer(n, Deadline::after(std::chrono::seconds(30)));  // waits for credit
          if (!m || !ch.send(std::move(*m))) return -1;
        } else {
          auto m = ch.buffer(n);  // a send consumes its buffer
          if (!m || !ch.send(std::move(*m), Deadline::after(std::chrono::seconds(30)))) return -1;
        }
        bytes += static_cast<std::int64_t>(n);
      }
      return ops.rtt(8, 1) ? bytes : -1;  // after every one-way message (one channel: in order)
    };
    client_cells(mech, ops, out);
    ch.close();
    return 0;
  }
}

// ---- raw UCX ----------------------------------------------------------------------------------
// --raw-sweep: raw UCX one-way streams of each StreamShape in turn on one connection, slices of
// --seconds, --rounds times in alternating order; per shape, MB/s over all its slices and the
// median [10th-90th percentile] of the first shape's MB/s / this one's in the same repetition
// (> 1: slower than the first). Printed by the client (stdout); no rows. Slices seconds apart on
// one connection: the window and the buffers' memory are the only difference.
int raw_sweep(mbmq::bench::RawUcxClient& c) {
  const auto& shapes = g_opt.raw_sweep;
  const std::size_t k = shapes.size();
  const auto slice = static_cast<std::int64_t>(g_opt.seconds * 1e9);
  for (std::size_t n : g_opt.oneway) {
    std::vector<double> bytes(k), ns(k);
    std::vector<std::vector<double>> ratio(k);
    for (std::size_t m = 0; m < k; ++m)  // warm-up: each shape's buffers made and touched
      if (c.stream(n, monotonic_ns() + slice / 3, shapes[m]) < 0) return 30;
    for (int rep = 0; rep < g_opt.rounds; ++rep) {
      std::vector<double> mbs(k);
      for (std::size_t i = 0; i < k; ++i) {
        const std::size_t m = rep % 2 == 0 ? i : k - 1 - i;
        const std::int64_t t0 = monotonic_ns();
        const std::int64_t b = c.stream(n, t0 + slice, shapes[m]);
        const std::int64_t t1 = monotonic_ns();
        if (b < 0) return 30;
        bytes[m] += static_cast<double>(b);
        ns[m] += static_cast<double>(t1 - t0);
        mbs[m] = static_cast<double>(b) / static_cast<double>(t1 - t0) * 1e3;
      }
      for (std::size_t m = 0; m < k; ++m) ratio[m].push_back(mbs[0] / mbs[m]);
    }
    std::printf("raw-sweep %s one-way, %d repetitions of %.2f s slices; loadavg %s\n",
                human(n).c_str(), g_opt.rounds, g_opt.seconds, load().c_str());
    for (std::size_t m = 0; m < k; ++m) {
      std::vector<double>& r = ratio[m];
      std::sort(r.begin(), r.end());
      const auto at = [&](double q) {
        return r[static_cast<std::size_t>(q * static_cast<double>(r.size() - 1) + 0.5)];
      };
      std::printf("  window %2u, %2u buffers, %2u sinks: %7.0f MB/s; first/this %.2f [%.2f-%.2f]\n",
                  shapes[m].window, shapes[m].buffers, shapes[m].sinks, bytes[m] / ns[m] * 1e3,
                  at(0.5), at(0.1), at(0.9));
    }
    std::fflush(stdout);
  }
  return 0;
}

// distinct (the raw-ucx-distinct row): one-way messages sent from 8 buffers in turn and landing in
// 8 (RawUcxClient::stream), as mbmq::net's, each a buffer of its own, do; raw-ucx sends every one
// from one buffer into one sink.
std::vector<Row> raw_ucx(const mbmq::netns::Pair& ns, bool distinct = false) {
  const std::string mech = distinct ? "raw-ucx-distinct" : "raw-ucx";
  auto serve = [&](int port_fd) -> int {
    return mbmq::bench::raw_ucx_serve(
        ns.ip_a,
        [](std::uint32_t p, void* fd) {
          pin(1);  // UCX is up
          put_u32(*static_cast<int*>(fd), p);
        },
        &port_fd);
  };
  auto client = [&](std::uint32_t port, int out) -> int {
    mbmq::bench::RawUcxClient c;
    std::size_t max = 8;
    for (auto s : g_opt.sizes) max = std::max(max, s);
    for (auto s : g_opt.oneway) max = std::max(max, s);
    if (auto e = c.connect(ns.ip_a, port, max); !e.empty()) {
      std::fprintf(stderr, "mbmq-net-bench: raw-ucx: %s\n", e.c_str());
      return 20;
    }
    pin(0);
    ClientOps ops;
    ops.rtt = [&](std::size_t n, std::uint64_t seq) { return c.call(n, seq); };
    const mbmq::bench::StreamShape shape{8, distinct ? 8u : 1u, distinct ? 8u : 1u};
    ops.stream = [&](std::size_t n, std::int64_t until) { return c.stream(n, until, shape); };
    if (!g_opt.raw_sweep.empty()) return raw_sweep(c);
    client_cells(mech, ops, out);
    return 0;
  };
  return run_pair(ns, mech, serve, client);
}

// ---- plain TCP --------------------------------------------------------------------------------
// A frame: 8 bytes (the payload size; top bit: one-way, not echoed), then the payload.
constexpr std::uint64_t kOneWayBit = 1ull << 63;

std::vector<Row> tcp(const mbmq::netns::Pair& ns) {
  std::size_t max = 8;
  for (auto s : g_opt.sizes) max = std::max(max, s);
  for (auto s : g_opt.oneway) max = std::max(max, s);
  auto serve = [&](int port_fd) -> int {
    std::uint16_t port = 0;
    pin(1);
    auto l = os::tcp_listen(ns.ip_a.c_str(), 0, 4, &port);
    if (!l) return 10;
    put_u32(port_fd, port);
    auto c = os::tcp_accept(l->get());
    if (!c) return 11;
    std::vector<std::byte> buf(max + 8);
    for (;;) {
      std::uint64_t h = 0;
      auto n = os::read_full(c->get(), std::as_writable_bytes(std::span(&h, 1)));
      if (!n || *n != 8) return 0;
      const std::size_t size = h & ~kOneWayBit;
      if (size > max) return 12;
      std::memcpy(buf.data(), &h, 8);
      auto m = os::read_full(c->get(), std::span(buf.data() + 8, size));
      if (!m || *m != size) return 0;
      if ((h & kOneWayBit) == 0 && !os::write_full(c->get(), std::span(buf.data(), size + 8)))
        return 0;
    }
  };
  auto client = [&](std::uint32_t port, int out) -> int {
    pin(0);
    auto c = os::tcp_connect(ns.ip_a.c_str(), static_cast<std::uint16_t>(port));
    if (!c) return 20;
    std::vector<std::byte> buf(max + 8);
    ClientOps ops;
    ops.rtt = [&](std::size_t n, std::uint64_t seq) {
      const std::uint64_t h = n;
      std::memcpy(buf.data(), &h, 8);
      if (n >= 8) std::memcpy(buf.data() + 8, &seq, 8);
      if (!os::write_full(c->get(), std::span(buf.data(), n + 8))) return false;
      auto r = os::read_full(c->get(), std::span(buf.data(), n + 8));
      std::uint64_t back = 0;
      if (n >= 8) std::memcpy(&back, buf.data() + 8, 8);
      return r && *r == n + 8 && (n < 8 || back == seq);
    };
    ops.stream = [&](std::size_t n, std::int64_t until) -> std::int64_t {
      std::int64_t bytes = 0;
      const std::uint64_t h = n | kOneWayBit;
      std::memcpy(buf.data(), &h, 8);
      while (monotonic_ns() < until) {
        if (!os::write_full(c->get(), std::span(buf.data(), n + 8))) return -1;
        bytes += static_cast<std::int64_t>(n);
      }
      return ops.rtt(8, 1) ? bytes : -1;
    };
    client_cells("tcp", ops, out);
    return 0;
  };
  return run_pair(ns, "tcp", serve, client);
}

// ---- ucx_perftest -----------------------------------------------------------------------------
// Runs `ucx_perftest` as server in namespace a and client in b; the client's last CSV line
// ("iterations,50.0_percentile_lat,avg_lat,overall_lat,avg_bw,overall_bw,avg_mr,overall_mr";
// latencies in us, bandwidths in MiB/s). Empty on failure.
std::vector<double> perftest(const mbmq::netns::Pair& ns, const std::string& test, std::size_t size,
                             unsigned iters, std::string& error) {
  static unsigned next_port = 20000 + static_cast<unsigned>(::getpid()) % 20000;
  const std::string port = std::to_string(next_port++);
  auto exec_in = [&](const std::string& nsn, const std::string& dev, int cpu,
                     std::vector<std::string> args, int out_fd) {
    return child_in(nsn, dev, cpu, [&]() -> int {
      if (out_fd >= 0) (void)::dup2(out_fd, 1);
      if (out_fd < 0) {
        const int devnull = ::open("/dev/null", O_WRONLY);
        (void)::dup2(devnull, 1);
        (void)::dup2(devnull, 2);
      }
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execvp("ucx_perftest", argv.data());
      return 97;
    });
  };
  const std::string cpu_s = "1", cpu_c = "0";
  std::vector<std::string> common{"-p", port,
                                  "-t", test,
                                  "-s", std::to_string(size),
                                  "-n", std::to_string(iters),
                                  "-w", std::to_string(std::max(1u, iters / 10)),
                                  "-f", "-v"};
  std::vector<std::string> sargs{"ucx_perftest"};
  sargs.insert(sargs.end(), common.begin(), common.end());
  if (g_opt.pin) sargs.insert(sargs.end(), {"-c", cpu_s});
  const pid_t server = exec_in(ns.a, ns.va, 1, sargs, -1);
  std::vector<std::string> cargs{"ucx_perftest", ns.ip_a};
  cargs.insert(cargs.end(), common.begin(), common.end());
  if (g_opt.pin) cargs.insert(cargs.end(), {"-c", cpu_c});
  std::vector<double> v;
  for (int attempt = 0; attempt < 20 && v.empty(); ++attempt) {
    os::sleep_ns(100'000'000);  // the server's socket
    auto pipe = os::make_pipe();
    if (!pipe) break;
    const pid_t client = exec_in(ns.b, ns.vb, 0, cargs, pipe->second.get());
    pipe->second.reset();
    std::string text;
    char chunk[4096];
    for (long n; (n = os::read_once(pipe->first.get(), chunk, sizeof chunk)) > 0;)
      text.append(chunk, static_cast<std::size_t>(n));
    const int rc = join(client);
    std::istringstream in(text);
    std::string last;
    for (std::string line; std::getline(in, line);) {
      const auto at = line.find_first_not_of(' ');
      if (at != std::string::npos && std::isdigit(static_cast<unsigned char>(line[at])) != 0)
        last = line;
    }
    if (rc == 0 && !last.empty()) {
      std::stringstream cs(last);
      for (std::string f; std::getline(cs, f, ',');) v.push_back(std::atof(f.c_str()));
    } else {
      error = "ucx_perftest client exit " + std::to_string(rc);
    }
  }
  (void)os::kill_process(server, SIGKILL);
  (void)join(server);
  if (v.size() < 6) v.clear();
  return v;
}

std::vector<Row> perftest_rows(const mbmq::netns::Pair& ns) {
  std::vector<Row> rows;
  if (std::system("command -v ucx_perftest >/dev/null 2>&1") != 0) {
    Row r;
    set_str(r.mechanism, sizeof r.mechanism, "ucx_perftest");
    set_str(r.error, sizeof r.error,
            "unavailable: no ucx_perftest (Debian: apt install ucx-utils)");
    rows.push_back(r);
    return rows;
  }
  // Iterations sized for about the cell's time at this machine's speeds (veth, TCP).
  auto iters = [](std::size_t size, double per_iter_us) {
    const double n = g_opt.seconds * 1e6 / per_iter_us;
    (void)size;
    return static_cast<unsigned>(std::clamp(n, 7.0, 100'000.0));
  };
  for (std::size_t size : g_opt.sizes) {
    Row r;
    set_str(r.mechanism, sizeof r.mechanism, "ucx_perftest");
    r.size = size;
    std::string err;
    const double guess_us = 30 + static_cast<double>(size) / 500.0;  // ~1 GB/s round trip
    auto v = perftest(ns, "ucp_am_lat", size, iters(size, guess_us), err);
    if (v.empty()) {
      set_str(r.error, sizeof r.error, err.empty() ? "no figures" : err);
    } else {
      r.iterations = static_cast<std::uint32_t>(v[0]);
      r.p50_ns = v[1] * 2 * 1e3;  // a half round trip: doubled
      r.mb_per_s = static_cast<double>(size) * 2 / (r.p50_ns / 1e9) / 1e6;
    }
    rows.push_back(r);
  }
  for (std::size_t size : g_opt.oneway) {
    Row r;
    set_str(r.mechanism, sizeof r.mechanism, "ucx_perftest");
    r.size = size;
    r.oneway = 1;
    std::string err;
    auto v = perftest(ns, "ucp_am_bw", size, iters(size, static_cast<double>(size) / 1000.0), err);
    if (v.empty()) {
      set_str(r.error, sizeof r.error, err.empty() ? "no figures" : err);
    } else {
      r.iterations = static_cast<std::uint32_t>(v[0]);
      r.mb_per_s = v[5] * 1048576.0 / 1e6;  // its MB is 2^20 bytes
    }
    rows.push_back(r);
  }
  return rows;
}

// ---- report -----------------------------------------------------------------------------------
// A bar: the ratio of two rows measured in the same round, per round; `measured` is the median
// of the rounds' ratios (the rounds ran interleaved, so a slow minute of the machine weighs on
// both rows of a pair), `lo`/`hi` the lowest and highest, `n` how many rounds had both rows.
struct Check {
  std::string what;
  double measured, limit;
  bool pass;
  double lo = 0, hi = 0;
  int n = 0;
};

const Row* find(const std::vector<Row>& rows, const std::string& mech, std::size_t size,
                bool oneway, std::uint32_t round) {
  for (const auto& r : rows)
    if (mech == r.mechanism && r.size == size && (r.oneway != 0) == oneway && r.round == round &&
        r.error[0] == 0 && (oneway ? r.mb_per_s > 0 : r.p50_ns > 0))
      return &r;
  return nullptr;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n == 0 ? 0 : n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// The ratio num / den (p50s, or MB/s one-way) in each round where both rows were measured.
std::vector<double> ratios(const std::vector<Row>& rows, const std::string& num,
                           const std::string& den, std::size_t size, bool oneway) {
  std::vector<double> x;
  for (int round = 0; round < g_opt.rounds; ++round) {
    const Row* a = find(rows, num, size, oneway, static_cast<std::uint32_t>(round));
    const Row* b = find(rows, den, size, oneway, static_cast<std::uint32_t>(round));
    if (a && b) x.push_back(oneway ? a->mb_per_s / b->mb_per_s : a->p50_ns / b->p50_ns);
  }
  return x;
}

void add_check(std::vector<Check>& out, const std::vector<Row>& rows, const std::string& what,
               const std::string& num, const std::string& den, std::size_t size, bool oneway,
               double limit) {
  const std::vector<double> x = ratios(rows, num, den, size, oneway);
  if (x.empty()) return;
  const double m = median(x);
  out.push_back({what + " @" + human(size), m, limit, m <= limit,
                 *std::min_element(x.begin(), x.end()), *std::max_element(x.begin(), x.end()),
                 static_cast<int>(x.size())});
}

std::vector<Check> checks_of(const std::vector<Row>& rows) {
  std::vector<Check> out;
  for (std::size_t size : g_opt.sizes) {
    if (size == 64 || size >= (64u << 10)) {
      add_check(out, rows, "mbmq-net-spin / raw-ucx p50", "mbmq-net-spin", "raw-ucx", size, false,
                size == 64 ? 1.15 : 1.05);
      // If wanted (--only): the same bar through mbmq::Channel (mbmq::connect("ucx://...")).
      add_check(out, rows, "mbmq-channel-spin / raw-ucx p50", "mbmq-channel-spin", "raw-ucx", size,
                false, size == 64 ? 1.15 : 1.05);
    }
    add_check(out, rows, "raw-ucx / ucx_perftest p50", "raw-ucx", "ucx_perftest", size, false, 1.2);
  }
  for (std::size_t size : g_opt.oneway) {  // > 1: mbmq::net slower
    add_check(out, rows, "raw-ucx / mbmq-net-spin MB/s one-way", "raw-ucx", "mbmq-net-spin", size,
              true, 1.05);
    add_check(out, rows, "raw-ucx / mbmq-channel-spin MB/s one-way", "raw-ucx", "mbmq-channel-spin",
              size, true, 1.05);
    // If wanted (--only): the same with raw-ucx's window (8 in flight at the largest size), and
    // against raw UCX sending distinct messages (from and into 8 buffers in turn, as mbmq does).
    add_check(out, rows, "raw-ucx / mbmq-net-spin-grant MB/s one-way", "raw-ucx",
              "mbmq-net-spin-grant", size, true, 1.05);
    add_check(out, rows, "raw-ucx-distinct / mbmq-net-spin MB/s one-way", "raw-ucx-distinct",
              "mbmq-net-spin", size, true, 1.05);
  }
  return out;
}

std::string load() {
  std::FILE* f = std::fopen("/proc/loadavg", "r");
  char b[128] = {};
  if (f != nullptr) {
    if (std::fgets(b, sizeof b, f) == nullptr) b[0] = 0;
    std::fclose(f);
  }
  std::string s(b);
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

std::string us(double ns) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f", ns / 1e3);
  return b;
}

void print_table(const std::vector<Row>& rows, const std::vector<Check>& checks,
                 const std::string& load0, const std::string& load1) {
  std::printf(
      "mbmq-net-bench: two network namespaces, a veth pair, UCX_TLS=tcp; %d CPUs, %s; %.2f s per "
      "cell. Round trip: SIZE bytes there and back. loadavg before: %s, after: %s\n\n",
      os::cpu_count(), g_opt.pin ? "client on CPU 0, server on CPU 1" : "not pinned", g_opt.seconds,
      load0.c_str(), load1.c_str());
  std::printf("%5s %-19s %8s %9s %12s %12s %12s %10s %s\n", "round", "mechanism", "size", "iters",
              "p50 us", "p99 us", "max us", "MB/s", "");
  for (int oneway = 0; oneway < 2; ++oneway) {
    if (oneway == 1) std::printf("\none-way throughput (MB/s = 10^6 bytes/s):\n");
    for (const auto& r : rows) {
      if (static_cast<int>(r.oneway) != oneway) continue;
      if (r.error[0] != 0) {
        std::printf("%5u %-19s %8s  %s\n", r.round, r.mechanism, human(r.size).c_str(), r.error);
        continue;
      }
      const bool pt = std::strcmp(r.mechanism, "ucx_perftest") == 0;
      if (oneway == 0)
        std::printf("%5u %-19s %8s %9u %12.1f %12s %12s %10.1f%s\n", r.round, r.mechanism,
                    human(r.size).c_str(), r.iterations, r.p50_ns / 1e3,
                    pt ? "-" : us(r.p99_ns).c_str(), pt ? "-" : us(r.max_ns).c_str(), r.mb_per_s,
                    pt ? "  (2 x its half round trip)" : "");
      else
        std::printf("%5u %-19s %8s %9u %12s %12s %12s %10.1f\n", r.round, r.mechanism,
                    human(r.size).c_str(), r.iterations, "-", "-", "-", r.mb_per_s);
    }
  }
  std::printf("\nratios (p50 round trip; one-way MB/s), median of the rounds [lowest-highest]:\n");
  auto show = [](const char* what, const std::vector<double>& x, std::size_t size) {
    if (x.empty()) return;
    std::printf("  %s @%s: %.2fx [%.2f-%.2f]\n", what, human(size).c_str(), median(x),
                *std::min_element(x.begin(), x.end()), *std::max_element(x.begin(), x.end()));
  };
  for (std::size_t size : g_opt.sizes) {
    show("raw-ucx / tcp", ratios(rows, "raw-ucx", "tcp", size, false), size);
    show("mbmq-net-sleep / raw-ucx", ratios(rows, "mbmq-net-sleep", "raw-ucx", size, false), size);
    show("mbmq-channel-spin / mbmq-net-spin",
         ratios(rows, "mbmq-channel-spin", "mbmq-net-spin", size, false), size);
    show("mbmq-net-queue / mbmq-net-sleep",
         ratios(rows, "mbmq-net-queue", "mbmq-net-sleep", size, false), size);
  }
  for (std::size_t size : g_opt.oneway)
    show("mbmq-net-spin / mbmq-channel-spin MB/s one-way",
         ratios(rows, "mbmq-net-spin", "mbmq-channel-spin", size, true), size);
  std::printf("\nchecks (#19 bars; the median of %d interleaved rounds' ratios):\n", g_opt.rounds);
  for (const auto& c : checks)
    std::printf("  %-48s %6.2f [%.2f-%.2f] (%d rounds)  (bar <= %.2f)  %s\n", c.what.c_str(),
                c.measured, c.lo, c.hi, c.n, c.limit, c.pass ? "PASS" : "FAIL");
}

nlohmann::json to_json(const std::vector<Row>& rows, const std::vector<Check>& checks,
                       const std::string& load0, const std::string& load1) {
  using nlohmann::json;
  json results = json::array();
  for (const auto& r : rows) {
    json j;
    const bool ok = r.error[0] == 0;
    const bool pt = std::strcmp(r.mechanism, "ucx_perftest") == 0;
    j["mechanism"] = r.mechanism;
    j["size"] = r.size;
    j["kind"] = r.oneway != 0 ? "one-way" : "round-trip";
    j["iterations"] = r.iterations;
    j["round"] = r.round;
    const bool lat = ok && r.oneway == 0;
    j["p50_ns"] = lat ? json(r.p50_ns) : json();
    j["p99_ns"] = lat && !pt ? json(r.p99_ns) : json();
    j["max_ns"] = lat && !pt ? json(r.max_ns) : json();
    j["mb_per_s"] = ok ? json(r.mb_per_s) : json();
    if (pt && r.oneway == 0) j["note"] = "2 x ucx_perftest's half round trip (its 50th percentile)";
    if (!ok) j["error"] = r.error;
    results.push_back(j);
  }
  json cj = json::array();
  for (const auto& c : checks)
    cj.push_back({{"check", c.what},
                  {"measured", c.measured},
                  {"lowest", c.lo},
                  {"highest", c.hi},
                  {"rounds", c.n},
                  {"limit", c.limit},
                  {"pass", c.pass}});
  return {{"results", results},
          {"checks", cj},
          {"machine",
           {{"cpus", os::cpu_count()},
            {"pinned", g_opt.pin && os::cpu_count() >= 2},
            {"loadavg_before", load0},
            {"loadavg_after", load1}}},
          {"transport", "UCX_TLS=tcp over a veth pair between two network namespaces"},
          {"seconds_per_cell", g_opt.seconds},
          {"rounds", g_opt.rounds}};
}

std::vector<std::size_t> parse_sizes(const std::string& s) {
  std::vector<std::size_t> v;
  std::stringstream in(s);
  for (std::string t; std::getline(in, t, ',');) {
    char* end = nullptr;
    std::size_t n = std::strtoull(t.c_str(), &end, 10);
    if (*end == 'K' || *end == 'k') n <<= 10;
    if (*end == 'M' || *end == 'm') n <<= 20;
    if (n == 0 || n > (64u << 20)) {
      std::fprintf(stderr, "mbmq-net-bench: bad size '%s' (1 B to 64M)\n", t.c_str());
      std::exit(2);
    }
    v.push_back(n);
  }
  return v;
}

bool named(const std::string& m) {
  return std::find(g_opt.only.begin(), g_opt.only.end(), m) != g_opt.only.end();
}
bool wanted(const std::string& m) { return g_opt.only.empty() || named(m); }

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "mbmq-net-bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--seconds") {
      g_opt.seconds = std::atof(next().c_str());
      if (!(g_opt.seconds > 0 && g_opt.seconds <= 60)) {
        std::fprintf(stderr, "mbmq-net-bench: --seconds: 0 < S <= 60\n");
        return 2;
      }
    } else if (a == "--sizes") {
      g_opt.sizes = parse_sizes(next());
    } else if (a == "--oneway-sizes") {
      g_opt.oneway = parse_sizes(next());
    } else if (a == "--only") {
      std::stringstream in(next());
      for (std::string t; std::getline(in, t, ',');) g_opt.only.push_back(t);
    } else if (a == "--rounds") {
      g_opt.rounds = std::atoi(next().c_str());
      if (g_opt.rounds < 1 || g_opt.rounds > 100) {
        std::fprintf(stderr, "mbmq-net-bench: --rounds: 1 to 100\n");
        return 2;
      }
    } else if (a == "--grant-bytes") {
      const std::string v = next();
      char* end = nullptr;
      std::uint64_t n = std::strtoull(v.c_str(), &end, 10);
      if (*end == 'K' || *end == 'k') n <<= 10;
      if (*end == 'M' || *end == 'm') n <<= 20;
      if (n == 0 || n > UINT32_MAX) {
        std::fprintf(stderr, "mbmq-net-bench: --grant-bytes: 1 B to 4095M\n");
        return 2;
      }
      g_opt.grant_bytes = n;
    } else if (a == "--raw-sweep") {
      std::stringstream in(next());
      for (std::string t; std::getline(in, t, ',');) {
        mbmq::bench::StreamShape sh;
        if (std::sscanf(t.c_str(), "%u:%u:%u", &sh.window, &sh.buffers, &sh.sinks) != 3 ||
            sh.window < 1 || sh.window > mbmq::bench::kMaxWindow || sh.buffers < 1 ||
            sh.buffers > 64 || sh.sinks < 1 || sh.sinks > 64) {
          std::fprintf(stderr, "mbmq-net-bench: --raw-sweep: WINDOW:BUFFERS:SINKS,... (1-64)\n");
          return 2;
        }
        g_opt.raw_sweep.push_back(sh);
      }
      g_opt.only = {"raw-ucx"};
    } else if (a == "--json") {
      g_opt.json = true;
    } else if (a == "--no-pin") {
      g_opt.pin = false;
    } else {
      std::printf(
          "usage: mbmq-net-bench [--seconds S (0.3)] [--rounds N (3)] [--sizes "
          "64,4K,64K,1M,16M,64M]\n"
          "                      [--oneway-sizes 64K,1M,16M] [--only mbmq-net-spin,mbmq-net-sleep,"
          "raw-ucx,ucx_perftest,tcp]\n"
          "                      [--json] [--no-pin] [--grant-bytes N (8 x the largest one-way "
          "size)]\n"
          "                      [--raw-sweep WINDOW:BUFFERS:SINKS,... (raw UCX one-way only)]\n"
          "Rows not run unless named in --only: mbmq-channel-spin, mbmq-net-spin-grant,\n"
          "raw-ucx-distinct.\n"
          "Runs as root: makes two network namespaces and a veth pair, removed at the end.\n");
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  if (::geteuid() != 0) {
    std::fprintf(stderr,
                 "mbmq-net-bench: needs root: it makes two network namespaces and a veth pair "
                 "(ip netns add, ip link add) and enters them (setns, a sysfs remount)\n");
    return 2;
  }
  std::uint64_t big = g_opt.grant_bytes;
  if (big == 0) {
    for (auto s : g_opt.oneway) big = std::max<std::uint64_t>(big, 8 * s);
    big = std::max<std::uint64_t>(big, net::kDefaultInboxBytes);
  }
  const auto big_grant = static_cast<std::uint32_t>(std::min<std::uint64_t>(big, UINT32_MAX));
  const std::string load0 = load();
  std::vector<Row> rows;
  {
    mbmq::netns::Pair ns("n");
    if (!ns.ok) {
      std::fprintf(stderr,
                   "mbmq-net-bench: could not make the namespaces and veth pair (iproute2 "
                   "installed? CAP_NET_ADMIN?)\n");
      return 2;
    }
    if (!g_opt.raw_sweep.empty()) {  // the client prints; no rows (run_pair: one error row)
      auto r = raw_ucx(ns);
      return r.size() == 1 && std::strstr(r[0].error, "exit code 0") != nullptr ? 0 : 1;
    }
    // Every mechanism once per round, the order reversed every other round: a ratio's two rows
    // are measured seconds apart, and neither always goes first.
    const std::vector<std::function<std::vector<Row>()>> mechs = {
        [&] { return wanted("tcp") ? tcp(ns) : std::vector<Row>{}; },
        [&] { return wanted("raw-ucx") ? raw_ucx(ns) : std::vector<Row>{}; },
        [&] { return named("raw-ucx-distinct") ? raw_ucx(ns, true) : std::vector<Row>{}; },
        [&] {
          return wanted("mbmq-net-spin") ? mbmq_net(ns, "mbmq-net-spin", mbmq::WaitMode::Spin)
                                         : std::vector<Row>{};
        },
        [&] {
          return named("mbmq-channel-spin")
                     ? mbmq_net(ns, "mbmq-channel-spin", mbmq::WaitMode::Spin, false, 0, true)
                     : std::vector<Row>{};
        },
        [&] {
          return named("mbmq-net-spin-grant")
                     ? mbmq_net(ns, "mbmq-net-spin-grant", mbmq::WaitMode::Spin, false, big_grant)
                     : std::vector<Row>{};
        },
        [&] {
          return wanted("mbmq-net-sleep") ? mbmq_net(ns, "mbmq-net-sleep", mbmq::WaitMode::Sleep)
                                          : std::vector<Row>{};
        },
        [&] {
          return wanted("mbmq-net-queue")
                     ? mbmq_net(ns, "mbmq-net-queue", mbmq::WaitMode::Sleep, true)
                     : std::vector<Row>{};
        },
        [&] { return wanted("ucx_perftest") ? perftest_rows(ns) : std::vector<Row>{}; },
    };
    for (int round = 0; round < g_opt.rounds; ++round) {
      for (std::size_t i = 0; i < mechs.size(); ++i) {
        auto r = mechs[round % 2 == 0 ? i : mechs.size() - 1 - i]();
        for (Row& x : r) x.round = static_cast<std::uint32_t>(round);
        rows.insert(rows.end(), r.begin(), r.end());
      }
    }
  }
  const std::string load1 = load();
  const auto checks = checks_of(rows);
  if (g_opt.json)
    std::printf("%s\n", to_json(rows, checks, load0, load1).dump(2).c_str());
  else
    print_table(rows, checks, load0, load1);
  // A cell that could not be measured (a failed round trip or stream) fails the run: exit 1.
  for (const Row& r : rows)
    if (r.error[0] != '\0') return 1;
  return 0;
}
