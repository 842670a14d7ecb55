// (K7, docs/design/net.md) close() of a remote channel does not wait for its peer to fetch what it
// sent: the channel lingers on the keeper at once (K5), and the exit handler gives lingering
// channels up to 100 ms, so that a process that sends, closes and exits loses nothing its peer
// fetches in that time. Before, close() itself waited up to 100 ms: a server thread (a queue
// loop, an asio loop) that closed a stopped peer's channel stalled that long.
//
// In both tests the server's worker is progressed by nobody while the client closes (no
// peer_timeout on either side: no keeper tick progresses it, K1), so the client's 8 MiB
// (a rendezvous send: complete once the server has fetched it) stays unfetched.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>

#include "mbmq/mbmq.h"
#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::filled;
using test::secs;
using test::url;

constexpr std::size_t kBig = 8u << 20;

double ms_since(std::int64_t t0) { return static_cast<double>(monotonic_ns() - t0) / 1e6; }

// The server's side: the next message is the client's kBig bytes of `c`, intact, then PeerClosed.
void expect_message_then_end(net::Channel& s, char c) {
  auto m = s.receive(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Message)
      << "the message sent before close() was lost: got kind " << static_cast<int>(m->kind) << " "
      << static_cast<int>(m->error) << " " << m->why;
  ASSERT_EQ(m->buffer.size(), kBig);
  EXPECT_EQ(m->buffer.data()[0], static_cast<std::byte>(c));
  EXPECT_EQ(m->buffer.data()[kBig - 1], static_cast<std::byte>(c));
  auto end = s.receive(secs(10));
  ASSERT_TRUE(end) << end.error().message();
  EXPECT_EQ(end->kind, Kind::PeerClosed);
}

// close() returns without waiting for the peer (before: 100 ms and more, by its loop), and the
// message still arrives, then the end.
TEST(NetClose, CloseDoesNotWaitForAPeerThatHasNotFetchedWhatWasSent) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = test::make_pair_without_keepers();
  ASSERT_TRUE(p);
  net::Channel& client = p->client;
  net::Channel* s = &p->server;
  for (int k = 0; k < 20; ++k) (void)s->receive(Deadline::after(2ms));  // HelloAck out, then idle
  ASSERT_TRUE(client.send(filled(client, kBig, 'q'), secs(10)));
  const std::int64_t t0 = monotonic_ns();
  client.close();
  const double took = ms_since(t0);
  std::printf("close() with 8 MiB unfetched: %.2f ms; keeper holds %zu\n", took,
              net::detail::keeper_holds_for_test());
  // One look at the worker and a Bye: well under a millisecond idle. The bound is loose for a
  // loaded machine and still below what the old loop took (>= 100 ms with the peer stopped).
  EXPECT_LT(took, 60.0) << "close() waited for the peer";
  EXPECT_GE(net::detail::keeper_holds_for_test(), 1u) << "the channel was not left lingering";
  expect_message_then_end(*s, 'q');
}

// Not a test: a client that sends kBig bytes its server has not fetched yet, closes and returns:
// the process exits at once, its channel lingering.
TEST(NetCloseHelper, DISABLED_ClientThatSendsClosesAndExits) {
  const char* u = std::getenv("MBMQ_NET_URL");
  if (u == nullptr) GTEST_SKIP() << "a helper of AProcessThatSendsClosesAndExits...";
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto ch = net::connect(u, secs(10), co);
  ASSERT_TRUE(ch) << ch.error().message();
  std::this_thread::sleep_for(100ms);  // the server stops progressing its worker meanwhile
  ASSERT_TRUE(ch->send(filled(*ch, kBig, 'z'), secs(10)));
  ch->close();
  if (const char* mark = std::getenv("MBMQ_NET_MARK"))  // tells the server: exiting now
    if (std::FILE* f = std::fopen(mark, "w")) (void)std::fclose(f);
  std::printf("helper: sent, closed, exiting\n");
  std::fflush(stdout);
}

// The exit handler waits (up to 100 ms) for what close() left lingering: the server, which starts
// fetching 20 ms after the helper has closed and begun to exit, gets the whole message (without
// the wait the helper's process was gone by then, and the message lost with its connection).
TEST(NetClose, AProcessThatSendsClosesAndExitsLosesNothingItsPeerFetchesSoon) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 90s);
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  const std::string env = "MBMQ_NET_URL=" + url(l->port());
  const std::string mark = "/tmp/mbmq-net-close-" + std::to_string(os::current_pid());
  for (int round = 0; round < 3; ++round) {
    (void)std::remove(mark.c_str());
    auto pid = test::spawn_helper("NetCloseHelper.DISABLED_ClientThatSendsClosesAndExits",
                                  {env, "MBMQ_NET_MARK=" + mark});
    ASSERT_TRUE(pid) << pid.error().message();
    auto s = l->accept(secs(20));
    ASSERT_TRUE(s) << s.error().message();
    for (int k = 0; k < 20; ++k) (void)s->receive(Deadline::after(2ms));  // HelloAck out
    // The helper sleeps 100 ms, sends, closes and exits; this worker is not progressed meanwhile
    // (the send's RTS waits in the socket) until the helper has been exiting for 20 ms.
    for (Deadline d = secs(20); !d.expired() && !std::filesystem::exists(mark);)
      std::this_thread::sleep_for(1ms);
    ASSERT_TRUE(std::filesystem::exists(mark)) << "the helper did not close";
    std::this_thread::sleep_for(20ms);
    expect_message_then_end(*s, 'z');
    int st = 0;
    ASSERT_EQ(::waitpid(*pid, &st, 0), *pid);
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "helper status 0x" << std::hex << st;
  }
  (void)std::remove(mark.c_str());
}

// Not a test: send, close, then net::finish_closes() and _exit(0), which skips the exit handler.
TEST(NetCloseHelper, DISABLED_SendsClosesFinishesAndUnderscoreExits) {
  const char* u = std::getenv("MBMQ_NET_URL");
  if (u == nullptr) GTEST_SKIP() << "a helper of ...UnderscoreExit...";
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto ch = net::connect(u, secs(10), co);
  if (!ch) ::_exit(5);
  std::this_thread::sleep_for(200ms);  // the server is in receive() by now
  if (!ch->send(filled(*ch, kBig, 'u'), secs(10))) ::_exit(6);
  ch->close();
  ::_exit(net::finish_closes(secs(10)) ? 0 : 7);
}

// (Review s11c) _exit() skips the exit handler: a program that ends so calls net::finish_closes()
// first, and its peer gets what it sent.
TEST(NetClose, FinishClosesBeforeUnderscoreExitDeliversWhatWasSent) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 90s);
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  for (int round = 0; round < 3; ++round) {
    auto pid = test::spawn_helper("NetCloseHelper.DISABLED_SendsClosesFinishesAndUnderscoreExits",
                                  {"MBMQ_NET_URL=" + url(l->port())});
    ASSERT_TRUE(pid) << pid.error().message();
    auto s = l->accept(secs(20));
    ASSERT_TRUE(s) << s.error().message();
    expect_message_then_end(*s, 'u');
    int st = 0;
    ASSERT_EQ(::waitpid(*pid, &st, 0), *pid);
    EXPECT_TRUE(WIFEXITED(st) && WEXITSTATUS(st) == 0) << "helper status 0x" << std::hex << st;
  }
}

// Takes the worker's lock and never lets it go (exit follows): what a thread interrupted inside a
// progress by a signal whose handler calls exit() holds.
void hold_forever(net::detail::WorkerCore& w) MBMQ_NO_THREAD_SAFETY_ANALYSIS { w.mu.lock(); }

// Not a test: a channel lingers; the exiting thread holds its worker's lock.
TEST(NetCloseHelper, DISABLED_ExitsHoldingTheLingeringChannelsWorkerLock) {
  if (std::getenv("MBMQ_NET_HELPER") == nullptr) GTEST_SKIP() << "a helper";
  ::setenv("UCX_TLS", "tcp", 1);
  auto p = test::make_pair_without_keepers();  // nobody progresses the server's worker
  ASSERT_TRUE(p);
  std::shared_ptr<net::detail::WorkerCore> w = test::core_of(p->client)->w_;  // before close
  ASSERT_TRUE(p->client.send(filled(p->client, kBig, 'h'), secs(10)));
  p->client.close();  // (K7) lingers at once
  ASSERT_EQ(net::detail::keeper_holds_for_test(), 1u) << "the channel did not linger";
  static auto* const kept = new test::Pair(std::move(*p));  // the server stays, never fetching
  (void)kept;
  EXPECT_FALSE(net::finish_closes(Deadline::after(1ms))) << "nothing fetches: TimedOut";
  hold_forever(*w);
  EXPECT_FALSE(net::finish_closes(Deadline::after(1ms))) << "holding a worker's lock: refused";
  std::exit(0);  // as a signal handler would, on the thread it interrupted
}

// (Review s11c) The exit handler's finishing must not deadlock on a worker lock the exiting
// thread holds (it once took it without a bound: exit hung for good).
TEST(NetClose, ExitOnAThreadHoldingAWorkersLockDoesNotHang) {
  for (int i = 0; i < 3; ++i) {
    auto pid =
        test::spawn_helper("NetCloseHelper.DISABLED_ExitsHoldingTheLingeringChannelsWorkerLock",
                           {"MBMQ_NET_HELPER=1"});
    ASSERT_TRUE(pid) << pid.error().message();
    const std::int64_t t0 = monotonic_ns();
    const int st = test::wait_for_exit(*pid, 15s);
    std::printf("round %d: status 0x%x after %.0f ms\n", i, st, ms_since(t0));
    EXPECT_NE(st, -1) << "round " << i << ": exit() hung (killed after 15 s)";
  }
}

// ---- (review s11d) finish_closes() on another thread while exit() runs
// --------------------------------------------------------------------------------------
std::atomic<std::int64_t> g_returned_ns{0};
std::atomic<bool> g_ok{false};

// Registered before UCX loads: runs after mbmq::net's before_exit() and before UCX's library
// destructors (as ReviewS6b's check_keeper_stopped_at_exit). From here on nothing of mbmq::net
// may touch UCX. The keeper stops (exiting()); the only one that can still empty the lingering
// list is the application thread inside finish_closes(): if its call returns, it progressed the
// worker / force-closed the endpoint after exit began.
void late_handler() {
  if (!net::detail::exiting()) ::_exit(4);
  const Deadline d = secs(13);  // the linger's 10 s cap, with room
  while (g_returned_ns.load() == 0 && !d.expired()) std::this_thread::sleep_for(5ms);
  std::printf(
      "helper: finish_closes on the other thread %s after mbmq::net's exit handler\n",
      g_returned_ns.load() != 0 ? (g_ok ? "returned OK" : "returned an error") : "did not return");
  std::fflush(stdout);
  ::_exit(g_returned_ns.load() != 0 && g_ok ? 3 : 0);
}

TEST(NetCloseHelper, DISABLED_ExitWhileAnotherThreadFinishesCloses) {
  if (std::getenv("MBMQ_NET_HELPER") == nullptr) GTEST_SKIP() << "a helper";
  ASSERT_FALSE(net::detail::ucx_usable()) << "UCX was loaded before the helper's handler";
  ASSERT_EQ(std::atexit(late_handler), 0);
  ::setenv("UCX_TLS", "tcp", 1);
  auto p = test::make_pair_without_keepers();  // nobody progresses the server's worker
  ASSERT_TRUE(p);
  ASSERT_TRUE(p->client.send(filled(p->client, kBig, 'x'), secs(10)));
  p->client.close();  // (K7) lingers at once
  ASSERT_EQ(net::detail::keeper_holds_for_test(), 1u);
  static auto* const kept = new test::Pair(std::move(*p));  // the server stays, never fetching
  (void)kept;
  std::thread([] {
    const Status s = net::finish_closes(Deadline::never());
    g_ok = static_cast<bool>(s);
    g_returned_ns = monotonic_ns();
  }).detach();
  std::this_thread::sleep_for(20ms);  // it is in its rounds now
  std::exit(0);                       // main returns, say
}

TEST(NetClose, FinishClosesOnAnotherThreadStopsTouchingUcxAtExit) {
  auto pid = test::spawn_helper("NetCloseHelper.DISABLED_ExitWhileAnotherThreadFinishesCloses",
                                {"MBMQ_NET_HELPER=1"});
  ASSERT_TRUE(pid) << pid.error().message();
  const int st = test::wait_for_exit(*pid, 30s);
  // Status 0: nothing of mbmq::net touched UCX after its exit handler (K6). 3 before the fix:
  // the other thread's rounds went on (linger_tick's force close, ucp_worker_progress).
  EXPECT_TRUE(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0) << "status 0x" << std::hex << st;
}

}  // namespace
}  // namespace mbmq
