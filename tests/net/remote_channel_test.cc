// One mbmq::Channel type for local and remote ends (#19; docs/design/net-channel.md): with
// mbmq::net linked, mbmq::connect("ucx://...") returns an mbmq::Channel, a redirected
// net::Listener delivers its connections as Message::channel, and the code written for local
// channels (buffer, call with the reply in the buffer, send, send_request, receive,
// receive_batch, redirect, MsgQueue::adopt/reply) serves them unchanged. What only shared memory
// can do is refused with InvalidArgument naming why.
#include <sys/socket.h>

#include <chrono>
#include <cstring>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/mbmq.h"
#include "mbmq/net.h"
#include "net/net_pair.h"
#include "os/fd.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::secs;
using test::url;

using test::remote_pair;
using test::RemotePair;

// Serves `ch` on a thread: every request's bytes + 1, answered in place with MsgQueue::reply;
// one-way messages counted. The same code as for a local end.
class Server {
 public:
  explicit Server(Channel& ch) : ch_(ch), t_([this] { run(); }) {}
  ~Server() {
    stop_.store(true);
    t_.join();
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  std::atomic<int> requests{0}, oneway{0}, ends{0}, not_remote{0};

 private:
  void run() {
    while (!stop_.load()) {
      auto m = ch_.receive(Deadline::after(20ms));
      if (!m) continue;
      if (m->kind == Kind::PeerClosed) {
        ++ends;
        return;
      }
      if (m->kind == Kind::Message) ++oneway;
      if (m->kind != Kind::Request) continue;
      ++requests;
      for (std::byte& b : m->buffer.data()) b = static_cast<std::byte>(std::to_integer<int>(b) + 1);
      if (!MsgQueue::reply(std::move(*m))) ++not_remote;
    }
  }
  Channel& ch_;
  std::atomic<bool> stop_{false};
  std::thread t_;
};

bool call_plus_one(Channel& ch, std::size_t size, char c) {
  auto b = ch.buffer(size);
  if (!b) {
    ADD_FAILURE() << "buffer: " << b.error().message();
    return false;
  }
  if (size != 0) std::memset(b->data().data(), c, size);
  Status s = ch.call(*b, secs(10));
  if (!s) {
    ADD_FAILURE() << "call of " << size << " bytes: " << s.error().message();
    return false;
  }
  if (!b->valid() || b->size() != size) return false;
  for (std::byte x : b->data())
    if (x != static_cast<std::byte>(c + 1)) return false;
  return true;
}

TEST(RemoteChannel, ConnectWithAUcxUrlReturnsAChannelWhoseCallsComeBackInTheBuffer) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  EXPECT_TRUE(p->client.is_remote());
  EXPECT_TRUE(p->server.is_remote());
  EXPECT_TRUE(p->client.valid());
  Server server(p->server);
  for (std::size_t size :
       {std::size_t{0}, std::size_t{1}, std::size_t{64}, std::size_t{4096}, std::size_t{1} << 20})
    EXPECT_TRUE(call_plus_one(p->client, size, 'a')) << size;
  // One buffer, many calls, as a local client reuses its slot; it may grow (Buffer::resize).
  auto b = p->client.buffer(16);
  ASSERT_TRUE(b);
  for (int i = 0; i < 100; ++i) {
    ASSERT_TRUE(b->resize(static_cast<std::size_t>(16 + i * 100)));
    std::memset(b->data().data(), i, b->size());
    ASSERT_TRUE(p->client.call(*b, secs(10)));
    ASSERT_EQ(b->size(), static_cast<std::size_t>(16 + i * 100));
    EXPECT_EQ(b->data()[0], static_cast<std::byte>(i + 1));
  }
  EXPECT_EQ(server.requests.load(), 105);
  EXPECT_EQ(server.not_remote.load(), 0);
}

TEST(RemoteChannel, OneWayBatchesAndRepliesToSendRequestTakeTheLocalPaths) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  // One-way: send_batch() of buffers() from the client, receive_batch() on the server, in order.
  constexpr std::uint32_t kN = 3000;
  std::thread producer([&] {
    std::vector<Buffer> bufs(16);
    std::uint32_t next = 0;
    while (next < kN) {
      auto n = p->client.buffers(64, std::span(bufs).first(std::min<std::size_t>(16, kN - next)),
                                 secs(10));
      ASSERT_TRUE(n) << n.error().message();
      for (std::size_t i = 0; i < *n; ++i) {
        const std::uint32_t v = next + static_cast<std::uint32_t>(i);
        std::memcpy(bufs[i].data().data(), &v, sizeof v);
      }
      std::size_t sent = 0;
      while (sent < *n) {
        auto s = p->client.send_batch(std::span(bufs).subspan(sent, *n - sent));
        if (!s) {
          ASSERT_EQ(s.error().code, Errc::WouldBlock) << s.error().message();
          os::sleep_ns(100'000);
          continue;
        }
        sent += *s;
      }
      next += static_cast<std::uint32_t>(*n);
    }
  });
  std::vector<Message> batch(32);
  std::uint32_t got = 0;
  while (got < kN) {
    auto n = p->server.receive_batch(batch, secs(10));
    ASSERT_TRUE(n) << n.error().message();
    ASSERT_GE(*n, 1u);
    for (std::size_t i = 0; i < *n; ++i) {
      ASSERT_EQ(batch[i].kind, Kind::Message);
      std::uint32_t v = 0;
      ASSERT_EQ(batch[i].buffer.size(), 64u);
      std::memcpy(&v, batch[i].buffer.data().data(), sizeof v);
      ASSERT_EQ(v, got) << "out of order";
      ++got;
    }
  }
  producer.join();
  // send_request: the reply comes through receive() as Kind::Reply, its bytes in the buffer.
  std::thread answer([&] {
    for (int i = 0; i < 3; ++i) {
      auto m = p->server.receive(secs(10));
      ASSERT_TRUE(m) << m.error().message();
      ASSERT_EQ(m->kind, Kind::Request);
      m->buffer.data()[0] = static_cast<std::byte>(0x40 + i);
      ASSERT_TRUE(MsgQueue::reply(std::move(*m)));
    }
  });
  for (int i = 0; i < 3; ++i) {
    auto b = p->client.buffer(8);
    ASSERT_TRUE(b);
    ASSERT_TRUE(p->client.send_request(std::move(*b)));
    EXPECT_FALSE(b->valid()) << "a sent buffer is the channel's";
  }
  for (int i = 0; i < 3; ++i) {
    auto m = p->client.receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Reply);
    EXPECT_EQ(m->buffer.data()[0], static_cast<std::byte>(0x40 + i));
  }
  answer.join();
}

// Buffer::id() (buffer.h): "the same for a buffer this side owns from send_request() to its
// Kind::Reply", by which mbmq/asio.h matches replies; a remote end's reply is a new vector, so the
// id travels as a tag. The server answers out of order and drops one (NoReply): each reply, by
// receive() and through a queue, carries its own request's id.
TEST(RemoteChannel, ARepliesIdIsItsSendRequestsInAnyOrderAndForNoReply) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  for (const bool queued : {false, true}) {
    SCOPED_TRACE(queued ? "through a MsgQueue" : "by receive()");
    auto p = remote_pair();
    ASSERT_TRUE(p);
    std::optional<MsgQueue> q;
    if (queued) {
      auto made = MsgQueue::create();
      ASSERT_TRUE(made);
      q.emplace(std::move(*made));
      ASSERT_TRUE(p->client.redirect(*q, 9));
    }
    constexpr int kN = 6;
    std::thread answer([&] {
      std::vector<Message> held;
      for (int i = 0; i < kN; ++i) {
        auto m = p->server.receive(secs(10));
        ASSERT_TRUE(m) << m.error().message();
        ASSERT_EQ(m->kind, Kind::Request);
        held.push_back(std::move(*m));
      }
      for (int i = kN - 1; i >= 0; --i) {  // last first; request 2 dropped: NoReply
        if (i == 2) {
          held[static_cast<std::size_t>(i)] = Message{};
          continue;
        }
        ASSERT_TRUE(MsgQueue::reply(std::move(held[static_cast<std::size_t>(i)])));
      }
    });
    std::vector<std::uint32_t> ids;
    for (int i = 0; i < kN; ++i) {
      auto b = p->client.buffer(1 + static_cast<std::size_t>(i) * 3000);  // large ones too
      ASSERT_TRUE(b);
      b->data()[0] = static_cast<std::byte>(i);
      ids.push_back(b->id());
      ASSERT_TRUE(p->client.send_request(std::move(*b)));
    }
    std::set<std::uint32_t> distinct(ids.begin(), ids.end());
    ASSERT_EQ(distinct.size(), ids.size()) << "buffers in flight at once have different ids";
    int replies = 0, no_reply = 0;
    for (int i = 0; i < kN; ++i) {
      auto m = queued ? q->wait(secs(10)) : p->client.receive(secs(10));
      ASSERT_TRUE(m) << m.error().message();
      ASSERT_EQ(m->kind, Kind::Reply);
      ASSERT_TRUE(m->buffer.valid());
      if (m->error == Errc::NoReply) {
        ++no_reply;
        EXPECT_EQ(m->buffer.id(), ids[2]) << "the dropped request's";
        continue;
      }
      ++replies;
      const auto which = std::to_integer<std::size_t>(m->buffer.data()[0]);
      ASSERT_LT(which, ids.size());
      EXPECT_EQ(m->buffer.id(), ids[which]) << "the reply to request " << which;
      EXPECT_EQ(m->buffer.size(), 1 + which * 3000);
    }
    EXPECT_EQ(replies, kN - 1);
    EXPECT_EQ(no_reply, 1);
    answer.join();
  }
}

// The "one server loop serves local and remote clients": a local Listener and a
// net::Listener redirected to one queue; every connection, local or remote, is Message::channel,
// adopted by the same line; every request answered by the same MsgQueue::reply.
TEST(RemoteChannel, OneLoopAdoptsLocalAndRemoteConnectionsAlike) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto nl = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(nl) << nl.error().message();
  const std::string name = "test-remote-one-loop-" + std::to_string(os::current_pid());
  auto ll = Listener::create(name);
  ASSERT_TRUE(ll) << ll.error().message();
  ASSERT_TRUE(nl->redirect(*q, 1));
  ASSERT_TRUE(ll->redirect(*q, 1));
  std::atomic<bool> stop{false};
  std::atomic<int> remote{0}, local{0}, requests{0}, failures{0};
  std::thread loop([&] {
    std::uint64_t next = 100;
    while (!stop.load()) {
      auto m = q->wait(Deadline::after(20ms));
      if (!m) continue;
      if (m->kind == Kind::Connection) {
        ++(m->channel.is_remote() ? remote : local);
        if (!q->adopt(std::move(m->channel), next++)) ++failures;
      } else if (m->kind == Kind::Request) {
        ++requests;
        for (std::byte& b : m->buffer.data())
          b = static_cast<std::byte>(std::to_integer<int>(b) + 1);
        if (!MsgQueue::reply(std::move(*m))) ++failures;
      }
    }
  });
  const std::string remote_url = url(nl->port());
  std::vector<std::thread> clients;
  for (int i = 0; i < 4; ++i)
    clients.emplace_back([&, i] {
      // The same client code for either kind of name.
      auto ch =
          connect(i % 2 == 0 ? std::string_view(remote_url) : std::string_view(name), secs(10));
      ASSERT_TRUE(ch) << ch.error().message();
      EXPECT_EQ(ch->is_remote(), i % 2 == 0);
      for (int k = 0; k < 50; ++k)
        EXPECT_TRUE(call_plus_one(*ch, static_cast<std::size_t>(1 + k * 37), static_cast<char>(k)));
    });
  for (auto& t : clients) t.join();
  stop.store(true);
  loop.join();
  EXPECT_EQ(remote.load(), 2);
  EXPECT_EQ(local.load(), 2);
  EXPECT_EQ(requests.load(), 200);
  EXPECT_EQ(failures.load(), 0);
}

TEST(RemoteChannel, WhatOnlySharedMemoryCanDoIsInvalidArgumentSayingWhy) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  Channel& ch = p->client;
  auto says = [](const Error& e, const char* word) {
    return e.code == Errc::InvalidArgument && std::string(e.op).find(word) != std::string::npos;
  };
  Reservation r;
  auto rs = ch.reserve(r, 64, 4, secs(1));
  ASSERT_FALSE(rs);
  EXPECT_TRUE(says(rs.error(), "remote")) << rs.error().message();
  InPlace in;
  auto ip = ch.receive_in_place(in, secs(1));
  ASSERT_TRUE(ip) << ip.error().message();
  EXPECT_EQ(*ip, 0u) << "a remote end reads nothing in place: 0, take it with receive()";
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  os::UniqueFd a(sv[0]), b(sv[1]);
  auto so = ch.send_over(a.get());
  ASSERT_FALSE(so);
  EXPECT_TRUE(says(so.error(), "remote")) << so.error().message();
  EXPECT_TRUE(ch.valid()) << "a refused send_over left the end as it was";
  // A remote end as a handle in a local message: refused, the end kept.
  auto lp = Channel::pair();
  ASSERT_TRUE(lp);
  auto lb = lp->first.buffer(8);
  ASSERT_TRUE(lb);
  auto at = lb->attach(std::move(ch));
  ASSERT_FALSE(at);
  EXPECT_TRUE(says(at.error(), "remote")) << at.error().message();
  EXPECT_TRUE(ch.valid());  // NOLINT(bugprone-use-after-move): refused, so not moved from
  // Handles in a remote buffer: cannot cross hosts (the fd is closed, as locally).
  auto rb = ch.buffer(8);
  ASSERT_TRUE(rb);
  auto fd = os::dup_fd(0);
  ASSERT_TRUE(fd);
  auto af = rb->attach_fd(fd->release());
  ASSERT_FALSE(af);
  EXPECT_TRUE(says(af.error(), "hosts")) << af.error().message();
  // Buffers of the other kind of end: refused, and left usable.
  auto cl = ch.call(*lb, secs(1));
  ASSERT_FALSE(cl);
  EXPECT_EQ(cl.error().code, Errc::InvalidArgument);
  EXPECT_TRUE(lb->valid());
  auto cr = lp->first.call(*rb, secs(1));
  ASSERT_FALSE(cr);
  EXPECT_EQ(cr.error().code, Errc::InvalidArgument);
  EXPECT_TRUE(rb->valid());
  // A ServerPolicy check cannot be made on a remote listener: refused, not ignored.
  ConnectOptions co;
  co.server.expected_uids = {0};
  auto cc = connect(url(p->l.port()), secs(5), co);
  ASSERT_FALSE(cc);
  EXPECT_TRUE(says(cc.error(), "ServerPolicy")) << cc.error().message();
  // A malformed URL: net's own InvalidArgument.
  auto bad = connect("ucx://nohost/svc", secs(1));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::InvalidArgument);
}

TEST(RemoteChannel, APeerThatClosesIsPeerClosedAndADeadlineIsTimedOut) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  auto p = remote_pair();
  ASSERT_TRUE(p);
  // Nobody answers: TimedOut at the deadline, the buffer given up (invalid, never dangling).
  auto b = p->client.buffer(64);
  ASSERT_TRUE(b);
  const std::int64_t t0 = monotonic_ns();
  auto s = p->client.call(*b, Deadline::after(150ms));
  const std::int64_t took = monotonic_ns() - t0;
  ASSERT_FALSE(s);
  EXPECT_EQ(s.error().code, Errc::TimedOut);
  EXPECT_GE(took, 140'000'000);
  // Given up (invalid), or, once UCX had sent its bytes, still the caller's: never dangling.
  if (b->valid()) {
    ASSERT_TRUE(b->resize(128));
    std::memset(b->data().data(), 1, b->size());
  }
  // The server takes that request and drops it (NoReply to nobody: the caller gave up), then
  // closes: the client's next call is PeerClosed, its buffer still usable.
  auto m = p->server.receive(secs(5));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::Request);
  *m = Message{};
  auto b2 = p->client.buffer(64);
  ASSERT_TRUE(b2);
  p->server.close();
  EXPECT_FALSE(p->server.valid());
  Status s2;
  for (Deadline d = secs(10); !d.expired();) {
    s2 = p->client.call(*b2, secs(5));
    if (!s2) break;
  }
  ASSERT_FALSE(s2);
  EXPECT_EQ(s2.error().code, Errc::PeerClosed) << s2.error().message();
  EXPECT_TRUE(b2->valid()) << "PeerClosed, the automatic reply, leaves the buffer usable";
  auto end = p->client.receive(secs(5));
  ASSERT_TRUE(end) << end.error().message();
  EXPECT_EQ(end->kind, Kind::PeerClosed);
}

// buffer(size, deadline) on a remote end waits for the peer's grant as a local one waits for a
// pool slot: a stream producer that takes its buffers so is paced, and never gets WouldBlock.
TEST(RemoteChannel, BufferWithADeadlineWaitsForTheGrantAndTimesOutWithout) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 60s);
  net::ListenOptions lo;
  lo.inbox_messages = 4;
  auto p = remote_pair(lo);
  ASSERT_TRUE(p);
  for (int i = 0; i < 4; ++i) {
    auto b = p->client.buffer(64, secs(5));
    ASSERT_TRUE(b) << b.error().message();
    ASSERT_TRUE(p->client.send(std::move(*b)));
  }
  auto none = p->client.buffer(64, Deadline::after(200ms));
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::TimedOut) << none.error().message();
  auto b = p->client.buffer(64);  // at once, no wait: a buffer, but its send finds no credit
  ASSERT_TRUE(b);
  auto wb = p->client.send(std::move(*b));
  ASSERT_FALSE(wb);
  EXPECT_EQ(wb.error().code, Errc::WouldBlock);
  EXPECT_TRUE(b->valid()) << "WouldBlock: nothing sent, the buffer still the caller's";
  std::thread consumer([&] {
    for (int i = 0; i < 4 + 200; ++i) {
      auto m = p->server.receive(secs(10));
      ASSERT_TRUE(m) << m.error().message();
    }
  });
  b->reset();
  // Paced by buffer(size, deadline): each send finds credit (one producer thread), none fails.
  for (int i = 0; i < 200; ++i) {
    auto nb = p->client.buffer(64, secs(10));
    ASSERT_TRUE(nb) << i << ": " << nb.error().message();
    Status s = p->client.send(std::move(*nb));
    ASSERT_TRUE(s) << i << ": " << s.error().message();
  }
  consumer.join();
}

// Nothing leaks across connect/close of remote Channels: fds and threads come back to where they
// were (the worker and its socket go with each channel).
TEST(RemoteChannel, ConnectAndCloseCyclesLeakNoFdsOrThreads) {
  ::setenv("UCX_TLS", "tcp", 1);
  test::Watchdog dog("the test", 120s);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, 1));
  std::atomic<bool> stop{false};
  std::thread loop([&] {
    std::uint64_t next = 100;
    while (!stop.load()) {
      auto m = q->wait(Deadline::after(20ms));
      if (!m) continue;
      if (m->kind == Kind::Connection) (void)q->adopt(std::move(m->channel), next++);
      if (m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
    }
  });
  const std::string u = url(l->port());
  auto cycle = [&] {
    auto ch = connect(u, secs(10));
    ASSERT_TRUE(ch) << ch.error().message();
    auto b = ch->buffer(64);
    ASSERT_TRUE(b);
    ASSERT_TRUE(ch->call(*b, secs(10)));
  };
  for (int i = 0; i < 20; ++i) cycle();  // warm-up: UCX's context, the keeper, the pump
  os::sleep_ns(300'000'000);
  const std::size_t fds0 = os::open_fd_count();
  const int tasks0 = test::task_count();
  const int kCycles = test::kSanitized ? 100 : 300;
  for (int i = 0; i < kCycles; ++i) cycle();
  // Closes the keeper finishes (K4) are let go within its ticks.
  bool settled = false;
  for (Deadline d = secs(10); !d.expired() && !settled; os::sleep_ns(50'000'000))
    settled =
        os::open_fd_count() <= fds0 && test::task_count() <= tasks0 && q->channel_count() == 0;
  stop.store(true);
  loop.join();
  EXPECT_TRUE(settled) << "fds " << fds0 << " -> " << os::open_fd_count() << ", threads " << tasks0
                       << " -> " << test::task_count() << ", adopted channels left "
                       << q->channel_count();
}

}  // namespace
}  // namespace mbmq
