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
#include "net/net_pair.h"
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
using test::heap_bytes;
using test::make_pair;
using test::RawClient;
using test::secs;
using test::url;

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
// F3. No flow control: one-way messages were taken off the wire by the keeper thread (or any
// progress) and queued in the channel's inbox without bound: a client sending 96 MiB of 1 MiB
// messages to a server that did not receive grew the server's heap by 99 MiB. Fixed by credits
// (docs/design/net.md, "Flow control"): the server grants kDefaultInboxMessages (1024) messages and
// kDefaultInboxBytes (16 MiB); 16 MiB are out after 16 sends, the 17th gets WouldBlock and nothing
// more is queued. (Client
// and server share this process's heap: the bound below covers both.)
TEST(Review19, OneWayFloodDoesNotGrowTheReceiverWithoutBound) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  constexpr int kMessages = 96;
  constexpr std::size_t kSize = 1u << 20;
  const std::int64_t before = heap_bytes();
  std::int64_t peak = 0;
  int sent = 0, refused = 0;
  for (int i = 0; i < kMessages; ++i) {
    auto b = p->client.buffer(kSize);
    ASSERT_TRUE(b);
    auto st = p->client.send(std::move(*b));
    if (!st) {
      ASSERT_EQ(st.error().code, Errc::WouldBlock) << st.error().message();
      ASSERT_TRUE(b->valid()) << "a refused send gave up the caller's buffer";
      ++refused;
    } else {
      ++sent;
    }
    (void)p->client.receive(Deadline::immediate());  // progresses the client's worker
    (void)p->l.accept(Deadline::immediate());        // and the server's
    peak = std::max(peak, heap_bytes() - before);
  }
  const Deadline d = Deadline::after(1s);
  while (!d.expired()) {
    (void)p->client.receive(Deadline::immediate());
    (void)p->l.accept(Deadline::after(5ms));
    peak = std::max(peak, heap_bytes() - before);
  }
  std::printf("sent %d MiB one-way (%d refused); heap grew by up to %.1f MiB\n", sent, refused,
              static_cast<double>(peak) / (1 << 20));
  EXPECT_EQ(sent, static_cast<int>(net::kDefaultInboxBytes / kSize)) << "the grant is 16 MiB";
  EXPECT_LT(peak, 24 << 20) << "the receiver queued more than its grant (16 MiB)";
  // Nothing lost: the server receives the 16, and the client may then send again.
  for (int i = 0; i < sent; ++i) {
    auto m = p->server.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Message);
    EXPECT_EQ(m->buffer.size(), kSize);
  }
  (void)p->server.receive(Deadline::immediate());  // would wait: the last credit goes back
  auto b = p->client.buffer(kSize);
  ASSERT_TRUE(b);
  auto st = p->client.send(std::move(*b), secs(5));
  EXPECT_TRUE(st) << st.error().message();
  // Received before the ends close: UCX 1.13 asserts at ucp_worker_destroy on a rendezvous send
  // still in progress (README, Not done yet).
  auto last = p->server.receive(secs(5));
  ASSERT_TRUE(last) << last.error().message();
  EXPECT_EQ(last->kind, Kind::Message);
}

// ---------------------------------------------------------------------------------------------
// F4. A hello is a grant and a 1-255 byte service name, but the server accepted a hello payload up
// to max_message (64 MiB) and, for a rendezvous one, allocated it before the service name was
// looked at. A raw client that is not even on the right service made the server allocate 16 MiB,
// and keep it allocated by not progressing its side of the rendezvous.
// Returns the peak heap growth of this process while the server handled the hello.
std::int64_t oversized_hello(std::uint32_t flags) {
  net::ListenOptions lo;
  lo.handshake_timeout = 5000ms;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  EXPECT_TRUE(l) << l.error().message();
  if (!l) return -1;
  RawClient raw;
  EXPECT_TRUE(raw.connect(l->port()));
  std::vector<char> big(16u << 20, 'x');
  const std::int64_t before = heap_bytes();
  WireHeader hello{kMagic, kVersion, static_cast<std::uint8_t>(WireKind::Hello), 0, 0, 1u << 20};
  void* r = raw.send(hello, big.data(), big.size(), flags);
  std::int64_t peak = 0;
  const Deadline d = Deadline::after(1500ms);
  int progressed = 0;
  while (!d.expired() && l->stats().failed + l->stats().refused_service == 0) {
    // The raw client progresses a little at first (its RTS goes out), then stops.
    if (progressed++ < 20) raw.progress_for(5ms);
    (void)l->accept(Deadline::after(10ms));
    peak = std::max(peak, heap_bytes() - before);
  }
  std::printf("an oversized hello made this process allocate up to %.1f MiB\n",
              static_cast<double>(peak) / (1 << 20));
  EXPECT_GE(l->stats().failed + l->stats().refused_service, 1u) << "the hello was not refused";
  EXPECT_EQ(l->stats().accepted, 0u);
  raw.finish(r);
  // The 16 MiB are given back once it is refused (UCX keeps some MiB of its own pools: 3-5 MiB
  // measured).
  (void)l->accept(Deadline::after(50ms));
  EXPECT_LT(heap_bytes() - before, 8 << 20) << "the refused hello's memory is still held";
  return peak;
}

// Sent as a rendezvous: the server allocated it in on_am_locked (fixed: refused before).
TEST(Review19, OversizedRendezvousHelloIsRefusedBeforeTheServerAllocatesIt) {
  EXPECT_LT(oversized_hello(UCP_AM_SEND_FLAG_RNDV), 8 << 20)
      << "a hello of 16 MiB was allocated before any check";
}
// Sent eagerly (a sender that forces UCP_AM_SEND_FLAG_EAGER; mbmq::net leaves the protocol to
// UCX): UCX 1.13 itself assembles a multi-fragment eager message before any
// handler sees its header (ucp_am_long_first_handler mallocs the total size the first fragment
// claims, with or without UCP_AM_FLAG_WHOLE_MSG), so mbmq cannot refuse it earlier. What mbmq
// bounds: it copies nothing of it (one 16 MiB copy, UCX's, not two), refuses it (the connection
// fails, nothing is accepted) and UCX frees it when the handler returns.
TEST(Review19, OversizedEagerHelloIsRefusedWithoutACopyAndItsMemoryFreed) {
  const std::int64_t peak = oversized_hello(UCP_AM_SEND_FLAG_EAGER);
  EXPECT_LT(peak, (16 << 20) + (6 << 20)) << "mbmq copied an oversized eager hello";
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
  // 1 s: a loaded CI machine under ASan; a call not at once waits for its reply (none comes)
  EXPECT_LT(monotonic_ns() - t0, 1'000'000'000);
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::TimedOut);
  // The server answers the timed-out call late, then a second call: the late reply is dropped.
  // jthread: ends by its receive's deadline, also after a failed ASSERT (else terminate)
  std::jthread srv([&] {
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
// Fixed (the channel goes to the graveyard): no deadlock (the watchdog's exit) in 35 runs here
// (net19: 20 quiet, 15 beside two busy loops). Still disabled because Debian's UCX 1.13 itself
// aborts the process, in its async thread (log prefix `[host:pid:a:tid]`), on `tcp_sockcm_ep.c:416
// Assertion ... cep->state`: uct_tcp_sockcm_ep_progress_send() found a connection-manager
// endpoint with a write event that is neither a client that packed its private data, nor a
// server endpoint created after its data came, nor one being rejected. Here that is one of the
// endpoints this test makes on purpose: a client force-closed by connect(Deadline::immediate())
// while the async thread works on its connection, or the server's side of a connection request
// whose ucp_ep_create failed because that client had gone (mbmq can neither create nor reject it:
// ucp_listener_reject on it segfaulted). Which one was not determined. Seen in 1 of 15 runs
// beside two busy loops and 0 of 26 quiet runs (the first review saw ~7 of 10). The check that
// fails is UCX's, on UCX's own thread, about UCX's endpoint state: not fixable in mbmq short of
// not making such endpoints; F6b (clients in another process) is the deadlock's regression test.
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
