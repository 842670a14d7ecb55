// tools/mbmq/main.cc: the `mbmq` command.
//   mbmq bench   two-process request/response: mbmq beside the IPC in use today, measured here
//                (--stream: one-way messages, producer to consumer, every message verified;
//                --fanout: one publisher, N subscribers, publish to last receive)
//   mbmq copies  per mechanism, the copies a request costs by design and as measured
//   mbmq files   serving a file over loopback HTTP: read+write, mmap+write, sendfile, splice, nginx
// `mbmq-bench ARGS` is `mbmq bench ARGS`. Argument errors print why and exit 2; a failed cell
// (a wrong reply, a mechanism that broke) exits 1 after the report.
#include <sys/wait.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "bench.h"
#include "fanout.h"
#include "mbmq/deadline.h"
#include "os/process.h"
#include "report.h"
#include "stream.h"

namespace mbmq::tool {
int run_files(const std::vector<std::string>& argv_rest);  // files.cc
// inspect.cc (#18)
int run_ls(const std::vector<std::string>& args);
int run_stat(const std::vector<std::string>& args);
int run_top(const std::vector<std::string>& args);
int run_demo(const std::vector<std::string>& args);
namespace {

std::vector<std::size_t> parse_sizes(const std::string& s) {
  std::vector<std::size_t> out;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    std::size_t comma = s.find(',', pos);
    std::string tok = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    std::size_t mult = 1;
    if (!tok.empty() && (tok.back() == 'K' || tok.back() == 'k'))
      mult = 1024, tok.pop_back();
    else if (!tok.empty() && (tok.back() == 'M' || tok.back() == 'm'))
      mult = 1 << 20, tok.pop_back();
    char* end = nullptr;
    unsigned long long v = std::strtoull(tok.c_str(), &end, 10);
    if (tok.empty() || *end != '\0' || tok[0] == '-')
      throw CLI::ValidationError("--sizes", "not a size: '" + tok + "' (e.g. 64,4K,1M)");
    std::size_t size = static_cast<std::size_t>(v) * mult;
    if (size < 8 || size > (64u << 20))
      throw CLI::ValidationError("--sizes", "each size must be 8 B .. 64 MiB, got " + tok);
    out.push_back(size);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

// "1,64,1024": counts 1..max for `option` (--channels, --fanout).
std::vector<std::size_t> parse_counts(const std::string& s, const char* option,
                                      unsigned long long max) {
  std::vector<std::size_t> out;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    std::size_t comma = s.find(',', pos);
    std::string tok = s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    char* end = nullptr;
    unsigned long long v = std::strtoull(tok.c_str(), &end, 10);
    if (tok.empty() || *end != '\0' || tok[0] == '-' || v < 1 || v > max)
      throw CLI::ValidationError(option,
                                 "not a count 1.." + std::to_string(max) + ": '" + tok + "'");
    out.push_back(static_cast<std::size_t>(v));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

// Runs this program under `strace -f -c` for `rtts` round trips of one cell and returns the total
// number of system calls strace counted (every thread of both processes).
std::optional<double> strace_total(const std::string& self, const std::string& mech,
                                   std::size_t size, std::uint64_t rtts, bool touch) {
  static int n = 0;
  std::string out =
      "/tmp/mbmq-strace-" + std::to_string(os::current_pid()) + "-" + std::to_string(n++) + ".txt";
  std::vector<std::string> args = {"-f",
                                   "-c",
                                   "-q",
                                   "-o",
                                   out,
                                   "--",
                                   self,
                                   "bench",
                                   "--mechanisms",
                                   mech,
                                   "--sizes",
                                   std::to_string(size),
                                   "--fixed-rtts",
                                   std::to_string(rtts),
                                   "--no-strace",
                                   "--no-pin",
                                   "--json",
                                   "--roudi-running"};
  if (!touch) args.push_back("--no-touch");
  auto pid = spawn_quiet("/usr/bin/strace", args);
  if (!pid) return std::nullopt;
  auto st = os::wait_process(*pid);
  const bool cell_ok = st && WIFEXITED(*st) && WEXITSTATUS(*st) == 0;
  auto calls = strace_calls(out);
  std::error_code ec;
  std::filesystem::remove(out, ec);
  if (!cell_ok) return std::nullopt;
  return calls;
}

// Syscalls per round trip by strace: the difference of two runs cancels start-up and tear-down.
void add_strace(std::vector<CellResult>& rs, const std::string& self, bool touch, std::size_t size,
                bool progress) {
  if (!std::filesystem::exists("/usr/bin/strace")) return;
  constexpr std::uint64_t kShort = 20, kLong = 220;
  for (auto& r : rs) {
    // Only where os/ could not count (third-party libraries).
    if (r.size != size || !r.error.empty() || r.syscalls_per_rtt) continue;
    if (progress)
      std::fprintf(stderr, "\r  strace: %-14s %-8s   ", r.mechanism.c_str(),
                   human_size(size).c_str());
    auto a = strace_total(self, r.mechanism, size, kShort, touch);
    auto b = strace_total(self, r.mechanism, size, kLong, touch);
    if (a && b && *b >= *a)
      r.strace_syscalls_per_rtt = (*b - *a) / static_cast<double>(kLong - kShort);
  }
}

struct Progress {
  Progress() = default;
  // Shown on a terminal when `cells` cells of `opt` take more than 3 s (and `allowed`).
  Progress(std::size_t cells, const Options& opt, bool allowed = true)
      : on(allowed && os::is_terminal(2) &&
           static_cast<double>(cells) * opt.seconds_per_cell > 3.0),
        total(cells) {}
  bool on = false;
  std::size_t total = 0, done = 0;
  void step(const std::string& what) {
    if (!on) return;
    const int width = 30;
    int fill =
        total ? static_cast<int>(static_cast<double>(done) / static_cast<double>(total) * width)
              : 0;
    std::fprintf(stderr, "\r[%.*s%*s] %zu/%zu %-28s", fill,
                 "==============================", width - fill, "", done, total, what.c_str());
    ++done;
  }
  void clear() {
    if (on) std::fprintf(stderr, "\r%90s\r", "");
  }
};

// Keeps the mechanisms named in `only` (comma-separated; empty: all). False, with a message, if
// one of the names is unknown. M: Mechanism or StreamMechanism.
template <class M>
bool select_mechanisms(std::vector<M>& mechs, const std::string& only) {
  if (only.empty()) return true;
  std::string list = "," + only + ",";
  for (std::size_t pos = 1; pos < list.size();) {
    std::size_t c = list.find(',', pos);
    std::string name = list.substr(pos, c - pos);
    if (!name.empty() &&
        std::none_of(mechs.begin(), mechs.end(), [&](const M& m) { return m.name == name; })) {
      std::string known;
      for (const auto& m : mechs) known += " " + m.name;
      std::fprintf(stderr, "--mechanisms: unknown '%s' (known:%s)\n", name.c_str(), known.c_str());
      return false;
    }
    pos = c + 1;
  }
  std::erase_if(mechs,
                [&](const M& m) { return list.find("," + m.name + ",") == std::string::npos; });
  return true;
}

enum class Output { Table, Json, Markdown };

// A row whose error is a failure (not a mechanism that cannot run here). R: CellResult or
// StreamResult.
template <class R>
bool failed_any(const std::vector<R>& results) {
  return std::any_of(results.begin(), results.end(), [](const R& r) {
    return !r.error.empty() && r.error.rfind("unavailable", 0) != 0 &&
           r.error.rfind("unsupported", 0) != 0;
  });
}

// `mbmq bench --stream`: per size, the stream mechanisms (mech_stream.cc), one-way messages.
int run_stream(const std::string& only, const Options& opt, Output out) {
  std::vector<StreamMechanism> mechs = stream_mechanisms();
  if (!select_mechanisms(mechs, only)) return 2;
  const auto rounds = static_cast<std::size_t>(opt.rounds);
  Progress progress(rounds * mechs.size() * opt.sizes.size(), opt);
  // per_cell[i]: the rounds of cell i (sizes outer, mechanisms inner), interleaved: every cell
  // once per round, so drift between rounds hits every row alike.
  std::vector<std::vector<StreamResult>> per_cell(mechs.size() * opt.sizes.size());
  for (std::size_t round = 0; round < rounds; ++round) {
    std::size_t i = 0;
    for (std::size_t size : opt.sizes) {
      for (auto& m : mechs) {
        progress.step(m.name + " " + human_size(size) +
                      (rounds > 1 ? " round " + std::to_string(round + 1) : std::string()));
        per_cell[i++].push_back(run_stream_cell(m, size, opt));
      }
    }
  }
  std::vector<StreamResult> results;
  for (const auto& cell : per_cell) results.push_back(merge_rounds(cell));
  progress.clear();
  if (out == Output::Json)
    std::printf("%s\n", stream_json(results, opt).c_str());
  else
    print_stream_table(results, mechs, opt);
  if (failed_any(results)) {
    (void)std::fprintf(stderr, "mbmq bench --stream: a cell failed (see its row)\n");
    return 1;
  }
  return 0;
}

// `mbmq bench --fanout N,...`: per size and subscriber count, the fan-out mechanisms
// (mech_fanout.cc); then strace counts the publisher's system calls where os/ cannot, at the
// first size.
int run_fanout(const FanoutOptions& fo, const std::string& only, Output out) {
  std::vector<FanoutMechanism> mechs = fanout_mechanisms();
  if (!select_mechanisms(mechs, only)) return 2;
  Options progress_opt;  // about a second per cell
  Progress progress(mechs.size() * fo.sizes.size() * fo.subscribers.size(), progress_opt);
  std::vector<FanoutResult> results;
  for (std::size_t size : fo.sizes)
    for (std::size_t n : fo.subscribers)
      for (auto& m : mechs) {
        progress.step(m.name + " x" + std::to_string(n) + " " + human_size(size));
        results.push_back(run_fanout_cell(m, n, size, fo));
      }
  if (fo.strace) {
    for (auto& r : results) {
      auto m = std::find_if(mechs.begin(), mechs.end(),
                            [&](const FanoutMechanism& x) { return x.name == r.mechanism; });
      if (r.size != fo.sizes.front() || !r.error.empty() || m->os_counted) continue;
      progress.step("strace " + r.mechanism + " x" + std::to_string(r.subscribers));
      r.publisher_syscalls_per_msg = strace_publisher(*m, r.subscribers, r.size, fo);
      if (r.publisher_syscalls_per_msg) r.syscalls_method = "strace";
    }
  }
  progress.clear();
  if (out == Output::Json)
    std::printf("%s\n", fanout_json(results, fo).c_str());
  else
    print_fanout_table(results, mechs, fo);
  if (failed_any(results)) {
    (void)std::fprintf(stderr, "mbmq bench --fanout: a cell failed (see its row)\n");
    return 1;
  }
  return 0;
}

// `mbmq bench --channels N,...`: per N, the channel mechanisms (mech_channels.cc) at each size.
int run_channels(const std::vector<std::size_t>& counts, const std::string& only,
                 const Options& opt, Output out) {
  const std::uint64_t limit = os::raise_fd_limit();
  std::vector<Mechanism> names = channel_mechanisms(1);
  if (!select_mechanisms(names, only)) return 2;
  std::vector<std::size_t> per_channel;  // fds per channel, both ends, per mechanism
  for (const auto& m : names) per_channel.push_back(fds_per_channel(m.name));
  Progress progress(counts.size() * names.size() * opt.sizes.size(), opt);
  std::vector<CellResult> results;
  for (std::size_t n : counts) {
    std::vector<Mechanism> mechs = channel_mechanisms(n);
    (void)select_mechanisms(mechs, only);
    for (std::size_t size : opt.sizes) {
      for (std::size_t k = 0; k < mechs.size(); ++k) {
        progress.step(mechs[k].name + " x" + std::to_string(n));
        // Before the fork this process holds both ends of every channel; a few more for the
        // ready pipe, the stats pipe, epoll and the watcher.
        const std::uint64_t need = n * per_channel[k] + os::open_fd_count() + 16;
        CellResult r;
        if (need > limit) {
          r.mechanism = mechs[k].name;
          r.size = size;
          r.error = "cannot reach " + std::to_string(n) + " channels: they need about " +
                    std::to_string(need) + " fds, RLIMIT_NOFILE allows " + std::to_string(limit) +
                    " (soft raised to the hard limit)";
        } else {
          r = run_cell(mechs[k], size, opt);
          if (!r.error.empty())
            r.error = std::to_string(n) + " channels (fd limit " + std::to_string(limit) +
                      "): " + r.error;
        }
        r.channels = n;
        results.push_back(std::move(r));
      }
    }
  }
  progress.clear();
  if (out == Output::Json)
    std::printf("%s\n", to_json(results, {}, opt).dump(2).c_str());
  else if (out == Output::Markdown)
    std::printf("%s", markdown(results).c_str());
  else
    print_channels_table(results, opt, limit);
  if (failed_any(results)) {
    std::fprintf(stderr, "mbmq bench --channels: a cell failed (see its row)\n");
    return 1;
  }
  return 0;
}

// `mbmq bench --async N`: per size, the three async mechanisms (mech_async.cc); one iteration of
// these cells is a batch of N calls in flight at once. The checks: async-1ch's median batch
// against blocking-Nch's and async-Nch's (issue #13: <= 1.5x).
int run_async(std::size_t n, const std::string& only, const Options& opt, Output out) {
#if MBMQ_HAVE_ASIO
  std::vector<Mechanism> mechs = async_mechanisms(n);
  if (!select_mechanisms(mechs, only)) return 2;
  Progress progress(mechs.size() * opt.sizes.size(), opt);
  std::vector<CellResult> results;
  for (std::size_t size : opt.sizes) {
    for (auto& m : mechs) {
      progress.step(m.name);
      CellResult r = run_cell(m, size, opt);
      r.in_flight = n;
      r.channels = m.name == "async-1ch" ? 1 : n;
      results.push_back(std::move(r));
    }
  }
  progress.clear();
  const std::string nch = std::to_string(n) + "ch";
  auto p50 = [&](const std::string& mech, std::size_t size) -> double {
    for (const auto& r : results)
      if (r.mechanism == mech && r.size == size && r.error.empty() && !r.lat.empty())
        return r.pct(0.5);
    return 0;
  };
  std::vector<Check> checks;
  for (std::size_t size : opt.sizes) {
    const double one = p50("async-1ch", size);
    for (const std::string& base : {"blocking-" + nch, "async-" + nch}) {
      const double b = p50(base, size);
      if (one > 0 && b > 0)
        checks.push_back({"async-1ch / " + base + " median batch of " + std::to_string(n) +
                              " calls, " + human_size(size),
                          one / b, 1.5, one / b <= 1.5});
    }
  }
  if (out == Output::Json) {
    std::printf("%s\n", to_json(results, checks, opt).dump(2).c_str());
  } else {
    std::printf(
        "mbmq bench --async %zu: %d CPUs, %s, %.2f s per cell.\nA batch: %zu calls in flight at "
        "once; it ends when the last reply is verified. The server, another process, answers\n"
        "each request in turn with the 8-byte sum of its payload.\n  async-1ch     %zu "
        "async_calls on one channel (mbmq/asio.h)\n  async-%-7s %zu channels, one async_call "
        "each, one AsyncQueue\n  blocking-%-4s %zu channels, one blocking call() each, from %zu "
        "threads\n\n",
        n, cpus(), opt.pin && cpus() >= 2 ? "client on CPU 0, server on CPU 1" : "not pinned",
        opt.seconds_per_cell, n, n, nch.c_str(), n, nch.c_str(), n, n);
    std::printf("%-16s %8s %8s %12s %12s %12s %10s %12s\n", "mechanism", "size", "batches",
                "p50 us", "p99 us", "per call us", "batches/s", "cpu us/batch");
    for (const auto& r : results) {
      if (!r.error.empty()) {
        std::printf("%-16s %8s  %s\n", r.mechanism.c_str(), human_size(r.size).c_str(),
                    r.error.c_str());
        continue;
      }
      std::printf("%-16s %8s %8zu %12.1f %12.1f %12.2f %10.0f %12.1f\n", r.mechanism.c_str(),
                  human_size(r.size).c_str(), r.lat.size(), r.pct(0.5) / 1e3, r.pct(0.99) / 1e3,
                  r.pct(0.5) / 1e3 / static_cast<double>(n), r.rtt_per_s(), r.cpu_ns_per_rtt / 1e3);
    }
    std::printf("\n");
    for (const auto& c : checks)
      std::printf("%-60s %6.2fx  (limit %.1fx)  %s\n", c.what.c_str(), c.measured, c.limit,
                  c.pass ? "ok" : "OVER");
  }
  if (failed_any(results)) {
    std::fprintf(stderr, "mbmq bench --async: a cell failed (see its row)\n");
    return 1;
  }
  return 0;
#else
  (void)n, (void)only, (void)opt, (void)out;
  std::fprintf(stderr, "--async: this mbmq was built without asio (Debian: libasio-dev)\n");
  return 2;
#endif
}

int run_bench(const std::vector<std::string>& argv_rest, bool copies_mode,
              const std::string& self) {
  CLI::App app{copies_mode
                   ? "mbmq copies: how many copies does a request cost, per mechanism"
                   : "mbmq bench: two-process request/response, mbmq beside the IPC you use"};
  bool json = false, markdown_out = false, quick = false, no_pin = false, no_touch = false,
       no_strace = false, corrupt = false, skip_seq = false, roudi_running = false, stream = false;
  std::string sizes_arg = copies_mode ? "64K,1M,16M" : "64,4K,64K,1M,16M,64M";
  std::string only, plot, channels_arg, fanout_arg;
  std::size_t messages = 0;
  double seconds = copies_mode ? 0.3 : 1.0;
  std::uint64_t fixed = 0;
  std::size_t async_n = 0;
  app.add_flag("--json", json, "print one JSON document instead of the table");
  app.add_flag("--markdown", markdown_out, "print a Markdown table instead");
  app.add_flag("--quick", quick, "a run under 30 s: sizes 64,64K,1M and 0.2 s per cell");
  app.add_option("--sizes", sizes_arg, "payload sizes, comma-separated, 8 B .. 64 MiB (K, M)");
  app.add_option("--seconds", seconds, "seconds per mechanism and size")
      ->check(CLI::Range(0.05, 60.0));
  app.add_option("--mechanisms", only, "comma-separated subset of mechanisms");
  app.add_option("--plot", plot, "write a log-log latency-vs-size plot to this SVG file");
  if (!copies_mode)
    app.add_option(
        "--channels", channels_arg,
        "instead: a server holding N channels, N-1 idle, one active (e.g. "
        "1,64,1024,4096): mbmq-spin/-adaptive/-sleep/-fd beside a Unix socket + epoll, 64 B");
  if (!copies_mode)
    app.add_option("--async", async_n,
                   "instead: N calls in flight at once (1..64): async_calls on one channel "
                   "(mbmq/asio.h) beside N channels with one call each, async and blocking; 64 B")
        ->check(CLI::Range(1, 64));
  if (!copies_mode)
    app.add_flag("--stream", stream,
                 "instead: one-way messages from a producer to a consumer process, every message "
                 "verified; msgs/s per mechanism (sizes 8,64,1K,64K; --quick: 64,64K, 0.3 s)");
  if (!copies_mode)
    app.add_option("--fanout", fanout_arg,
                   "instead: one publisher, N subscriber processes (e.g. 1,2,4,8): latency from "
                   "publish to the last receive, publisher system calls and CPU per message "
                   "(sizes 64,1M)");
  if (!copies_mode)
    app.add_option("--messages", messages,
                   "--fanout: measured messages per cell (default 2000, 1000 from 1 MiB)")
        ->check(CLI::Range(1, 1000000));
  int rounds = 1;
  if (!copies_mode)
    app.add_option("--rounds", rounds,
                   "--stream: interleaved rounds of every cell; ratios are the median of the "
                   "per-round ratios (default 1)")
        ->check(CLI::Range(1, 100));
  app.add_flag("--no-pin", no_pin, "do not pin client and server to CPUs 0 and 1");
  app.add_flag("--no-touch", no_touch, "write and read 8 bytes of the payload, not all of it");
  app.add_flag("--no-strace", no_strace, "skip counting system calls with strace");
  app.add_option("--fixed-rtts", fixed, "exactly this many measured round trips (for strace)")
      ->group("");
  app.add_flag("--inject-corruption", corrupt, "test: the server flips a payload byte")->group("");
  app.add_flag("--inject-skip", skip_seq, "test (--stream): the producer skips a sequence number")
      ->group("");
  app.add_flag("--roudi-running", roudi_running, "use the RouDi our parent run started")->group("");
  std::vector<const char*> args = {copies_mode ? "mbmq copies" : "mbmq bench"};
  for (const auto& a : argv_rest) args.push_back(a.c_str());
  try {
    app.parse(static_cast<int>(args.size()), const_cast<char**>(args.data()));
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return 2;
  }
  Options opt;
  std::vector<std::size_t> channel_counts;
  FanoutOptions fanout;
  try {
    if (!fanout_arg.empty()) {
      fanout.subscribers = parse_counts(fanout_arg, "--fanout", 64);
      if (!app.count("--sizes")) sizes_arg = "64,1M";
    }
    if (!channels_arg.empty()) {
      channel_counts = parse_counts(channels_arg, "--channels", 65536);
      if (!app.count("--sizes")) sizes_arg = "64";
    }
    if (async_n != 0 && !app.count("--sizes")) sizes_arg = "64";
    const bool sizes_given = app.count("--sizes") > 0;
    if (stream && !sizes_given) sizes_arg = quick ? "64,64K" : "8,64,1K,64K";
    opt.sizes = parse_sizes(quick && !stream && fanout.subscribers.empty() && !sizes_given
                                ? std::string("64,64K,1M")
                                : sizes_arg);
  } catch (const CLI::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  if (json && markdown_out) {
    std::fprintf(stderr, "--json and --markdown: choose one\n");
    return 2;
  }
  opt.seconds_per_cell = quick ? (stream ? 0.3 : 0.2) : seconds;
  opt.pin = !no_pin;
  opt.rounds = rounds;
  if (app.count("--rounds") > 0 && !stream) {
    (void)std::fprintf(stderr, "--rounds: only with --stream\n");
    return 2;
  }
  opt.fixed_rtts = fixed;
  g_work.touch = !no_touch;
  g_work.corrupt = corrupt;
  g_work.skip_seq = skip_seq;
  if (roudi_running) use_running_roudi();
  if (!fanout.subscribers.empty()) {
    if (stream || async_n != 0 || !channel_counts.empty() || !plot.empty() || fixed != 0 ||
        no_touch || markdown_out || app.count("--seconds") || skip_seq) {
      (void)std::fprintf(stderr,
                         "--fanout: --stream, --async, --channels, --plot, --fixed-rtts, "
                         "--no-touch, --markdown, --seconds and --inject-skip do not apply\n");
      return 2;
    }
    if (std::any_of(opt.sizes.begin(), opt.sizes.end(), [](std::size_t s) { return s < 16; })) {
      (void)std::fprintf(stderr, "--fanout: each size must be at least 16 B\n");
      return 2;
    }
    fanout.sizes = opt.sizes;
    fanout.messages = quick && messages == 0 ? 200 : messages;
    fanout.pin = opt.pin;
    fanout.strace = !no_strace;
    return run_fanout(fanout, only, json ? Output::Json : Output::Table);
  }
  if (messages != 0) {
    (void)std::fprintf(stderr, "--messages: only with --fanout\n");
    return 2;
  }
  if (stream) {
    if (async_n != 0 || !channel_counts.empty() || !plot.empty() || fixed != 0 || no_touch ||
        markdown_out) {
      (void)std::fprintf(stderr,
                         "--stream: --async, --channels, --plot, --fixed-rtts, --no-touch and "
                         "--markdown do not apply\n");
      return 2;
    }
    return run_stream(only, opt, json ? Output::Json : Output::Table);
  }
  if (async_n != 0) {
    if (!plot.empty() || fixed != 0 || !channel_counts.empty()) {
      std::fprintf(stderr, "--async: --plot, --fixed-rtts and --channels do not apply\n");
      return 2;
    }
    if (quick && !app.count("--sizes")) opt.sizes = {64};
    return run_async(async_n, only, opt, json ? Output::Json : Output::Table);
  }
  if (!channel_counts.empty()) {
    if (!plot.empty() || fixed != 0) {
      std::fprintf(stderr, "--channels: --plot and --fixed-rtts do not apply\n");
      return 2;
    }
    if (quick && !app.count("--sizes")) opt.sizes = {64};
    return run_channels(channel_counts, only, opt,
                        json           ? Output::Json
                        : markdown_out ? Output::Markdown
                                       : Output::Table);
  }

  std::vector<Mechanism> mechs = all_mechanisms();
  if (!select_mechanisms(mechs, only)) return 2;

  Progress progress(mechs.size() * opt.sizes.size(), opt, fixed == 0);
  std::vector<CellResult> results;
  for (std::size_t size : opt.sizes) {
    for (auto& m : mechs) {
      progress.step(m.name + " " + human_size(size));
      results.push_back(run_cell(m, size, opt));
    }
  }
  if (!no_strace && !copies_mode && fixed == 0)
    add_strace(results, self, g_work.touch, opt.sizes.front(), progress.on);
  progress.clear();
  if (fixed == 0) derive_copies(results);
  std::vector<Check> checks = copies_mode ? std::vector<Check>{} : evaluate(results, opt.sizes);
  if (!plot.empty()) {
    std::ofstream f(plot);
    f << svg_plot(results);
    if (!f) std::fprintf(stderr, "--plot: cannot write %s\n", plot.c_str());
  }
  if (json) {
    std::printf("%s\n", to_json(results, checks, opt).dump(2).c_str());
  } else if (markdown_out) {
    std::printf("%s", markdown(results).c_str());
  } else if (copies_mode) {
    print_copies(results, mechs, opt.sizes);
  } else {
    print_table(results, checks, opt);
  }
  return failed_any(results) ? 1 : 0;
}

int usage() {
  std::fprintf(
      stderr,
      "usage: mbmq bench [options]    side-by-side IPC benchmark (mbmq bench --help)\n"
      "       mbmq copies [options]   copies per request, by design and measured\n"
      "       mbmq files [options]    serving a file: read+write, mmap, sendfile, splice, nginx\n"
      "       mbmq ls [--json]        the mbmq listeners this user may see: name, pid, user, live\n"
      "       mbmq stat NAME [--json] [--watch [--interval-ms N] [--iterations N]]\n"
      "                               a listener's counters and its channels'\n"
      "       mbmq top [--once | --iterations N] [--interval-ms N]\n"
      "                               listeners and channels sorted by message rate\n"
      "       mbmq demo NAME [CLIENTS [SECONDS [LINGER]]] [--idle N]\n"
      "                               an echo listener with looping clients (and N idle ones)\n");
  return 2;
}

}  // namespace
}  // namespace mbmq::tool

// Under ASan (the asan preset): libzmq frees with free() some memory it allocated with
// `new (std::nothrow)`, which ASan reports as a mismatch. That is libzmq's, not ours: allow it.
extern "C" const char* __asan_default_options() { return "alloc_dealloc_mismatch=0"; }

int main(int argc, char** argv) {
  using namespace mbmq::tool;
  std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  std::string prog = std::filesystem::path(argv[0]).filename().string();
  std::vector<std::string> rest(argv + 1, argv + argc);
  if (!rest.empty() && rest.front() == "__iceoryx-server")
    return iceoryx_server_main({rest.begin() + 1, rest.end()});
  if (!rest.empty() && rest.front() == "__iceoryx-stream")
    return iceoryx_stream_main({rest.begin() + 1, rest.end()});
  if (!rest.empty() && rest.front() == "__iceoryx-fanout")
    return iceoryx_fanout_main({rest.begin() + 1, rest.end()});
  if (prog == "mbmq-bench") return run_bench(rest, false, self);  // the old name: an alias
  if (rest.empty()) return usage();
  std::string cmd = rest.front();
  rest.erase(rest.begin());
  if (cmd == "bench") return run_bench(rest, false, self);
  if (cmd == "copies") return run_bench(rest, true, self);
  if (cmd == "files") return run_files(rest);
  if (cmd == "ls") return run_ls(rest);
  if (cmd == "stat") return run_stat(rest);
  if (cmd == "top") return run_top(rest);
  if (cmd == "demo") return run_demo(rest);
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    usage();
    return 0;
  }
  std::fprintf(stderr, "mbmq: unknown command '%s'\n", cmd.c_str());
  return usage();
}
