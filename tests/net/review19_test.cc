// Hostile review of mbmq::net (issue #19, branch rev-b): one reproducer per suspicion. Client and
// server live in this one process (two UCX workers of one context, over 127.0.0.1); a "raw" client
// speaks UCX directly to send what mbmq::net never would.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <netinet/in.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_util.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using net::detail::kAmId;
using net::detail::kMagic;
using net::detail::kVersion;
using net::detail::WireHeader;
using net::detail::WireKind;
using test::secs;

std::string url(std::uint32_t port, const char* service = "svc") {
  return "ucx://127.0.0.1:" + std::to_string(port) + "/" + service;
}

// A listener and one client of it, connected in this process (connect() on a thread while the
// listener accepts: each side's worker is progressed by its own caller).
struct Pair {
  net::Listener l;
  net::Channel server, client;
};

std::optional<Pair> make_pair(const net::ListenOptions& lo = {},
                              const net::ConnectOptions& co = {}) {
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  EXPECT_TRUE(l) << l.error().message();
  if (!l) return std::nullopt;
  std::optional<Result<net::Channel>> c;
  std::thread t([&] { c.emplace(net::connect(url(l->port()), secs(10), co)); });
  auto s = l->accept(secs(10));
  t.join();
  EXPECT_TRUE(s) << s.error().message();
  EXPECT_TRUE(*c) << (*c).error().message();
  if (!s || !*c) return std::nullopt;
  return Pair{std::move(*l), std::move(*s), std::move(**c)};
}

// Bytes the C heap holds now (arena + mmapped chunks).
std::int64_t heap_bytes() {
  const struct mallinfo2 mi = ::mallinfo2();
  return static_cast<std::int64_t>(mi.uordblks + mi.hblkhd);
}

// A client speaking raw UCX (its own worker of this process's context).
struct RawClient {
  const net::detail::Ucx* u = nullptr;
  std::shared_ptr<net::detail::WorkerCore> w;
  ucp_ep_h ep = nullptr;
  std::atomic<bool> failed{false};

  bool connect(std::uint32_t port) {
    auto x = net::detail::ucx();
    if (!x) return false;
    u = *x;
    auto wk = net::detail::WorkerCore::make(u);
    if (!wk) return false;
    w = *wk;
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(static_cast<std::uint16_t>(port));
    (void)inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    os::LockGuard lock(w->mu);
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR |
                   UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
    p.sockaddr.addr = reinterpret_cast<const sockaddr*>(&sa);
    p.sockaddr.addrlen = sizeof sa;
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    p.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t) {
      static_cast<RawClient*>(arg)->failed = true;
    };
    p.err_handler.arg = this;
    return u->ucp_ep_create(w->worker, &p, &ep) == UCS_OK;
  }
  // Starts an AM send; returns the request (nullptr: done at once).
  void* send(const WireHeader& h, const void* data, std::size_t n, std::uint32_t flags = 0) {
    os::LockGuard lock(w->mu);
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_AM_SEND_FLAG_REPLY | flags;
    ucs_status_ptr_t r = u->ucp_am_send_nbx(ep, kAmId, &h, sizeof h, data, n, &p);
    return UCS_PTR_IS_PTR(r) ? r : nullptr;
  }
  void progress_for(std::chrono::milliseconds d) {
    const std::int64_t until = monotonic_ns() + std::chrono::nanoseconds(d).count();
    while (monotonic_ns() < until) {
      {
        os::LockGuard lock(w->mu);
        (void)u->ucp_worker_progress(w->worker);
      }
      os::sleep_ns(200'000);
    }
  }
  // Waits (progressing) for request r, then frees it.
  void finish(void* r) {
    if (r == nullptr) return;
    const std::int64_t until = monotonic_ns() + 3'000'000'000;
    for (;;) {
      os::LockGuard lock(w->mu);
      if (u->ucp_request_check_status(r) != UCS_INPROGRESS || monotonic_ns() > until) break;
      (void)u->ucp_worker_progress(w->worker);
    }
    os::LockGuard lock(w->mu);
    u->ucp_request_free(r);
  }
  ~RawClient() {
    if (ep == nullptr) return;
    os::LockGuard lock(w->mu);
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t r = u->ucp_ep_close_nbx(ep, &p);
    if (UCS_PTR_IS_PTR(r)) u->ucp_request_free(r);
  }
};

// ---------------------------------------------------------------------------------------------
// F1. peer_timeout is not agreed between the ends: each end sends heartbeats after ITS OWN
// peer_timeout / 4 of silence, but declares the peer dead after ITS OWN peer_timeout. A server
// with peer_timeout 1 s and a client with the default 10 s: the idle, healthy client says
// nothing for 2.5 s, and the server ends the channel with PeerClosed after 1 s.
TEST(Review19, IdleHealthyChannelSurvivesPeersWithDifferentPeerTimeouts) {
  net::ListenOptions lo;
  lo.peer_timeout = 1000ms;
  auto p = make_pair(lo, {});  // client: kDefaultPeerTimeout (10 s)
  ASSERT_TRUE(p);
  std::this_thread::sleep_for(2200ms);  // idle; the keeper thread progresses both workers
  auto m = p->server.receive(Deadline::immediate());
  if (m) {
    EXPECT_NE(m->kind, Kind::PeerClosed)
        << "false positive: a live, idle client declared dead: " << m->why;
  } else {
    EXPECT_EQ(m.error().code, Errc::TimedOut);
  }
  // And the channel still works both ways.
  std::thread srv([&] {
    auto r = p->server.receive(secs(5));
    if (r && r->kind == Kind::Request) (void)net::Channel::reply(std::move(*r));
  });
  auto b = p->client.buffer(8);
  ASSERT_TRUE(b);
  auto st = p->client.call(*b, secs(5));
  srv.join();
  EXPECT_TRUE(st) << st.error().message();
}

// ---------------------------------------------------------------------------------------------
// F2. A pending connection (no hello) is expired only inside Listener::accept(). A server that
// accepted its clients and no longer calls accept() keeps every silent connection (a UCX endpoint
// and a socket each) for ever: "dropped within handshake_timeout" does not hold.
TEST(Review19, SilentHandshakeIsDroppedWithoutAnAcceptCall) {
  net::ListenOptions lo;
  lo.handshake_timeout = 200ms;
  lo.peer_timeout = 2000ms;  // the accepted channel is watched: the keeper progresses the worker
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  RawClient raw;
  ASSERT_TRUE(raw.connect(p->l.port()));
  // No hello. Nobody calls accept(); the keeper thread progresses the listener's worker.
  const Deadline d = Deadline::after(2s);
  while (!raw.failed && !d.expired()) raw.progress_for(20ms);
  EXPECT_GE(p->l.stats().failed, 1u) << "a connection with no hello is still pending after 2 s "
                                        "(handshake_timeout 200 ms)";
  EXPECT_TRUE(raw.failed.load()) << "the silent client's endpoint was never closed";
}

// ---------------------------------------------------------------------------------------------
// F3. No flow control: one-way messages are taken off the wire by the keeper thread (or any
// progress) and queued in the channel's inbox without bound. A client sending 96 MiB of 1 MiB
// messages to a server that does not receive grows the server's heap by 96 MiB (a local channel
// has a bounded ring: send waits or fails). Not fixed (needs credits or a bounded inbox; README,
// Not done yet): kept as the reproducer, not run.
TEST(Review19, DISABLED_OneWayFloodDoesNotGrowTheReceiverWithoutBound) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  constexpr int kMessages = 96;
  constexpr std::size_t kSize = 1u << 20;
  const std::int64_t before = heap_bytes();
  std::int64_t peak = 0;
  int sent = 0;
  for (int i = 0; i < kMessages; ++i) {
    auto b = p->client.buffer(kSize);
    ASSERT_TRUE(b);
    if (!p->client.send(std::move(*b))) break;  // a bounded channel may refuse: fine
    ++sent;
    (void)p->client.receive(Deadline::immediate());  // progresses the client's worker
    (void)p->l.accept(Deadline::immediate());        // and the server's
    peak = std::max(peak, heap_bytes() - before);
  }
  const Deadline d = Deadline::after(2s);
  while (!d.expired()) {
    (void)p->client.receive(Deadline::immediate());
    (void)p->l.accept(Deadline::after(5ms));
    peak = std::max(peak, heap_bytes() - before);
  }
  std::printf("sent %d MiB one-way; heap grew by up to %.1f MiB\n", sent,
              static_cast<double>(peak) / (1 << 20));
  EXPECT_LT(peak, 32 << 20) << "the receiver queued every unread message: no bound per peer";
}

// ---------------------------------------------------------------------------------------------
// F4. A hello is 1-255 bytes (a service name), but the server accepts a hello payload up to
// max_message (64 MiB) and, for a rendezvous one, allocates it before the service name is looked
// at. A raw client that is not even on the right service makes the server allocate 16 MiB, and
// keeps it allocated by not progressing its side of the rendezvous.
void oversized_hello(std::uint32_t flags) {
  net::ListenOptions lo;
  lo.handshake_timeout = 5000ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_TRUE(l) << l.error().message();
  RawClient raw;
  ASSERT_TRUE(raw.connect(l->port()));
  std::vector<char> big(16u << 20, 'x');
  const std::int64_t before = heap_bytes();
  WireHeader hello{kMagic, kVersion, static_cast<std::uint8_t>(WireKind::Hello), 0, 0, 1u << 20};
  void* r = raw.send(hello, big.data(), big.size(), flags);
  std::int64_t peak = 0;
  const Deadline d = Deadline::after(1500ms);
  int progressed = 0;
  while (!d.expired()) {
    // The raw client progresses a little at first (its RTS goes out), then stops.
    if (progressed++ < 20) raw.progress_for(5ms);
    (void)l->accept(Deadline::after(10ms));
    peak = std::max(peak, heap_bytes() - before);
  }
  std::printf("an oversized hello made the server allocate up to %.1f MiB\n",
              static_cast<double>(peak) / (1 << 20));
  EXPECT_LT(peak, 8 << 20) << "a hello of 16 MiB was allocated before any check";
  EXPECT_GE(l->stats().failed + l->stats().refused_service, 1u);
  raw.finish(r);
}

// Sent as a rendezvous: the server allocated it in on_am_locked (fixed: refused before).
TEST(Review19, OversizedRendezvousHelloIsRefusedBeforeTheServerAllocatesIt) {
  oversized_hello(UCP_AM_SEND_FLAG_RNDV);
}
// Sent eagerly: UCX itself (UCP_AM_FLAG_WHOLE_MSG) assembles the whole message, of the size the
// sender claims, before mbmq's handler sees its header. Not fixed: mbmq cannot check earlier.
TEST(Review19, DISABLED_OversizedEagerHelloIsRefusedBeforeTheServerAllocatesIt) {
  oversized_hello(UCP_AM_SEND_FLAG_EAGER);
}

// ---------------------------------------------------------------------------------------------
// F5. Deadlines: a connect to a black-holed address, and Deadline::immediate() on connect and
// call, return at their deadline.
TEST(Review19, ConnectToABlackHoleHonoursItsDeadline) {
  const std::int64_t t0 = monotonic_ns();
  auto c = net::connect("ucx://10.255.255.1:47123/svc", Deadline::after(300ms));
  const std::int64_t took = monotonic_ns() - t0;
  EXPECT_FALSE(c);
  EXPECT_LT(took, 1'500'000'000) << "connect took " << took / 1'000'000 << " ms";
}

TEST(Review19, ImmediateDeadlinesReturnAtOnceAndTheChannelStaysUsable) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  auto c = net::connect(url(p->l.port()), Deadline::immediate());
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, Errc::TimedOut);
  auto b = p->client.buffer(16);
  ASSERT_TRUE(b);
  const std::int64_t t0 = monotonic_ns();
  auto st = p->client.call(*b, Deadline::immediate());
  EXPECT_LT(monotonic_ns() - t0, 200'000'000);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::TimedOut);
  // The server answers the timed-out call late, then a second call: the late reply is dropped.
  std::thread srv([&] {
    for (int i = 0; i < 2; ++i) {
      auto m = p->server.receive(secs(5));
      if (!m || m->kind != Kind::Request) return;
      if (!m->buffer.data().empty()) m->buffer.data()[0] = std::byte{static_cast<unsigned char>(i)};
      (void)net::Channel::reply(std::move(*m));
    }
  });
  auto b2 = p->client.buffer(16);
  ASSERT_TRUE(b2);
  st = p->client.call(*b2, secs(5));
  srv.join();
  ASSERT_TRUE(st) << st.error().message();
  EXPECT_EQ(b2->data()[0], std::byte{1}) << "the late reply of the timed-out call was taken";
}

// ---------------------------------------------------------------------------------------------
// F6. House rule: no lock held across a blocking wait. close() flushes its endpoint spinning up
// to 100 ms with the worker's mutex held; an accepted channel shares the listener's worker, so
// closing one client's channel stalls every other channel of the listener (and the keeper).
TEST(Review19, ClosingOneAcceptedChannelDoesNotStallTheOthers) {
  auto a = make_pair();  // a's client is idle
  ASSERT_TRUE(a);
  // A second client of the same listener.
  std::optional<Result<net::Channel>> c;
  std::thread t([&] { c.emplace(net::connect(url(a->l.port()), secs(10))); });
  auto s2 = a->l.accept(secs(10));
  t.join();
  ASSERT_TRUE(s2);
  ASSERT_TRUE(*c);
  std::atomic<bool> closing{false}, closed{false};
  std::int64_t close_ns = 0;
  std::thread closer([&] {
    closing = true;
    const std::int64_t t0 = monotonic_ns();
    a->server.close();
    close_ns = monotonic_ns() - t0;
    closed = true;
  });
  while (!closing) std::this_thread::yield();
  std::int64_t worst = 0;
  while (!closed) {
    const std::int64_t t0 = monotonic_ns();
    (void)s2->receive(Deadline::immediate());  // another channel of the same worker
    worst = std::max(worst, monotonic_ns() - t0);
  }
  closer.join();
  std::printf("close() took %.1f ms; another channel's receive(immediate) waited up to %.1f ms\n",
              static_cast<double>(close_ns) / 1e6, static_cast<double>(worst) / 1e6);
  EXPECT_LT(worst, 50'000'000);
}

// ---------------------------------------------------------------------------------------------
// F8. Self-deadlock: when ucp_ep_create fails for a connection request (the client gave up at once:
// connect() with Deadline::immediate() force-closes its endpoint), on_conn_request_locked drops
// the last reference to the new ChannelCore inside UCX's callback, with the worker's mutex held;
// ~ChannelCore takes that mutex: the listener, its channels and the keeper hang for ever.
// Fixed (the channel goes to the graveyard). Still fails most runs on Debian's UCX 1.13: its async
// thread aborts on `tcp_sockcm_ep.c:416 Assertion ... cep->state` (client and server are in this
// one process here; with the clients in another process, F6b, neither side asserted in 5 runs;
// ucp_listener_reject on the failed request was tried: it segfaults). Kept as the reproducer, not
// run: F6b is the regression test of the deadlock.
TEST(Review19, DISABLED_ClientsGivingUpAtOnceDoNotDeadlockTheListener) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    const Deadline d = Deadline::after(4s);
    while (!done && !d.expired()) os::sleep_ns(10'000'000);
    if (!done) {
      std::fprintf(stderr,
                   "Review19: the listener's worker deadlocked (a thread blocked on its "
                   "own mutex)\n");
      std::_Exit(1);
    }
  });
  for (int i = 0; i < 60; ++i) {
    auto c = net::connect(url(p->l.port()), Deadline::immediate());
    EXPECT_FALSE(c);
    // Every other round the listener's worker is progressed late: the request of a client that
    // is gone already is then taken (and its endpoint cannot be made).
    if (i % 2 == 1) (void)p->server.receive(Deadline::after(5ms));
  }
  (void)p->server.receive(Deadline::after(200ms));
  (void)p->l.stats();  // takes the worker's mutex
  done = true;
  watchdog.join();
}

// F6b. The same, with the clients in another process (forked before this one loads UCX): which
// side UCX 1.13's assertion takes down. The listener must survive clients that give up at once;
// the clients' own process is reported, not asserted on (it is the side that asserted if it died
// of SIGABRT).
TEST(Review19, ClientsGivingUpAtOnceInAnotherProcessLeaveTheListenerServing) {
  test::Pipe port = test::Pipe::make();
  const pid_t child = test::spawn(
      [&]() -> int {
        const std::uint32_t p = port.get();
        if (p == 0) return 2;
        for (int i = 0; i < 60; ++i) (void)net::connect(url(p), Deadline::immediate());
        return 0;
      },
      30);
  ASSERT_GT(child, 0);
  auto l = net::listen("ucx://127.0.0.1:0/svc");
  ASSERT_TRUE(l) << l.error().message();
  port.put(l->port());
  int rc = -1;
  for (Deadline d = secs(10); !d.expired();) {
    (void)l->accept(Deadline::after(5ms));  // progresses the listener's worker
    int st = 0;
    if (::waitpid(child, &st, WNOHANG) == child) {
      rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      break;
    }
  }
  for (Deadline d = Deadline::after(300ms); !d.expired();) (void)l->accept(Deadline::after(5ms));
  std::printf("the clients' process ended with %d (134: SIGABRT, UCX's assertion)\n", rc);
  // Still serving: a fresh client connects and calls.
  std::optional<Result<net::Channel>> c;
  std::thread t([&] { c.emplace(net::connect(url(l->port()), secs(10))); });
  auto s = l->accept(secs(10));
  t.join();
  ASSERT_TRUE(s) << s.error().message();
  ASSERT_TRUE(*c) << (*c).error().message();
}

// ---------------------------------------------------------------------------------------------
// F7. NoReply when a request is dropped; PeerClosed for a call in flight when the server's channel
// closes.
TEST(Review19, DroppedRequestAnswersNoReplyAndCloseAnswersPeerClosed) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  std::thread srv([&] {
    (void)p->server.receive(secs(5));  // dropped unanswered: NoReply
    auto m2 = p->server.receive(secs(5));
    if (m2) p->server.close();
  });
  auto b = p->client.buffer(16);
  ASSERT_TRUE(b);
  auto st = p->client.call(*b, secs(5));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::NoReply);
  st = p->client.call(*b, secs(5));
  srv.join();
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::PeerClosed) << st.error().message();
}

}  // namespace
}  // namespace mbmq
