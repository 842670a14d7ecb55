// mbmq-bench: two-process request/response, mbmq beside raw baselines, in one run.
//
// Every cell forks a server process; client and server are pinned to different CPUs when there
// are two. One round trip = the client writes the whole payload, sends it, the server reads the
// whole payload (a 64-bit sum), answers with the 8-byte sum, and the client verifies it. The
// baselines do exactly the same work:
//   raw-spin   shared memory, spin on an atomic flag each way (the hardware limit)
//   raw-ring   raw-spin with mbmq's line pattern: a descriptor line, then the payload line it
//              names (the floor of a zero-copy design passing buffer references, no software)
//   raw-futex  shared memory, always FUTEX_WAKE the peer and FUTEX_WAIT for it (a sleeping waiter)
//   pipe       two pipes, write()+read() (2 copies of the payload)
//   uds        a Unix stream socket pair (2 copies of the payload)
//   mbmq-spin / mbmq-adaptive / mbmq-sleep   a Channel, the server on a MsgQueue, with that
//              WaitPolicy on both sides (0 copies: the payload is written once, in place)
// System calls are counted by the os/ layer on both sides; heap allocations by a counting
// operator new on both sides; both per round trip, over the measured (post-warm-up) iterations.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "alloc_count.h"
#include "mbmq/mbmq.h"
#include "os/futex.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/process.h"
#include "os/syscall_count.h"
#include "os/unix_socket.h"

namespace mbmq::bench {
namespace {

using Clock = std::int64_t;

// ---- the work each round trip does ---------------------------------------------------------
std::uint8_t fill_value(std::uint64_t iter) { return static_cast<std::uint8_t>(iter * 13 + 1); }

// The client writes the whole payload.
void write_payload(std::byte* p, std::size_t n, std::uint64_t iter) {
  std::memset(p, fill_value(iter), n);
}
// The server reads the whole payload.
std::uint64_t payload_sum(const std::byte* p, std::size_t n) {
  std::uint64_t s = 0;
  std::size_t words = n / 8;
  for (std::size_t i = 0; i < words; ++i) {
    std::uint64_t w;
    std::memcpy(&w, p + i * 8, 8);
    s += w;
  }
  for (std::size_t i = words * 8; i < n; ++i) s += static_cast<std::uint64_t>(p[i]);
  return s;
}
std::uint64_t expected_sum(std::size_t n, std::uint64_t iter) {
  std::uint64_t v = fill_value(iter);
  return static_cast<std::uint64_t>(n / 8) * (v * 0x0101010101010101ull) + (n % 8) * v;
}

// ---- cells -----------------------------------------------------------------------------------
struct ServerStats {
  std::uint64_t syscalls = 0, allocs = 0, rtts = 0;
  int error = 0;
};
constexpr std::uint64_t kServerSkip = 10;  // server-side warm-up: first requests not counted

// Server-side accounting: snapshots after kServerSkip requests and at the end.
// tick() is called as each request arrives (before it is answered); stop() when the stop request
// arrives, so tear-down is not counted.
struct ServerCounter {
  std::uint64_t n = 0, sys0 = 0, alloc0 = 0, sys1 = 0, alloc1 = 0;
  bool stopped = false;
  void tick() {
    if (++n == kServerSkip) {
      sys0 = os::syscalls_this_thread();
      alloc0 = g_allocs.load(std::memory_order_relaxed);
    }
  }
  void stop() {
    if (stopped) return;
    stopped = true;
    sys1 = os::syscalls_this_thread();
    alloc1 = g_allocs.load(std::memory_order_relaxed);
  }
  ServerStats finish(int error) {
    stop();
    ServerStats s;
    s.error = error;
    if (n > kServerSkip) {
      // The window opens as request kServerSkip arrives (before its reply) and closes as the
      // stop request arrives: it holds the replies to requests kServerSkip..n and the waits for
      // requests kServerSkip+1..n and the stop, i.e. n - kServerSkip + 1 round trips.
      s.rtts = n - kServerSkip + 1;
      s.syscalls = sys1 - sys0;
      s.allocs = alloc1 - alloc0;
    }
    return s;
  }
};

struct Options {
  std::vector<std::size_t> sizes;
  double seconds_per_cell = 1.0;
  std::size_t max_samples = 2'000'000;
  bool pin = true;
};

struct CellResult {
  std::string mechanism;
  std::size_t size = 0;
  std::vector<std::int64_t> lat;  // ns per round trip, measured iterations
  std::optional<double> syscalls_per_rtt, allocs_per_rtt;
  double client_syscalls = 0, server_syscalls = 0;
  std::string error;
  double pct(double q) const {
    if (lat.empty()) return 0;
    std::size_t i = static_cast<std::size_t>(q * static_cast<double>(lat.size() - 1));
    return static_cast<double>(lat[i]);
  }
};

// A mechanism: sets up shared state, then forks a server; `client_rtt(iter)` does one verified
// round trip (false on a wrong reply); `stop()` tells the server to exit.
struct Mechanism {
  std::string name;
  std::function<Status(std::size_t size)> setup;
  std::function<int(std::size_t size, ServerCounter& count)> serve;  // in the child
  std::function<void()> after_fork_parent;
  std::function<bool(std::uint64_t iter)> client_rtt;
  std::function<void()> stop;
  std::function<void()> teardown;
};

// Read once, before anything is pinned (pinning narrows what sched_getaffinity reports).
const int g_cpus = os::cpu_count();

void pin(int cpu, bool enabled) {
  if (enabled && g_cpus >= 2) (void)os::pin_to_cpu(cpu);
}

CellResult run_cell(Mechanism& m, std::size_t size, const Options& opt) {
  CellResult r;
  r.mechanism = m.name;
  r.size = size;
  if (auto s = m.setup(size); !s) {
    r.error = s.error().message();
    return r;
  }
  auto stats_pipe = os::make_pipe();
  if (!stats_pipe) {
    r.error = stats_pipe.error().message();
    return r;
  }
  auto pid = os::fork_process();
  if (!pid) {
    r.error = pid.error().message();
    return r;
  }
  if (*pid == 0) {
    os::die_with_parent();
    pin(1, opt.pin);
    stats_pipe->first.reset();
    ServerCounter count;
    int err = m.serve(size, count);
    ServerStats st = count.finish(err);
    (void)os::write_full(stats_pipe->second.get(), {reinterpret_cast<std::byte*>(&st), sizeof(st)});
    os::exit_now(0);
  }
  stats_pipe->second.reset();
  if (m.after_fork_parent) m.after_fork_parent();
  pin(0, opt.pin);
  r.lat.reserve(opt.max_samples);
  bool ok = true;
  std::uint64_t iter = 0;
  // Warm-up: a fifth of the budget, at least 50 round trips.
  const Clock warm_end = monotonic_ns() + static_cast<Clock>(opt.seconds_per_cell * 0.2e9);
  while (ok && (iter < 50 || monotonic_ns() < warm_end)) ok = m.client_rtt(iter++);
  const std::uint64_t sys0 = os::syscalls_this_thread();
  const std::uint64_t alloc0 = g_allocs.load(std::memory_order_relaxed);
  const Clock end = monotonic_ns() + static_cast<Clock>(opt.seconds_per_cell * 0.8e9);
  while (ok && r.lat.size() < opt.max_samples) {
    Clock t0 = monotonic_ns();
    ok = m.client_rtt(iter++);
    Clock t1 = monotonic_ns();
    r.lat.push_back(t1 - t0);  // capacity reserved: no allocation
    if (t1 >= end) break;
  }
  const double n = static_cast<double>(r.lat.size());
  const double csys = static_cast<double>(os::syscalls_this_thread() - sys0) / n;
  const double callocs = static_cast<double>(g_allocs.load(std::memory_order_relaxed) - alloc0) / n;
  m.stop();
  ServerStats st{};
  auto got =
      os::read_full(stats_pipe->first.get(), {reinterpret_cast<std::byte*>(&st), sizeof(st)});
  (void)os::wait_process(*pid);
  m.teardown();
  if (!ok) r.error = "a reply failed verification or the call failed";
  if (!got || *got != sizeof(st) || st.error != 0)
    r.error = "server failed (code " + std::to_string(st.error) + ")";
  if (st.rtts > 0) {
    r.client_syscalls = csys;
    r.server_syscalls = static_cast<double>(st.syscalls) / static_cast<double>(st.rtts);
    r.syscalls_per_rtt = csys + r.server_syscalls;
    r.allocs_per_rtt = callocs + static_cast<double>(st.allocs) / static_cast<double>(st.rtts);
  }
  std::sort(r.lat.begin(), r.lat.end());
  return r;
}

// ---- raw shared memory: spin and futex ---------------------------------------------------------
// Each flag in its own 128-byte block: the adjacent-line prefetcher pairs 128-byte-aligned lines,
// and the baselines must be the best the hardware can do.
struct RawCtl {
  alignas(128) std::atomic<std::uint32_t> req;   // client: store-release seq; server: acquire
  alignas(128) std::atomic<std::uint32_t> resp;  // server: store-release seq; client: acquire
  std::uint64_t sum;                             // written by the server before resp
};
static_assert(sizeof(RawCtl) == 256);
constexpr std::size_t kRawPayloadOffset = 4096;
constexpr std::uint32_t kStop = 0xFFFFFFFFu;

Mechanism raw_mechanism(bool futex) {
  struct State {
    os::UniqueFd fd;
    os::Mapping map;
    RawCtl* ctl = nullptr;
    std::byte* payload = nullptr;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = futex ? "raw-futex" : "raw-spin";
  m.setup = [st](std::size_t size) -> Status {
    std::size_t total = kRawPayloadOffset + size;
    st->fd = MBMQ_TRY(os::make_sealed_memfd("bench-raw", total));
    st->map = MBMQ_TRY(os::Mapping::map_shared(st->fd.get(), total, os::Access::ReadWrite));
    st->ctl = new (st->map.data()) RawCtl{};
    st->payload = st->map.data() + kRawPayloadOffset;
    return {};
  };
  m.serve = [st, futex](std::size_t size, ServerCounter& count) -> int {
    std::uint32_t last = 0;
    for (;;) {
      std::uint32_t seq;
      while ((seq = st->ctl->req.load(std::memory_order_acquire)) == last) {
        if (futex)
          (void)os::futex_wait(&st->ctl->req, last, -1);
        else
          __builtin_ia32_pause();
      }
      last = seq;
      if (seq == kStop) return count.stop(), 0;
      st->ctl->sum = payload_sum(st->payload, size);
      st->ctl->resp.store(seq, std::memory_order_release);
      if (futex) (void)os::futex_wake(&st->ctl->resp, 1);
      count.tick();
    }
  };
  m.client_rtt = [st, futex](std::uint64_t iter) -> bool {
    std::size_t size = st->map.size() - kRawPayloadOffset;
    write_payload(st->payload, size, iter);
    std::uint32_t seq = static_cast<std::uint32_t>(iter % 0x7FFFFFFF) + 1;
    st->ctl->req.store(seq, std::memory_order_release);
    if (futex) (void)os::futex_wake(&st->ctl->req, 1);
    std::uint32_t got;
    while ((got = st->ctl->resp.load(std::memory_order_acquire)) != seq) {
      if (futex)
        (void)os::futex_wait(&st->ctl->resp, got, -1);
      else
        __builtin_ia32_pause();
    }
    return st->ctl->sum == expected_sum(size, iter);
  };
  m.stop = [st, futex] {
    st->ctl->req.store(kStop, std::memory_order_release);
    if (futex) (void)os::futex_wake(&st->ctl->req, 1);
  };
  m.teardown = [st] {
    st->map.reset();
    st->fd.reset();
  };
  return m;
}

// ---- raw-ring: mbmq's cache-line pattern with no software around it
// Each way, a descriptor line (sequence + buffer index) and then the payload line it names, read
// only after the descriptor (the address depends on it): the floor of any zero-copy design that
// passes buffer references through a ring, measured beside mbmq in the same run.
struct RingCtl {
  struct alignas(128) Entry {
    std::atomic<std::uint32_t> seq;  // writer: store-release after `index`; reader: acquire
    std::uint32_t index;             // which payload buffer (always 0 here, but read and used)
  };
  Entry req;   // client -> server
  Entry resp;  // server -> client
};
static_assert(sizeof(RingCtl) == 256);

Mechanism raw_ring_mechanism() {
  struct State {
    os::UniqueFd fd;
    os::Mapping map;
    RingCtl* ctl = nullptr;
    std::byte* pool = nullptr;
    std::size_t size = 0;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = "raw-ring";
  m.setup = [st](std::size_t size) -> Status {
    std::size_t total = kRawPayloadOffset + size;
    st->fd = MBMQ_TRY(os::make_sealed_memfd("bench-raw-ring", total));
    st->map = MBMQ_TRY(os::Mapping::map_shared(st->fd.get(), total, os::Access::ReadWrite));
    st->ctl = new (st->map.data()) RingCtl{};
    st->pool = st->map.data() + kRawPayloadOffset;
    st->size = size;
    return {};
  };
  m.serve = [st](std::size_t size, ServerCounter& count) -> int {
    std::uint32_t last = 0;
    for (;;) {
      std::uint32_t seq;
      while ((seq = st->ctl->req.seq.load(std::memory_order_acquire)) == last)
        __builtin_ia32_pause();
      last = seq;
      if (seq == kStop) return count.stop(), 0;
      std::byte* buf = st->pool + std::size_t{st->ctl->req.index} * size;  // dependent address
      std::uint64_t sum = payload_sum(buf, size);
      std::memcpy(buf, &sum, 8);  // the answer in the request's own buffer
      st->ctl->resp.index = st->ctl->req.index;
      st->ctl->resp.seq.store(seq, std::memory_order_release);
      count.tick();
    }
  };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    write_payload(st->pool, st->size, iter);
    std::uint32_t seq = static_cast<std::uint32_t>(iter % 0x7FFFFFFF) + 1;
    st->ctl->req.index = 0;
    st->ctl->req.seq.store(seq, std::memory_order_release);
    while (st->ctl->resp.seq.load(std::memory_order_acquire) != seq) __builtin_ia32_pause();
    const std::byte* buf = st->pool + std::size_t{st->ctl->resp.index} * st->size;
    std::uint64_t sum;
    std::memcpy(&sum, buf, 8);
    return sum == expected_sum(st->size, iter);
  };
  m.stop = [st] { st->ctl->req.seq.store(kStop, std::memory_order_release); };
  m.teardown = [st] {
    st->map.reset();
    st->fd.reset();
  };
  return m;
}

// ---- pipe and Unix socket
// ------------------------------------------------------------------------
Mechanism stream_mechanism(bool uds) {
  struct State {
    os::UniqueFd c_in, c_out, s_in, s_out;  // client reads c_in, writes c_out; server the reverse
    std::vector<std::byte> cbuf, sbuf;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = uds ? "uds" : "pipe";
  m.setup = [st, uds](std::size_t size) -> Status {
    if (uds) {
      auto [a, b] = MBMQ_TRY(os::stream_pair());
      st->c_out = MBMQ_TRY(os::dup_fd(a.get()));
      st->c_in = std::move(a);
      st->s_out = MBMQ_TRY(os::dup_fd(b.get()));
      st->s_in = std::move(b);
    } else {
      auto [r1, w1] = MBMQ_TRY(os::make_pipe());  // client -> server
      auto [r2, w2] = MBMQ_TRY(os::make_pipe());  // server -> client
      st->c_out = std::move(w1);
      st->s_in = std::move(r1);
      st->s_out = std::move(w2);
      st->c_in = std::move(r2);
    }
    st->cbuf.assign(size + 8, std::byte{0});
    st->sbuf.assign(size + 8, std::byte{0});
    return {};
  };
  // Frame: 8-byte length, then the payload. Reply: the 8-byte sum. A length of ~0 stops.
  m.serve = [st](std::size_t, ServerCounter& count) -> int {
    st->c_in.reset();
    st->c_out.reset();
    for (;;) {
      std::uint64_t len = 0;
      auto got = os::read_full(st->s_in.get(), {reinterpret_cast<std::byte*>(&len), 8});
      if (!got || *got != 8) return 1;
      if (len == ~std::uint64_t{0}) return count.stop(), 0;
      if (len > st->sbuf.size()) return 2;
      got = os::read_full(st->s_in.get(), {st->sbuf.data(), len});
      if (!got || *got != len) return 3;
      std::uint64_t sum = payload_sum(st->sbuf.data(), len);
      if (!os::write_full(st->s_out.get(), {reinterpret_cast<std::byte*>(&sum), 8})) return 4;
      count.tick();
    }
  };
  m.after_fork_parent = [st] {
    st->s_in.reset();
    st->s_out.reset();
  };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    std::size_t size = st->cbuf.size() - 8;
    std::uint64_t len = size;
    std::memcpy(st->cbuf.data(), &len, 8);
    write_payload(st->cbuf.data() + 8, size, iter);
    if (!os::write_full(st->c_out.get(), {st->cbuf.data(), size + 8})) return false;
    std::uint64_t sum = 0;
    auto got = os::read_full(st->c_in.get(), {reinterpret_cast<std::byte*>(&sum), 8});
    return got && *got == 8 && sum == expected_sum(size, iter);
  };
  m.stop = [st] {
    std::uint64_t stop = ~std::uint64_t{0};
    (void)os::write_full(st->c_out.get(), {reinterpret_cast<std::byte*>(&stop), 8});
  };
  m.teardown = [st] {
    st->c_in.reset();
    st->c_out.reset();
    st->cbuf = {};
    st->sbuf = {};
  };
  return m;
}

// ---- mbmq ---------------------------------------------------------------------------------------
Mechanism mbmq_mechanism(const char* name, WaitMode mode) {
  struct State {
    Channel client, server;
    Buffer buf;
    std::size_t size = 0;
  };
  auto st = std::make_shared<State>();
  Mechanism m;
  m.name = name;
  m.setup = [st, mode](std::size_t size) -> Status {
    ChannelOptions opt;
    opt.wait.mode = mode;
    auto [c, s] = MBMQ_TRY(Channel::pair(opt));
    st->client = std::move(c);
    st->server = std::move(s);
    st->size = size;
    return {};
  };
  m.serve = [st, mode](std::size_t, ServerCounter& count) -> int {
    st->client.close();
    WaitPolicy policy;
    policy.mode = mode;
    auto q = MsgQueue::create(policy);
    if (!q || !st->server.redirect(*q, 1)) return 1;
    auto msg = q->wait(Deadline::never());
    for (;;) {
      if (!msg) return 2;
      if (msg->kind != Kind::Request) return msg->kind == Kind::PeerClosed ? 0 : 3;
      Buffer& b = msg->buffer;
      std::size_t n = b.size();
      if (n == 0) {
        count.stop();
        (void)MsgQueue::reply(std::move(*msg));  // the stop request
        return 0;
      }
      std::uint64_t sum = payload_sum(b.data().data(), n);  // read in place
      std::memcpy(b.data().data(), &sum, 8);
      if (!b.resize(8)) return 4;
      count.tick();
      msg = q->reply_and_wait(std::move(*msg), Deadline::never());
    }
  };
  m.after_fork_parent = [st] { st->server.close(); };
  m.client_rtt = [st](std::uint64_t iter) -> bool {
    if (!st->buf.valid()) {
      auto b = st->client.buffer(st->size);
      if (!b) return false;
      st->buf = std::move(*b);
    }
    Buffer& b = st->buf;
    if (!b.resize(st->size)) return false;  // within capacity: no move, no allocation
    write_payload(b.data().data(), st->size, iter);
    if (!st->client.call(b, Deadline::after(std::chrono::seconds(10)))) return false;
    std::uint64_t sum;
    std::memcpy(&sum, b.data().data(), 8);
    return b.size() == 8 && sum == expected_sum(st->size, iter);
  };
  m.stop = [st] {
    if (st->buf.valid() && st->buf.resize(0))
      (void)st->client.call(st->buf, Deadline::after(std::chrono::seconds(5)));
  };
  m.teardown = [st] {
    st->buf.reset();
    st->client.close();
    st->server.close();
  };
  return m;
}

// ---- reporting
// ------------------------------------------------------------------------------------
const CellResult* find(const std::vector<CellResult>& rs, const std::string& mech,
                       std::size_t size) {
  for (const auto& r : rs)
    if (r.mechanism == mech && r.size == size && r.error.empty()) return &r;
  return nullptr;
}

std::string human_size(std::size_t n) {
  if (n >= (1u << 20) && n % (1u << 20) == 0) return std::to_string(n >> 20) + " MiB";
  if (n >= 1024 && n % 1024 == 0) return std::to_string(n >> 10) + " KiB";
  return std::to_string(n) + " B";
}

std::string fmt_us(double ns) {
  char b[32];
  std::snprintf(b, sizeof b, ns < 10'000 ? "%.2f" : ns < 1e6 ? "%.1f" : "%.0f", ns / 1000.0);
  return b;
}

std::string ratio(const CellResult& r, const std::vector<CellResult>& all, const char* base) {
  const CellResult* b = find(all, base, r.size);
  if (b == nullptr || b->pct(0.5) <= 0) return "-";
  char s[32];
  std::snprintf(s, sizeof s, "%.2fx", r.pct(0.5) / b->pct(0.5));
  return s;
}

struct Check {
  std::string what;
  double measured, limit;
  bool pass;
};

std::vector<Check> evaluate(const std::vector<CellResult>& rs,
                            const std::vector<std::size_t>& sizes) {
  std::vector<Check> out;
  auto add = [&](const std::string& what, const char* a, const char* b, std::size_t size,
                 double limit) {
    const CellResult* x = find(rs, a, size);
    const CellResult* y = find(rs, b, size);
    if (x == nullptr || y == nullptr) return;
    double v = x->pct(0.5) / y->pct(0.5);
    out.push_back({what + " @" + human_size(size), v, limit, v <= limit});
  };
  for (std::size_t s : sizes) {
    if (s <= 64) {
      add("mbmq-spin p50 / raw-spin p50", "mbmq-spin", "raw-spin", s, 1.5);
      // Not an issue target: how close mbmq is to the floor of its own zero-copy design.
      add("mbmq-spin p50 / raw-ring p50 (zero-copy floor)", "mbmq-spin", "raw-ring", s, 1.2);
      add("mbmq-adaptive p50 / raw-spin p50", "mbmq-adaptive", "raw-spin", s, 2.0);
    }
    if (s >= (1u << 20)) add("mbmq-spin p50 / raw-spin p50", "mbmq-spin", "raw-spin", s, 1.3);
    add("mbmq-sleep p50 / raw-futex p50", "mbmq-sleep", "raw-futex", s, 1.2);
    add("mbmq-sleep p50 / uds p50", "mbmq-sleep", "uds", s, 1.0);
  }
  for (const auto& r : rs) {
    if (!r.syscalls_per_rtt) continue;
    if (r.mechanism == "mbmq-spin")
      out.push_back({"mbmq-spin syscalls/rtt @" + human_size(r.size), *r.syscalls_per_rtt, 0.0,
                     *r.syscalls_per_rtt == 0.0});
    if (r.mechanism == "mbmq-sleep") {
      double worst = std::max(r.client_syscalls, r.server_syscalls);
      out.push_back(
          {"mbmq-sleep syscalls/rtt per side @" + human_size(r.size), worst, 2.0, worst <= 2.0});
    }
    if (r.mechanism.rfind("mbmq", 0) == 0 && r.allocs_per_rtt)
      out.push_back({r.mechanism + " allocs/rtt @" + human_size(r.size), *r.allocs_per_rtt, 0.0,
                     *r.allocs_per_rtt == 0.0});
  }
  return out;
}

nlohmann::json to_json(const std::vector<CellResult>& rs, const std::vector<Check>& checks,
                       const Options& opt) {
  nlohmann::json results = nlohmann::json::array();
  for (const auto& r : rs) {
    nlohmann::json j;
    j["mechanism"] = r.mechanism;
    j["size"] = r.size;
    j["iterations"] = r.lat.size();
    if (r.error.empty() && !r.lat.empty()) {
      j["p50_ns"] = r.pct(0.5);
      j["p99_ns"] = r.pct(0.99);
    } else {
      j["p50_ns"] = nullptr;
      j["p99_ns"] = nullptr;
      j["error"] = r.error;
    }
    j["syscalls_per_rtt"] =
        r.syscalls_per_rtt ? nlohmann::json(*r.syscalls_per_rtt) : nlohmann::json();
    j["allocs_per_rtt"] = r.allocs_per_rtt ? nlohmann::json(*r.allocs_per_rtt) : nlohmann::json();
    if (r.syscalls_per_rtt) {
      j["client_syscalls_per_rtt"] = r.client_syscalls;
      j["server_syscalls_per_rtt"] = r.server_syscalls;
    }
    results.push_back(j);
  }
  nlohmann::json cj = nlohmann::json::array();
  for (const auto& c : checks)
    cj.push_back(
        {{"check", c.what}, {"measured", c.measured}, {"limit", c.limit}, {"pass", c.pass}});
  return {{"results", results},
          {"checks", cj},
          {"machine", {{"cpus", g_cpus}, {"pinned", opt.pin && g_cpus >= 2}}},
          {"seconds_per_cell", opt.seconds_per_cell}};
}

void print_table(const std::vector<CellResult>& rs, const std::vector<Check>& checks) {
  std::printf("%-14s %8s %10s %10s %9s %9s %9s %9s %9s %8s %7s\n", "mechanism", "size", "p50 us",
              "p99 us", "xraw-spin", "xraw-ring", "xraw-futx", "xuds", "syscalls", "allocs",
              "iters");
  std::size_t last = 0;
  for (const auto& r : rs) {
    if (r.size != last && last != 0) std::printf("\n");
    last = r.size;
    if (!r.error.empty()) {
      std::printf("%-14s %8s  error: %s\n", r.mechanism.c_str(), human_size(r.size).c_str(),
                  r.error.c_str());
      continue;
    }
    char sys[16] = "-", al[16] = "-";
    if (r.syscalls_per_rtt) std::snprintf(sys, sizeof sys, "%.2f", *r.syscalls_per_rtt);
    if (r.allocs_per_rtt) std::snprintf(al, sizeof al, "%.2f", *r.allocs_per_rtt);
    std::printf("%-14s %8s %10s %10s %9s %9s %9s %9s %9s %8s %7zu\n", r.mechanism.c_str(),
                human_size(r.size).c_str(), fmt_us(r.pct(0.5)).c_str(), fmt_us(r.pct(0.99)).c_str(),
                ratio(r, rs, "raw-spin").c_str(), ratio(r, rs, "raw-ring").c_str(),
                ratio(r, rs, "raw-futex").c_str(), ratio(r, rs, "uds").c_str(), sys, al,
                r.lat.size());
  }
  std::printf("\nsyscalls and allocs are per round trip, both processes together.\n");
  std::printf("\nTargets (ratios of p50 in this run):\n");
  for (const auto& c : checks)
    std::printf("  [%s] %-52s %8.3f (limit %.2f)\n", c.pass ? "ok  " : "MISS", c.what.c_str(),
                c.measured, c.limit);
}

std::vector<std::size_t> parse_sizes(const std::string& s) {
  std::vector<std::size_t> out;
  std::size_t pos = 0;
  while (pos < s.size()) {
    std::size_t comma = s.find(',', pos);
    std::string tok = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    std::size_t mult = 1;
    if (!tok.empty() && (tok.back() == 'K' || tok.back() == 'k'))
      mult = 1024, tok.pop_back();
    else if (!tok.empty() && (tok.back() == 'M' || tok.back() == 'm'))
      mult = 1 << 20, tok.pop_back();
    char* end = nullptr;
    unsigned long long v = std::strtoull(tok.c_str(), &end, 10);
    if (tok.empty() || *end != '\0') throw CLI::ValidationError("--sizes", "not a size: " + tok);
    out.push_back(static_cast<std::size_t>(v) * mult);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

}  // namespace
}  // namespace mbmq::bench

int main(int argc, char** argv) {
  using namespace mbmq::bench;
  CLI::App app{"mbmq-bench: two-process request/response, mbmq beside raw baselines"};
  bool json = false, quick = false, no_pin = false;
  std::string sizes_arg = "64,4096,65536,1048576,16777216";
  std::string only;
  double seconds = 1.0;
  app.add_flag("--json", json, "print one JSON document instead of the table");
  app.add_flag("--quick", quick, "short run: 0.25 s per cell");
  app.add_option("--sizes", sizes_arg, "payload sizes, comma-separated (K and M suffixes)");
  app.add_option("--seconds", seconds, "seconds per mechanism and size")
      ->check(CLI::Range(0.05, 60.0));
  app.add_option("--mechanisms", only, "comma-separated subset of mechanisms to run");
  app.add_flag("--no-pin", no_pin, "do not pin client and server to CPUs 0 and 1");
  CLI11_PARSE(app, argc, argv);

  Options opt;
  try {
    opt.sizes = parse_sizes(sizes_arg);
  } catch (const CLI::Error& e) {
    return app.exit(e);
  }
  for (std::size_t s : opt.sizes) {
    if (s < 8 || s > (1ull << 30)) {
      std::fprintf(stderr, "--sizes: each size must be 8 B .. 1 GiB (got %zu)\n", s);
      return 2;
    }
  }
  opt.seconds_per_cell = quick ? 0.25 : seconds;
  opt.pin = !no_pin;
  opt.max_samples = 2'000'000;

  std::vector<Mechanism> mechs;
  mechs.push_back(raw_mechanism(false));
  mechs.push_back(raw_ring_mechanism());
  mechs.push_back(raw_mechanism(true));
  mechs.push_back(stream_mechanism(false));
  mechs.push_back(stream_mechanism(true));
  mechs.push_back(mbmq_mechanism("mbmq-spin", mbmq::WaitMode::Spin));
  mechs.push_back(mbmq_mechanism("mbmq-adaptive", mbmq::WaitMode::Adaptive));
  mechs.push_back(mbmq_mechanism("mbmq-sleep", mbmq::WaitMode::Sleep));
  if (!only.empty()) {
    std::string list = "," + only + ",";
    std::erase_if(mechs, [&](const Mechanism& m) {
      return list.find("," + m.name + ",") == std::string::npos;
    });
    if (mechs.empty()) {
      std::fprintf(stderr, "--mechanisms: none known in '%s'\n", only.c_str());
      return 2;
    }
  }

  std::vector<CellResult> results;
  for (std::size_t size : opt.sizes) {
    for (auto& m : mechs) {
      if (!json) std::fprintf(stderr, "\r%-14s %-8s ...", m.name.c_str(), human_size(size).c_str());
      results.push_back(run_cell(m, size, opt));
    }
  }
  if (!json) std::fprintf(stderr, "\r%40s\r", "");
  std::vector<Check> checks = evaluate(results, opt.sizes);
  if (json) {
    std::printf("%s\n", to_json(results, checks, opt).dump(2).c_str());
  } else {
    std::printf(
        "mbmq-bench: %d CPUs, %s, %.2f s per cell; round trip = client writes the payload, "
        "server reads it, replies with its 8-byte sum, client verifies.\n\n",
        g_cpus, opt.pin && g_cpus >= 2 ? "client on CPU 0, server on CPU 1" : "not pinned",
        opt.seconds_per_cell);
    print_table(results, checks);
  }
  bool any_error = std::any_of(results.begin(), results.end(),
                               [](const CellResult& r) { return !r.error.empty(); });
  return any_error ? 1 : 0;
}
