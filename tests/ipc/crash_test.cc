// Crashes between unrelated processes (fork+exec of tests/helpers/test_peer.cc, each with a
// watchdog): SIGKILL of a server while 32 clients are mid-call, at random times, and SIGKILL of a
// client while its server holds its request. Before and after every trial this process's fd
// count, its count of mbmq mappings ("memfd:mbmq-" in /proc/self/maps: the allocator's and the
// sanitizers' own mappings come and go) and the /dev/shm listing are unchanged; every peer
// reports its own counts as well.
//
// MBMQ_CRASH_TRIALS sets the number of server-kill trials (default 50, 10 in the sanitizer builds;
// the `soak` label runs more). The detection latency (SIGKILL to PeerClosed in the caller) is
// printed as p50/p99/max.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "os/process.h"
#include "os/unix_socket.h"
#include "peer_util.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::secs;

using test::Lines;
using test::settled;
using test::Snapshot;
using test::snapshot;

pid_t start(Lines& out, std::vector<std::string> args) { return test::start_peer(out, args); }
int reap(pid_t pid) { return test::join(pid); }

int trials_from_env() {
  const char* v = std::getenv("MBMQ_CRASH_TRIALS");
  int n = v != nullptr ? std::atoi(v) : 0;
  // 10 under a sanitizer: every trial takes the same paths (a kill at a random moment), and 33
  // instrumented processes a trial cost 4x the time (20 s under ASan for 50).
  return n > 0 ? n : test::sized(50, 10);
}

double percentile(std::vector<std::int64_t> v, double p) {
  std::sort(v.begin(), v.end());
  std::size_t i = static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5);
  return static_cast<double>(v[i]) / 1e6;
}

TEST(Crash, KillingTheServerMidCallEndsEveryCallWithPeerClosedPromptly) {
  constexpr int kClients = 32;
  const int trials = trials_from_env();
  const std::string name = "crash-" + std::to_string(os::current_pid());
  std::mt19937 rng(12345);
  std::vector<std::int64_t> latencies;
  std::uint64_t in_process_calls = 0;
  // The watcher thread exists before the baseline (the pair stays open: closing it would have
  // the watcher free the other end while the baseline is taken), and so does the C library's
  // cached stack of a joined thread (it keeps one for reuse).
  auto warm_up = Channel::pair();
  std::thread([] {}).join();
  const Snapshot before = snapshot();
  for (int trial = 0; trial < trials; ++trial) {
    {
      Lines out;
      // The same name every trial: a restarted server listens on it at once.
      pid_t server = start(out, {"server", name});
      ASSERT_GT(server, 0);
      ASSERT_EQ(out.next(secs(10)), "ready") << "trial " << trial;
      std::vector<pid_t> clients;
      for (int c = 0; c < kClients; ++c) clients.push_back(start(out, {"client", name}));
      for (int c = 0; c < kClients; ++c) ASSERT_EQ(out.next(secs(20)), "connected") << trial;
      // This process calls too, so that its own cleanup is checked against the snapshot.
      std::int64_t my_t = 0;
      Errc my_code = Errc::System;
      std::atomic<bool> calling{false};
      std::thread me([&] {
        auto ch = connect(name, secs(5));
        auto buf = ch ? ch->buffer(64) : Result<Buffer>(fail(Errc::System, "connect"));
        for (;; calling.store(true)) {
          auto r = buf ? ch->call(*buf, secs(10)) : Status(fail(buf.error()));
          if (!r) {
            my_t = monotonic_ns();
            my_code = r.error().code;
            calling.store(true);
            return;
          }
          ++in_process_calls;
        }
      });
      struct Join {  // also after a failed ASSERT (else terminate): the server killed ends `me`
        std::thread& t;
        pid_t server;
        ~Join() {
          if (!t.joinable()) return;
          (void)os::kill_process(server, SIGKILL);
          t.join();
        }
      } join_me{me, server};
      while (!calling.load()) ::usleep(100);
      ::usleep(1000 + static_cast<unsigned>(rng() % 30000));  // kill at a random moment
      const std::int64_t t_kill = monotonic_ns();
      ASSERT_TRUE(os::kill_process(server, SIGKILL));
      for (int c = 0; c < kClients; ++c) {
        std::string line = out.next(secs(20));
        std::istringstream in(line);
        std::string word, code;
        long long t = 0, calls = 0, dfd = 0, dmap = 0;
        in >> word >> code >> t >> calls >> dfd >> dmap;
        ASSERT_EQ(word, "closed") << "trial " << trial << ": " << line;
        EXPECT_EQ(code, "peer-closed") << "trial " << trial << ": " << line;
        EXPECT_EQ(dfd, 0) << "a client leaked fds: " << line;
        EXPECT_EQ(dmap, 0) << "a client leaked mappings: " << line;
        latencies.push_back(t - t_kill);
      }
      me.join();
      EXPECT_EQ(my_code, Errc::PeerClosed);
      latencies.push_back(my_t - t_kill);
      EXPECT_EQ(reap(server), 128 + SIGKILL);
      for (pid_t c : clients) EXPECT_EQ(reap(c), 0);
    }
    EXPECT_EQ(settled(before), before)
        << "trial " << trial << ": fds, mappings or /dev/shm changed";
    if (HasFailure()) break;
  }
  const double p50 = percentile(latencies, 0.50), p99 = percentile(latencies, 0.99),
               mx = percentile(latencies, 1.0);
  // The design target (p99 <= 100 ms, DESIGN.md) is a figure, reported here and in
  // docs/RELIABILITY.md, not asserted: timing in a unit test would fail on a loaded machine or
  // under a sanitizer (ASan once measured p99 118 ms while release measures 40-55 ms). What is
  // asserted is that nobody hangs: a call still waiting seconds after the kill is a bug.
  std::printf(
      "server SIGKILL -> PeerClosed: %d trials, %zu calls: p50 %.2f ms, p99 %.2f ms, max %.2f "
      "ms (target p99 <= 100 ms: %s)\n",
      trials, latencies.size(), p50, p99, mx, p99 <= 100.0 ? "met" : "MISSED");
  EXPECT_LE(mx, 5000.0) << "a call waited seconds after its server was killed";
  EXPECT_GT(in_process_calls, 0u);
}

TEST(Crash, KillingAClientWhileTheServerHoldsItsRequestFailsTheReplyCleanly) {
  const std::string name = "hold-" + std::to_string(os::current_pid());
  std::mt19937 rng(777);
  const Snapshot before = snapshot();
  for (int trial = 0; trial < 10; ++trial) {
    {
      Lines out;
      pid_t server = start(out, {"server", name, "--hold"});
      ASSERT_EQ(out.next(secs(10)), "ready");
      pid_t client = start(out, {"client", name});
      ASSERT_EQ(out.next(secs(10)), "connected");
      ASSERT_EQ(out.next(secs(10)), "holding 1");
      ::usleep(static_cast<unsigned>(rng() % 5000));
      ASSERT_TRUE(os::kill_process(client, SIGKILL));
      // The server saw the caller die, replied into the void, and is back to where it started.
      EXPECT_EQ(out.next(secs(10)), "released peer-closed 0 0") << "trial " << trial;
      EXPECT_EQ(reap(client), 128 + SIGKILL);
      EXPECT_EQ(reap(server), 0);
    }
    EXPECT_EQ(settled(before), before);
    if (HasFailure()) break;
  }
}

}  // namespace
}  // namespace mbmq
