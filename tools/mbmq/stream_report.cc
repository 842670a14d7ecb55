// tools/mbmq/stream_report.cc: what `mbmq bench --stream` prints: the table (msgs/s per row and
// the ratios mbmq-stream / raw-spsc and mbmq-stream / uds at each size) and the JSON document.
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "stream.h"

namespace mbmq::tool {
namespace {

using nlohmann::json;

const StreamResult* find(const std::vector<StreamResult>& rs, const std::string& mech,
                         std::size_t size) {
  for (const auto& r : rs)
    if (r.mechanism == mech && r.size == size && r.error.empty()) return &r;
  return nullptr;
}

// a's msgs/s over b's at the same size, per round in order (each round's median windows, the two
// cells of one round side by side); empty if either row failed.
std::vector<double> round_ratios(const std::vector<StreamResult>& rs, const std::string& a,
                                 const std::string& b, std::size_t size) {
  const StreamResult* x = find(rs, a, size);
  const StreamResult* y = find(rs, b, size);
  std::vector<double> out;
  if (x == nullptr || y == nullptr) return out;
  const std::size_t n = std::min(x->round_msgs_per_s.size(), y->round_msgs_per_s.size());
  for (std::size_t i = 0; i < n; ++i)
    if (y->round_msgs_per_s[i] > 0) out.push_back(x->round_msgs_per_s[i] / y->round_msgs_per_s[i]);
  return out;
}

// The median of the per-round ratios (one round: a's median msgs/s over b's); none if either row
// failed.
std::optional<double> ratio(const std::vector<StreamResult>& rs, const std::string& a,
                            const std::string& b, std::size_t size) {
  std::vector<double> v = round_ratios(rs, a, b, size);
  if (v.empty()) return std::nullopt;
  std::sort(v.begin(), v.end());
  return v.size() % 2 == 1 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// "0.52x" or, over several rounds, "0.52x (0.31-0.88x, 7/9 >= 0.5x)" with `bar` > 0.
std::string ratio_text(const std::vector<StreamResult>& rs, const std::string& a,
                       const std::string& b, std::size_t size, double bar) {
  std::vector<double> v = round_ratios(rs, a, b, size);
  std::sort(v.begin(), v.end());
  const std::optional<double> m = ratio(rs, a, b, size);
  char s[96];
  if (!m) return "-";
  if (v.size() == 1) {
    (void)std::snprintf(s, sizeof s, "%.3fx", *m);
    return s;
  }
  const auto met = std::count_if(v.begin(), v.end(), [&](double x) { return x >= bar; });
  (void)std::snprintf(s, sizeof s, "%.3fx (%.2f-%.2fx, %td/%zu >= %gx)", *m, v.front(), v.back(),
                      met, v.size(), bar);
  return s;
}

std::string num(const std::optional<double>& v, const char* fmt = "%.2f") {
  if (!v) return "-";
  char s[32];
  (void)std::snprintf(s, sizeof s, fmt, *v);
  return s;
}

json opt_json(const std::optional<double>& v) { return v ? json(*v) : json(); }

std::vector<std::size_t> sizes_of(const std::vector<StreamResult>& rs) {
  std::vector<std::size_t> out;
  for (const auto& r : rs)
    if (std::find(out.begin(), out.end(), r.size) == out.end()) out.push_back(r.size);
  return out;
}

const char* kStream = "mbmq-stream";

}  // namespace

void print_stream_table(const std::vector<StreamResult>& rs,
                        const std::vector<StreamMechanism>& mechs, const Options& opt) {
  std::printf(
      "mbmq bench --stream: %d CPUs, %s, %.2f s per cell (a fifth warm-up, then %zu timed "
      "windows).\nOne-way messages: the producer writes every byte of each (its sequence number "
      "first); the consumer reads every byte\nand checks the order (no loss, duplication or "
      "reordering) and the contents. msgs/s: the median window, with min and max.\n\n",
      cpus(), opt.pin && cpus() >= 2 ? "producer on CPU 0, consumer on CPU 1" : "not pinned",
      opt.seconds_per_cell, kStreamWindows);
  std::printf("%-13s %8s %11s %11s %11s %9s %9s %8s %8s %7s %8s %8s\n", "mechanism", "size",
              "msgs/s", "min", "max", "MB/s", "x spsc", "x uds", "sys/msg", "allocs", "cpu ns",
              "retries");
  std::size_t last = 0;
  for (const auto& r : rs) {
    if (r.size != last && last != 0) std::printf("\n");
    last = r.size;
    if (!r.error.empty()) {
      std::printf("%-13s %8s  %s\n", r.mechanism.c_str(), human_size(r.size).c_str(),
                  r.error.c_str());
      continue;
    }
    std::printf("%-13s %8s %11.0f %11.0f %11.0f %9.1f %9s %8s %8s %7s %8.0f %8s\n",
                r.mechanism.c_str(), human_size(r.size).c_str(), r.median(), r.min(), r.max(),
                r.mb_per_s(), num(ratio(rs, r.mechanism, "raw-spsc", r.size), "%.2fx").c_str(),
                num(ratio(rs, r.mechanism, "uds", r.size), "%.2fx").c_str(),
                num(r.syscalls_per_msg, "%.3f").c_str(), num(r.allocs_per_msg).c_str(),
                r.cpu_ns_per_msg, num(r.retries_per_msg, "%.3f").c_str());
  }
  if (opt.rounds > 1)
    std::printf(
        "\nmbmq-stream / raw-spsc, / raw-spsc-64 and / uds: the median of %d interleaved "
        "rounds' ratios (each round's\ncells side by side), their range, and the rounds at or "
        "over #14's bars (0.5x raw-spsc, 10x uds):\n",
        opt.rounds);
  else
    std::printf("\nmbmq-stream / raw-spsc, / raw-spsc-64 and / uds (median msgs/s, this run):\n");
  for (std::size_t size : sizes_of(rs)) {
    std::printf("  %8s   / raw-spsc %s\n", human_size(size).c_str(),
                ratio_text(rs, kStream, "raw-spsc", size, 0.5).c_str());
    std::printf("  %8s   / raw-spsc-64 %s\n", "",
                ratio_text(rs, kStream, "raw-spsc-64", size, 0.5).c_str());
    std::printf("  %8s   / uds %s\n", "", ratio_text(rs, kStream, "uds", size, 10).c_str());
  }
  std::printf(
      "\nx spsc, x uds: the row's median msgs/s over raw-spsc's and uds's at the same size "
      "(over rounds: the median of\n  the per-round ratios); msgs/s, min, max: over every "
      "round's windows.\n"
      "sys/msg: system calls per message, both processes, counted by mbmq's os/ layer (-: a "
      "third-party library,\n  not counted). allocs: operator new calls per message on both "
      "sides' threads. cpu ns: CPU time per message,\n  both processes, all threads. retries: "
      "the mbmq rows' waits for room that ran out and refused sends per message, retried.\n");
  for (const auto& m : mechs)
    if (!m.note.empty()) std::printf("%s\n", m.note.c_str());
}

std::string stream_json(const std::vector<StreamResult>& rs, const Options& opt) {
  json results = json::array();
  for (const auto& r : rs) {
    const bool ok = r.error.empty();
    json j;
    j["mechanism"] = r.mechanism;
    j["size"] = r.size;
    j["msgs_per_s"] = ok ? json(r.median()) : json();
    j["msgs_per_s_min"] = ok ? json(r.min()) : json();
    j["msgs_per_s_max"] = ok ? json(r.max()) : json();
    j["window_msgs_per_s"] = r.window_msgs_per_s;
    j["round_msgs_per_s"] = r.round_msgs_per_s;
    j["mb_per_s"] = ok ? json(r.mb_per_s()) : json();
    j["syscalls_per_msg"] = opt_json(r.syscalls_per_msg);
    j["syscalls_method"] = r.syscalls_per_msg ? "os-layer counters" : "";
    if (r.syscalls_per_msg) {
      j["producer_syscalls_per_msg"] = r.producer_syscalls;
      j["consumer_syscalls_per_msg"] = r.consumer_syscalls;
    }
    j["allocs_per_msg"] = opt_json(r.allocs_per_msg);
    j["cpu_ns_per_msg"] = ok ? json(r.cpu_ns_per_msg) : json();
    j["retries_per_msg"] = opt_json(r.retries_per_msg);
    j["verified_msgs"] = r.verified;
    if (!ok) j["error"] = r.error;
    results.push_back(j);
  }
  json ratios = json::array();
  for (std::size_t size : sizes_of(rs))
    ratios.push_back(
        {{"size", size},
         {"mbmq_stream_over_raw_spsc", opt_json(ratio(rs, kStream, "raw-spsc", size))},
         {"mbmq_stream_over_raw_spsc_64", opt_json(ratio(rs, kStream, "raw-spsc-64", size))},
         {"mbmq_stream_over_uds", opt_json(ratio(rs, kStream, "uds", size))},
         {"per_round",
          {{"mbmq_stream_over_raw_spsc", round_ratios(rs, kStream, "raw-spsc", size)},
           {"mbmq_stream_over_raw_spsc_64", round_ratios(rs, kStream, "raw-spsc-64", size)},
           {"mbmq_stream_over_uds", round_ratios(rs, kStream, "uds", size)}}}});
  json doc = {{"mode", "stream"},
              {"results", results},
              {"ratios", ratios},
              {"machine", {{"cpus", cpus()}, {"pinned", opt.pin && cpus() >= 2}}},
              {"seconds_per_cell", opt.seconds_per_cell},
              {"rounds", opt.rounds},
              {"windows", kStreamWindows}};
  return doc.dump(2);
}

}  // namespace mbmq::tool
