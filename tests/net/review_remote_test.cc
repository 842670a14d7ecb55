// Hostile review of #19 (one mbmq::Channel type for local and remote ends, c06555a..b79602e).
// Each test is a suspicion; a failing (or hanging) test is a confirmed finding.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ipc/foreign_channel.h"
#ifdef REVIEW_HAVE_ASIO
#include "mbmq/asio.h"
#endif
#include "mbmq/mbmq.h"
#include "mbmq/net.h"
#include "mbmq/stream.h"
#include "net/net_pair.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::secs;
using test::url;

// ---- static initialisation: connect("ucx://...") from a global initialiser of the consumer ----
// register.cc's object sits after the consumer's own objects on the link line, so its
// initialiser runs after theirs: a global that connects at start-up is told to link mbmq::net.
struct EarlyConnect {
  bool connector_set = false;
  std::string message;
  EarlyConnect() {
    connector_set = mbmq::detail::remote_connector() != nullptr;
    if (!connector_set) {
      // Without the connector this returns at once (no UCX): the message a user sees.
      auto c = mbmq::connect("ucx://127.0.0.1:1/svc", Deadline::immediate());
      if (!c) message = c.error().message();
    }
  }
};
const EarlyConnect g_early;

TEST(ReviewRemote, ConnectFromAStaticInitialiserOfAProgramLinkingMbmqNetReachesMbmqNet) {
  EXPECT_TRUE(g_early.connector_set)
      << "a global initialiser of a program that links mbmq::net called mbmq::connect(\"ucx://\") "
         "and got: \""
      << g_early.message << "\" (register.cc's initialiser had not run yet)";
  EXPECT_NE(mbmq::detail::remote_connector(), nullptr) << "after main: set";
}

using test::remote_pair;
using test::RemotePair;

std::int64_t ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                               t0)
      .count();
}

// ---- fork: a child using the parent's remote Channel gets a clear error, never a hang ----
// channel.h: receive_in_place() on a remote end answers 0 ("take it with receive()") whenever
// the handle is open, without asking net: in a forked child that is not an error.
TEST(ReviewRemote, AForkedChildUsingARemoteChannelGetsErrorsNotZeroOrAHang) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  auto pre = p->client.buffer(64);  // made before the fork
  ASSERT_TRUE(pre);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::alarm(10);  // a hang: SIGALRM, 128 + 14
    int bad = 0;
    if (p->client.buffer(64)) bad |= 1;
    if (p->client.buffer(64, Deadline::after(500ms))) bad |= 2;
    InPlace in;
    auto n = p->client.receive_in_place(in, Deadline::after(500ms));
    if (n) bad |= 4;  // 0: "a message of another kind is next"
    if (p->client.receive(Deadline::after(500ms))) bad |= 8;
    if (p->client.call(*pre, Deadline::after(500ms))) bad |= 16;
    auto b = std::move(*pre);
    if (p->client.send(std::move(b))) bad |= 32;
    p->client.set_wait_policy(WaitPolicy{});
    p->client.close();
    p->server.close();
    std::_Exit(bad);
  }
  int status = -1;
  for (Deadline d = secs(20); !d.expired();) {
    if (::waitpid(pid, &status, WNOHANG) == pid) break;
    os::sleep_ns(1'000'000);
  }
  if (status == -1) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    ADD_FAILURE() << "the forked child hung";
  }
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  const int bad = WEXITSTATUS(status);
  EXPECT_EQ(bad & 1, 0) << "buffer(size) succeeded in the child";
  EXPECT_EQ(bad & 2, 0) << "buffer(size, deadline) succeeded in the child";
  EXPECT_EQ(bad & 4, 0) << "receive_in_place() returned 0 (success) in a forked child";
  EXPECT_EQ(bad & 8, 0) << "receive() succeeded in the child";
  EXPECT_EQ(bad & 16, 0) << "call() succeeded in the child";
  EXPECT_EQ(bad & 32, 0) << "send() succeeded in the child";
  EXPECT_LT(bad, 128) << "the child hung (SIGALRM) or died: " << bad;
  // The parent's channel still works.
  std::thread srv([&] {
    auto m = p->server.receive(secs(10));
    if (m && m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
  });
  auto b = p->client.buffer(8);
  ASSERT_TRUE(b);
  EXPECT_TRUE(p->client.call(*b, secs(10)));
  srv.join();
}

// ---- receive_in_place() after the final PeerClosed ----
// channel.h: "Once receive() has delivered the final PeerClosed, the error receive() then gives
// (PeerClosed, Protocol)". A remote end answers 0 at once forever: a loop that reads in place and
// falls back to receive() on 0 never learns the channel ended from receive_in_place().
TEST(ReviewRemote, ReceiveInPlaceAfterTheFinalPeerClosedIsTheErrorNotZero) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  p->server.close();
  auto m = p->client.receive(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::PeerClosed);
  auto again = p->client.receive(Deadline::after(200ms));
  ASSERT_FALSE(again);
  InPlace in;
  auto n = p->client.receive_in_place(in, Deadline::after(200ms));
  EXPECT_FALSE(n) << "receive_in_place after the final PeerClosed returned " << *n
                  << " (receive() says: " << again.error().message() << ")";
}

// ---- close() from another thread while one waits in buffer(size, deadline) ----
// channel.h close(): "Safe while other threads are inside call() or receive() on it ... they
// return Errc::InvalidArgument ("closed")". remote.h: "one thread at a time, but for close()".
TEST(ReviewRemote, CloseWakesABufferWaitingForCredit) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  net::ListenOptions lo;
  lo.inbox_messages = 2;
  auto p = remote_pair(lo);
  ASSERT_TRUE(p);
  for (int i = 0; i < 2; ++i) {
    auto b = p->client.buffer(64, secs(5));
    ASSERT_TRUE(b) << b.error().message();
    ASSERT_TRUE(p->client.send(std::move(*b)));
  }
  std::optional<Result<Buffer>> r;
  std::int64_t took = -1;
  std::thread t([&] {
    const auto t0 = std::chrono::steady_clock::now();
    r.emplace(p->client.buffer(64, secs(20)));
    took = ms_since(t0);
  });
  os::sleep_ns(300'000'000);
  p->client.close();
  t.join();
  ASSERT_TRUE(r);
  EXPECT_FALSE(*r);
  EXPECT_LT(took, 3000) << "buffer(size, deadline) went on waiting " << took
                        << " ms after another thread closed the channel";
  if (!*r) {
    EXPECT_EQ((*r).error().code, Errc::InvalidArgument) << (*r).error().message();
  }
}

// ---- close() from another thread while one is inside call() ----
TEST(ReviewRemote, CloseDuringACallEndsItWithInvalidArgumentAndAUsableOrInvalidBuffer) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  std::optional<Message> held;  // the request, never answered until the end
  std::thread srv([&] {
    auto m = p->server.receive(secs(10));
    if (m) held.emplace(std::move(*m));
  });
  auto b = p->client.buffer(4096);
  ASSERT_TRUE(b);
  std::memset(b->data().data(), 'x', 4096);
  Status s;
  std::int64_t took = -1;
  std::thread c([&] {
    const auto t0 = std::chrono::steady_clock::now();
    s = p->client.call(*b, secs(20));
    took = ms_since(t0);
  });
  srv.join();
  ASSERT_TRUE(held);
  os::sleep_ns(200'000'000);
  p->client.close();
  c.join();
  EXPECT_FALSE(s);
  EXPECT_LT(took, 3000) << "call went on " << took << " ms after close()";
  if (!s) {
    EXPECT_EQ(s.error().code, Errc::InvalidArgument) << s.error().message();
  }
  if (b->valid()) {
    // Usable: its bytes readable and writable, of its size.
    EXPECT_LE(b->size(), b->capacity());
    for (std::byte& x : b->data()) x = std::byte{1};
  }
  held.reset();
}

// ---- buffer(size, deadline) on a remote end redirected to a queue that nobody waits on ----
// channel.h: on a redirected end "pool slots come back without it [the queue's wait()]": a
// producer that redirected its end (to get send_request() replies) and paces itself with
// buffer(size, deadline) is paced by its peer, not by its own queue.
TEST(ReviewRemote, BufferWithADeadlineOnARedirectedEndGetsCreditWithoutTheQueuesWait) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 90s);
  net::ListenOptions lo;
  lo.inbox_messages = 4;
  auto p = remote_pair(lo);
  ASSERT_TRUE(p);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(p->client.redirect(*q, 5));
  std::atomic<int> got{0};
  std::thread consumer([&] {
    for (int i = 0; i < 40; ++i) {
      auto m = p->server.receive(secs(20));
      if (!m) return;
      ++got;
    }
  });
  int sent = 0;
  std::string err;
  for (int i = 0; i < 40; ++i) {
    auto nb = p->client.buffer(64, secs(3));
    if (!nb) {
      err = nb.error().message();
      break;
    }
    Status st = p->client.send(std::move(*nb));
    if (!st) {
      err = st.error().message();
      break;
    }
    ++sent;
  }
  EXPECT_EQ(sent, 40) << "stopped after " << sent << " (the consumer took " << got.load()
                      << "): " << err;
  p->server.close();
  consumer.join();
}

// ---- a reply of another size than the request: data() follows the reply's vector ----
TEST(ReviewRemote, AReplyLargerThanTheRequestMovesDataAndTheBufferStaysUsable) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  constexpr std::size_t kBig = std::size_t{3} << 20;
  std::atomic<int> fails{0};
  std::thread srv([&] {
    for (int i = 0; i < 3; ++i) {
      auto m = p->server.receive(secs(10));
      if (!m || m->kind != Kind::Request) {
        ++fails;
        return;
      }
      const std::size_t n = i == 1 ? 5 : kBig;
      if (!m->buffer.resize(n)) {
        ++fails;
        continue;
      }
      std::memset(m->buffer.data().data(), 'A' + i, n);
      if (!MsgQueue::reply(std::move(*m))) ++fails;
    }
  });
  auto b = p->client.buffer(16);
  ASSERT_TRUE(b);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(b->resize(16));
    std::memset(b->data().data(), 'q', 16);
    Status s = p->client.call(*b, secs(10));
    ASSERT_TRUE(s) << i << ": " << s.error().message();
    const std::size_t n = i == 1 ? 5 : kBig;
    ASSERT_EQ(b->size(), n) << i;
    ASSERT_LE(b->size(), b->capacity());
    for (std::byte x : b->data()) ASSERT_EQ(x, static_cast<std::byte>('A' + i)) << i;
    // The whole capacity is ours to write.
    ASSERT_TRUE(b->resize(b->capacity()));
    std::memset(b->data().data(), 'z', b->size());
  }
  srv.join();
  EXPECT_EQ(fails.load(), 0);
}

// ---- MsgQueue::adopt of a remote end: a failed adopt leaves the channel with the caller ----
TEST(ReviewRemote, AFailedAdoptLeavesTheRemoteChannelOpenAndSaysWhy) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  auto q1 = MsgQueue::create();
  ASSERT_TRUE(q1);
  auto q2 = MsgQueue::create();
  ASSERT_TRUE(q2);
  ASSERT_TRUE(p->server.redirect(*q1, 1));
  Status s = q2->adopt(std::move(p->server), 2);  // redirected elsewhere already
  if (!s) {
    EXPECT_TRUE(p->server.valid()) << "failed adopt closed or took the channel";
  }
  MsgQueue closed = std::move(*q2);
  MsgQueue gone;  // a moved-from (closed) queue
  auto p2 = remote_pair();
  ASSERT_TRUE(p2);
  Status s2 = gone.adopt(std::move(p2->server), 3);
  ASSERT_FALSE(s2);
  EXPECT_TRUE(p2->server.valid());
  EXPECT_EQ(std::string(s2.error().message()).find("closed channel"), std::string::npos)
      << "adopt into a closed queue blames the (open) channel: " << s2.error().message();
}

// ---- receive_batch reusing a span that holds an earlier batch's remote connection ----
// Message::channel of a Kind::Connection may be a remote end; a receive_batch whose span still
// holds one (from an earlier batch) drops it first (closing it takes the worker's lock).
TEST(ReviewRemote, ReceiveBatchDropsEarlierMessagesHoldingRemoteChannels) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  auto p2 = remote_pair();
  ASSERT_TRUE(p2);
  std::vector<Message> out(4);
  out[1].kind = Kind::Connection;
  out[1].channel = std::move(p2->server);  // an earlier batch's connection
  std::thread peer([&] {
    for (int i = 0; i < 3; ++i) {
      auto b = p->server.buffer(32);
      if (b) (void)p->server.send(std::move(*b));
    }
  });
  auto n = p->client.receive_batch(out, secs(10));
  peer.join();
  ASSERT_TRUE(n) << n.error().message();
  EXPECT_GE(*n, 1u);
  // The earlier connection was dropped: its client sees PeerClosed.
  auto m = p2->client.receive(secs(5));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed);
}

// ---- buffers(size, out, deadline): bounded as a local pool is ----
// channel.h: buffers() "waits as above for the first, then takes what is free without waiting".
// A remote end waits for credit for the first only, then makes out.size() buffers regardless of
// the grant: a producer sizing its span for throughput allocates out.size() x size bytes it can
// never send in one batch (here 64 x 1 MiB for a grant of 4 messages).
TEST(ReviewRemote, BuffersTakesNoMoreThanTheGrantCanSend) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  net::ListenOptions lo;
  lo.inbox_messages = 4;
  auto p = remote_pair(lo);
  ASSERT_TRUE(p);
  std::vector<Buffer> out(64);
  auto n = p->client.buffers(std::size_t{1} << 20, out, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  auto sent = p->client.send_batch(std::span<Buffer>(out.data(), *n));
  ASSERT_TRUE(sent) << sent.error().message();
  EXPECT_LE(*n, 4u) << "buffers() handed out " << *n << " buffers of 1 MiB; send_batch could send "
                    << *sent << " of them";
}

// ---- exit() with a remote Channel still open in a static (a common home for a client) ----
// Run in a fresh process (this binary, re-executed): UCX cannot be used in a forked child.
Channel* g_static_client = nullptr;
TEST(ReviewRemote, HelperExitWithARemoteChannelInAStatic) {
  if (::getenv("REVIEW_REMOTE_EXIT_HELPER") == nullptr) GTEST_SKIP() << "helper";
  ::setenv("UCX_TLS", "tcp", 1);
  static std::optional<RemotePair> p = remote_pair();
  if (!p) std::_Exit(3);
  static Channel client = std::move(p->client);
  g_static_client = &client;
  auto b = client.buffer(64);
  if (!b) std::_Exit(4);
  std::thread srv([&] {
    auto m = p->server.receive(secs(10));
    if (m && m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
  });
  if (!client.call(*b, secs(10))) std::_Exit(5);
  srv.join();
  std::exit(0);  // static destructors: client, then p (listener, server end)
}

TEST(ReviewRemote, ExitWithARemoteChannelInAStaticEndsCleanly) {
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::setenv("REVIEW_REMOTE_EXIT_HELPER", "1", 1);
    char filter[] = "--gtest_filter=ReviewRemote.HelperExitWithARemoteChannelInAStatic";
    char self[] = "/proc/self/exe";
    char* argv[] = {self, filter, nullptr};
    ::execv(self, argv);
    std::_Exit(2);
  }
  int status = -1;
  for (Deadline d = secs(30); !d.expired();) {
    if (::waitpid(pid, &status, WNOHANG) == pid) break;
    os::sleep_ns(5'000'000);
  }
  if (status == -1) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    FAIL() << "the process hung in exit() with a remote Channel in a static";
  }
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << (WIFEXITED(status) ? "exit " + std::to_string(WEXITSTATUS(status))
                            : "signal " + std::to_string(WTERMSIG(status)));
}

// ---- call() ended by PeerClosed: "the automatic reply: buf stays usable" (channel.h, net.h) ----
// ChannelCore::call gives buf up (buf = Buffer{}) whenever UCX still held its bytes when the call
// ended, PeerClosed included: a large request the peer closed on before fetching it.
TEST(ReviewRemote, ACallEndedByPeerClosedLeavesTheBufferUsable) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 110s);
  int peer_closed = 0, invalid = 0;
  for (int delay_ms : {0, 1, 2, 5, 10, 20, 40, 0, 1, 2, 5, 10}) {
    auto p = remote_pair();
    ASSERT_TRUE(p);
    auto b = p->client.buffer(std::size_t{48} << 20);
    ASSERT_TRUE(b) << b.error().message();
    std::thread closer([&] {
      os::sleep_ns(static_cast<std::int64_t>(delay_ms) * 1'000'000);
      p->server.close();
    });
    Status s = p->client.call(*b, secs(10));
    closer.join();
    if (!s && s.error().code == Errc::PeerClosed) {
      ++peer_closed;
      if (!b->valid()) ++invalid;
    }
  }
  EXPECT_EQ(invalid, 0) << invalid << " of " << peer_closed
                        << " calls ended by PeerClosed gave the buffer up";
}

// ---- fork: mbmq::connect("ucx://...") in a child of a process that used UCX ----
TEST(ReviewRemote, ConnectInAForkedChildIsAClearErrorNotAHang) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  const std::string u = url(p->l.port());
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::alarm(10);
    auto c = connect(u, Deadline::after(3s));
    std::_Exit(c ? 1 : (c.error().code == Errc::TimedOut ? 2 : 0));
  }
  int status = -1;
  for (Deadline d = secs(20); !d.expired();) {
    if (::waitpid(pid, &status, WNOHANG) == pid) break;
    os::sleep_ns(1'000'000);
  }
  if (status == -1) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    FAIL() << "the forked child hung in connect()";
  }
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status);
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: connected in a forked child; 2: TimedOut, not a clear "
                                       "error";
}

// ---- connections of a redirected net::Listener dropped by the loop, and the queue destroyed
// with more queued: no deadlock (closing a remote end takes its worker's lock) ----
TEST(ReviewRemote, DroppingRemoteConnectionsAndTheQueueUnderLoadDoesNotDeadlock) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 100s);
  for (int round = 0; round < 3; ++round) {
    auto q = std::make_unique<MsgQueue>(*MsgQueue::create());
    net::ListenOptions lo;
    lo.backlog = 64;
    auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
    ASSERT_TRUE(l) << l.error().message();
    ASSERT_TRUE(l->redirect(*q, 1));
    const std::string u = url(l->port());
    std::atomic<bool> stop{false};
    std::atomic<int> dropped{0};
    std::thread loop([&] {
      std::vector<Message> batch;
      while (!stop.load()) {
        auto m = q->wait(Deadline::after(5ms));
        if (!m) continue;
        if (m->kind == Kind::Connection) {
          ++dropped;
          if (dropped % 2 == 0) {
            batch.push_back(std::move(*m));  // held, dropped later together
            if (batch.size() > 3) batch.clear();
          }
        }
      }
    });
    std::vector<std::thread> clients;
    for (int i = 0; i < 6; ++i)
      clients.emplace_back([&] {
        for (int k = 0; k < 4; ++k) {
          auto ch = connect(u, secs(5));
          if (!ch) continue;
          auto b = ch->buffer(16);
          if (b) (void)ch->call(*b, Deadline::after(50ms));
        }
      });
    os::sleep_ns(150'000'000);
    stop.store(true);
    loop.join();
    q.reset();  // connections still queued: closed here
    for (auto& t : clients) t.join();
  }
}

#ifdef REVIEW_HAVE_ASIO
// ---- mbmq/asio.h with a remote end: AsyncChannel::create takes it, async_call never completes --
// channel.h says "async_call is for local ends", but nothing refuses a remote Channel: the reply
// comes back through the queue with an id that matches no call (NetSource gives a Kind::Reply id
// 0; the request's buffer had RemoteEnd's next_id()), so the call waits out its deadline (a hang
// with Deadline::never()) though the server answered at once.
TEST(ReviewRemote, AsyncCallOnARemoteEndCompletesOrIsRefused) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  std::atomic<int> answered{0};
  std::thread srv([&] {
    auto m = p->server.receive(secs(10));
    if (m && m->kind == Kind::Request && MsgQueue::reply(std::move(*m))) ++answered;
  });
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto ch = AsyncChannel::create(*q, std::move(p->client), 5);
  if (!ch) {
    SUCCEED() << "refused: " << ch.error().message();
    EXPECT_EQ(ch.error().code, Errc::InvalidArgument);
    // "On error the channel is closed" (AsyncChannel::create), remote or not.
    EXPECT_FALSE(p->client.valid());  // NOLINT(bugprone-use-after-move): create() closes it
    p->server.close();
    srv.join();
    return;
  }
  auto b = ch->buffer(16);
  ASSERT_TRUE(b) << b.error().message();
  std::optional<Status> r;
  ch->async_call(*b, Deadline::after(3s), [&](Status s) { r = std::move(s); });
  for (Deadline d = secs(8); !d.expired() && !r;) io.run_for(std::chrono::milliseconds(20));
  srv.join();
  ASSERT_TRUE(r) << "async_call did not complete";
  EXPECT_TRUE(*r) << "async_call on a remote end: " << r->error().message() << " (the server "
                  << (answered.load() ? "had answered" : "had not answered") << ")";
}
#endif

}  // namespace
}  // namespace mbmq
