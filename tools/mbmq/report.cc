#include "report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

namespace mbmq::tool {

namespace {

const CellResult* find(const std::vector<CellResult>& rs, const std::string& mech,
                       std::size_t size) {
  for (const auto& r : rs)
    if (r.mechanism == mech && r.size == size && r.error.empty()) return &r;
  return nullptr;
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

std::string opt_num(const std::optional<double>& v, const char* fmt = "%.2f") {
  if (!v) return "-";
  char s[32];
  std::snprintf(s, sizeof s, fmt, *v);
  return s;
}

// The syscall figure shown: os/'s exact count where the mechanism's calls all go through it
// (strace slows the traced processes, which changes how often a waiter sleeps), else strace's.
std::optional<double> shown_syscalls(const CellResult& r) {
  return r.syscalls_per_rtt ? r.syscalls_per_rtt : r.strace_syscalls_per_rtt;
}

double mb_per_s(const CellResult& r) { return static_cast<double>(r.size) * r.rtt_per_s() / 1e6; }

}  // namespace

void derive_copies(std::vector<CellResult>& rs) {
  // The slope between this size and the next smaller one measured (both >= 64 KiB): fixed costs
  // per message (system calls, wake-ups) cancel, and so does the payload work every mechanism
  // does (raw-spin's slope); what is left, per byte, in units of memcpy's cost per byte.
  std::map<std::size_t, double> mc;
  auto memcpy_at = [&](std::size_t n) {
    if (!mc.count(n)) mc[n] = memcpy_ns(n);
    return mc[n];
  };
  for (auto& r : rs) {
    if (!r.error.empty() || r.size < 64 * 1024) continue;
    const CellResult* prev = nullptr;
    for (const auto& q : rs)
      if (q.mechanism == r.mechanism && q.error.empty() && q.size >= 64 * 1024 && q.size < r.size &&
          (prev == nullptr || q.size > prev->size))
        prev = &q;
    if (prev == nullptr) continue;
    const CellResult* hw = find(rs, "raw-spin", r.size);
    const CellResult* hw_prev = find(rs, "raw-spin", prev->size);
    if (hw == nullptr || hw_prev == nullptr) continue;
    const double extra = (r.pct(0.5) - prev->pct(0.5)) - (hw->pct(0.5) - hw_prev->pct(0.5));
    const double per_copy = memcpy_at(r.size) - memcpy_at(prev->size);
    if (per_copy > 0) r.memcpy_eq = std::max(0.0, extra / per_copy);
  }
}

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
    // Issue #13: 1.05x a raw futex ping-pong at 64 B and 4 KiB; issue #2's 1.2x at other sizes.
    add("mbmq-sleep p50 / raw-futex p50", "mbmq-sleep", "raw-futex", s, s <= 4096 ? 1.05 : 1.2);
    // Not the issue's bar: the same ping-pong with the timeout an mbmq caller's deadline puts on
    // each FUTEX_WAIT (mbmq's bench client calls with a 10 s deadline).
    add("mbmq-sleep p50 / raw-futex-deadline p50 (baseline with a deadline)", "mbmq-sleep",
        "raw-futex-deadline", s, s <= 4096 ? 1.05 : 1.2);
    // Issue #13: no slower than a Unix stream socket.
    add("mbmq-sleep p50 / uds p50", "mbmq-sleep", "uds", s, 1.0);
    // Issue #13: the server in epoll_wait on MsgQueue::fd() within 1.2x of one in wait().
    add("mbmq-fd p50 / mbmq-sleep p50", "mbmq-fd", "mbmq-sleep", s, 1.2);
    // Issue #16: untrusted peers at copy speed or better, never slower than a Unix socket; the
    // sealed path, where chosen, within 2x of cooperative from 16 MiB.
    if (s >= (1u << 20)) {
      add("mbmq-untrusted p50 / mbmq-adaptive p50", "mbmq-untrusted", "mbmq-adaptive", s, 1.5);
      // Not the issue's bar: the same ratio for a raw ping-pong whose server copies (one memcpy
      // of the payload, then its read). Above 1.5, no receiver that copies can meet #16's bar on
      // this machine; mbmq-untrusted against it says what mbmq adds to the copy.
      add("raw-spin-copy p50 / raw-spin p50 (a copy's floor for the line above)", "raw-spin-copy",
          "raw-spin", s, 1.5);
      add("mbmq-untrusted p50 / raw-spin-copy p50 (over the copy floor)", "mbmq-untrusted",
          "raw-spin-copy", s, 1.3);
      add("mbmq-untrusted p50 / uds p50", "mbmq-untrusted", "uds", s, 1.0);
    }
    if (s >= (16u << 20))
      add("mbmq-untrusted-sealed p50 / mbmq-adaptive p50", "mbmq-untrusted-sealed", "mbmq-adaptive",
          s, 2.0);
  }
  for (const auto& r : rs) {
    if (!r.syscalls_per_rtt || !r.error.empty()) continue;
    if (r.mechanism == "mbmq-spin")
      out.push_back({"mbmq-spin syscalls/rtt @" + human_size(r.size), *r.syscalls_per_rtt, 0.0,
                     *r.syscalls_per_rtt == 0.0});
    if (r.mechanism == "mbmq-sleep") {
      double worst = std::max(r.client_syscalls, r.server_syscalls);
      out.push_back(
          {"mbmq-sleep syscalls/rtt per side @" + human_size(r.size), worst, 2.0, worst <= 2.0});
    }
    // Issue #2's zero-allocation target is for the cooperative modes; the untrusted ones are
    // reported in the table (their sealed path makes a memfd per message).
    if (r.mechanism.rfind("mbmq", 0) == 0 && r.mechanism.find("untrusted") == std::string::npos &&
        r.allocs_per_rtt)
      out.push_back({r.mechanism + " allocs/rtt @" + human_size(r.size), *r.allocs_per_rtt, 0.0,
                     *r.allocs_per_rtt == 0.0});
  }
  return out;
}

nlohmann::json to_json(const std::vector<CellResult>& rs, const std::vector<Check>& checks,
                       const Options& opt) {
  using nlohmann::json;
  auto opt_json = [](const std::optional<double>& v) { return v ? json(*v) : json(); };
  json results = json::array();
  for (const auto& r : rs) {
    json j;
    j["mechanism"] = r.mechanism;
    j["size"] = r.size;
    if (r.channels > 0) j["channels"] = r.channels;     // --channels rows only
    if (r.in_flight > 0) j["in_flight"] = r.in_flight;  // --async rows: one iteration = a batch
    j["iterations"] = r.lat.size();
    const bool ok = r.error.empty() && !r.lat.empty();
    j["p50_ns"] = ok ? json(r.pct(0.5)) : json();
    j["p99_ns"] = ok ? json(r.pct(0.99)) : json();
    j["p999_ns"] = ok ? json(r.pct(0.999)) : json();
    j["max_ns"] = ok ? json(r.pct(1.0)) : json();
    j["rtt_per_s"] = ok ? json(r.rtt_per_s()) : json();
    j["mb_per_s"] = ok ? json(mb_per_s(r)) : json();
    j["memcpy_eq"] = opt_json(r.memcpy_eq);
    j["syscalls_per_rtt"] = opt_json(shown_syscalls(r));
    j["syscalls_method"] = r.syscalls_per_rtt          ? "os-layer counters"
                           : r.strace_syscalls_per_rtt ? "strace -f -c"
                                                       : "";
    j["strace_syscalls_per_rtt"] = opt_json(r.strace_syscalls_per_rtt);
    j["os_syscalls_per_rtt"] = opt_json(r.syscalls_per_rtt);
    if (r.syscalls_per_rtt) {
      j["client_syscalls_per_rtt"] = r.client_syscalls;
      j["server_syscalls_per_rtt"] = r.server_syscalls;
    }
    j["yields_per_rtt"] = opt_json(r.yields_per_rtt);
    j["allocs_per_rtt"] = opt_json(r.allocs_per_rtt);
    j["cpu_ns_per_rtt"] = ok ? json(r.cpu_ns_per_rtt) : json();
    if (!r.error.empty()) j["error"] = r.error;
    results.push_back(j);
  }
  json cj = json::array();
  for (const auto& c : checks)
    cj.push_back(
        {{"check", c.what}, {"measured", c.measured}, {"limit", c.limit}, {"pass", c.pass}});
  return {{"results", results},
          {"checks", cj},
          {"machine", {{"cpus", cpus()}, {"pinned", opt.pin && cpus() >= 2}}},
          {"seconds_per_cell", opt.seconds_per_cell},
          {"touch", g_work.touch}};
}

void print_table(const std::vector<CellResult>& rs, const std::vector<Check>& checks,
                 const Options& opt) {
  std::printf(
      "mbmq bench: %d CPUs, %s, %.2f s per cell. Round trip = the client writes %s payload, the "
      "server reads it and answers its 8-byte sum, the client verifies it.\n\n",
      cpus(), opt.pin && cpus() >= 2 ? "client on CPU 0, server on CPU 1" : "not pinned",
      opt.seconds_per_cell, g_work.touch ? "the whole" : "8 bytes of the (--no-touch)");
  std::printf("%-14s %8s %9s %9s %9s %9s %10s %9s %8s %8s %8s %7s %7s\n", "mechanism", "size",
              "p50 us", "p99 us", "p99.9 us", "max us", "rtt/s", "MB/s", "x mbmq", "x hw",
              "sys/rtt", "allocs", "copies");
  std::size_t last = 0;
  for (const auto& r : rs) {
    if (r.size != last && last != 0) std::printf("\n");
    last = r.size;
    if (!r.error.empty()) {
      std::printf("%-14s %8s  %s\n", r.mechanism.c_str(), human_size(r.size).c_str(),
                  r.error.c_str());
      continue;
    }
    std::printf("%-14s %8s %9s %9s %9s %9s %10.0f %9.1f %8s %8s %8s %7s %7s\n", r.mechanism.c_str(),
                human_size(r.size).c_str(), fmt_us(r.pct(0.5)).c_str(), fmt_us(r.pct(0.99)).c_str(),
                fmt_us(r.pct(0.999)).c_str(), fmt_us(r.pct(1.0)).c_str(), r.rtt_per_s(),
                mb_per_s(r), ratio(r, rs, "mbmq-adaptive").c_str(),
                ratio(r, rs, "raw-spin").c_str(), opt_num(shown_syscalls(r)).c_str(),
                opt_num(r.allocs_per_rtt).c_str(), opt_num(r.memcpy_eq, "%.1f").c_str());
  }
  std::printf(
      "\nx mbmq: p50 / mbmq-adaptive's p50 (mbmq's default). x hw: p50 / raw-spin's (the hardware "
      "limit).\nsys/rtt: system calls per round trip, both processes: counted exactly by mbmq's "
      "os/ "
      "layer, or for\n  libzmq, Boost and iceoryx by strace -f -c (200 round trips, smallest size, "
      "every thread).\nallocs: operator new calls per round trip on the client's "
      "and the server's thread (libzmq's malloc calls are not seen).\ncopies: payload copies per "
      "request in memcpy equivalents, from the slope between two sizes >= 64 KiB:\n  (extra p50 "
      "per extra byte, beyond raw-spin's) / (memcpy's time per extra byte), both measured in "
      "this run.\n");
  if (!checks.empty()) {
    std::printf("\nmbmq's targets (ratios of p50 in this run):\n");
    for (const auto& c : checks)
      std::printf("  [%s] %-52s %8.3f (limit %.2f)\n", c.pass ? "ok  " : "MISS", c.what.c_str(),
                  c.measured, c.limit);
  }
}

namespace {
// --channels: p50 over `base`'s p50 at the same size; `base` is the same mechanism at the smallest
// channel count measured (same_mech) or the named mechanism at the same count.
std::string channel_ratio(const CellResult& r, const std::vector<CellResult>& rs,
                          const char* base) {
  const CellResult* b = nullptr;
  for (const auto& q : rs) {
    if (!q.error.empty() || q.lat.empty() || q.size != r.size) continue;
    if (base == nullptr ? q.mechanism == r.mechanism && (b == nullptr || q.channels < b->channels)
                        : q.mechanism == base && q.channels == r.channels)
      b = &q;
  }
  if (b == nullptr || b->pct(0.5) <= 0) return "-";
  char s[32];
  std::snprintf(s, sizeof s, "%.2fx", r.pct(0.5) / b->pct(0.5));
  return s;
}

std::string channels_markdown(const std::vector<CellResult>& rs) {
  std::string out =
      "| mechanism | channels | size | p50 µs | p99 µs | p99.9 µs | max µs | rtt/s | × fewest | "
      "× uds-epoll | syscalls/rtt | allocs/rtt | CPU µs/rtt |\n"
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  char line[512];
  for (const auto& r : rs) {
    if (!r.error.empty()) {
      std::snprintf(line, sizeof line, "| %s | %zu | %s | %s ||||||||||\n", r.mechanism.c_str(),
                    r.channels, human_size(r.size).c_str(), r.error.c_str());
    } else {
      std::snprintf(line, sizeof line,
                    "| %s | %zu | %s | %s | %s | %s | %s | %.0f | %s | %s | %s | %s | %s |\n",
                    r.mechanism.c_str(), r.channels, human_size(r.size).c_str(),
                    fmt_us(r.pct(0.5)).c_str(), fmt_us(r.pct(0.99)).c_str(),
                    fmt_us(r.pct(0.999)).c_str(), fmt_us(r.pct(1.0)).c_str(), r.rtt_per_s(),
                    channel_ratio(r, rs, nullptr).c_str(),
                    channel_ratio(r, rs, "uds-epoll").c_str(), opt_num(shown_syscalls(r)).c_str(),
                    opt_num(r.allocs_per_rtt).c_str(), fmt_us(r.cpu_ns_per_rtt).c_str());
    }
    out += line;
  }
  return out;
}
}  // namespace

void print_channels_table(const std::vector<CellResult>& rs, const Options& opt,
                          std::uint64_t fd_limit) {
  std::printf(
      "mbmq bench --channels: %d CPUs, %s, %.2f s per cell, RLIMIT_NOFILE %llu.\nOne server "
      "holds N channels, N-1 idle and one active; the client holds their other ends and calls on "
      "the active one:\nit writes %s payload, the server reads it and answers its 8-byte sum, "
      "the client verifies it.\n\n",
      cpus(), opt.pin && cpus() >= 2 ? "client on CPU 0, server on CPU 1" : "not pinned",
      opt.seconds_per_cell, static_cast<unsigned long long>(fd_limit),
      g_work.touch ? "the whole" : "8 bytes of the (--no-touch)");
  std::printf("%-14s %8s %8s %9s %9s %9s %9s %10s %9s %9s %8s %7s %8s\n", "mechanism", "channels",
              "size", "p50 us", "p99 us", "p99.9 us", "max us", "rtt/s", "x fewest", "x uds",
              "sys/rtt", "allocs", "cpu us");
  std::size_t last = 0;
  for (const auto& r : rs) {
    if (r.channels != last && last != 0) std::printf("\n");
    last = r.channels;
    if (!r.error.empty()) {
      std::printf("%-14s %8zu %8s  %s\n", r.mechanism.c_str(), r.channels,
                  human_size(r.size).c_str(), r.error.c_str());
      continue;
    }
    std::printf("%-14s %8zu %8s %9s %9s %9s %9s %10.0f %9s %9s %8s %7s %8s\n", r.mechanism.c_str(),
                r.channels, human_size(r.size).c_str(), fmt_us(r.pct(0.5)).c_str(),
                fmt_us(r.pct(0.99)).c_str(), fmt_us(r.pct(0.999)).c_str(),
                fmt_us(r.pct(1.0)).c_str(), r.rtt_per_s(), channel_ratio(r, rs, nullptr).c_str(),
                channel_ratio(r, rs, "uds-epoll").c_str(), opt_num(shown_syscalls(r)).c_str(),
                opt_num(r.allocs_per_rtt).c_str(), fmt_us(r.cpu_ns_per_rtt).c_str());
  }
  std::printf(
      "\nx fewest: p50 / the same mechanism's p50 at the fewest channels measured. x uds: p50 / "
      "uds-epoll's p50 at the same\nchannel count (a Unix stream socket per channel, the server "
      "in epoll_wait on all of them).\nsys/rtt: system calls per round trip, both processes "
      "(mbmq's os/ layer counts them). allocs: operator new\ncalls per round trip, both threads. "
      "cpu us: CPU time per round trip, both processes. Setting up the\nchannels (before the "
      "fork) and adopting or registering them (in the server) is not measured.\n");
}

std::string markdown(const std::vector<CellResult>& rs) {
  if (std::any_of(rs.begin(), rs.end(), [](const CellResult& r) { return r.channels > 0; }))
    return channels_markdown(rs);
  std::string out =
      "| mechanism | size | p50 µs | p99 µs | p99.9 µs | max µs | rtt/s | MB/s | × mbmq | × hw | "
      "syscalls/rtt | allocs/rtt | copies "
      "|\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  char line[512];
  for (const auto& r : rs) {
    if (!r.error.empty()) {
      std::snprintf(line, sizeof line, "| %s | %s | %s |||||||||||\n", r.mechanism.c_str(),
                    human_size(r.size).c_str(), r.error.c_str());
    } else {
      std::snprintf(line, sizeof line,
                    "| %s | %s | %s | %s | %s | %s | %.0f | %.1f | %s | %s | %s | %s | %s |\n",
                    r.mechanism.c_str(), human_size(r.size).c_str(), fmt_us(r.pct(0.5)).c_str(),
                    fmt_us(r.pct(0.99)).c_str(), fmt_us(r.pct(0.999)).c_str(),
                    fmt_us(r.pct(1.0)).c_str(), r.rtt_per_s(), mb_per_s(r),
                    ratio(r, rs, "mbmq-adaptive").c_str(), ratio(r, rs, "raw-spin").c_str(),
                    opt_num(shown_syscalls(r)).c_str(), opt_num(r.allocs_per_rtt).c_str(),
                    opt_num(r.memcpy_eq, "%.1f").c_str());
    }
    out += line;
  }
  return out;
}

std::string svg_plot(const std::vector<CellResult>& rs) {
  // Series in first-seen order.
  std::vector<std::string> names;
  double xmin = 1e300, xmax = 0, ymin = 1e300, ymax = 0;
  for (const auto& r : rs) {
    if (!r.error.empty() || r.lat.empty()) continue;
    if (std::find(names.begin(), names.end(), r.mechanism) == names.end())
      names.push_back(r.mechanism);
    double x = static_cast<double>(r.size), y = r.pct(0.5) / 1000.0;
    xmin = std::min(xmin, x), xmax = std::max(xmax, x);
    ymin = std::min(ymin, y), ymax = std::max(ymax, y);
  }
  const double W = 900, H = 560, L = 80, R = 200, T = 40, B = 60;
  if (names.empty()) return "<svg xmlns='http://www.w3.org/2000/svg'/>\n";
  double lx0 = std::floor(std::log10(xmin)), lx1 = std::ceil(std::log10(xmax));
  double ly0 = std::floor(std::log10(ymin)), ly1 = std::ceil(std::log10(ymax));
  if (lx1 <= lx0) lx1 = lx0 + 1;
  if (ly1 <= ly0) ly1 = ly0 + 1;
  auto px = [&](double x) { return L + (std::log10(x) - lx0) / (lx1 - lx0) * (W - L - R); };
  auto py = [&](double y) { return H - B - (std::log10(y) - ly0) / (ly1 - ly0) * (H - T - B); };
  static const char* colors[] = {"#000000", "#7f7f7f", "#bcbd22", "#1f77b4", "#2ca02c",
                                 "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                                 "#ff7f0e", "#aec7e8", "#98df8a", "#ff9896"};
  std::string s;
  char b[512];
  std::snprintf(b, sizeof b,
                "<svg xmlns='http://www.w3.org/2000/svg' width='%.0f' height='%.0f' "
                "font-family='sans-serif' font-size='12'>\n<rect width='100%%' height='100%%' "
                "fill='white'/>\n<text x='%.0f' y='24' font-size='15'>Round-trip latency (p50) "
                "vs payload size, log-log (mbmq bench)</text>\n",
                W, H, L);
  s += b;
  for (double e = lx0; e <= lx1; ++e) {
    double x = px(std::pow(10.0, e));
    std::snprintf(b, sizeof b,
                  "<line x1='%.1f' y1='%.0f' x2='%.1f' y2='%.0f' stroke='#ddd'/><text x='%.1f' "
                  "y='%.0f' text-anchor='middle'>1e%.0f B</text>\n",
                  x, T, x, H - B, x, H - B + 18, e);
    s += b;
  }
  for (double e = ly0; e <= ly1; ++e) {
    double y = py(std::pow(10.0, e));
    std::snprintf(b, sizeof b,
                  "<line x1='%.0f' y1='%.1f' x2='%.0f' y2='%.1f' stroke='#ddd'/><text x='%.0f' "
                  "y='%.1f' text-anchor='end'>%g µs</text>\n",
                  L, y, W - R, y, L - 6, y + 4, std::pow(10.0, e));
    s += b;
  }
  std::snprintf(b, sizeof b, "<text x='%.0f' y='%.0f' text-anchor='middle'>payload size</text>\n",
                (L + W - R) / 2, H - 16);
  s += b;
  for (std::size_t k = 0; k < names.size(); ++k) {
    const char* c = colors[k % (sizeof colors / sizeof *colors)];
    std::string pts;
    for (const auto& r : rs) {
      if (r.mechanism != names[k] || !r.error.empty() || r.lat.empty()) continue;
      std::snprintf(b, sizeof b, "%.1f,%.1f ", px(static_cast<double>(r.size)),
                    py(r.pct(0.5) / 1000.0));
      pts += b;
    }
    const bool ours = names[k].rfind("mbmq", 0) == 0;
    std::snprintf(b, sizeof b,
                  "<polyline fill='none' stroke='%s' stroke-width='%d' points='%s'/>\n"
                  "<line x1='%.0f' y1='%.0f' x2='%.0f' y2='%.0f' stroke='%s' stroke-width='%d'/>"
                  "<text x='%.0f' y='%.0f'>%s</text>\n",
                  c, ours ? 3 : 1, pts.c_str(), W - R + 10, T + 18.0 * static_cast<double>(k) + 10,
                  W - R + 34, T + 18.0 * static_cast<double>(k) + 10, c, ours ? 3 : 1, W - R + 40,
                  T + 18.0 * static_cast<double>(k) + 14, names[k].c_str());
    s += b;
  }
  s += "</svg>\n";
  return s;
}

void print_copies(const std::vector<CellResult>& rs, const std::vector<Mechanism>& mechs,
                  const std::vector<std::size_t>& all_sizes) {
  // Only sizes with a slope (the smallest has none).
  std::vector<std::size_t> sizes;
  for (std::size_t s : all_sizes)
    if (std::any_of(rs.begin(), rs.end(),
                    [&](const CellResult& r) { return r.size == s && r.memcpy_eq; }))
      sizes.push_back(s);
  std::printf(
      "How many copies does a request cost? Per mechanism: the copies of the payload by design, "
      "and the measured\nmemcpy equivalents: the round trip's extra time per extra byte (beyond "
      "raw-spin, the hardware limit),\nin units of memcpy's time per byte, from the slope "
      "between two payload sizes (fixed costs per message cancel).\n\n%-14s",
      "mechanism");
  for (std::size_t s : sizes) std::printf("   @%-8s", human_size(s).c_str());
  std::printf("  by design\n");
  for (const auto& m : mechs) {
    std::printf("%-14s", m.name.c_str());
    for (std::size_t s : sizes) {
      std::string v = "-";
      for (const auto& r : rs)
        if (r.mechanism == m.name && r.size == s)
          v = !r.error.empty() ? "n/a" : opt_num(r.memcpy_eq, "%.2f");
      std::printf(" %10s", v.c_str());
    }
    if (m.unavailable.empty())
      std::printf("  %s\n", m.copies_by_design.c_str());
    else
      std::printf("  unavailable: %s\n", m.unavailable.c_str());
  }
}

}  // namespace mbmq::tool
