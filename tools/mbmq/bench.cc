// tools/mbmq/bench.cc: the work of a round trip, server accounting, and running one cell.
#include "bench.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "alloc_count.h"
#include "mbmq/deadline.h"
#include "os/process.h"
#include "os/syscall_count.h"
#include "os/unix_socket.h"

namespace mbmq::tool {

Work g_work;

namespace {
std::uint8_t fill_value(std::uint64_t iter) { return static_cast<std::uint8_t>(iter * 13 + 1); }
std::size_t touched(std::size_t n) { return g_work.touch ? n : std::min<std::size_t>(n, 8); }
}  // namespace

void write_payload(std::byte* p, std::size_t n, std::uint64_t iter) {
  std::memset(p, fill_value(iter), touched(n));
}

std::uint64_t read_payload(std::byte* p, std::size_t n) {
  n = touched(n);
  if (g_work.corrupt && n > 0) p[n / 2] ^= std::byte{0x40};  // what a broken transport would do
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
  n = touched(n);
  std::uint64_t v = fill_value(iter);
  return static_cast<std::uint64_t>(n / 8) * (v * 0x0101010101010101ull) + (n % 8) * v;
}

// ---- server accounting -------------------------------------------------------------------------
constexpr std::uint64_t kServerSkip = 10;  // server-side warm-up: first requests not counted

void ServerCounter::tick() {
  if (++n == kServerSkip) {
    sys0 = os::work_syscalls_this_thread();
    yield0 = os::yields_this_thread();
    alloc0 = allocs_this_thread();
    cpu0 = os::process_cpu_ns();
  }
}

void ServerCounter::stop() {
  if (stopped) return;
  stopped = true;
  sys1 = os::work_syscalls_this_thread();
  yield1 = os::yields_this_thread();
  alloc1 = allocs_this_thread();
  cpu1 = os::process_cpu_ns();
}

ServerStats ServerCounter::finish(int error) {
  if (external) {
    ServerStats s = *external;
    if (error != 0) s.error = error;
    return s;
  }
  stop();
  ServerStats s;
  s.error = error;
  if (n > kServerSkip) {
    // The window opens as request kServerSkip arrives (before its reply) and closes as the stop
    // request arrives: it holds the replies to requests kServerSkip..n and the waits for requests
    // kServerSkip+1..n and the stop, i.e. n - kServerSkip + 1 round trips.
    s.rtts = n - kServerSkip + 1;
    s.syscalls = sys1 - sys0;
    s.yields = yield1 - yield0;
    s.allocs = alloc1 - alloc0;
    s.cpu_ns = cpu1 - cpu0;
  }
  return s;
}

// ---- cells
// ---------------------------------------------------------------------------------------
namespace {
// Read once, before anything is pinned (pinning narrows what sched_getaffinity reports).
const int g_cpus = os::cpu_count();
void pin(int cpu, bool enabled) {
  if (enabled && g_cpus >= 2) (void)os::pin_to_cpu(cpu);
}
}  // namespace

int cpus() { return g_cpus; }

double percentile(const std::vector<std::int64_t>& sorted, double q) {
  if (sorted.empty()) return 0;
  std::size_t i = static_cast<std::size_t>(q * static_cast<double>(sorted.size() - 1) + 0.5);
  return static_cast<double>(sorted[std::min(i, sorted.size() - 1)]);
}

double CellResult::pct(double q) const { return percentile(lat, q); }

double CellResult::rtt_per_s() const {
  double total = 0;
  for (auto v : lat) total += static_cast<double>(v);
  return total > 0 ? static_cast<double>(lat.size()) * 1e9 / total : 0;
}

std::string human_size(std::size_t n) {
  if (n >= (1u << 20) && n % (1u << 20) == 0) return std::to_string(n >> 20) + " MiB";
  if (n >= 1024 && n % 1024 == 0) return std::to_string(n >> 10) + " KiB";
  return std::to_string(n) + " B";
}

pid_t fork_pinned(int cpu, bool pin, const std::function<void()>& body, std::string& error) {
  auto pid = os::fork_process();
  if (!pid) {
    error = pid.error().message();
    return -1;
  }
  if (*pid != 0) return *pid;
  os::die_with_parent();
  if (pin && g_cpus >= 2) (void)os::pin_to_cpu(cpu);
  os::ignore_sigpipe();  // a write to a pipe or socket whose reader left fails with EPIPE
  body();
  os::exit_now(0);
}

Result<pid_t> spawn_quiet(const std::string& path, const std::vector<std::string>& args) {
  std::FILE* devnull = std::fopen("/dev/null", "w");
  const int quiet = devnull != nullptr ? fileno(devnull) : -1;
  auto pid = os::spawn_program(path, args, quiet, quiet);
  if (devnull != nullptr) (void)std::fclose(devnull);
  return pid;
}

bool wait_exit(int r, std::int64_t deadline) {
  const std::int64_t left = deadline - monotonic_ns();
  auto ready = os::wait_readable(r, std::max<std::int64_t>(left, 0));
  return ready && *ready;
}

std::optional<double> strace_calls(const std::string& file,
                                   const std::vector<std::string>& excluded) {
  // "% time     seconds  usecs/call     calls    errors syscall", a row per system call
  // ("  12.50    0.000123          12        10         2 futex", errors may be blank), a rule,
  // then "100.00    0.001234          12      1234        5 total".
  std::ifstream f(file);
  std::string line;
  double calls = 0;
  bool total = false;
  while (std::getline(f, line)) {
    std::istringstream in(line);
    std::vector<std::string> t;
    for (std::string w; in >> w;) t.push_back(w);
    if (t.size() < 5 || t[0].empty() || (std::isdigit(static_cast<unsigned char>(t[0][0])) == 0))
      continue;
    if (t.back() == "total") {
      total = true;
      break;
    }
    if (std::find(excluded.begin(), excluded.end(), t.back()) != excluded.end()) continue;
    char* end = nullptr;
    const double v = std::strtod(t[3].c_str(), &end);
    if (end != t[3].c_str()) calls += v;
  }
  if (!total) return std::nullopt;
  return calls;
}

std::string unique_tmp_path(const char* what, const char* suffix) {
  static int n = 0;
  return std::string("/tmp/mbmq-") + what + "-" + std::to_string(os::current_pid()) + "-" +
         std::to_string(n++) + suffix;
}

CellResult run_cell(Mechanism& m, std::size_t size, const Options& opt) {
  CellResult r;
  r.mechanism = m.name;
  r.size = size;
  if (!m.unavailable.empty()) {
    r.error = "unavailable: " + m.unavailable;
    return r;
  }
  if (size > m.max_size) {
    r.error = "unsupported: payloads above " + human_size(m.max_size);
    return r;
  }
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
  bool ok = true;
  if (m.after_fork_parent) {
    if (auto s = m.after_fork_parent(); !s) {
      r.error = s.error().message();
      ok = false;
    }
  }
  pin(0, opt.pin);
  const std::size_t max_samples = opt.fixed_rtts > 0 ? opt.fixed_rtts : opt.max_samples;
  r.lat.reserve(max_samples);
  std::uint64_t iter = 0;
  // Warm-up: a fifth of the budget, and at least 50 round trips while that takes under the whole
  // budget, 5 in any case (one 64 MiB ZeroMQ round trip takes half a second here). 10 for a
  // fixed count.
  const std::int64_t warm_start = monotonic_ns();
  const std::int64_t budget = static_cast<std::int64_t>(opt.seconds_per_cell * 1e9);
  const std::int64_t warm_end = opt.fixed_rtts > 0 ? 0 : warm_start + budget / 5;
  const std::uint64_t warm_min = opt.fixed_rtts > 0 ? 10 : 5;
  while (ok && (iter < warm_min || monotonic_ns() < warm_end ||
                (opt.fixed_rtts == 0 && iter < 50 && monotonic_ns() < warm_start + budget)))
    ok = m.client_rtt(iter++);
  const std::uint64_t sys0 = os::work_syscalls_this_thread(), yield0 = os::yields_this_thread();
  const std::uint64_t alloc0 = allocs_this_thread();
  const std::int64_t cpu0 = os::process_cpu_ns();
  const std::int64_t end =
      opt.fixed_rtts > 0 ? std::numeric_limits<std::int64_t>::max()
                         : monotonic_ns() + static_cast<std::int64_t>(opt.seconds_per_cell * 0.8e9);
  while (ok && r.lat.size() < max_samples) {
    std::int64_t t0 = monotonic_ns();
    ok = m.client_rtt(iter++);
    std::int64_t t1 = monotonic_ns();
    r.lat.push_back(t1 - t0);  // capacity reserved: no allocation
    if (t1 >= end) break;
  }
  const double n = static_cast<double>(std::max<std::size_t>(r.lat.size(), 1));
  const double csys = static_cast<double>(os::work_syscalls_this_thread() - sys0) / n;
  const double cyields = static_cast<double>(os::yields_this_thread() - yield0) / n;
  const double callocs = static_cast<double>(allocs_this_thread() - alloc0) / n;
  const double ccpu = static_cast<double>(os::process_cpu_ns() - cpu0) / n;
  m.stop();
  ServerStats st{};
  auto got =
      os::read_full(stats_pipe->first.get(), {reinterpret_cast<std::byte*>(&st), sizeof(st)});
  (void)os::wait_process(*pid);
  m.teardown();
  if (!ok && r.error.empty()) r.error = "a reply failed verification or the round trip failed";
  if (!got || *got != sizeof(st) || st.error != 0)
    if (r.error.empty()) r.error = "server failed (code " + std::to_string(st.error) + ")";
  if (st.rtts > 0) {
    if (m.os_counted) {
      r.client_syscalls = csys;
      r.server_syscalls = static_cast<double>(st.syscalls) / static_cast<double>(st.rtts);
      r.syscalls_per_rtt = csys + r.server_syscalls;
      r.yields_per_rtt = cyields + static_cast<double>(st.yields) / static_cast<double>(st.rtts);
    }
    r.allocs_per_rtt = callocs + static_cast<double>(st.allocs) / static_cast<double>(st.rtts);
    r.cpu_ns_per_rtt = ccpu + static_cast<double>(st.cpu_ns) / static_cast<double>(st.rtts);
  }
  std::sort(r.lat.begin(), r.lat.end());
  return r;
}

double memcpy_ns(std::size_t n) {
  std::vector<std::byte> a(n, std::byte{1}), b(n, std::byte{2});
  std::vector<std::int64_t> t;
  const int reps = n >= (16u << 20) ? 7 : n >= (1u << 20) ? 21 : 101;
  for (int i = 0; i < reps; ++i) {
    std::int64_t t0 = monotonic_ns();
    std::memcpy(b.data(), a.data(), n);
    std::int64_t t1 = monotonic_ns();
    t.push_back(t1 - t0);
    a[static_cast<std::size_t>(i) % n] = b[(static_cast<std::size_t>(i) * 7) % n];  // keep it real
  }
  std::sort(t.begin(), t.end());
  return static_cast<double>(t[t.size() / 2]);
}

}  // namespace mbmq::tool
