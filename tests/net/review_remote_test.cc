// Hostile review of #19 (one mbmq::Channel type for local and remote ends, c06555a..b79602e).
// Each test is a suspicion; a failing (or hanging) test is a confirmed finding.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <optional>
#include <set>
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
#include "net/core.h"
#include "net/net_pair.h"
#include "net/ucx.h"
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

// ---- send_batch(): a send UCX fails leaves that buffer the caller's ----
// channel.h: send_batch's unsent rest are "untouched, still the caller's". A send that
// ucp_am_send_nbx refused was counted unsent but its buffer came back invalid (net moved the bytes
// into its send op and dropped them). UCX is made to refuse one send here by swapping its entry in
// the loaded function table (a plain global: no other thread sends while it is swapped but this
// process's own ends, which the fake passes through).
namespace fake_send {
decltype(&::ucp_am_send_nbx) real = nullptr;
std::atomic<int> fail_marked{0};  // how many sends whose payload starts with kMark to refuse
constexpr std::byte kMark{0xE7};
ucs_status_ptr_t send(ucp_ep_h ep, unsigned id, const void* header, size_t header_length,
                      const void* buffer, size_t count, const ucp_request_param_t* param) {
  if (count > 0 && *static_cast<const std::byte*>(buffer) == kMark && fail_marked.fetch_sub(1) > 0)
    return UCS_STATUS_PTR(UCS_ERR_NO_RESOURCE);
  return real(ep, id, header, header_length, buffer, count, param);
}
}  // namespace fake_send

TEST(ReviewRemote, ASendThatUcxRefusesInABatchLeavesItsBufferTheCallers) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  std::vector<Buffer> bufs(3);
  auto n = p->client.buffers(4096, bufs, secs(10));
  ASSERT_TRUE(n);
  ASSERT_EQ(*n, 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    std::memset(bufs[i].data().data(), static_cast<int>(i), bufs[i].size());
  }
  bufs[1].data()[0] = fake_send::kMark;                              // the second send is refused
  auto* table = const_cast<net::detail::Ucx*>(*net::detail::ucx());  // NOLINT: a test's fake
  fake_send::real = table->ucp_am_send_nbx;
  fake_send::fail_marked.store(1);
  table->ucp_am_send_nbx = fake_send::send;
  auto sent = p->client.send_batch(bufs);
  table->ucp_am_send_nbx = fake_send::real;
  ASSERT_TRUE(sent) << sent.error().message();
  EXPECT_EQ(*sent, 1u) << "the first sent, the refused one stops the batch";
  EXPECT_FALSE(bufs[0].valid()) << "sent: moved from";
  ASSERT_TRUE(bufs[1].valid()) << "unsent, refused by UCX: the contract says untouched";
  EXPECT_EQ(bufs[1].size(), 4096u);
  EXPECT_EQ(bufs[1].data()[0], fake_send::kMark);
  EXPECT_EQ(bufs[1].data()[4095], std::byte{1}) << "its bytes kept";
  ASSERT_TRUE(bufs[2].valid());
  EXPECT_EQ(bufs[2].data()[4095], std::byte{2});
  // The channel failed (net treats a refused send as a broken endpoint): the next send says so.
  auto again = p->client.send(std::move(bufs[2]));
  EXPECT_FALSE(again);
}

#ifdef REVIEW_HAVE_ASIO
// ---- mbmq/asio.h with a remote end: async_call matches each reply to its call ----
// First found as: AsyncChannel::create took a remote end and async_call never completed (the
// reply's Buffer::id() was 0, matching no call); then refused at create(); now a remote end's
// replies carry their request's id (net.h, Buffer::tag_) and async_call works on it. Several calls
// in flight, answered in reverse order, one dropped (NoReply): each completes with its own reply.
TEST(ReviewRemote, AsyncCallsOnARemoteEndCompleteEachWithItsOwnReply) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  constexpr int kN = 5;
  std::thread srv([&] {
    std::vector<Message> held;
    for (int i = 0; i < kN; ++i) {
      auto m = p->server.receive(secs(10));
      ASSERT_TRUE(m) << m.error().message();
      ASSERT_EQ(m->kind, Kind::Request);
      held.push_back(std::move(*m));
    }
    for (int i = kN - 1; i >= 0; --i) {
      auto& m = held[static_cast<std::size_t>(i)];
      if (std::to_integer<int>(m.buffer.data()[0]) == 1) {
        m = Message{};  // dropped: NoReply
        continue;
      }
      for (std::byte& b : m.buffer.data())
        b = static_cast<std::byte>(std::to_integer<int>(b) + 100);
      ASSERT_TRUE(MsgQueue::reply(std::move(m)));
    }
  });
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto ch = AsyncChannel::create(*q, std::move(p->client), 5);
  ASSERT_TRUE(ch) << ch.error().message();
  std::vector<Buffer> bufs(kN);
  std::vector<std::optional<Status>> r(kN);
  for (int i = 0; i < kN; ++i) {
    auto b = ch->buffer(8 + static_cast<std::size_t>(i) * 10000);
    ASSERT_TRUE(b) << b.error().message();
    bufs[static_cast<std::size_t>(i)] = std::move(*b);
    std::memset(bufs[static_cast<std::size_t>(i)].data().data(), i,
                bufs[static_cast<std::size_t>(i)].size());
    ch->async_call(bufs[static_cast<std::size_t>(i)], Deadline::after(10s),
                   [&r, i](Status s) { r[static_cast<std::size_t>(i)] = std::move(s); });
  }
  auto all = [&] {
    for (auto& x : r)
      if (!x) return false;
    return true;
  };
  for (Deadline d = secs(15); !d.expired() && !all();) io.run_for(std::chrono::milliseconds(20));
  srv.join();
  for (int i = 0; i < kN; ++i) {
    const auto k = static_cast<std::size_t>(i);
    ASSERT_TRUE(r[k]) << "async_call " << i << " did not complete";
    if (i == 1) {
      ASSERT_FALSE(*r[k]);
      EXPECT_EQ(r[k]->error().code, Errc::NoReply) << r[k]->error().message();
      continue;
    }
    ASSERT_TRUE(*r[k]) << "async_call " << i << ": " << r[k]->error().message();
    ASSERT_TRUE(bufs[k].valid());
    ASSERT_EQ(bufs[k].size(), 8 + k * 10000);
    EXPECT_EQ(std::to_integer<int>(bufs[k].data()[0]), i + 100) << "call " << i << "'s reply";
    EXPECT_EQ(std::to_integer<int>(bufs[k].data()[bufs[k].size() - 1]), i + 100);
  }
}
#endif

// ---- Second review (eleventh session) of the reply ids: buffers of one end in flight at once ----
// Found: a received request's id (the peer's wire sequence) met our own numbering, and every
// one-way message a queue delivered had id 0. Fixed: one process-wide counter, requests' ids with
// the top bit set (net/remote.h, next_buffer_id).
// buffer.h, Buffer::id(): "different for any two buffers of one end in flight at once".
// On a remote end a received request's id is the PEER's wire sequence (1, 2, ...) while this
// end's own buffers, and now the replies to its send_request()s (their tag), are numbered by
// RemoteEnd::next_id() (1, 2, ...): two counters in one id space. The client's first
// send_request() (buffer id 1) gets its reply with id 1 while the server's first request to the
// client (wire seq 1) arrives with id 1 too: two buffers of one end in flight with one id.
TEST(ReviewS11, AReplyAndAReceivedRequestInFlightOnOneRemoteEndHaveDifferentIds) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  std::atomic<bool> server_ok{false};
  std::thread srv([&] {
    auto sb = p->server.buffer(8);
    ASSERT_TRUE(sb) << sb.error().message();
    std::memset(sb->data().data(), 0x55, 8);
    ASSERT_TRUE(p->server.send_request(std::move(*sb)));  // to the client: wire seq 1
    // The client's request: answered. Then the client's answer to ours.
    bool answered = false, got_reply = false;
    for (Deadline d = secs(10); !d.expired() && !(answered && got_reply);) {
      auto m = p->server.receive(Deadline::after(200ms));
      if (!m) continue;
      if (m->kind == Kind::Request) {
        ASSERT_TRUE(MsgQueue::reply(std::move(*m)));
        answered = true;
      } else if (m->kind == Kind::Reply) {
        got_reply = true;
      }
    }
    server_ok = answered && got_reply;
  });
  auto b = p->client.buffer(8);
  ASSERT_TRUE(b) << b.error().message();
  const std::uint32_t mine = b->id();
  std::memset(b->data().data(), 0x11, 8);
  ASSERT_TRUE(p->client.send_request(std::move(*b)));
  std::optional<Message> request, reply;
  for (Deadline d = secs(10); !d.expired() && !(request && reply);) {
    auto m = p->client.receive(Deadline::after(200ms));
    if (!m) continue;
    if (m->kind == Kind::Request) request.emplace(std::move(*m));
    if (m->kind == Kind::Reply) reply.emplace(std::move(*m));
  }
  ASSERT_TRUE(request) << "the server's request did not come";
  ASSERT_TRUE(reply) << "the reply did not come";
  EXPECT_EQ(reply->buffer.id(), mine) << "the reply carries its request's id (the change)";
  // Both are buffers of the client's end, held (in flight) at once.
  EXPECT_NE(request->buffer.id(), reply->buffer.id())
      << "a received request (id = the peer's wire seq) and a reply (id = our next_id()) share "
         "Buffer::id() "
      << reply->buffer.id() << " on one end";
  ASSERT_TRUE(MsgQueue::reply(std::move(*request)));
  srv.join();
  EXPECT_TRUE(server_ok.load());
}

// The same contract through a queue: every one-way message NetSource delivers has
// Buffer::id() == Queued::delivered_id() == buffer.tag_ == 0 (redirect.cc), so two held at once
// share id 0. A remote end (unlike a local one) accepts a received buffer for a send (net's
// own_buffer: channel_ == id_), so they can be sent as requests: see the asio test below.
TEST(ReviewS11, OneWayMessagesARemoteEndsQueueDeliversHaveDifferentIds) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(p->client.redirect(*q, 9));
  std::thread srv([&] {
    for (int i = 0; i < 2; ++i) {
      auto sb = p->server.buffer(8);
      ASSERT_TRUE(sb) << sb.error().message();
      std::memset(sb->data().data(), i, 8);
      ASSERT_TRUE(p->server.send(std::move(*sb)));
    }
    (void)p->server.receive(Deadline::after(1500ms));  // progress the server's worker a while
  });
  std::vector<Message> got;
  for (Deadline d = secs(10); !d.expired() && got.size() < 2;) {
    auto m = q->wait(Deadline::after(200ms));
    if (m && m->kind == Kind::Message) got.push_back(std::move(*m));
  }
  srv.join();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_NE(got[0].buffer.id(), got[1].buffer.id())
      << "two received one-way messages held at once on one end share Buffer::id() "
      << got[0].buffer.id();
}

#ifdef REVIEW_HAVE_ASIO
// Consequence with AsyncChannel on a remote end (newly allowed): an echo-style client that
// async_calls the one-way messages it was sent (a remote end accepts received buffers for sends)
// gets InvalidArgument "buffer already in flight" for the second, because both have id 0. Each
// call should complete with its own reply.
TEST(ReviewS11, AsyncCallsOfTwoReceivedBuffersOnARemoteEndBothComplete) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  std::atomic<int> answered{0};
  std::thread srv([&] {
    for (int i = 0; i < 2; ++i) {
      auto sb = p->server.buffer(8);
      ASSERT_TRUE(sb) << sb.error().message();
      std::memset(sb->data().data(), i, 8);
      ASSERT_TRUE(p->server.send(std::move(*sb)));
    }
    for (Deadline d = secs(8); !d.expired() && answered.load() < 2;) {
      auto m = p->server.receive(Deadline::after(200ms));
      if (m && m->kind == Kind::Request && MsgQueue::reply(std::move(*m))) ++answered;
    }
  });
  asio::io_context io;
  auto q = AsyncQueue::create(io.get_executor());
  ASSERT_TRUE(q);
  auto ch = AsyncChannel::create(*q, std::move(p->client), 5);
  ASSERT_TRUE(ch) << ch.error().message();
  std::vector<Buffer> bufs;
  for (int i = 0; i < 2; ++i) {
    std::optional<Result<Message>> r;
    q->async_wait(secs(10), [&](Result<Message> m) { r = std::move(m); });
    for (Deadline d = secs(10); !d.expired() && !r;) io.run_for(20ms);
    ASSERT_TRUE(r && *r) << "one-way message " << i << " did not come";
    ASSERT_EQ((*r)->kind, Kind::Message);
    bufs.push_back(std::move((*r)->buffer));
  }
  std::vector<std::optional<Status>> res(2);
  for (std::size_t i = 0; i < 2; ++i)
    ch->async_call(bufs[i], Deadline::after(8s), [&res, i](Status s) { res[i] = std::move(s); });
  for (Deadline d = secs(10); !d.expired() && !(res[0] && res[1]);) io.run_for(20ms);
  srv.join();
  for (std::size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(res[i]) << "async_call " << i << " did not complete";
    EXPECT_TRUE(*res[i]) << "async_call " << i << ": " << res[i]->error().message()
                         << " (ids: " << bufs[0].id() << ", " << bufs[1].id() << ")";
  }
}
#endif

}  // namespace
}  // namespace mbmq
