// Flow control of mbmq::net (issue #19; docs/design/net.md, "Flow control"): what a peer can make
// a receiver hold is its grant; a sender out of credit gets WouldBlock or waits; credit comes back
// as the application receives; a peer that sends beyond its grant is closed, alone. Client and
// server live in this one process (two UCX workers of one context, over 127.0.0.1).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using net::detail::kMagic;
using net::detail::kVersion;
using net::detail::WireHeader;
using net::detail::WireKind;
using test::heap_bytes;
using test::make_pair;
using test::number_of;
using test::numbered;
using test::RawClient;
using test::secs;
using test::url;

// A sender streaming one-way as fast as credit allows, a receiver slower than it: every message
// arrives, in order, and the sender is never more than the grant ahead of what the receiving
// application took (so the receiver never holds more than the grant).
TEST(NetFlow, FastSenderAgainstSlowReceiverDeliversEverythingInOrderWithinTheGrant) {
  net::ListenOptions lo;
  lo.inbox_messages = 8;
  lo.inbox_bytes = 64 << 10;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  constexpr std::uint32_t kCount = 3000;
  constexpr std::size_t kSize = 1024;
  std::atomic<std::uint32_t> sent{0};
  std::atomic<bool> sender_failed{false};
  std::thread sender([&] {
    for (std::uint32_t i = 0; i < kCount; ++i) {
      auto st = p->client.send(numbered(p->client, kSize, i), secs(20));
      if (!st) {
        std::fprintf(stderr, "send %u: %s\n", i, st.error().message().c_str());
        sender_failed = true;
        return;
      }
      sent.store(i + 1, std::memory_order_release);
    }
  });
  std::int64_t worst_ahead = 0;
  const std::int64_t before = heap_bytes();
  std::int64_t peak = 0;
  for (std::uint32_t i = 0; i < kCount && !sender_failed; ++i) {
    auto m = p->server.receive(secs(20));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Message) << m->why;
    ASSERT_EQ(number_of(m->buffer), i) << "out of order or lost";
    // Sent so far <= received + the grant: what the sender read is at most what it sent.
    const std::int64_t ahead =
        static_cast<std::int64_t>(sent.load(std::memory_order_acquire)) - (i + 1);
    worst_ahead = std::max(worst_ahead, ahead);
    EXPECT_LE(ahead, lo.inbox_messages) << "the sender got ahead of the grant";
    // A slow receiver: some work per message (not a wait on anything).
    const std::int64_t until = monotonic_ns() + 20'000;
    while (monotonic_ns() < until) {
    }
    if (i % 64 == 0) peak = std::max(peak, heap_bytes() - before);
  }
  sender.join();
  ASSERT_FALSE(sender_failed);
  std::printf(
      "%u messages in order; the sender was at most %lld ahead of the receiver (grant %u); "
      "heap grew by up to %.1f KiB\n",
      kCount, static_cast<long long>(worst_ahead), lo.inbox_messages,
      static_cast<double>(peak) / 1024);
  EXPECT_LT(peak, 4 << 20);
}

// Out of credit: send() gets WouldBlock with the buffer still the caller's; call() waits until
// its deadline and sends nothing; once the server receives, credit comes back and both go.
TEST(NetFlow, SenderOutOfCreditGetsWouldBlockAndCreditComesBackAfterReceive) {
  net::ListenOptions lo;
  lo.inbox_messages = 4;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  for (std::uint32_t i = 0; i < 4; ++i) {
    auto st = p->client.send(numbered(p->client, 64, i));
    ASSERT_TRUE(st) << st.error().message();
  }
  net::Buffer fifth = numbered(p->client, 64, 4);
  auto st = p->client.send(std::move(fifth));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::WouldBlock) << st.error().message();
  ASSERT_TRUE(fifth.valid()) << "a refused send gave up the caller's buffer";
  EXPECT_EQ(number_of(fifth), 4u);
  // send with a deadline and call wait, then time out, having sent nothing.
  std::int64_t t0 = monotonic_ns();
  st = p->client.send(std::move(fifth), Deadline::after(200ms));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::TimedOut);
  EXPECT_TRUE(fifth.valid());
  net::Buffer req = numbered(p->client, 64, 99);
  t0 = monotonic_ns();
  st = p->client.call(req, Deadline::after(200ms));
  const std::int64_t took = monotonic_ns() - t0;
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::TimedOut);
  EXPECT_GE(took, 190'000'000);
  EXPECT_LT(took, 2'000'000'000);
  ASSERT_TRUE(req.valid()) << "a call that sent nothing gave up its buffer";
  // The server takes two: half the grant goes back (batched), and the client may send again.
  for (std::uint32_t i = 0; i < 2; ++i) {
    auto m = p->server.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(number_of(m->buffer), i);
  }
  st = p->client.send(std::move(fifth), secs(5));
  ASSERT_TRUE(st) << st.error().message();
  // The server answers the call once it reaches it; the call waits for credit, then for its reply.
  std::thread srv([&] {
    for (std::uint32_t i = 2; i < 6; ++i) {
      auto m = p->server.receive(secs(5));
      if (!m || m->kind == Kind::PeerClosed) return;
      if (m->kind == Kind::Request) (void)net::Channel::reply(std::move(*m));
    }
  });
  st = p->client.call(req, secs(5));
  srv.join();
  EXPECT_TRUE(st) << st.error().message();
}

// A sender waiting for credit learns at once that the receiver closed.
TEST(NetFlow, SenderWaitingForCreditSeesTheReceiverClose) {
  net::ListenOptions lo;
  lo.inbox_messages = 1;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  ASSERT_TRUE(p->client.send(numbered(p->client, 64, 0)));
  std::thread closer([&] {
    // Closes once the client is out of credit: its first message has arrived.
    auto m = p->server.receive(secs(5));
    (void)m;
    p->server.close();
  });
  Status st = p->client.send(numbered(p->client, 64, 1), secs(10));
  // The server may have returned the credit before closing (the send then went out): then the
  // next send sees the close.
  for (int i = 0; st && i < 2; ++i) st = p->client.send(numbered(p->client, 64, 2), secs(10));
  closer.join();
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::PeerClosed) << st.error().message();
}

// A peer that ignores its grant (a raw client: a hello granting credit, then 32 one-way messages
// of 1 MiB sent as rendezvous without waiting for any credit back) is closed with Errc::Protocol
// at the first message beyond the grant, before that message's payload is fetched: the server
// holds at most the grant. Another client of the same listener keeps working.
TEST(NetFlow, PeerSendingBeyondItsGrantIsClosedAndOtherChannelsKeepWorking) {
  net::ListenOptions lo;
  lo.inbox_messages = 4;
  auto good = make_pair(lo, {});
  ASSERT_TRUE(good);
  RawClient raw;
  ASSERT_TRUE(raw.connect(good->l.port()));
  raw.hello({16, 16u << 20});
  auto bad = good->l.accept(secs(5));
  ASSERT_TRUE(bad) << bad.error().message();
  std::vector<char> mib(1u << 20, 'x');
  const std::int64_t before = heap_bytes();
  WireHeader msg{kMagic, kVersion, static_cast<std::uint8_t>(WireKind::Message), 0, 0, 0};
  std::vector<void*> reqs;
  for (int i = 0; i < 32; ++i)
    reqs.push_back(raw.send(msg, mib.data(), mib.size(), UCP_AM_SEND_FLAG_RNDV));
  std::int64_t peak = 0;
  int delivered = 0;
  std::optional<net::Message> end;
  for (Deadline d = secs(10); !d.expired() && !end;) {
    raw.progress_for(1ms);
    auto m = bad->receive(Deadline::after(5ms));
    peak = std::max(peak, heap_bytes() - before);
    if (!m) continue;
    if (m->kind == Kind::PeerClosed) {
      end.emplace(std::move(*m));
    } else {
      ++delivered;
    }
  }
  for (void* q : reqs) raw.finish(q);
  std::printf(
      "a peer ignoring its grant of 4: %d delivered, then %s; heap grew by up to %.1f MiB "
      "for 32 MiB sent\n",
      delivered, end ? end->why : "(not closed)", static_cast<double>(peak) / (1 << 20));
  ASSERT_TRUE(end) << "the channel of a peer sending beyond its grant was not closed";
  EXPECT_EQ(end->error, Errc::Protocol);
  EXPECT_NE(std::string(end->why).find("credit"), std::string::npos) << end->why;
  EXPECT_LE(delivered, 4);
  EXPECT_LT(peak, 8 << 20) << "the server fetched payloads beyond the grant";
  // The other client of the same listener still calls.
  std::thread srv([&] {
    auto m = good->server.receive(secs(5));
    if (m && m->kind == Kind::Request) (void)net::Channel::reply(std::move(*m));
  });
  net::Buffer b = numbered(good->client, 64, 7);
  auto st = good->client.call(b, secs(5));
  srv.join();
  EXPECT_TRUE(st) << st.error().message();
}

// Round trips never wait for credit: each reply gives its request's back (no Credit message).
TEST(NetFlow, ManyRoundTripsWithAGrantOfOne) {
  net::ListenOptions lo;
  lo.inbox_messages = 1;
  lo.inbox_bytes = 1;
  net::ConnectOptions co;
  co.inbox_messages = 1;
  co.inbox_bytes = 1;
  auto p = make_pair(lo, co);
  ASSERT_TRUE(p);
  constexpr int kCalls = 500;
  std::thread srv([&] {
    for (int i = 0; i < kCalls; ++i) {
      auto m = p->server.receive(secs(5));
      if (!m || m->kind != Kind::Request) return;
      (void)net::Channel::reply(std::move(*m));
    }
  });
  for (int i = 0; i < kCalls; ++i) {
    net::Buffer b = numbered(p->client, 256, static_cast<std::uint32_t>(i));
    auto st = p->client.call(b, secs(5));
    ASSERT_TRUE(st) << i << ": " << st.error().message();
    EXPECT_EQ(number_of(b), static_cast<std::uint32_t>(i));
  }
  srv.join();
}

// ---- send_request() and receive_batch() (docs/design/net.md, "Requests without waiting") ----

// Requests sent without waiting (small and rendezvous-sized), answered by the server in reverse
// order with a one-way message in between: the client receives the replies, and the message, in
// the order the server sent them, each with its own request's answer.
TEST(NetRequest, RepliesComeThroughReceiveInTheOrderTheServerAnswered) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  constexpr std::uint32_t kN = 6;
  auto size_of = [](std::uint32_t i) -> std::size_t { return i % 2 == 0 ? 64 : (2u << 20) + i; };
  std::atomic<bool> server_ok{false};
  std::thread srv([&] {
    std::vector<net::Message> held;
    while (held.size() < kN) {
      auto m = p->server.receive(secs(10));
      if (!m || m->kind != Kind::Request) return;
      held.push_back(std::move(*m));
    }
    for (std::uint32_t k = 0; k < kN; ++k) {
      net::Message& m = held[kN - 1 - k];
      const std::uint32_t answer = number_of(m.buffer) + 1000;
      std::memcpy(m.buffer.data().data(), &answer, sizeof answer);
      if (!net::Channel::reply(std::move(m))) return;
      if (k == 2 && !p->server.send(numbered(p->server, 64, 555), secs(10))) return;
    }
    server_ok = true;
  });
  for (std::uint32_t i = 0; i < kN; ++i) {
    auto st = p->client.send_request(numbered(p->client, size_of(i), i));
    ASSERT_TRUE(st) << i << ": " << st.error().message();
  }
  std::vector<std::uint32_t> got;
  std::vector<net::Message> batch(4);
  while (got.size() < kN + 1) {
    auto n = p->client.receive_batch(batch, secs(10));
    ASSERT_TRUE(n) << n.error().message();
    for (std::size_t j = 0; j < *n; ++j) {
      const net::Message& m = batch[j];
      ASSERT_NE(m.kind, Kind::PeerClosed) << m.why;
      if (m.kind == Kind::Message) {
        got.push_back(number_of(m.buffer));
        continue;
      }
      ASSERT_EQ(m.kind, Kind::Reply);
      EXPECT_NE(m.error, Errc::NoReply);
      const std::uint32_t i = number_of(m.buffer) - 1000;
      ASSERT_LT(i, kN);
      EXPECT_EQ(m.buffer.size(), size_of(i)) << "reply " << i << " is not its request's";
      got.push_back(i);
    }
  }
  srv.join();
  EXPECT_TRUE(server_ok);
  const std::vector<std::uint32_t> want{5, 4, 3, 555, 2, 1, 0};
  EXPECT_EQ(got, want);
  // A received reply is ours: it cannot be replied to; its buffer can be sent again.
  net::Message r;
  r.kind = Kind::Reply;
  auto st = net::Channel::reply(std::move(r));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::InvalidArgument);
}

// Each outstanding request holds one message of the server's grant: out of it, send_request()
// is WouldBlock (the buffer still the caller's) or waits until its deadline; a request the server
// drops unanswered comes back as a Reply with NoReply; both give the credit back.
TEST(NetRequest, OutstandingRequestsHoldCreditAndADroppedOneRepliesNoReply) {
  net::ListenOptions lo;
  lo.inbox_messages = 2;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 0)));
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 1)));
  net::Buffer third = numbered(p->client, 64, 2);
  auto st = p->client.send_request(std::move(third));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::WouldBlock) << st.error().message();
  ASSERT_TRUE(third.valid()) << "a refused send_request gave up the caller's buffer";
  st = p->client.send_request(std::move(third), Deadline::after(100ms));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::TimedOut);
  ASSERT_TRUE(third.valid());
  {
    auto a = p->server.receive(secs(5));
    auto b = p->server.receive(secs(5));
    ASSERT_TRUE(a && b);
    ASSERT_EQ(number_of(a->buffer), 0u);
    ASSERT_TRUE(net::Channel::reply(std::move(*b)));
    // `a` is dropped here unanswered: NoReply.
  }
  int no_reply = 0;
  int answered = 0;
  for (int k = 0; k < 2; ++k) {
    auto m = p->client.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Reply) << m->why;
    if (m->error == Errc::NoReply) {
      ++no_reply;
      EXPECT_EQ(m->buffer.size(), 0u);
    } else {
      ++answered;
      EXPECT_EQ(number_of(m->buffer), 1u);
    }
  }
  EXPECT_EQ(no_reply, 1);
  EXPECT_EQ(answered, 1);
  // Both gave their credit back: two more go at once.
  ASSERT_TRUE(p->client.send_request(std::move(third)));
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 3)));
}

// A request still outstanding when the server closes: its reply never comes, and receive() ends
// with PeerClosed rather than waiting.
TEST(NetRequest, ARequestOutstandingWhenThePeerClosesEndsWithPeerClosed) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 0)));
  net::Buffer next = numbered(p->client, 64, 1);
  auto m = p->server.receive(secs(5));
  ASSERT_TRUE(m);
  p->server.close();  // holding the request
  auto end = p->client.receive(secs(5));
  ASSERT_TRUE(end) << end.error().message();
  EXPECT_EQ(end->kind, Kind::PeerClosed);
  EXPECT_EQ(end->error, Errc::PeerClosed);
  auto st = p->client.send_request(std::move(next));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, Errc::PeerClosed) << st.error().message();
}

// receive_batch() takes what has arrived, in order, without waiting for more; the end comes last.
TEST(NetRequest, ReceiveBatchTakesWhatHasArrivedInOrderAndTheEndComesLast) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  std::vector<net::Message> none;
  auto bad = p->server.receive_batch(none, secs(1));
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().code, Errc::InvalidArgument);
  constexpr std::uint32_t kN = 20;
  for (std::uint32_t i = 0; i < kN; ++i) ASSERT_TRUE(p->client.send(numbered(p->client, 128, i)));
  std::vector<net::Message> batch(8);
  std::uint32_t next = 0;
  std::size_t largest = 0;
  while (next < kN) {
    auto n = p->server.receive_batch(batch, secs(5));
    ASSERT_TRUE(n) << n.error().message();
    ASSERT_GE(*n, 1u);
    ASSERT_LE(*n, batch.size());
    largest = std::max(largest, *n);
    for (std::size_t j = 0; j < *n; ++j) {
      ASSERT_EQ(batch[j].kind, Kind::Message);
      EXPECT_EQ(number_of(batch[j].buffer), next++);
    }
  }
  EXPECT_GT(largest, 1u) << "a batch never took more than one message";
  ASSERT_TRUE(p->client.send(numbered(p->client, 128, 99)));
  p->client.close();
  std::vector<Kind> kinds;
  for (Deadline d = secs(5); !d.expired();) {
    auto n = p->server.receive_batch(batch, d);
    ASSERT_TRUE(n) << n.error().message();
    for (std::size_t j = 0; j < *n; ++j) kinds.push_back(batch[j].kind);
    if (kinds.back() == Kind::PeerClosed) break;
  }
  const std::vector<Kind> want{Kind::Message, Kind::PeerClosed};
  EXPECT_EQ(kinds, want);
  auto after = p->server.receive_batch(batch, secs(1));
  EXPECT_FALSE(after) << "a second end";
}

// (R2) A reply must answer one request of ours, once. A second reply to a timed-out call, while
// another request holds credit, was accepted before and took that request's credit back (the
// client could then send beyond the server's grant); now it ends the channel with Protocol, as a
// second reply to an outstanding send_request() and a reply to no request do. The server here
// answers through its channel's core, by sequence number (the client numbers from 1).
TEST(NetRequest, ASecondReplyOrAReplyToNoRequestIsAProtocolError) {
  for (int mode = 0; mode < 3; ++mode) {
    SCOPED_TRACE(mode);
    auto p = make_pair();
    ASSERT_TRUE(p);
    ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 0)));  // seq 1, outstanding
    net::Buffer call = numbered(p->client, 64, 1);                    // seq 2
    if (mode == 0) {
      auto st = p->client.call(call, Deadline::after(50ms));
      ASSERT_FALSE(st);
      ASSERT_EQ(st.error().code, Errc::TimedOut);
    }
    for (int k = 0; k < (mode == 0 ? 2 : 1); ++k) {
      auto m = p->server.receive(secs(5));
      ASSERT_TRUE(m);
      ASSERT_EQ(m->kind, Kind::Request);
    }
    std::shared_ptr<net::detail::ChannelCore> core = test::core_of(p->server);
    auto answer = [&](std::uint32_t seq) {
      return core->reply(seq, numbered(p->server, 64, 7), net::detail::kReplyOk, 64);
    };
    const std::uint32_t seq = mode == 0 ? 2 : mode == 1 ? 1 : 40;
    ASSERT_TRUE(answer(seq));
    if (mode != 2) {
      ASSERT_TRUE(answer(seq));
    }
    std::optional<net::Message> end;
    for (Deadline d = secs(5); !d.expired() && !end;) {
      auto m = p->client.receive(d);
      ASSERT_TRUE(m) << m.error().message();
      if (m->kind == Kind::PeerClosed) end.emplace(std::move(*m));
    }
    ASSERT_TRUE(end) << "the bad reply was accepted";
    EXPECT_EQ(end->error, Errc::Protocol);
    EXPECT_NE(std::string(end->why).find("reply"), std::string::npos) << end->why;
  }
}

// (F8) The transport window: a sender of 64 KiB one-way messages to a receiver that keeps up has
// at most kTxWindowMessages of them with UCX, not completed. Before, it handed UCX all its credit
// allowed (the grant: 256 of 64 KiB), which UCX queued, and the kernel copied each from memory
// long out of the cache by then: raw UCX / mbmq-net-spin one-way 1.36x at 64 KiB (15 interleaved
// rounds), 0.99x with the window.
TEST(NetFlow, AOneWayStreamKeepsAtMostTheWindowWithTheTransport) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  constexpr std::uint32_t kCount = 400;
  constexpr std::size_t kSize = 64 << 10;
  std::atomic<bool> rx_failed{false};
  std::thread rx([&] {
    for (std::uint32_t i = 0; i < kCount; ++i) {
      auto m = p->server.receive(secs(20));
      if (!m || m->kind != Kind::Message || number_of(m->buffer) != i) {
        rx_failed = true;
        return;
      }
    }
  });
  net::detail::ChannelCore& core = *test::core_of(p->client);
  // After each send(), under the worker's lock: what is with UCX, and whether the window is
  // stalled (a millisecond with no completion: the sends then go, F8). Only this thread
  // progresses the client's worker, so nothing changes between the send and the look.
  std::uint32_t within = 0, beyond = 0, stalled = 0, most = 0;
  for (std::uint32_t i = 0; i < kCount; ++i) {
    auto st = p->client.send(numbered(p->client, kSize, i), secs(20));
    ASSERT_TRUE(st) << st.error().message();
    os::LockGuard lock(core.w_->mu);
    const std::uint32_t pending = core.*get(test::TxPendingOf{});
    if (core.*get(test::TxStalledOf{})) {
      ++stalled;
      continue;
    }
    most = std::max(most, pending);
    ++(pending <= net::detail::ChannelCore::kTxWindowMessages ? within : beyond);
  }
  rx.join();
  EXPECT_FALSE(rx_failed) << "a message was lost, doubled or reordered";
  // Not stalled, never beyond the window (before the window: most samples at the grant, 256). A
  // loaded machine stalls it often (in the clean-clone CI run beside the suite the median sample
  // was 58 when stalled samples counted); with too few unstalled samples there is nothing to see.
  if (within + beyond < 20) GTEST_SKIP() << stalled << " of " << kCount << " samples stalled";
  EXPECT_EQ(beyond, 0u) << "most " << most << " with UCX; " << within << " within, " << stalled
                        << " stalled";
}

// (F8) The window never fails a send: a receiver that does not progress its worker fetches no
// rendezvous payload, so no send completes; the sender waits for the window at most 1 ms, then
// (stalled) sends what its credit allows, and with an immediate deadline at once; everything
// arrives in order once the receiver receives.
TEST(NetFlow, TheWindowLetsMessagesGoToAPeerThatFetchesNothing) {
  auto p =
      test::make_pair_without_keepers();  // nothing progresses the server's worker but receive()
  ASSERT_TRUE(p);
  constexpr std::uint32_t kCount = 40;
  constexpr std::size_t kSize = 256 << 10;  // rendezvous: sent only as the receiver fetches it
  for (std::uint32_t i = 0; i < kCount; ++i) {
    const Deadline d = i % 2 == 0 ? Deadline::immediate() : secs(10);
    auto st = p->client.send(numbered(p->client, kSize, i), d);
    ASSERT_TRUE(st) << i << ": " << st.error().message();
  }
  net::detail::ChannelCore& core = *test::core_of(p->client);
  {
    os::LockGuard lock(core.w_->mu);
    EXPECT_GT(core.*get(test::TxPendingOf{}), net::detail::ChannelCore::kTxWindowMessages)
        << "the sends completed: nothing tested";
    EXPECT_TRUE(core.*get(test::TxStalledOf{}));
  }
  // Neither end has a keeper: the client's worker must be progressed too for its payloads to be
  // fetched, so the two are progressed in turn.
  std::uint32_t got = 0;
  for (const Deadline end = secs(10); got < kCount && !end.expired();) {
    (void)p->client.receive(Deadline::after(1ms));
    auto m = p->server.receive(Deadline::after(1ms));
    if (!m) continue;
    ASSERT_EQ(m->kind, Kind::Message);
    EXPECT_EQ(number_of(m->buffer), got);
    ++got;
  }
  EXPECT_EQ(got, kCount);
}

TEST(NetFlow, AGrantOfZeroIsRefused) {
  net::ListenOptions lo;
  lo.inbox_messages = 0;
  auto l = net::listen("ucx://127.0.0.1:0/svc", lo);
  ASSERT_FALSE(l);
  EXPECT_EQ(l.error().code, Errc::InvalidArgument);
  net::ConnectOptions co;
  co.inbox_bytes = 0;
  auto c = net::connect("ucx://127.0.0.1:1/svc", secs(1), co);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, Errc::InvalidArgument);
}

}  // namespace
}  // namespace mbmq
