// Hostile review (rev-b) of K5 (close()'s linger handed to the keeper) and D1 (the allocating
// thread for deferred payload vectors), 2428a08..1ae8aa9. Client and server in this one process
// (one helper test runs as a program of its own); every wait has a deadline, so a test fails
// rather than hangs.
//
// On the code reviewed (1ae8aa9, Release, 2 shared vCPUs, nice 19):
//   ASmallDeferredPayloadDoesNotWaitBehindOtherWorkersLargeAllocations failed, 3 of 3 runs: a
//     1 MiB payload's send -> received was 212-1175 ms while three other workers' 64 MiB payloads
//     were being allocated (alone 3-19 ms; the same load with the 64 MiB payloads not deferred,
//     the control: 3-19 ms). One allocating thread for the process (keeper.cc, allocate_run)
//     allocated every worker's deferred vectors in turn. Fixed: that thread takes payloads of
//     4 MiB or more only, one per worker in turn; smaller ones are allocated as before D1.
//   The others passed (Release, and under TSan: no report from mbmq's code). Exit...: under TSan
//     one helper of five exited 66 on a "thread leak" of UCX's async thread (the worker the
//     keeper keeps alive at exit), as for K4: the sanitizer suppressions do not cover it.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "net/net_util.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::filled;
using test::make_many;
using test::secs;
using test::url;

std::int64_t now_ns() { return mbmq::monotonic_ns(); }
double ms_since(std::int64_t t0) { return static_cast<double>(now_ns() - t0) / 1e6; }

// A Channel's ChannelCore (private), through the explicit instantiation rule, as in
// review_netsib_test.cc.

// Voluntary context switches of every thread of this process (the keeper's 1 ms ticks show here).
std::int64_t voluntary_switches() {
  std::int64_t sum = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream f(e.path() / "status");
    std::string line;
    while (std::getline(f, line))
      if (line.rfind("voluntary_ctxt_switches:", 0) == 0)
        sum += std::strtoll(line.c_str() + 24, nullptr, 10);
  }
  return sum;
}

using test::wait_for_exit;

// ---- K5 -----------------------------------------------------------------------------------------

// (K5) Not a test: a client that sends 8 MiB its server never fetches, close()s (the channel
// lingers on the keeper, which ticks every millisecond) and returns: the process exits (static
// destructors, UCX's library destructors) with the keeper inside linger_tick().
TEST(ReviewS6bHelper, DISABLED_ClientThatExitsWhileLingering) {
  const char* u = std::getenv("MBMQ_NET_URL");
  if (u == nullptr) GTEST_SKIP() << "a helper of ExitWithALingeringChannel";
  // No peer_timeout here either: ours, sent in the hello, would have the server's keeper
  // progress the server's worker (K1) and fetch the 8 MiB, and the channel might not linger.
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto ch = net::connect(u, secs(10), co);
  ASSERT_TRUE(ch) << ch.error().message();
  std::this_thread::sleep_for(300ms);  // the server stops progressing its worker meanwhile
  Status s = ch->send(filled(*ch, 8u << 20, 'x'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  ch->close();
  std::this_thread::sleep_for(50ms);  // the keeper ticks
  std::printf("helper: exiting with a lingering channel\n");
  std::fflush(stdout);
}

// (K5) A process that exits with a channel lingering exits cleanly (status 0, at once: the 10 s
// linger does not hold up exit), five times.
TEST(ReviewS6b, ExitWithALingeringChannelIsClean) {
  net::ListenOptions lo;
  // No keeper here (the helper's peer_timeout is 0 too): the helper's 8 MiB is never fetched.
  lo.peer_timeout = 0ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  const std::string env = "MBMQ_NET_URL=" + url(l->port());
  for (int i = 0; i < 5; ++i) {
    auto pid = test::spawn_helper("ReviewS6bHelper.DISABLED_ClientThatExitsWhileLingering", {env});
    ASSERT_TRUE(pid) << pid.error().message();
    auto ch = l->accept(secs(20));
    ASSERT_TRUE(ch) << ch.error().message();
    // HelloAck out (progress a little), then nothing progresses this worker.
    for (int k = 0; k < 50; ++k) (void)ch->receive(Deadline::after(2ms));
    const std::int64_t t0 = now_ns();
    const int st = wait_for_exit(*pid, 20s);
    std::printf("round %d: helper status 0x%x after %.1f ms\n", i, st, ms_since(t0));
    EXPECT_TRUE(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0)
        << "a process exiting with a lingering channel: status 0x" << std::hex << st
        << (st != -1 && WIFSIGNALED(st) ? " (killed by a signal)" : "");
  }
}

// (K6) Not a test: a process that exits while the keeper ticks every millisecond for a lingering
// channel (its 8 MiB never fetched: neither end has a peer_timeout, so no keeper tick progresses
// the server's worker, and the linger lasts its 10 s cap). An atexit handler of its own,
// registered before UCX is loaded, runs after mbmq::net's (handlers run in the reverse order of
// registration) and before UCX's library destructors: there the process must already be exiting
// for mbmq::net and the keeper must make no more passes over UCX; else it ends with status 3.
std::uint64_t g_passes_at_exit = 0;
void check_keeper_stopped_at_exit() {
  if (!net::detail::exiting()) {
    std::printf("helper: mbmq::net's exit handler had not run before this one\n");
    std::fflush(stdout);
    ::_exit(3);
  }
  g_passes_at_exit = net::detail::keeper_passes_for_test();
  std::this_thread::sleep_for(100ms);
  const std::uint64_t after = net::detail::keeper_passes_for_test() - g_passes_at_exit;
  std::printf("helper: %llu keeper passes in the 100 ms after mbmq::net's exit handler\n",
              static_cast<unsigned long long>(after));
  std::fflush(stdout);
  if (after != 0) ::_exit(3);
}

TEST(ReviewS6bHelper, DISABLED_KeeperStopsTouchingUcxAtExit) {
  if (std::getenv("MBMQ_NET_HELPER") == nullptr) GTEST_SKIP() << "a helper of AtExitTheKeeper...";
  ASSERT_FALSE(net::detail::ucx_usable()) << "UCX was loaded before the helper's handler";
  ASSERT_EQ(std::atexit(check_keeper_stopped_at_exit), 0);
  auto p = test::make_pair_without_keepers();
  ASSERT_TRUE(p);
  Status s = p->client.send(filled(p->client, 8u << 20, 'e'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  p->client.close();  // lingers: the keeper ticks every millisecond
  const std::uint64_t before = net::detail::keeper_passes_for_test();
  const Deadline give_up = secs(5);
  while (net::detail::keeper_passes_for_test() < before + 10 && !give_up.expired())
    std::this_thread::sleep_for(1ms);
  ASSERT_GE(net::detail::keeper_passes_for_test(), before + 10)
      << "the keeper did not tick for the lingering channel";
  // Kept to the end: with its server alive and never progressed, the client's channel lingers
  // (the keeper ticking every millisecond) until the process exits.
  static auto* const kept = new test::Pair(std::move(*p));
  (void)kept;
  std::printf("helper: exiting with the keeper ticking\n");
  std::fflush(stdout);
}

// (K6) Exit with the keeper busy: UCX 1.13's library destructors run at exit after every atexit
// handler; a keeper progressing a worker (a lingering channel, a close it finishes) meanwhile used
// what they free. A Release CI run crashed once at exit of a test that had just passed with such
// a worker (a general protection fault in glibc's free() on another thread,
// ReviewNetSib.ALingeringChannelEndsWhenItsPeerGoes, 2026-12-02; 0 in 1,500 runs here, so that
// cause is a reading, not shown). Three exits of the helper above.
TEST(ReviewS6b, AtExitTheKeeperStopsTouchingUcxBeforeItsDestructorsRun) {
  for (int i = 0; i < 3; ++i) {
    auto pid = test::spawn_helper("ReviewS6bHelper.DISABLED_KeeperStopsTouchingUcxAtExit",
                                  {"MBMQ_NET_HELPER=1"});
    ASSERT_TRUE(pid) << pid.error().message();
    const int st = wait_for_exit(*pid, 30s);
    EXPECT_TRUE(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0)
        << "round " << i << ": helper status 0x" << std::hex << st
        << (st != -1 && WIFSIGNALED(st) ? " (killed by a signal)"
            : st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 3
                ? " (the keeper was not stopped at exit)"
                : "");
  }
}

// (K5) A peer alive but never fetching (nothing progresses its worker), and no peer_timeout on
// the lingering end (no K2): the linger ends at kLingerMaxNs (10 s), and the keeper's 1 ms ticks
// stop with it.
TEST(ReviewS6b, LingerEndsAt10sWithNoPeerTimeoutAndTheTicksStop) {
  if (test::kSanitized) GTEST_SKIP() << "a 10 s wait, for a bound on time (Release runs it)";
  auto p = test::make_pair_without_keepers();
  ASSERT_TRUE(p);
  std::weak_ptr<net::detail::ChannelCore> core = test::core_of(p->client);
  Status s = p->client.send(filled(p->client, 8u << 20, 'q'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  const std::int64_t t0 = now_ns();
  p->client = net::Channel{};  // closed, and the handle lets go of its core
  ASSERT_FALSE(core.expired()) << "close() did not linger";
  std::this_thread::sleep_for(200ms);
  const std::int64_t c0 = voluntary_switches();
  std::this_thread::sleep_for(500ms);
  const std::int64_t during = voluntary_switches() - c0;
  while (!core.expired() && now_ns() - t0 < 13'000'000'000) os::sleep_ns(5'000'000);
  const double ms = ms_since(t0);
  std::printf(
      "linger ended %.0f ms after close(); context switches per 500 ms while lingering: "
      "%lld\n",
      ms, static_cast<long long>(during));
  EXPECT_TRUE(core.expired()) << "a lingering channel outlived kLingerMaxNs by 3 s";
  EXPECT_GT(ms, 9000.0) << "the linger was cut short of 10 s with the peer alive";
  std::this_thread::sleep_for(300ms);
  const std::int64_t a0 = voluntary_switches();
  std::this_thread::sleep_for(500ms);
  const std::int64_t after = voluntary_switches() - a0;
  std::printf("context switches per 500 ms after the linger: %lld\n",
              static_cast<long long>(after));
  EXPECT_LT(after, 100) << "the keeper still ticks every millisecond";
}

// (K5) Several large sends, a small one, then close(); the receiver busy for 300 ms (keepers on):
// every message arrives, in order, then PeerClosed.
TEST(ReviewS6b, SeveralLargeSendsBeforeCloseArriveInOrder) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  const std::size_t sizes[] = {4u << 20, 3u << 20, 6u << 20, 100, 2u << 20};
  char c = 'a';
  for (std::size_t n : sizes) {
    Status s = p->client.send(filled(p->client, n, c++), secs(10));
    ASSERT_TRUE(s) << s.error().message();
  }
  p->client.close();
  std::this_thread::sleep_for(300ms);
  c = 'a';
  for (std::size_t n : sizes) {
    auto r = p->server.receive(secs(5));
    ASSERT_TRUE(r) << r.error().message();
    ASSERT_EQ(r->kind, Kind::Message) << "message '" << c << "' lost (" << r->why << ")";
    EXPECT_EQ(r->buffer.size(), n);
    if (r->buffer.size() == n) {
      EXPECT_EQ(static_cast<char>(r->buffer.data()[0]), c);
      EXPECT_EQ(static_cast<char>(r->buffer.data()[n - 1]), c);
    }
    ++c;
  }
  auto end = p->server.receive(secs(5));
  ASSERT_TRUE(end) << end.error().message();
  EXPECT_EQ(end->kind, Kind::PeerClosed);
}

// (K5) A server channel on the listener's shared worker lingers (its client is busy); the
// listener is destroyed meanwhile and a sibling channel keeps calling. The sibling is served
// throughout; the client, once back, gets the message then PeerClosed.
// Caveat (read in the code, not measured): the client's own peer_timeout is 0, but the
// listener's (the default 10 s), sent in its HelloAck, has the keeper watch client 0's channel
// too, and progress its worker every tick (K1): client 0 is not idle, and may fetch the 8 MiB
// within server 0's close() (100 ms), and then server 0 does not linger at all (`lingered` is
// printed, not checked). Both peer_timeouts 0 would keep client 0 idle, but then no keeper would
// watch the server's channels (kept as it is: every check here passes either way).
TEST(ReviewS6b, LingeringServerChannelOutlivesItsListenerBesideABusySibling) {
  net::ListenOptions lo;  // keepers on the listener's side (and so on the clients' too)
  net::ConnectOptions co;
  co.peer_timeout = 0ms;  // no K2 of the clients' own; the listener's 10 s still has K1 (above)
  auto m = make_many(2, lo, co);
  ASSERT_TRUE(m);
  std::weak_ptr<net::detail::ChannelCore> core = test::core_of(m->server[0]);
  Status s = m->server[0].send(filled(m->server[0], 8u << 20, 'L'), secs(10));
  ASSERT_TRUE(s) << s.error().message();
  m->server[0] = net::Channel{};  // closed, and the handle lets go of its core
  const bool lingered = !core.expired();
  { net::Listener gone = std::move(m->l); }  // the listener destroyed while the channel lingers
  // The sibling: client 1 calls, server 1 answers, for 400 ms.
  std::atomic<bool> stop{false};
  std::thread srv([&] {
    while (!stop.load()) {
      auto r = m->server[1].receive(Deadline::after(5ms));
      if (r && r->kind == Kind::Request) (void)net::Channel::reply(std::move(*r));
    }
  });
  int calls = 0;
  double worst = 0;
  const std::int64_t until = now_ns() + 400'000'000;
  while (now_ns() < until) {
    net::Buffer b = filled(m->client[1], 64, 'c');
    const std::int64_t t0 = now_ns();
    Status st = m->client[1].call(b, secs(2));
    worst = std::max(worst, ms_since(t0));
    ASSERT_TRUE(st) << st.error().message();
    ++calls;
  }
  const std::int64_t t0 = now_ns();
  auto r = m->client[0].receive(secs(5));
  stop.store(true);
  srv.join();
  std::printf("lingered: %d; sibling: %d calls, max %.1f ms; client 0's receive: %.1f ms\n",
              lingered, calls, worst, ms_since(t0));
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_EQ(r->kind, Kind::Message) << "the message sent before close() was lost: " << r->why;
  EXPECT_EQ(r->buffer.size(), 8u << 20);
  auto end = m->client[0].receive(secs(5));
  ASSERT_TRUE(end) << end.error().message();
  EXPECT_EQ(end->kind, Kind::PeerClosed);
  const std::int64_t f0 = now_ns();
  while (!core.expired() && now_ns() - f0 < 3'000'000'000) os::sleep_ns(2'000'000);
  EXPECT_TRUE(core.expired()) << "the lingering channel was not freed once its peer fetched";
}

// (K5) A call() whose large request is not fetched by its deadline (the server busy), then
// close(): the channel lingers with the call's send pending (its buffer handed to the send), and
// the request still reaches the server when it comes back; its reply finds no caller; then
// PeerClosed. (One thread per Channel: net.h.)
TEST(ReviewS6b, TimedOutCallsRequestStillArrivesAfterClose) {
  auto p = test::make_pair_without_keepers();  // the server busy: nothing progresses its worker
  ASSERT_TRUE(p);
  std::weak_ptr<net::detail::ChannelCore> core = test::core_of(p->client);
  net::Buffer b = filled(p->client, 8u << 20, 'R');
  Status got = p->client.call(b, Deadline::after(50ms));
  std::printf("call(50 ms): %s\n", got ? "ok" : got.error().message().c_str());
  EXPECT_FALSE(got);
  p->client = net::Channel{};  // closed, and the handle lets go of its core
  EXPECT_FALSE(core.expired()) << "close() did not linger for the call's unfetched request";
  std::this_thread::sleep_for(300ms);
  auto r = p->server.receive(secs(5));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->kind, Kind::Request) << "the call's request was lost: " << r->why;
  if (r->kind == Kind::Request) {
    EXPECT_EQ(r->buffer.size(), 8u << 20);
    EXPECT_EQ(static_cast<char>(r->buffer.data()[(8u << 20) - 1]), 'R');
    (void)r->buffer.resize(16);
    Status rs = net::Channel::reply(std::move(*r));
    std::printf("reply to a closed caller: %s\n", rs ? "sent" : rs.error().message().c_str());
    auto end = p->server.receive(secs(5));
    ASSERT_TRUE(end) << end.error().message();
    EXPECT_EQ(end->kind, Kind::PeerClosed);
  }
  const std::int64_t t0 = now_ns();
  while (!core.expired() && now_ns() - t0 < 3'000'000'000) os::sleep_ns(2'000'000);
  EXPECT_TRUE(core.expired()) << "the lingering channel was not freed once its peer fetched";
}

// ---- D1 -----------------------------------------------------------------------------------------

// (D1) Latency of a deferred payload (no spare fits: each received buffer is kept) for a receiver
// that waits before it comes, as the poller on the event fd (Sleep, one thread), against the same
// size with a spare (not deferred). A lost wake-up after the allocating thread started the receive
// costs a 20 ms wait_events() cap (or the deadline) each time.
TEST(ReviewS6b, PollerIsWokenForADeferredPayload) {
  auto p = test::make_pair_without_keepers();
  ASSERT_TRUE(p);
  const char* mode = std::getenv("S6B_SPIN");
  p->server.set_wait_policy(WaitPolicy{mode != nullptr ? WaitMode::Spin : WaitMode::Sleep, {}});
  std::vector<double> deferred_ms, spare_ms;
  std::vector<net::Buffer> kept;  // no spare for the next size
  for (int round = 0; round < 12; ++round) {
    const bool with_spare = (round % 2) == 1;  // the previous round's buffer given back first
    const std::size_t n = (std::size_t{2} << 20) + static_cast<std::size_t>(round / 2) * (3u << 20);
    if (with_spare) kept.pop_back();
    std::optional<Result<net::Message>> r;
    std::atomic<bool> ready{false};  // r set (r itself is not read before)
    std::int64_t t_got = 0;
    std::thread rx([&] {
      r.emplace(p->server.receive(secs(5)));
      ready.store(true);
      t_got = now_ns();
    });
    std::this_thread::sleep_for(30ms);  // the receiver is asleep on the event fd
    net::Buffer b = filled(p->client, n, 'd');
    const std::int64_t t0 = now_ns();
    Status s = p->client.send(std::move(b), secs(5));
    ASSERT_TRUE(s) << s.error().message();
    while (!ready.load() && now_ns() - t0 < 6'000'000'000)
      (void)p->client.receive(Deadline::after(1ms));  // the sender's worker progressed
    rx.join();
    ASSERT_TRUE(*r) << (*r).error().message();
    ASSERT_EQ((*r)->buffer.size(), n);
    (with_spare ? spare_ms : deferred_ms).push_back(static_cast<double>(t_got - t0) / 1e6);
    kept.push_back(std::move((*r)->buffer));
  }
  for (std::size_t i = 0; i < deferred_ms.size(); ++i)
    std::printf("size %zu MiB: deferred %.1f ms, with a spare %.1f ms\n", 2 + i * 3, deferred_ms[i],
                spare_ms[i]);
  const double worst = *std::max_element(deferred_ms.begin(), deferred_ms.end());
  EXPECT_LT(worst, 1000.0) << "a receive() asleep on the event fd was not woken";
}

// (D1) Many rounds of one 2 MiB deferred payload (allocated in ~1 ms), the receiver waiting
// before it comes: Sleep (the poller on the event fd, its wait capped at 20 ms) against Spin. A
// wake-up lost once the allocating thread started the receive shows as Sleep's median near the
// 20 ms cap while Spin's stays at a few ms.
std::vector<double> deferred_round_trips(WaitMode mode, int rounds) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  std::vector<double> out;
  auto p = test::make_pair(lo, co);
  EXPECT_TRUE(p);
  if (!p) return out;
  p->server.set_wait_policy(WaitPolicy{mode, {}});
  std::vector<net::Buffer> kept;  // no spare: every payload deferred
  for (int round = 0; round < rounds; ++round) {
    const std::size_t n = std::size_t{2} << 20;
    std::optional<Result<net::Message>> r;
    std::atomic<bool> ready{false};  // r set (r itself is not read before)
    std::int64_t t_got = 0;
    std::thread rx([&] {
      r.emplace(p->server.receive(secs(5)));
      ready.store(true);
      t_got = now_ns();
    });
    std::this_thread::sleep_for(10ms);
    net::Buffer b = filled(p->client, n, 'd');
    const std::int64_t t0 = now_ns();
    Status s = p->client.send(std::move(b), secs(5));
    EXPECT_TRUE(s);
    while (!ready.load() && now_ns() - t0 < 6'000'000'000)
      (void)p->client.receive(Deadline::after(1ms));
    rx.join();
    EXPECT_TRUE(*r);
    if (!*r) break;
    out.push_back(static_cast<double>(t_got - t0) / 1e6);
    kept.push_back(std::move((*r)->buffer));
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(ReviewS6b, SleepingReceiverIsWokenAsSoonAsASpinningOneForADeferredPayload) {
  const auto spin = deferred_round_trips(WaitMode::Spin, 25);
  const auto sleep = deferred_round_trips(WaitMode::Sleep, 25);
  ASSERT_EQ(spin.size(), 25u);
  ASSERT_EQ(sleep.size(), 25u);
  std::printf(
      "2 MiB deferred, send -> received: Spin p50 %.1f p90 %.1f max %.1f ms; Sleep p50 "
      "%.1f p90 %.1f max %.1f ms\n",
      spin[12], spin[22], spin[24], sleep[12], sleep[22], sleep[24]);
  EXPECT_LT(sleep[12], spin[12] + 10.0)
      << "a receiver asleep on the event fd waits for its 20 ms cap, not for the payload";
}

// (D1) The same with two waiters on the listener's worker: the channel the payload is for waits as
// a gen sleeper (its sibling's thread polls the event fd, waiting on another channel).
TEST(ReviewS6b, GenSleeperIsWokenForADeferredPayload) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(2, lo, co);
  ASSERT_TRUE(m);
  for (auto& s : m->server) s.set_wait_policy(WaitPolicy{WaitMode::Sleep, {}});
  std::vector<double> got_ms;
  std::vector<net::Buffer> kept;
  std::atomic<bool> stop{false};
  std::thread poller([&] {  // sibling 1: nothing comes on it
    while (!stop.load()) (void)m->server[1].receive(Deadline::after(200ms));
  });
  for (int round = 0; round < 6; ++round) {
    const std::size_t n = (std::size_t{2} << 20) + static_cast<std::size_t>(round) * (3u << 20);
    std::optional<Result<net::Message>> r;
    std::atomic<bool> ready{false};  // r set (r itself is not read before)
    std::int64_t t_got = 0;
    std::this_thread::sleep_for(30ms);
    std::thread rx([&] {
      r.emplace(m->server[0].receive(secs(5)));
      ready.store(true);
      t_got = now_ns();
    });
    std::this_thread::sleep_for(30ms);
    const std::int64_t t0 = now_ns();
    Status s = m->client[0].send(filled(m->client[0], n, 'g'), secs(5));
    ASSERT_TRUE(s) << s.error().message();
    while (!ready.load() && now_ns() - t0 < 6'000'000'000)
      (void)m->client[0].receive(Deadline::after(1ms));
    rx.join();
    ASSERT_TRUE(*r) << (*r).error().message();
    ASSERT_EQ((*r)->buffer.size(), n);
    got_ms.push_back(static_cast<double>(t_got - t0) / 1e6);
    kept.push_back(std::move((*r)->buffer));
  }
  stop.store(true);
  poller.join();
  for (std::size_t i = 0; i < got_ms.size(); ++i)
    std::printf("size %zu MiB: %.1f ms\n", 2 + i * 3, got_ms[i]);
  EXPECT_LT(*std::max_element(got_ms.begin(), got_ms.end()), 1000.0);
}

// (D1) One allocating thread for the whole process: a 1 MiB deferred payload of one pair waits
// behind other pairs' 64 MiB allocations (page faults, 50-130 ms each here), queued first. Before
// D1 the 1 MiB receiver's own thread allocated it at once. Measured: send -> received of the 1 MiB
// message while three other workers' 64 MiB payloads are being allocated, against the same alone.
TEST(ReviewS6b, ASmallDeferredPayloadDoesNotWaitBehindOtherWorkersLargeAllocations) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  constexpr int kBigPairs = 3;
  std::vector<test::Pair> big;
  for (int i = 0; i < kBigPairs; ++i) {
    auto p = test::make_pair(lo, co);
    ASSERT_TRUE(p);
    big.push_back(std::move(*p));
  }
  auto small = test::make_pair(lo, co);
  ASSERT_TRUE(small);
  constexpr std::size_t kBig = 64u << 20;
  constexpr std::size_t kSmall = 1u << 20;
  std::vector<net::Buffer> kept;
  auto one_small = [&](char c) {
    std::optional<Result<net::Message>> r;
    std::atomic<bool> ready{false};  // r set (r itself is not read before)
    std::thread rx([&] {
      r.emplace(small->server.receive(secs(5)));
      ready.store(true);
    });
    std::this_thread::sleep_for(2ms);
    const std::int64_t t0 = now_ns();
    Status s = small->client.send(filled(small->client, kSmall, c), secs(5));
    EXPECT_TRUE(s);
    while (!ready.load() && now_ns() - t0 < 6'000'000'000)
      (void)small->client.receive(Deadline::after(1ms));
    rx.join();
    const double ms = ms_since(t0);
    EXPECT_TRUE(*r);
    if (*r) kept.push_back(std::move((*r)->buffer));  // no spare for the next one
    return ms;
  };
  std::vector<double> alone, beside;  // beside: the big payloads deferred
  std::vector<net::Message> held;
  for (int i = 0; i < 3; ++i) alone.push_back(one_small('a'));
  auto big_round = [&](bool keep) {
    // Filled first (the senders' own page faults), then sent at once; the big receivers' threads
    // wait in receive() (their RTSs deferred, posted to the allocating thread).
    std::vector<net::Buffer> bufs;
    for (auto& b : big) bufs.push_back(filled(b.client, kBig, 'B'));
    std::atomic<int> received{0};
    std::atomic<bool> stop{false};
    std::vector<std::thread> ts;
    std::vector<std::optional<Result<net::Message>>> got(kBigPairs);
    for (std::size_t i = 0; i < big.size(); ++i) {
      ts.emplace_back([&, i] {
        got[i].emplace(big[i].server.receive(secs(10)));
        ++received;
      });
      ts.emplace_back([&, i] {
        while (!stop.load()) (void)big[i].client.receive(Deadline::after(1ms));
      });
    }
    std::this_thread::sleep_for(5ms);
    for (std::size_t i = 0; i < big.size(); ++i) {
      Status s = big[i].client.send(std::move(bufs[i]), secs(10));
      EXPECT_TRUE(s) << s.error().message();
    }
    std::this_thread::sleep_for(3ms);  // the big RTSs reach their receivers first
    const double ms = one_small('b');
    const std::int64_t t0 = now_ns();
    while (received.load() < kBigPairs && now_ns() - t0 < 10'000'000'000) os::sleep_ns(1'000'000);
    stop.store(true);
    for (auto& t : ts) t.join();
    for (auto& g : got)  // kept: no spare for the next round's 64 MiB payloads
      if (keep && g.has_value() && *g) held.push_back(std::move(**g));
    return ms;
  };
  for (int round = 0; round < 3; ++round) beside.push_back(big_round(true));
  // Control: the same load, the big payloads not deferred (each big worker has a 64 MiB spare).
  held.clear();
  (void)big_round(false);  // (the first may have had no spare)
  std::vector<double> control;
  for (int round = 0; round < 3; ++round) control.push_back(big_round(false));
  for (std::size_t i = 0; i < 3; ++i)
    std::printf(
        "1 MiB send -> received: alone %.1f ms, beside 3 x 64 MiB allocations %.1f ms, "
        "beside 3 x 64 MiB not deferred (control) %.1f ms\n",
        alone[i], beside[i], control[i]);
  EXPECT_LT(*std::max_element(beside.begin(), beside.end()), 50.0)
      << "a 1 MiB deferred payload waited behind other workers' 64 MiB allocations";
}

// (D1) A listener (and its channels) destroyed while its workers' deferred payloads are queued
// for (or being allocated by) the allocating thread: no crash, the senders learn the close, and
// the next pair's deferred payloads are still started (the thread is not stuck).
TEST(ReviewS6b, WorkerDestroyedWithDeferredPayloadsQueued) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  for (int round = 0; round < 4; ++round) {
    auto m = make_many(3, lo, co);
    ASSERT_TRUE(m);
    for (auto& c : m->client) {
      Status s = c.send(filled(c, 32u << 20, 'w'), secs(10));
      ASSERT_TRUE(s) << s.error().message();
    }
    for (int k = 0; k < 5; ++k)
      for (auto& c : m->client) (void)c.receive(Deadline::after(1ms));
    (void)m->server[0].receive(Deadline::after(1ms));  // the RTSs taken: deferred, posted
    m->server.clear();
    { net::Listener gone = std::move(m->l); }
    for (auto& c : m->client) {
      auto r = c.receive(secs(5));
      ASSERT_TRUE(r) << r.error().message();
      EXPECT_EQ(r->kind, Kind::PeerClosed);
    }
  }
  // The allocating thread still serves a fresh pair.
  auto p = test::make_pair(lo, co);
  ASSERT_TRUE(p);
  Status s = p->client.send(filled(p->client, 24u << 20, 'n'), secs(5));
  ASSERT_TRUE(s);
  std::optional<Result<net::Message>> r;
  std::atomic<bool> ready{false};  // r set (r itself is not read before)
  std::thread rx([&] {
    r.emplace(p->server.receive(secs(5)));
    ready.store(true);
  });
  const std::int64_t t0 = now_ns();
  while (!ready.load() && now_ns() - t0 < 6'000'000'000)
    (void)p->client.receive(Deadline::after(1ms));
  rx.join();
  ASSERT_TRUE(*r) << (*r).error().message();
  EXPECT_EQ((*r)->buffer.size(), 24u << 20);
}

}  // namespace
}  // namespace mbmq
