// A hostile review of net::Listener::redirect (Q6, commit aba8a38; docs/design/net.md, "Redirect
// to a MsgQueue", Q6). Confirmed_* tests fail on the reviewed code (a real bug); the others state a
// property that holds.
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ipc/queue_core.h"
#include "mbmq/mbmq.h"
#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "net/remote.h"
#include "os/process.h"
#include "test_util.h"

// ---- an allocation failure injected at one chosen allocation (ReviewQ6.Confirmed_*BadAlloc*) ----
//
// Armed on one thread: the first allocation of kFailSize bytes right after one of kAfterSize
// bytes throws std::bad_alloc. Unarmed, operator new is malloc.
// The replacements pair malloc with free; GCC sees inlined new-expressions freed by free().
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
namespace {
thread_local bool g_armed = false;
thread_local std::size_t g_last = 0;
std::size_t g_fail_size = 0, g_after_size = 0;
std::size_t g_after_min = 0;  // if set: after any allocation of at least this size instead
std::atomic<int> g_fired{0};
thread_local bool g_fail_next = false;  // armed: this thread's next allocation throws
}  // namespace

void* operator new(std::size_t n) {
  if (g_fail_next) {
    g_fail_next = false;
    g_fired.fetch_add(1);
    throw std::bad_alloc();
  }
  if (g_armed) {
    if ((g_after_min != 0 ? g_last >= g_after_min : g_last == g_after_size) && n == g_fail_size) {
      g_armed = false;
      g_fired.fetch_add(1);
      throw std::bad_alloc();
    }
    g_last = n;
  }
  void* p = std::malloc(n != 0 ? n : 1);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::secs;
using test::url;

template <class Pred>
bool eventually(Pred p, std::chrono::milliseconds limit = 10s) {
  for (const Deadline d = Deadline::after(limit); !d.expired(); os::sleep_ns(1'000'000))
    if (p()) return true;
  return p();
}

int fd_count() { return static_cast<int>(os::dir_listing("/proc/self/fd").size()); }

// The server's call answered by a loop or ended: the call's status and how long it took.
struct CallResult {
  Status status;
  std::int64_t ns = 0;
};
CallResult timed_call(net::Channel& ch, Deadline d) {
  CallResult r;
  auto b = ch.buffer(64);
  if (!b) {
    r.status = fail(b.error());
    return r;
  }
  const std::int64_t t0 = monotonic_ns();
  r.status = ch.call(*b, d);
  r.ns = monotonic_ns() - t0;
  return r;
}

// One connection of a listener redirected to `q`, taken from the queue (Kind::Connection), and
// its client; both empty on failure.
struct Delivered {
  Message msg;
  Result<net::Channel> client = fail(Errc::TimedOut, "not run");
};
std::optional<Delivered> deliver_one(net::Listener& l, MsgQueue& q) {
  Delivered d;
  d.client = net::connect(url(l.port()), secs(10));
  if (!d.client) {
    ADD_FAILURE() << d.client.error().message();
    return std::nullopt;
  }
  for (const Deadline dl = secs(10); !dl.expired();) {
    auto m = q.wait(Deadline::after(100ms));
    if (m && m->kind == Kind::Connection) {
      d.msg = std::move(*m);
      return d;
    }
  }
  ADD_FAILURE() << "no Kind::Connection";
  return std::nullopt;
}

// ---- findings ----

// (Design: "the queue destroyed: ... Connections still queued in the source are destroyed with it
// (closed)"; net.h: "dropped, the connection closes and the client sees PeerClosed".) A
// connection delivered to the queue's source but not yet taken by wait() when the queue is
// destroyed must close: nobody can ever take it. On the reviewed code the source stays in the
// worker's list (NetSource::listening_ keeps it) and NetSource::close() closes only its taps, so
// the connection stays open, heartbeating, for as long as the listener lives: its client's call
// hangs until its deadline (here 6 s) instead of PeerClosed.
// Fixed: NetSource::close() takes the queued connections out and closes them (no lock held).
// Before: 10 of 10 runs (and under ASan) the client's call timed out.
TEST(ReviewQ6, TheQueueDestroyedClosesConnectionsItHadNotTaken) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  std::optional<Result<net::Channel>> c;
  {
    auto q = MsgQueue::create();
    ASSERT_TRUE(q);
    ASSERT_TRUE(l->redirect(*q, 1));
    c.emplace(net::connect(url(l->port()), secs(10)));
    ASSERT_TRUE(*c) << (*c).error().message();
    // Its HelloAck left (the client has it): the next flush of the pump delivers it to the
    // source. Nobody waits on the queue.
    os::sleep_ns(300'000'000);
  }  // the queue destroyed, the connection never taken
  CallResult r = timed_call(**c, secs(6));
  ASSERT_FALSE(r.status) << "answered by a server whose queue is gone";
  EXPECT_EQ(r.status.error().code, Errc::PeerClosed)
      << r.status.error().message() << ": the connection the destroyed queue held was not closed";
  EXPECT_LT(r.ns, 4'000'000'000) << "the call waited for its deadline";
}

// The same, racing: clients connect while the queue is destroyed under them (its destruction
// lands during their handshakes). Each client that connected must end up PeerClosed, never left
// hanging: besides the connections queued before NetSource::close(), one pushed just after it
// (deliver_locked's queue_alive() check passed, then the queue went) is the same leak.
// Fixed: NetSource::close() marks the source closed under its lock, and push_connection()
// refuses from then on (deliver_locked closes the connection). Before: 10 of 10 runs, 1-3 of the 6
// clients left hanging.
TEST(ReviewQ6, ConnectionsArrivingAsTheQueueIsDestroyedAreNeverLeftOpen) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 100s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  constexpr int kClients = 6;
  std::vector<std::optional<Result<net::Channel>>> got(kClients);
  std::vector<std::thread> ts;
  {
    auto q = MsgQueue::create();
    ASSERT_TRUE(q);
    ASSERT_TRUE(l->redirect(*q, 1));
    for (int i = 0; i < kClients; ++i) {
      ts.emplace_back([&, i] {
        os::sleep_ns(static_cast<std::int64_t>(i) * 15'000'000);
        got[static_cast<std::size_t>(i)].emplace(net::connect(url(l->port()), secs(10)));
      });
    }
    os::sleep_ns(40'000'000);
  }  // destroyed amid the handshakes
  for (auto& t : ts) t.join();
  int connected = 0, hanging = 0;
  for (auto& g : got) {
    if (!*g) continue;  // closed during its handshake: fine
    ++connected;
    CallResult r = timed_call(**g, secs(4));
    if (!r.status && r.status.error().code == Errc::TimedOut) ++hanging;
  }
  std::printf("%d of %d clients connected, %d left hanging\n", connected, kClients, hanging);
  EXPECT_EQ(hanging, 0) << hanging << " of " << connected
                        << " connected clients' connections stayed open with their queue gone";
}

// net::accepted() on a Message whose RemoteEnd was copied from one already taken: two messages
// could share one heap net::Channel, and the second accepted() returned success with an empty
// (invalid) Channel. Fixed: RemoteEnd is move-only (as Message::channel), and accepted() of an end
// whose channel is gone says InvalidArgument. Before: `copy.remote = d->msg.remote` compiled, and
// the second accepted() succeeded with an invalid Channel (10 of 10 runs).
// (Since the connection is Message::channel itself, a remote mbmq::Channel: move-only.)
static_assert(!std::is_copy_constructible_v<Channel> && !std::is_copy_assignable_v<Channel>);
static_assert(std::is_nothrow_move_constructible_v<Channel>);
TEST(ReviewQ6, ARemoteEndIsMoveOnlyAndItsChannelIsTakenOnce) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, 1));
  auto d = deliver_one(*l, *q);
  ASSERT_TRUE(d);
  Message moved;
  moved.kind = Kind::Connection;
  moved.channel = std::move(d->msg.channel);
  EXPECT_FALSE(d->msg.channel.valid()) << "a moved-from Channel still says it holds one";
  auto none = net::accepted(d->msg);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::InvalidArgument);
  auto first = net::accepted(moved);
  ASSERT_TRUE(first) << first.error().message();
  EXPECT_TRUE(first->valid());
  auto second = net::accepted(moved);
  ASSERT_FALSE(second) << "net::accepted() twice on one message";
  EXPECT_EQ(second.error().code, Errc::InvalidArgument);
}

// ListenCore::deliver_locked wrapped each connection as `std::shared_ptr<Channel>(new
// Channel(*it))` under the worker's mu. When the shared_ptr's control block could not be
// allocated, the shared_ptr constructor deleted the Channel: ~Channel -> ChannelCore::close() took
// the worker's mu, held by this very thread (a self-deadlock), and would have closed a connection
// still in ready_. Fixed: an empty Channel is made first (make_shared), then given the core, which
// cannot throw. Before: a hang, 3 of 3 runs (the failure injected at that control block). Now the
// failure is injected at the empty Channel's allocation (since the connection is an
// mbmq::Channel, Message::channel: the empty RemoteEnd's, right after the Queued node's):
// redirect() returns, the connection stays in ready_ and a later flush delivers
// it.
TEST(ReviewQ6, BadAllocWrappingAConnectionDoesNotDeadlockTheWorker) {
  ::setenv("UCX_TLS", "tcp", 1);
  if (test::kSanitized) GTEST_SKIP() << "replaces operator new: not under the sanitizers";
  test::Watchdog dog("the test (a hang: the worker's mu taken twice by one thread)", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  // A channel of the listener's worker redirected to q first: the source exists and the pump
  // runs, so the listener's redirect() allocates nothing before deliver_locked but a larger
  // sources vector (32 bytes).
  auto first = test::connect_one(*l);
  ASSERT_TRUE(first.server.valid());
  ASSERT_TRUE(first.server.redirect(*q, 5));
  // A connection accepted (its HelloAck out: the keeper progresses the idle worker) but not
  // taken by accept(): in ready_, delivered by redirect()'s deliver_locked().
  auto c = net::connect(url(l->port()), secs(10));
  ASSERT_TRUE(c) << c.error().message();
  os::sleep_ns(200'000'000);
#ifdef __GLIBCXX__
  g_fail_size = sizeof(std::_Sp_counted_ptr_inplace<net::detail::RemoteEnd, std::allocator<void>,
                                                    __gnu_cxx::_S_atomic>);
#else
  GTEST_SKIP() << "the control block's size is libstdc++'s";
#endif
  g_after_min = 64;  // the Queued node's block (larger), not the sources vector's (32 bytes)
  g_last = 0;
  g_fired = 0;  // (the tests of one binary run share it)
  g_armed = true;
  Status s = l->redirect(*q, 1);
  g_armed = false;
  g_after_min = 0;
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(g_fired.load(), 1) << "the injection point was not reached (test out of date)";
  // Delivered by a later flush, and it works.
  std::optional<Message> got;
  for (const Deadline d = secs(10); !d.expired() && !got;) {
    auto m = q->wait(Deadline::after(100ms));
    if (m && m->kind == Kind::Connection) got.emplace(std::move(*m));
  }
  ASSERT_TRUE(got) << "the connection left in ready_ was never delivered";
  auto ch = net::accepted(*got);
  ASSERT_TRUE(ch) << ch.error().message();
  ASSERT_TRUE(net::adopt(*q, std::move(*ch), 100));
  test::QueueServer server(*q);
  CallResult r = timed_call(*c, secs(5));
  EXPECT_TRUE(r.status) << r.status.error().message();
}

// ---- properties that hold ----

// A NetSource outlives its queue in the worker's list while the listener is redirected (above),
// and sources are found by the queue's address (source_of_locked). That address cannot be reused
// by a new queue meanwhile: QueueCore is make_shared and the source's weak_ptr keeps its storage.
// So a channel of the same worker redirected to a new queue reaches that queue.
TEST(ReviewQ6, AChannelRedirectedToANewQueueAfterTheListenersQueueDiedIsDelivered) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  auto r = test::connect_one(*l);  // the listener's worker's, accepted before the redirect
  ASSERT_TRUE(r.server.valid());
  const void* dead = nullptr;
  {
    auto qa = MsgQueue::create();
    ASSERT_TRUE(qa);
    dead = detail::QueueAccess::core(*qa).get();
    ASSERT_TRUE(l->redirect(*qa, 1));
  }
  std::vector<MsgQueue> held;
  bool reused = false;
  for (int i = 0; i < 32; ++i) {
    auto q = MsgQueue::create();
    ASSERT_TRUE(q);
    reused = reused || detail::QueueAccess::core(*q).get() == dead;
    held.push_back(std::move(*q));
  }
  EXPECT_FALSE(reused) << "a new queue at the dead queue's address: source_of_locked would match";
  MsgQueue& qb = held.back();
  ASSERT_TRUE(r.server.redirect(qb, 7));
  ASSERT_TRUE(r.client.send(test::numbered(r.client, 64, 42), secs(5)));
  auto m = qb.wait(secs(5));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->key, 7u);
  EXPECT_EQ(m->kind, Kind::Message);
}

// The listener and its accepted channels on one queue; the listener destroyed first with a
// connection still queued (not taken), then the queue: no deadlock (the source's last reference
// and the queued connection's Channel are destroyed with no worker mu held), the adopted channel's
// client and the queued one's client both see PeerClosed, and the pump ends.
TEST(ReviewQ6, ListenerThenQueueDestroyedWithQueuedAndAdoptedConnectionsCloseBothCleanly) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  {
    auto w = test::make_pair();  // warm-up: the keeper and allocator threads
    ASSERT_TRUE(w);
  }
  const int pumps0 = net::detail::pumps_running();
  std::optional<MsgQueue> q;
  q.emplace(*MsgQueue::create());
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, 1));
  auto d = deliver_one(*l, *q);
  ASSERT_TRUE(d);
  auto adopted = net::accepted(d->msg);
  ASSERT_TRUE(adopted);
  ASSERT_TRUE(net::adopt(*q, std::move(*adopted), 100));
  auto queued = net::connect(url(l->port()), secs(10));  // delivered, never taken
  ASSERT_TRUE(queued) << queued.error().message();
  os::sleep_ns(300'000'000);
  *l = net::Listener{};
  q.reset();
  CallResult a = timed_call(*d->client, secs(6));
  ASSERT_FALSE(a.status);
  EXPECT_EQ(a.status.error().code, Errc::PeerClosed) << a.status.error().message();
  CallResult b = timed_call(*queued, secs(6));
  ASSERT_FALSE(b.status);
  EXPECT_EQ(b.status.error().code, Errc::PeerClosed) << b.status.error().message();
  EXPECT_TRUE(eventually([&] { return net::detail::pumps_running() == pumps0; }))
      << net::detail::pumps_running() - pumps0 << " pumps left";
}

// A thread in accept(Deadline::never()) returns InvalidArgument at once when another thread
// redirects the listener, even while clients are connecting.
TEST(ReviewQ6, RedirectWakesEveryThreadInAcceptWhileClientsConnect) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  std::atomic<int> accepted{0}, refused{0};
  std::vector<net::Channel> kept;
  std::mutex mu;
  std::vector<std::thread> acceptors;
  for (int i = 0; i < 3; ++i) {
    acceptors.emplace_back([&] {
      for (;;) {
        auto a = l->accept(Deadline::never());
        if (!a) {
          if (a.error().code == Errc::InvalidArgument) ++refused;
          return;
        }
        ++accepted;
        std::lock_guard lock(mu);
        kept.push_back(std::move(*a));
      }
    });
  }
  std::vector<std::thread> clients;
  std::vector<std::optional<Result<net::Channel>>> cs(6);
  for (int i = 0; i < 6; ++i)
    clients.emplace_back([&, i] {
      cs[static_cast<std::size_t>(i)].emplace(net::connect(url(l->port()), secs(10)));
    });
  os::sleep_ns(50'000'000);
  ASSERT_TRUE(l->redirect(*q, 1));
  const std::int64_t t0 = monotonic_ns();
  for (auto& t : acceptors) t.join();
  EXPECT_LT(monotonic_ns() - t0, 2'000'000'000) << "a thread stayed in accept()";
  EXPECT_EQ(refused.load(), 3);
  for (auto& t : clients) t.join();
  // Every connected client is either one accept() returned or a Kind::Connection.
  int connected = 0;
  for (auto& c : cs) connected += (*c) ? 1 : 0;
  int delivered = 0;
  for (const Deadline d = secs(10); !d.expired() && accepted.load() + delivered < connected;) {
    auto m = q->wait(Deadline::after(100ms));
    if (m && m->kind == Kind::Connection) ++delivered;
  }
  EXPECT_EQ(accepted.load() + delivered, connected) << "a connection lost between accept and queue";
}

// Many listen/redirect/connect/destroy cycles (queue and listener destroyed in either order)
// leave no pump, thread or fd behind.
TEST(ReviewQ6, RedirectDestroyCyclesLeakNoPumpThreadOrFd) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 110s);
  {
    auto w = test::make_pair();  // warm-up
    ASSERT_TRUE(w);
  }
  const int cycles = test::kSanitized ? 6 : 20;
  auto cycle = [](int i) {
    std::optional<MsgQueue> q;
    q.emplace(*MsgQueue::create());
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    ASSERT_TRUE(l) << l.error().message();
    ASSERT_TRUE(l->redirect(*q, 1));
    auto d = deliver_one(*l, *q);
    ASSERT_TRUE(d);
    if (i % 2 == 0) {
      auto ch = net::accepted(d->msg);
      ASSERT_TRUE(ch);
      ASSERT_TRUE(net::adopt(*q, std::move(*ch), 100));
    }
    if (i % 3 == 0) {
      *l = net::Listener{};
      q.reset();
    } else {
      q.reset();
      *l = net::Listener{};
    }
  };
  cycle(0);  // one first: what the first use creates for good
  os::sleep_ns(300'000'000);
  const int pumps0 = net::detail::pumps_running();
  const int tasks0 = test::task_count();
  const int fds0 = fd_count();
  for (int i = 1; i <= cycles; ++i) cycle(i);
  EXPECT_TRUE(eventually([&] { return net::detail::pumps_running() == pumps0; }))
      << net::detail::pumps_running() - pumps0 << " pumps left";
  EXPECT_TRUE(eventually([&] { return test::task_count() <= tasks0; }))
      << test::task_count() - tasks0 << " threads more";
  EXPECT_TRUE(eventually([&] { return fd_count() <= fds0 + 2; }))
      << fd_count() - fds0 << " fds more";
}

// The listener destroyed while clients are connecting (its last reference: ~ListenCore, then
// ~WorkerCore -> ucp_worker_destroy) and, redirected, while its pump is delivering (the pump reads
// WorkerCore::listen_tap, ~ListenCore clears it). Expected: no crash; every client ends (served,
// refused or PeerClosed: never hanging); the pump ends. Found: a SIGSEGV in UCX's async thread
// (uct_tcp_sockcm_ep_recv calling into freed memory) while the main thread is in
// ucp_worker_destroy (uct_tcp_sockcm_t_cleanup), in 27 of 30 runs redirected; the same without
// any redirect (the variant below), so it is the listener's destruction amid sockaddr
// connection requests, not Q6 (Q6 makes it the normal way to stop a server: no thread in
// accept() to stop first).
// Not fixed: UCX 1.13's own race between ucp_listener_destroy and a connection request its async
// thread is handling (the crash is in ucp_cm_server_conn_request_cb, on UCX's thread; upstream:
// openucx/ucx#8243, "UCT/CM: Fix destroying listener in parallel with conn_req_cb", not in
// Debian's 1.13.1 as far as this shows). Keeping the listener's worker alive 300 ms after the
// listener (the test holding a reference) did not help: 8 of 8 runs crashed. Not keeping the
// ucp_listener either: its port would stay bound, and a restarted server must listen at once.
// Disabled (each run kills the process); README "Known" says so.
void destroy_amid_connects(bool redirect) {
  {
    auto w = test::make_pair();
    ASSERT_TRUE(w);
  }
  const int pumps0 = net::detail::pumps_running();
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  test::QueueServer server(*q);  // takes and drops connections (their remote end unclaimed)
  const int rounds = test::kSanitized ? 3 : 40;
  for (int round = 0; round < rounds; ++round) {
    auto l = net::listen("ucx://127.0.0.1:0/svc");
    ASSERT_TRUE(l) << l.error().message();
    if (redirect) {
      ASSERT_TRUE(l->redirect(*q, 1));
    }
    const std::string u = url(l->port());
    std::vector<std::thread> ts;
    std::atomic<int> hung{0};
    for (int i = 0; i < 4; ++i) {
      ts.emplace_back([&] {
        auto c = net::connect(u, secs(5));
        if (!c) return;
        CallResult r = timed_call(*c, secs(5));
        if (!r.status && r.status.error().code == Errc::TimedOut) ++hung;
      });
    }
    os::sleep_ns(static_cast<std::int64_t>(round % 4) * 3'000'000);
    *l = net::Listener{};
    for (auto& t : ts) t.join();
    EXPECT_EQ(hung.load(), 0) << "round " << round;
  }
  EXPECT_TRUE(eventually([&] { return net::detail::pumps_running() == pumps0; }))
      << net::detail::pumps_running() - pumps0 << " pumps left";
}

TEST(ReviewQ6, DISABLED_Confirmed_ARedirectedListenerDestroyedAmidConnectingClientsDoesNotCrash) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 110s);
  destroy_amid_connects(true);
}

TEST(ReviewQ6, DISABLED_Confirmed_AListenerDestroyedAmidConnectingClientsDoesNotCrash) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 110s);
  destroy_amid_connects(false);
}

// net::accepted() on a moved-from Message (its RemoteEnd moved with it) and on a message that
// never held one: InvalidArgument, not a crash or an empty success.
TEST(ReviewQ6, AcceptedOnAMovedFromOrLocalMessageIsInvalidArgument) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, 1));
  auto d = deliver_one(*l, *q);
  ASSERT_TRUE(d);
  Message moved = std::move(d->msg);
  auto none = net::accepted(d->msg);  // NOLINT(bugprone-use-after-move): the point
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::InvalidArgument);
  Message empty;
  empty.kind = Kind::Connection;
  auto none2 = net::accepted(empty);
  ASSERT_FALSE(none2);
  EXPECT_EQ(none2.error().code, Errc::InvalidArgument);
  auto ch = net::accepted(moved);
  ASSERT_TRUE(ch) << ch.error().message();
  EXPECT_TRUE(ch->valid());
}

// The pump thread cannot be had (its std::thread state's allocation fails, injected):
// Listener::redirect says System and changes nothing: no pump counted, accept() still works, and
// a later redirect succeeds and delivers.
TEST(ReviewQ6, ARedirectWhosePumpCannotStartLeavesTheListenerAsItWas) {
  ::setenv("UCX_TLS", "tcp", 1);
  if (test::kSanitized) GTEST_SKIP() << "replaces operator new: not under the sanitizers";
  test::Watchdog dog("the test", 30s);
  {
    auto w = test::make_pair();  // warm-up
    ASSERT_TRUE(w);
  }
  const int pumps0 = net::detail::pumps_running();
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  // A fresh source: make_shared<NetSource>, the queue's sources vector (16 bytes), the worker's
  // (16 bytes), then std::thread's state (a vtable pointer, the function and its argument).
  g_after_size = sizeof(std::shared_ptr<int>);
  g_fail_size = 3 * sizeof(void*);
  g_last = 0;
  g_fired = 0;  // (the tests of one binary run share it)
  g_armed = true;
  Status s = l->redirect(*q, 1);
  g_armed = false;
  ASSERT_EQ(g_fired.load(), 1) << "the injection point was not reached (test out of date)";
  ASSERT_FALSE(s) << "redirected with no pump";
  EXPECT_EQ(s.error().code, Errc::System) << s.error().message();
  EXPECT_EQ(net::detail::pumps_running(), pumps0);
  auto r = test::connect_one(*l);  // accept() still works
  EXPECT_TRUE(r.server.valid());
  ASSERT_TRUE(l->redirect(*q, 1));
  auto d = deliver_one(*l, *q);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->msg.key, 1u);
  EXPECT_EQ(q->channel_count(), 0u) << "the failed redirect's source still counts";
}

// A forked child's copy of a queue with a remote connection queued in it: wait() there neither
// crashes nor hangs nor hands out the parent's connection, and the copy is destroyed cleanly; the
// parent's connection is unaffected and still delivered.
TEST(ReviewQ6, AForkedChildsCopyOfTheQueueIgnoresQueuedConnections) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 30s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, 1));
  auto c = net::connect(url(l->port()), secs(10));
  ASSERT_TRUE(c) << c.error().message();
  os::sleep_ns(300'000'000);  // delivered to the source, not taken
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    int code = 0;
    auto m = q->wait(Deadline::after(200ms));
    if (m && m->channel.valid()) code = 3;  // the parent's connection, in a child
    if (m && m->kind == Kind::Connection) code = 4;
    *q = MsgQueue{};
    std::_Exit(code);
  }
  int status = -1;
  for (const Deadline d = secs(10); !d.expired(); os::sleep_ns(5'000'000))
    if (::waitpid(pid, &status, WNOHANG) == pid) break;
  if (status == -1) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    FAIL() << "the child hung";
  }
  ASSERT_TRUE(WIFEXITED(status)) << "the child crashed: status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 0);
  auto m = q->wait(secs(5));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Connection);
  auto ch = net::accepted(*m);
  ASSERT_TRUE(ch) << ch.error().message();
  ASSERT_TRUE(net::adopt(*q, std::move(*ch), 100));
  test::QueueServer server(*q);
  CallResult r = timed_call(*c, secs(5));
  EXPECT_TRUE(r.status) << r.status.error().message();
}

// A flood of clients naming another service, with nobody in accept() and nobody waiting on the
// queue: each is refused (HelloAck{refused}, then closed) and freed by the pump (graveyard_ back
// to empty), none is delivered, and the listener still serves its own service afterwards.
TEST(ReviewQ6, RefusedHandshakesAreFreedByThePumpWithNobodyWaiting) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/other");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, 1));
  constexpr int kClients = 8;
  std::vector<std::unique_ptr<test::RawClient>> raws;
  for (int i = 0; i < kClients; ++i) {
    raws.push_back(std::make_unique<test::RawClient>());
    ASSERT_TRUE(raws.back()->connect(l->port()));
    raws.back()->hello(net::detail::Grant{16, 1u << 20});  // service "svc": refused
  }
  EXPECT_TRUE(eventually([&] {
    for (auto& r : raws) r->progress_for(1ms);
    return l->stats().refused_service >= kClients;
  })) << l->stats().refused_service
      << " refused";
  auto& core = *((*l).*get(test::ListenCoreOf{}));
  auto graveyard = [&] {
    os::LockGuard lock(core.w_->mu);
    return (core.*get(test::GraveyardOf{})).size();
  };
  EXPECT_TRUE(eventually([&] { return graveyard() == 0; }, 5s))
      << graveyard() << " refused connections still held";
  auto m = q->wait(Deadline::immediate());
  EXPECT_FALSE(m && m->kind == Kind::Connection) << "a refused connection was delivered";
  auto c = net::connect(url(l->port(), "other"), secs(10));
  ASSERT_TRUE(c) << c.error().message();
  auto got = q->wait(secs(5));
  ASSERT_TRUE(got) << got.error().message();
  EXPECT_EQ(got->kind, Kind::Connection);
}

// (review rev-f8c) Out of memory where a send, a send_request or a call allocates its SendOp
// (the first allocation on their path with credit at hand): nothing is sent, the buffer stays the
// caller's, the credit is back (once: a request held outstanding meanwhile keeps its own) and
// nothing is listed; the channel goes on. Fixed for send() and
// send_request() by reading (no reproducer then); call() let the bad_alloc out with the credit
// taken. Before (call): "C++ exception with description std::bad_alloc thrown in the test body",
// one message of the grant lost.
TEST(ReviewQ6, OutOfMemoryInASendACallOrASendRequestGivesItsCreditBack) {
  ::setenv("UCX_TLS", "tcp", 1);
  if (test::kSanitized) GTEST_SKIP() << "replaces operator new: not under the sanitizers";
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  auto credit = [&] {
    auto core = test::core_of(p->client);
    os::LockGuard lock(core->w_->mu);
    return std::tuple{(*core).*get(test::OutMsgsOf{}), (*core).*get(test::OutBytesOf{}),
                      ((*core).*get(test::RequestsOf{})).size()};
  };
  for (int what = 0; what < 3; ++what) {
    SCOPED_TRACE(what == 0 ? "call" : what == 1 ? "send" : "send_request");
    auto b = p->client.buffer(1000);
    ASSERT_TRUE(b);
    std::memset(b->data().data(), 'a' + what, 1000);
    const int fired = g_fired.load();
    // The last round's credit back first (a one-way message's comes later): receive() progresses.
    const auto zero = std::tuple<std::uint64_t, std::uint64_t, std::size_t>{0, 0, 0};
    for (const Deadline d = secs(5); credit() != zero && !d.expired();)
      (void)p->client.receive(Deadline::after(10ms));
    ASSERT_EQ(credit(), zero);
    // One request outstanding (its credit and its listing held), so that a give-back too many
    // (the counts saturate at zero) shows too.
    auto held = p->client.buffer(100);
    ASSERT_TRUE(held);
    ASSERT_TRUE(p->client.send_request(std::move(*held), secs(5)));
    const auto one = std::tuple<std::uint64_t, std::uint64_t, std::size_t>{1, 100, 1};
    ASSERT_EQ(credit(), one);
    Status st;
    g_fail_next = true;
    try {
      st = what == 0   ? p->client.call(*b, secs(5))
           : what == 1 ? p->client.send(std::move(*b), secs(5))
                       : p->client.send_request(std::move(*b), secs(5));
    } catch (const std::bad_alloc&) {
      ADD_FAILURE() << "std::bad_alloc came out";
    }
    g_fail_next = false;
    ASSERT_EQ(g_fired.load(), fired + 1)
        << "the injection point was not reached (test out of date)";
    ASSERT_FALSE(st);
    EXPECT_EQ(st.error().code, Errc::System) << st.error().message();
    EXPECT_EQ(credit(), one) << "credit or a listing left behind, or given back twice";
    ASSERT_TRUE(b->valid()) << "the buffer was given up";
    EXPECT_EQ(static_cast<char>(b->data()[999]), 'a' + what);
    // The channel goes on: the same buffer once more, received by the server after the held
    // request; both requests answered.
    std::jthread srv([&] {
      for (int k = 0; k < 2; ++k) {
        auto m = p->server.receive(secs(5));
        if (m && m->kind == Kind::Request) (void)net::Channel::reply(std::move(*m));
      }
    });
    st = what == 0   ? p->client.call(*b, secs(5))
         : what == 1 ? p->client.send(std::move(*b), secs(5))
                     : p->client.send_request(std::move(*b), secs(5));
    EXPECT_TRUE(st) << st.error().message();
    srv.join();
    for (int k = 0; k < (what == 2 ? 2 : 1); ++k) {  // the held request's reply (and the new's)
      auto r = p->client.receive(secs(5));
      ASSERT_TRUE(r) << r.error().message();
      EXPECT_EQ(r->kind, Kind::Reply);
    }
  }
}

}  // namespace
}  // namespace mbmq
