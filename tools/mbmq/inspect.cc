// `mbmq ls`, `mbmq stat`, `mbmq top` (#18): live introspection over the stat query of
// include/mbmq/introspect.h, and `mbmq demo`, an echo listener with looping clients to look at.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "mbmq/mbmq.h"
#include "os/fd.h"
#include "os/file.h"
#include "os/process.h"

namespace mbmq::tool {

namespace {

using namespace std::chrono_literals;

// uid -> user name, from /etc/passwd (read once).
std::string user_name(unsigned uid) {
  static std::map<unsigned, std::string> names = [] {
    std::map<unsigned, std::string> m;
    auto f = os::open_read("/etc/passwd");
    if (!f) return m;
    std::string text;
    std::vector<std::byte> chunk(16384);
    for (;;) {
      auto n = os::read_some(f->get(), chunk);
      if (!n || *n == 0) break;
      text.append(reinterpret_cast<const char*>(chunk.data()), *n);
    }
    std::size_t at = 0;
    while (at < text.size()) {
      std::size_t end = text.find('\n', at);
      if (end == std::string::npos) end = text.size();
      const std::string line = text.substr(at, end - at);
      at = end + 1;
      const std::size_t c1 = line.find(':');
      const std::size_t c2 = c1 == std::string::npos ? c1 : line.find(':', c1 + 1);
      const std::size_t c3 = c2 == std::string::npos ? c2 : line.find(':', c2 + 1);
      if (c3 == std::string::npos) continue;
      try {
        m[static_cast<unsigned>(std::stoul(line.substr(c2 + 1, c3 - c2 - 1)))] = line.substr(0, c1);
      } catch (...) {
      }
    }
    return m;
  }();
  auto it = names.find(uid);
  return it != names.end() ? it->second : std::to_string(uid);
}

// A hostile listener's strings may be any bytes: JSON output replaces what is not UTF-8.
constexpr auto kJsonReplace = nlohmann::json::error_handler_t::replace;

// Text output: a listener's strings (and names from /proc/net/unix) may carry terminal escapes;
// control bytes (C0, DEL, and C1 as UTF-8 \xc2\x80-\x9f) are shown as '?'.
void scrub(char* p, std::size_t n) {
  for (std::size_t i = 0; i < n && p[i] != 0; ++i) {
    const auto b = static_cast<unsigned char>(p[i]);
    const auto next = i + 1 < n ? static_cast<unsigned char>(p[i + 1]) : 0u;
    if (b < 0x20 || b == 0x7f) {
      p[i] = '?';
    } else if (b == 0xc2 && next >= 0x80 && next <= 0x9f) {
      p[i] = p[i + 1] = '?';
      ++i;
    }
  }
}
template <std::size_t N>
void scrub(char (&s)[N]) {
  scrub(s, N);
}
void scrub(StatSnapshot* s) {
  scrub(s->listener.name);
  scrub(s->listener.policy);
  scrub(s->listener.last_why);
  for (ChannelStat& c : s->channels) scrub(c.why);
}
std::string shown(std::string s) {
  scrub(s.data(), s.size());
  return s;
}

const char* wait_name(std::uint8_t m) {
  switch (static_cast<WaitMode>(m)) {
    case WaitMode::Spin:
      return "spin";
    case WaitMode::Sleep:
      return "sleep";
    default:
      return "adaptive";
  }
}
const char* state_name(std::uint8_t s) {
  switch (static_cast<ChannelState>(s)) {
    case ChannelState::Open:
      return "open";
    case ChannelState::PeerClosed:
      return "peer-closed";
    case ChannelState::Protocol:
      return "protocol";
    default:
      return "closed";
  }
}
std::uint64_t messages(const ChannelStat& c) {
  return c.requests_in + c.requests_out + c.replies_in + c.replies_out + c.oneway_in + c.oneway_out;
}
std::uint64_t messages(const ListenerStat& l) {
  return l.requests_in + l.requests_out + l.replies_in + l.replies_out + l.oneway_in + l.oneway_out;
}

nlohmann::json to_json(const StatSnapshot& s) {
  const ListenerStat& l = s.listener;
  nlohmann::json j = {
      {"name", l.name},
      {"pid", l.pid},
      {"uid", l.uid},
      {"user", user_name(l.uid)},
      {"policy", l.policy},
      {"uptime_ns", l.uptime_ns},
      {"max_connections", l.max_connections},
      {"accepted", l.accepted},
      {"refused_policy", l.refused_policy},
      {"refused_version", l.refused_version},
      {"refused_limit", l.refused_limit},
      {"refused_busy", l.refused_busy},
      {"failed", l.failed},
      {"live", l.live},
      {"fd_backoffs", l.fd_backoffs},
      {"queries", l.queries},
      {"queries_dropped", l.queries_dropped},
      {"last_refused_uid",
       l.last_refused_uid == ~0u ? nlohmann::json() : nlohmann::json(l.last_refused_uid)},
      {"last_refused_pid", l.last_refused_pid},
      {"requests_in", l.requests_in},
      {"requests_out", l.requests_out},
      {"replies_in", l.replies_in},
      {"replies_out", l.replies_out},
      {"oneway_in", l.oneway_in},
      {"oneway_out", l.oneway_out},
      {"no_reply_in", l.no_reply_in},
      {"no_reply_out", l.no_reply_out},
      {"bytes_in", l.bytes_in},
      {"bytes_out", l.bytes_out},
      {"ended_peer_closed", l.peer_closed},
      {"ended_protocol", l.protocol},
      {"last_protocol_why", l.last_why}};
  nlohmann::json chans = nlohmann::json::array();
  for (const ChannelStat& c : s.channels)
    chans.push_back({{"id", c.id},
                     {"peer_pid", c.peer_pid},
                     {"peer_uid", c.peer_uid},
                     {"trust", c.trust != 0 ? "untrusted" : "cooperative"},
                     {"wait", wait_name(c.wait_mode)},
                     {"wait_spin_ns", c.wait_spin_ns},
                     {"state", state_name(c.state)},
                     {"why", c.why},
                     {"requests_in", c.requests_in},
                     {"requests_out", c.requests_out},
                     {"replies_in", c.replies_in},
                     {"replies_out", c.replies_out},
                     {"oneway_in", c.oneway_in},
                     {"oneway_out", c.oneway_out},
                     {"returns_in", c.returns_in},
                     {"returns_out", c.returns_out},
                     {"no_reply_in", c.no_reply_in},
                     {"no_reply_out", c.no_reply_out},
                     {"bytes_in", c.bytes_in},
                     {"bytes_out", c.bytes_out},
                     {"in_flight_here", c.requests_held},
                     {"in_flight_out", c.requests_out_now},
                     {"ring_in", c.ring_in},
                     {"ring_out", c.ring_out},
                     {"slots_in_use", c.slots_in_use},
                     {"extents_in_use", c.extents_in_use},
                     {"idle_ns", c.idle_ns}});
  j["channels"] = chans;
  return j;
}

void print_text(const StatSnapshot& s) {
  const ListenerStat& l = s.listener;
  std::printf("listener %s  pid %d  user %s  policy: %s  up %.1f s\n", l.name, l.pid,
              user_name(l.uid).c_str(), l.policy, static_cast<double>(l.uptime_ns) / 1e9);
  std::printf("  connections  accepted %" PRIu64 "  live %" PRIu64 " (max %u)  failed %" PRIu64
              "  refused: policy %" PRIu64 " version %" PRIu64 " limit %" PRIu64 " busy %" PRIu64,
              l.accepted, l.live, l.max_connections, l.failed, l.refused_policy, l.refused_version,
              l.refused_limit, l.refused_busy);
  if (l.last_refused_uid != ~0u)
    std::printf("  (last refused: uid %u %s, pid %d)", l.last_refused_uid,
                user_name(l.last_refused_uid).c_str(), l.last_refused_pid);
  std::printf("\n  messages     requests in %" PRIu64 " out %" PRIu64 "  replies in %" PRIu64
              " out %" PRIu64 "  one-way in %" PRIu64 " out %" PRIu64 "  NoReply in %" PRIu64
              " out %" PRIu64 "  bytes in %" PRIu64 " out %" PRIu64 "\n",
              l.requests_in, l.requests_out, l.replies_in, l.replies_out, l.oneway_in, l.oneway_out,
              l.no_reply_in, l.no_reply_out, l.bytes_in, l.bytes_out);
  std::printf("  ended        peer-closed %" PRIu64 "  protocol %" PRIu64 "%s%s%s  queries %" PRIu64
              " (dropped %" PRIu64 ")\n",
              l.peer_closed, l.protocol, l.last_why[0] != 0 ? " (last: " : "", l.last_why,
              l.last_why[0] != 0 ? ")" : "", l.queries, l.queries_dropped);
  if (s.channels.empty()) return;
  std::printf("  %5s %7s %-8s %-5s %-8s %-11s %9s %9s %9s %9s %11s %11s %4s %4s %4s %5s %3s %8s\n",
              "ID", "PEER", "USER", "TRUST", "WAIT", "STATE", "REQ-IN", "REP-OUT", "REQ-OUT",
              "REP-IN", "BYTES-IN", "BYTES-OUT", "FLY", "RQ", "TQ", "SLOTS", "EXT", "IDLE");
  for (const ChannelStat& c : s.channels) {
    char idle[32] = "-";
    if (c.idle_ns >= 0)
      std::snprintf(idle, sizeof idle, "%.1fs", static_cast<double>(c.idle_ns) / 1e9);
    std::printf("  %5" PRIu64 " %7d %-8s %-5s %-8s %-11s %9" PRIu64 " %9" PRIu64 " %9" PRIu64
                " %9" PRIu64 " %11" PRIu64 " %11" PRIu64 " %4u %4u %4u %5u %3u %8s%s%s\n",
                c.id, c.peer_pid, user_name(c.peer_uid).c_str(), c.trust != 0 ? "untr" : "coop",
                wait_name(c.wait_mode), state_name(c.state), c.requests_in, c.replies_out,
                c.requests_out, c.replies_in, c.bytes_in, c.bytes_out,
                c.requests_held + c.requests_out_now, c.ring_in, c.ring_out, c.slots_in_use,
                c.extents_in_use, idle, c.why[0] != 0 ? "  why: " : "", c.why);
  }
}

// Parses "--name value" style options; returns false on an unknown one.
struct Opts {
  std::vector<std::string> pos;
  bool json = false, watch = false;
  int iterations = 0;  // 0: until interrupted
  int idle = 0;        // demo: idle channels held by one more client process
  int interval_ms = 1000;
};
bool parse(const std::vector<std::string>& args, Opts* o) {
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto num = [&](int* v) {
      if (i + 1 >= args.size()) return false;
      try {
        *v = std::stoi(args[++i]);
      } catch (...) {
        return false;
      }
      return *v >= 0;
    };
    if (a == "--json")
      o->json = true;
    else if (a == "--watch")
      o->watch = true;
    else if (a == "--once")
      o->iterations = 1;
    else if (a == "--iterations") {
      if (!num(&o->iterations)) return false;
    } else if (a == "--interval-ms") {
      if (!num(&o->interval_ms)) return false;
    } else if (a == "--idle") {
      if (!num(&o->idle)) return false;
    } else if (!a.empty() && a[0] == '-')
      return false;
    else
      o->pos.push_back(a);
  }
  return true;
}

// Asks every listener in `names` at once (in rounds of 32 threads), each until `timeout`: a
// socket that listens and never answers (anyone may bind an mbmq: name) costs one timeout in all,
// not one per silent socket. Index i: names[i]'s snapshot, if it answered.
std::vector<std::optional<StatSnapshot>> query_all(const std::vector<std::string>& names,
                                                   StatChannels channels,
                                                   std::chrono::milliseconds timeout) {
  std::vector<std::optional<StatSnapshot>> out(names.size());
  constexpr std::size_t kRound = 32;
  for (std::size_t at = 0; at < names.size(); at += kRound) {
    std::vector<std::thread> threads;
    const std::size_t end = std::min(names.size(), at + kRound);
    for (std::size_t i = at; i < end; ++i) {
      auto ask = [&, i] {
        auto s = query_stats(names[i], channels, Deadline::after(timeout));
        if (s) out[i] = std::move(*s);
      };
      try {
        threads.emplace_back(ask);
      } catch (const std::system_error&) {
        ask();  // no thread to be had: in turn
      }
    }
    for (std::thread& t : threads) t.join();
  }
  return out;
}

}  // namespace

int run_ls(const std::vector<std::string>& args) {
  Opts o;
  if (!parse(args, &o) || !o.pos.empty()) {
    std::fprintf(stderr, "usage: mbmq ls [--json]\n");
    return 2;
  }
  auto names = listener_names();
  if (!names) {
    std::fprintf(stderr, "mbmq ls: %s\n", names.error().message().c_str());
    return 1;
  }
  nlohmann::json out = nlohmann::json::array();
  if (!o.json) std::printf("%-32s %8s %-10s %6s\n", "NAME", "PID", "USER", "LIVE");
  const auto snaps = query_all(*names, StatChannels::No, 200ms);
  for (std::size_t i = 0; i < names->size(); ++i) {
    const std::string& n = (*names)[i];
    // Only what the caller may see: a listener whose policy refuses us is left out.
    const auto& s = snaps[i];
    if (!s) continue;
    const ListenerStat& l = s->listener;
    if (o.json)
      out.push_back({{"name", n},
                     {"pid", l.pid},
                     {"uid", l.uid},
                     {"user", user_name(l.uid)},
                     {"live", l.live}});
    else
      std::printf("%-32s %8d %-10s %6" PRIu64 "\n", shown(n).c_str(), l.pid,
                  user_name(l.uid).c_str(), l.live);
  }
  // Names are any bytes but NUL (the kernel's and the listeners' word): not UTF-8, they are
  // replaced (U+FFFD), never thrown about (json::dump's default).
  if (o.json) std::printf("%s\n", out.dump(2, ' ', false, kJsonReplace).c_str());
  return 0;
}

int run_stat(const std::vector<std::string>& args) {
  Opts o;
  if (!parse(args, &o) || o.pos.size() != 1) {
    std::fprintf(stderr,
                 "usage: mbmq stat NAME [--json] [--watch [--interval-ms N] [--iterations N]]\n");
    return 2;
  }
  const int rounds = o.watch ? o.iterations : 1;
  for (int i = 0; rounds == 0 || i < rounds; ++i) {
    if (i > 0) std::this_thread::sleep_for(std::chrono::milliseconds(o.interval_ms));
    auto s = query_stats(o.pos[0], StatChannels::Yes, Deadline::after(2s));
    if (!s) {
      std::fprintf(stderr, "mbmq stat %s: %s\n", o.pos[0].c_str(), s.error().message().c_str());
      return 1;
    }
    if (o.watch && !o.json && os::is_terminal(1)) std::printf("\033[H\033[2J");
    if (o.json)
      std::printf("%s\n", to_json(*s).dump(o.watch ? -1 : 2, ' ', false, kJsonReplace).c_str());
    else {
      scrub(&*s);
      print_text(*s);
    }
    std::fflush(stdout);
  }
  return 0;
}

int run_top(const std::vector<std::string>& args) {
  Opts o;
  if (!parse(args, &o) || !o.pos.empty()) {
    std::fprintf(stderr, "usage: mbmq top [--once | --iterations N] [--interval-ms N]\n");
    return 2;
  }
  // Rates need two looks: each round compares with the previous one (the first with one taken
  // interval_ms before it).
  using Key = std::pair<std::string, std::uint64_t>;  // listener, channel id (0: the listener)
  std::map<Key, std::uint64_t> before;
  auto sample = [&](std::map<Key, std::uint64_t>* m, std::vector<StatSnapshot>* snaps) {
    m->clear();
    auto names = listener_names();
    if (!names) return;
    auto all = query_all(*names, StatChannels::Yes, 500ms);
    for (std::size_t i = 0; i < names->size(); ++i) {
      const std::string& n = (*names)[i];
      auto& s = all[i];
      if (!s) continue;
      std::uint64_t sum = messages(s->listener);  // includes the live channels
      (*m)[{n, 0}] = sum;
      for (const ChannelStat& c : s->channels) (*m)[{n, c.id}] = messages(c);
      if (snaps != nullptr) snaps->push_back(std::move(*s));
    }
  };
  sample(&before, nullptr);
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; o.iterations == 0 || i < o.iterations; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(o.interval_ms));
    std::map<Key, std::uint64_t> now;
    std::vector<StatSnapshot> snaps;
    sample(&now, &snaps);
    const auto t1 = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(t1 - t0).count();
    t0 = t1;
    auto rate = [&](const Key& k) {
      auto a = before.find(k);
      auto b = now.find(k);
      if (b == now.end()) return 0.0;
      const std::uint64_t was = a == before.end() ? 0 : a->second;
      return b->second >= was ? static_cast<double>(b->second - was) / dt : 0.0;
    };
    struct Row {
      double rate;
      std::string what;
    };
    std::vector<Row> procs, chans;
    for (const StatSnapshot& s : snaps) {
      const ListenerStat& l = s.listener;
      char line[256];
      std::snprintf(line, sizeof line, "%-24s %8d %-10s %6" PRIu64 " live", shown(l.name).c_str(),
                    l.pid, user_name(l.uid).c_str(), l.live);
      procs.push_back({rate({l.name, 0}), line});
      for (const ChannelStat& c : s.channels) {
        std::snprintf(line, sizeof line, "%-24s %5" PRIu64 " peer %7d %-10s %-11s",
                      shown(l.name).c_str(), c.id, c.peer_pid, user_name(c.peer_uid).c_str(),
                      state_name(c.state));
        chans.push_back({rate({l.name, c.id}), line});
      }
    }
    auto by_rate = [](const Row& a, const Row& b) { return a.rate > b.rate; };
    std::stable_sort(procs.begin(), procs.end(), by_rate);
    std::stable_sort(chans.begin(), chans.end(), by_rate);
    if (os::is_terminal(1)) std::printf("\033[H\033[2J");
    std::printf("%12s  %-24s %8s %-10s\n", "MSG/S", "LISTENER", "PID", "USER");
    for (const Row& r : procs) std::printf("%12.0f  %s\n", r.rate, r.what.c_str());
    std::printf("\n%12s  %-24s %5s %12s %-10s %-11s\n", "MSG/S", "LISTENER", "ID", "PEER PID",
                "USER", "STATE");
    for (const Row& r : chans) std::printf("%12.0f  %s\n", r.rate, r.what.c_str());
    std::fflush(stdout);
    before = std::move(now);
  }
  return 0;
}

// An echo listener NAME with `clients` forked clients calling in a loop for `seconds`; the server
// stays up `linger` seconds more (to be looked at with ls/stat/top).
int run_demo(const std::vector<std::string>& args) {
  Opts o;
  if (!parse(args, &o) || o.pos.empty() || o.pos.size() > 4) {
    std::fprintf(stderr, "usage: mbmq demo NAME [CLIENTS [SECONDS [LINGER]]] [--idle N]\n");
    return 2;
  }
  const std::string name = o.pos[0];
  const int clients = o.pos.size() > 1 ? std::stoi(o.pos[1]) : 3;
  const double seconds = o.pos.size() > 2 ? std::stod(o.pos[2]) : 5;
  const double linger = o.pos.size() > 3 ? std::stod(o.pos[3]) : 30;
  auto listener = Listener::create(name);
  if (!listener) {
    std::fprintf(stderr, "mbmq demo: %s\n", listener.error().message().c_str());
    return 1;
  }
  auto queue = MsgQueue::create();
  if (!queue || !listener->redirect(*queue, 0)) return 1;
  for (int i = 0; i < clients; ++i) {
    auto pid = os::fork_process();
    if (!pid) return 1;
    if (*pid == 0) {
      auto ch = connect(name, Deadline::after(5s));
      if (!ch) _exit(1);
      auto b = ch->buffer(64);
      if (!b) _exit(1);
      const auto end = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
      while (std::chrono::steady_clock::now() < end) {
        for (int k = 0; k < 100; ++k)
          if (!ch->call(*b, Deadline::after(5s))) _exit(1);
        std::this_thread::sleep_for(std::chrono::milliseconds(1 + i));
      }
      _exit(0);
    }
  }
  if (o.idle > 0) {  // one process holding `idle` quiet channels, for as long as the server
    auto pid = os::fork_process();
    if (!pid) return 1;
    if (*pid == 0) {
      os::die_with_parent();
      std::vector<Channel> quiet;
      for (int i = 0; i < o.idle; ++i) {
        auto ch = connect(name, Deadline::after(10s));
        if (!ch) _exit(1);
        quiet.push_back(std::move(*ch));
      }
      std::this_thread::sleep_for(std::chrono::duration<double>(seconds + linger));
      _exit(0);
    }
  }
  const auto end =
      std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds + linger);
  std::map<std::uint64_t, Channel> open;
  std::uint64_t next_key = 1;
  while (std::chrono::steady_clock::now() < end) {
    auto m = queue->wait(Deadline::after(100ms));
    if (!m) continue;
    if (m->kind == Kind::Connection) {
      if (!m->channel.redirect(*queue, next_key)) return 1;
      open.emplace(next_key++, std::move(m->channel));
    } else if (m->kind == Kind::Request) {
      (void)MsgQueue::reply(std::move(*m));
    } else if (m->kind == Kind::PeerClosed) {
      open.erase(m->key);  // its counters join the listener's totals
    }
  }
  return 0;
}

}  // namespace mbmq::tool
