// tools/mbmq/fanout_report.cc: what `mbmq bench --fanout` prints: the table (latency from publish
// to the last receive, the publisher's system calls and CPU per message, payload copies), issue
// #15's check, and the JSON document (a row per mechanism, subscriber count and size).
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>

#include "fanout.h"

namespace mbmq::tool {
namespace {

using nlohmann::json;

const char* kTopic = "mbmq-topic";  // the row issue #15 asks for (mbmq/topic.h)

const FanoutResult* find(const std::vector<FanoutResult>& rs, const std::string& mech,
                         std::size_t subs, std::size_t size) {
  for (const auto& r : rs)
    if (r.mechanism == mech && r.subscribers == subs && r.size == size && r.error.empty() &&
        !r.lat.empty())
      return &r;
  return nullptr;
}

double p50(const FanoutResult& r) { return percentile(r.lat, 0.5); }

// pass: none when it cannot be told (the row to compare with failed or did not run).
struct FanoutCheck {
  std::string what;
  std::optional<bool> pass;
};

// Issue #15: at the most subscribers, each mbmq-topic row's (mbmq-topic, mbmq-topic-sleep) p50
// below iceoryx's and zmq-pubsub's in the same run, 0 payload copies, at most 2 publisher system
// calls per message. Empty without such a row.
std::vector<FanoutCheck> checks(const std::vector<FanoutResult>& rs, const FanoutOptions& opt) {
  std::vector<FanoutCheck> out;
  if (opt.subscribers.empty()) return out;
  const std::size_t n = *std::max_element(opt.subscribers.begin(), opt.subscribers.end());
  for (std::size_t size : opt.sizes) {
    for (const auto& t : rs) {
      if (t.mechanism.rfind(kTopic, 0) != 0 || t.subscribers != n || t.size != size) continue;
      const std::string at = " at " + std::to_string(n) + " subscribers, " + human_size(size);
      if (find(rs, t.mechanism, n, size) == nullptr) {
        out.push_back({t.mechanism + at + ": the row failed", false});
        continue;
      }
      for (const char* other : {"iceoryx", "zmq-pubsub"}) {
        const FanoutResult* o = find(rs, other, n, size);
        out.push_back({t.mechanism + " p50 < " + other + " p50" + at,
                       o == nullptr ? std::nullopt : std::optional<bool>(p50(t) < p50(*o))});
      }
      out.push_back({t.mechanism + " payload copies 0" + at, t.copies == 0});
      out.push_back({t.mechanism + " publisher system calls <= 2 per message" + at,
                     t.publisher_syscalls_per_msg && *t.publisher_syscalls_per_msg <= 2.0});
    }
  }
  return out;
}

const char* verdict(const std::optional<bool>& pass) {
  return !pass ? "not known (no row to compare with)" : *pass ? "met" : "NOT MET";
}

std::string us(double ns) {
  char s[32];
  (void)std::snprintf(s, sizeof s, ns >= 100'000 ? "%.0f" : "%.1f", ns / 1e3);
  return s;
}

}  // namespace

void print_fanout_table(const std::vector<FanoutResult>& rs,
                        const std::vector<FanoutMechanism>& mechs, const FanoutOptions& opt) {
  const int n_cpus = cpus();
  std::printf(
      "mbmq bench --fanout: one publisher process, N subscriber processes, every message to every "
      "subscriber.\n");
  if (opt.pin && n_cpus >= 2)
    std::printf(
        "This machine has %d CPUs: the publisher runs on CPU 0, subscriber i on CPU (i+1) mod %d; "
        "beyond\nthe CPUs, subscribers share them and sleep until woken (the case measured).\n",
        n_cpus, n_cpus);
  else
    std::printf(
        "This machine has %d CPUs (not pinned): subscribers beyond them share them and sleep "
        "until woken.\n",
        n_cpus);
  std::printf(
      "Paced: a message starts when every subscriber has acknowledged the previous one and %.0f "
      "us have\npassed, so every subscriber is asleep when it comes. Latency: from the start of a "
      "publish (before the\npublisher writes the payload) to the LAST subscriber's receive.\n\n",
      static_cast<double>(opt.gap_ns) / 1e3);
  std::printf("%-20s %5s %8s %9s %9s %9s %8s %9s %9s %7s %6s\n", "mechanism", "subs", "size",
              "p50 us", "p99 us", "p99.9 us", "x futex", "pub sys", "pub cpu", "copies", "msgs");
  std::size_t last_subs = 0, last_size = 0;
  for (const auto& r : rs) {
    if ((r.subscribers != last_subs || r.size != last_size) && last_subs != 0) std::printf("\n");
    last_subs = r.subscribers;
    last_size = r.size;
    if (!r.error.empty()) {
      std::printf("%-20s %5zu %8s  %s\n", r.mechanism.c_str(), r.subscribers,
                  human_size(r.size).c_str(), r.error.c_str());
      continue;
    }
    const FanoutResult* floor = find(rs, "raw-futex", r.subscribers, r.size);
    char ratio[16] = "-", sys[24] = "-";
    if (floor != nullptr && p50(*floor) > 0)
      (void)std::snprintf(ratio, sizeof ratio, "%.2fx", p50(r) / p50(*floor));
    if (r.publisher_syscalls_per_msg)
      (void)std::snprintf(sys, sizeof sys, "%.2f%s", *r.publisher_syscalls_per_msg,
                          r.syscalls_method == "strace" ? "*" : "");
    std::printf("%-20s %5zu %8s %9s %9s %9s %8s %9s %9s %7zu %6zu\n", r.mechanism.c_str(),
                r.subscribers, human_size(r.size).c_str(), us(p50(r)).c_str(),
                us(percentile(r.lat, 0.99)).c_str(), us(percentile(r.lat, 0.999)).c_str(), ratio,
                sys, us(r.publisher_cpu_ns_per_msg).c_str(), r.copies, r.messages);
  }
  std::printf(
      "\nx futex: p50 over raw-futex's at the same count and size. pub sys: the publisher's system "
      "calls per message:\n  counted by mbmq's os/ layer around the publish calls, or (*) by "
      "strace -f -c on the publisher process, every\n  thread, 10 and 60 messages, the difference "
      "(its pacing sleeps left out); -: not counted. pub cpu: the publisher\n  process's CPU "
      "time per message in us, every thread, its pacing waits left out. copies: payload copies "
      "per\n  message by design (memcpy or kernel). Subscribers stamp the receive time as the "
      "receive returns, then check the\n  sequence number, the send time and up to 4 KiB every "
      "word (above it 64 sampled words and the last one).\n");
  for (const auto& m : mechs)
    if (!m.note.empty()) std::printf("%s\n", m.note.c_str());
  const auto cs = checks(rs, opt);
  std::printf("\nIssue #15 (at the most subscribers, each mbmq-topic row): ");
  if (cs.empty()) {
    std::printf("%s row pending (mbmq/topic.h is not on this branch)\n", kTopic);
  } else {
    std::printf("\n");
    for (const auto& c : cs) std::printf("  %-76s %s\n", c.what.c_str(), verdict(c.pass));
  }
}

std::string fanout_json(const std::vector<FanoutResult>& rs, const FanoutOptions& opt) {
  json results = json::array();
  for (const auto& r : rs) {
    const bool ok = r.error.empty() && !r.lat.empty();
    json j;
    j["mechanism"] = r.mechanism;
    j["subscribers"] = r.subscribers;
    j["size"] = r.size;
    j["p50_ns"] = ok ? json(percentile(r.lat, 0.5)) : json();
    j["p99_ns"] = ok ? json(percentile(r.lat, 0.99)) : json();
    j["p999_ns"] = ok ? json(percentile(r.lat, 0.999)) : json();
    j["publisher_syscalls_per_msg"] =
        r.publisher_syscalls_per_msg ? json(*r.publisher_syscalls_per_msg) : json();
    j["syscalls_method"] = r.syscalls_method;
    j["publisher_cpu_ns_per_msg"] = ok ? json(r.publisher_cpu_ns_per_msg) : json();
    j["messages"] = r.messages;
    j["payload_copies"] = r.copies;
    if (!r.error.empty()) j["error"] = r.error;
    results.push_back(j);
  }
  json cs = json::array();
  for (const auto& c : checks(rs, opt))
    cs.push_back({{"what", c.what}, {"pass", c.pass ? json(*c.pass) : json()}});
  json doc = {{"mode", "fanout"},
              {"results", results},
              {"checks", cs},
              {"machine", {{"cpus", cpus()}, {"pinned", opt.pin && cpus() >= 2}}},
              {"gap_ns", opt.gap_ns}};
  return doc.dump(2);
}

}  // namespace mbmq::tool
