// Hostile review of 15596b4 (net::Channel::send_request(), receive_batch(), "a reply must answer
// one request of ours, once": R1-R3 in docs/design/net.md): reproducers. Confirmed_* fail on
// 15596b4; Suspected_* pass there (they pin down what was suspected and found to hold).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq::test {
namespace {

// More private members (RobAuto, the credit counts: net_access.h).
struct NextSeqOf {
  friend auto get(NextSeqOf);
};
template struct RobAuto<NextSeqOf, &net::detail::ChannelCore::next_seq_>;
struct LingeringOf {
  friend auto get(LingeringOf);
};
template struct RobAuto<LingeringOf, &net::detail::ChannelCore::lingering_>;
// InboxOf: net_access.h's.
struct TokenOf {
  friend auto get(TokenOf);
};
template struct RobAuto<TokenOf, &net::Buffer::reply_>;

}  // namespace
}  // namespace mbmq::test

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::make_pair;
using test::number_of;
using test::numbered;
using test::secs;

// A received request's reply answered with `answer` in its first 4 bytes.
bool answer(net::Message&& m, std::uint32_t answer) {
  std::memcpy(m.buffer.data().data(), &answer, sizeof answer);
  return static_cast<bool>(net::Channel::reply(std::move(m)));
}

struct Credit {
  std::uint64_t msgs, bytes;
  std::size_t listed;
};
Credit credit_of(net::Channel& ch) {
  auto core = test::core_of(ch);
  os::LockGuard lock(core->w_->mu);
  return {(*core).*get(test::OutMsgsOf{}), (*core).*get(test::OutBytesOf{}),
          ((*core).*get(test::RequestsOf{})).size()};
}

// As ~2^32 requests later: the next request the client numbers gets seq 1 again (0 is skipped).
void wrap_seq(net::Channel& ch) {
  auto core = test::core_of(ch);
  os::LockGuard lock(core->w_->mu);
  (*core).*get(test::NextSeqOf{}) = 0xffffffffu;
}

// Receives (progressing the client) until its credit is all back, or the deadline.
Credit settle(net::Channel& ch, std::vector<net::Message>* got, Deadline d) {
  for (;;) {
    Credit c = credit_of(ch);
    if ((c.msgs == 0 && c.listed == 0) || d.expired()) return c;
    auto m = ch.receive(Deadline::after(10ms));
    if (m && got != nullptr) got->push_back(std::move(*m));
  }
}

// ---- seq wrap: a seq still listed is handed out again ----

// Fixed: numbers in use are skipped (ChannelCore::next_seq_locked). Before:
// A timed-out call's entry (late_call, seq 1) stays listed while the server holds its request.
// Once next_seq_ wraps, a send_request() is numbered 1 again; its reply matches the late_call
// entry first (find_request_locked returns the first), is dropped as "late", and the application
// never sees it (receive() times out). The held request's answer, when it comes, is then taken
// as the send_request()'s reply: an answer to the wrong request.
TEST(ReviewReq, AfterASeqWrapALateCallsEntryDoesNotSwallowASendRequestsReply) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  net::Buffer call = numbered(p->client, 64, 1);
  auto st = p->client.call(call, Deadline::after(50ms));  // seq 1
  ASSERT_FALSE(st);
  ASSERT_EQ(st.error().code, Errc::TimedOut);
  auto held = p->server.receive(secs(5));  // held: its late reply does not come yet
  ASSERT_TRUE(held);
  ASSERT_EQ(number_of(held->buffer), 1u);
  wrap_seq(p->client);
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 2)));  // seq 1 again
  auto req = p->server.receive(secs(5));
  ASSERT_TRUE(req);
  ASSERT_EQ(number_of(req->buffer), 2u);
  ASSERT_TRUE(answer(std::move(*req), 1002));
  auto r = p->client.receive(secs(2));
  ASSERT_TRUE(r) << "the send_request()'s reply never came: " << r.error().message();
  ASSERT_EQ(r->kind, Kind::Reply) << r->why;
  EXPECT_EQ(number_of(r->buffer), 1002u);
  ASSERT_TRUE(answer(std::move(*held), 1001));  // the timed-out call's late reply: dropped
  auto late = p->client.receive(Deadline::after(300ms));
  EXPECT_FALSE(late && late->kind == Kind::Reply)
      << "a timed-out call's late answer came out as a send_request()'s reply: "
      << number_of(late->buffer);
}

// Fixed as the test above. Before:
// The same root cause with a call in flight: a send_request() (seq 1) is outstanding; after the
// wrap a call is numbered 1 too. on_am_locked checks call_seq_ first, so the send_request()'s
// reply is taken as the call's reply, and the call's own reply then comes through receive().
// (With a rendezvous reply whose header came before the call started and whose payload lands
// after, on_recv_done_locked takes the payload as the call's and leaves the inbox slot kept for
// it empty: receive() then waits behind that hole for ever.)
TEST(ReviewReq, AfterASeqWrapASendRequestsReplyIsNotTakenAsTheCallsReply) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 1)));  // seq 1, held by the server
  auto held = p->server.receive(secs(5));
  ASSERT_TRUE(held);
  ASSERT_EQ(number_of(held->buffer), 1u);
  wrap_seq(p->client);
  std::optional<Status> call_st;
  net::Buffer call = numbered(p->client, 64, 2);
  std::thread caller([&] { call_st.emplace(p->client.call(call, secs(5))); });  // seq 1 again
  auto req = p->server.receive(secs(5));
  ASSERT_TRUE(req);
  ASSERT_EQ(number_of(req->buffer), 2u);
  ASSERT_TRUE(answer(std::move(*held), 1001));  // the send_request()'s answer, first
  std::this_thread::sleep_for(100ms);
  ASSERT_TRUE(answer(std::move(*req), 1002));  // the call's
  caller.join();
  ASSERT_TRUE(*call_st) << call_st->error().message();
  EXPECT_EQ(number_of(call), 1002u) << "the call returned another request's reply";
  auto r = p->client.receive(secs(2));
  ASSERT_TRUE(r) << r.error().message();
  ASSERT_EQ(r->kind, Kind::Reply) << r->why;
  EXPECT_EQ(number_of(r->buffer), 1001u) << "the send_request() got the call's reply";
}

// ---- credit: a reply giving back less than its request took ----

// Fixed: a reply's limit must equal its request's size (R2), else Protocol. Before:
// (R2) checks only that a reply's `limit` does not EXCEED its request's size. Every reply mbmq
// sends gives back exactly the request's size (ReplyToken::credit_bytes), so a smaller one is a
// broken rule too, and it is accepted: the difference stays in out_bytes_ for ever. Here one
// such reply (limit 0) to a 60 KB request under a 64 KiB byte grant wedges the channel: nothing
// is outstanding any more, the application got its reply, and every later 60 KB send_request()
// is WouldBlock (and call()/send() time out) for the life of the channel. The same holds for a
// call's reply (call_bytes_ check), before this commit too.
TEST(ReviewReq, AReplyGivingBackLessCreditThanItsRequestTookIsAProtocolError) {
  net::ListenOptions lo;
  lo.inbox_bytes = 64 << 10;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  constexpr std::size_t kSize = 60000;
  ASSERT_TRUE(p->client.send_request(numbered(p->client, kSize, 0)));  // seq 1
  auto m = p->server.receive(secs(5));
  ASSERT_TRUE(m);
  auto token = m->buffer.*get(test::TokenOf{});
  ASSERT_TRUE(token);
  token->answered = true;  // answered below, by hand: no NoReply when m is dropped
  auto core = test::core_of(p->server);
  ASSERT_TRUE(core->reply(token->seq, numbered(p->server, 64, 7), net::detail::kReplyOk, 0));
  auto r = p->client.receive(secs(5));
  ASSERT_TRUE(r) << r.error().message();
  // Fixed: a reply must give back exactly its request's credit; a short one ends the channel.
  ASSERT_EQ(r->kind, Kind::PeerClosed) << "a reply giving back less credit was accepted";
  EXPECT_EQ(r->error, Errc::Protocol) << r->why;
  EXPECT_NE(std::string(r->why).find("credit"), std::string::npos) << r->why;
}

// ---- credit accounting with send_request(), call() and time-outs mixed ----

// Rounds of two send_request()s (64 B and 2 MiB) and a call() (64 B or a 6 MiB reply, fetched
// by the allocating thread) that times out while the server sits on its requests, then answers
// them all (the calls' replies late, some of them arriving while a reply header is in and its
// payload not yet). Afterwards every message and byte of credit is back and nothing is listed,
// and every send_request() got its own reply once.
TEST(ReviewReq, MixedSendRequestsCallsAndTimeOutsGiveEveryCreditBack) {
  net::ListenOptions lo;
  lo.inbox_messages = 8;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  constexpr std::uint32_t kRounds = 6;
  std::atomic<bool> server_ok{false};
  // How many messages the server is to take: a call that timed out waiting for credit (the
  // server behind, on a loaded machine) was never sent. Fixed: the server waited for all 18 and
  // failed after 10 s (CI, 2026-12-02; 2 of 10 runs here with a build beside it).
  std::atomic<std::uint32_t> expected{kRounds * 3};
  struct Release {  // a failed ASSERT below: the server stops waiting at once
    std::atomic<std::uint32_t>& e;
    ~Release() { e = 0; }
  };
  std::jthread srv([&] {
    const Deadline end = secs(30);
    for (std::uint32_t k = 0; k < expected.load();) {
      auto m = p->server.receive(Deadline::after(100ms));
      if (!m && m.error().code == Errc::TimedOut && !end.expired()) continue;
      if (!m || m->kind != Kind::Request) return;
      ++k;
      const std::uint32_t i = number_of(m->buffer);
      std::this_thread::sleep_for(i % 3 == 2 ? 15ms : 1ms);  // the call's: after its deadline
      if (i % 3 == 2 && (i / 3) % 2 == 1 && !m->buffer.resize(6u << 20)) return;
      if (!answer(std::move(*m), i + 1000)) return;
    }
    server_ok = true;
  });
  const Release release{expected};  // destroyed before srv (joined): the server ends first
  std::vector<net::Message> got;
  std::uint32_t timed_out = 0, unsent = 0;
  for (std::uint32_t r = 0; r < kRounds; ++r) {
    ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 3 * r), secs(5)));
    ASSERT_TRUE(p->client.send_request(numbered(p->client, 2u << 20, 3 * r + 1), secs(5)));
    net::Buffer call = numbered(p->client, 64, 3 * r + 2);
    auto st = p->client.call(call, Deadline::after(12ms));
    if (!st) ++timed_out;
    if (st) {
      EXPECT_EQ(number_of(call), 3 * r + 2 + 1000);
    } else {
      EXPECT_EQ(st.error().code, Errc::TimedOut) << st.error().message();
      // The op of call()'s credit wait, exactly (src/net/channel.cc): reworded, this fails.
      if (std::string_view(st.error().op) == "net::Channel::call: no credit in time (nothing sent)")
        ++unsent;
    }
  }
  expected = kRounds * 3 - unsent;
  srv.join();
  ASSERT_TRUE(server_ok);
  std::printf("%u of %u calls timed out (%u of them unsent: no credit in time)\n", timed_out,
              kRounds, unsent);
  EXPECT_GT(timed_out - unsent, 0u) << "no late reply exercised";
  const Credit c = settle(p->client, &got, secs(5));
  // (Entries leave the list when their payload is in the inbox: take what is left there.)
  for (;;) {
    auto m = p->client.receive(Deadline::after(100ms));
    if (!m) break;
    got.push_back(std::move(*m));
  }
  EXPECT_EQ(c.msgs, 0u);
  EXPECT_EQ(c.bytes, 0u);
  EXPECT_EQ(c.listed, 0u);
  std::vector<int> seen(kRounds * 3, 0);
  for (const net::Message& m : got) {
    ASSERT_EQ(m.kind, Kind::Reply) << m.why;
    const std::uint32_t i = number_of(m.buffer) - 1000;
    ASSERT_LT(i, kRounds * 3);
    ASSERT_NE(i % 3, 2u) << "a timed-out call's late reply came through receive()";
    ++seen[i];
  }
  for (std::uint32_t i = 0; i < kRounds * 3; ++i) {
    if (i % 3 != 2) {
      EXPECT_EQ(seen[i], 1) << i;
    }
  }
}

// Timed-out calls whose requests the server answers late, more of them than the grant's
// messages: each late_call entry leaves the list with its reply, so the channel never wedges.
TEST(ReviewReq, LateCallEntriesLeaveWithTheirRepliesSoTimeOutsDoNotWedge) {
  net::ListenOptions lo;
  lo.inbox_messages = 2;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  for (std::uint32_t i = 0; i < 10; ++i) {
    net::Buffer call = numbered(p->client, 64, i);
    auto st = p->client.call(call, Deadline::after(5ms));
    ASSERT_FALSE(st) << i;
    ASSERT_EQ(st.error().code, Errc::TimedOut) << i << ": " << st.error().message();
    auto m = p->server.receive(secs(5));
    ASSERT_TRUE(m);
    ASSERT_TRUE(answer(std::move(*m), 1));
    const Credit c = settle(p->client, nullptr, secs(2));
    ASSERT_EQ(c.msgs, 0u) << i;
    ASSERT_EQ(c.listed, 0u) << i;
  }
}

// A call times out with its reply's header in (its credit back, call_replied_) and its 64 MiB
// payload still to be allocated (D1) and fetched: no late_call entry is listed for it (or, if the
// header had not come, one entry holding the message's credit); the next call, started while
// that payload may still be on its way, gets its own reply; the old payload is dropped when it
// lands; the credit is all back afterwards and nothing comes through receive().
// (64 MiB, a client's limit, in 10 ms: 6.4 GB/s. A CI machine once fetched 48 MiB within 40 ms,
// and the failed ASSERT then left the server thread unjoined: terminate. Too fast a machine now
// skips, and the thread is a jthread.)
TEST(ReviewReq, ACallTimingOutWhileItsReplysPayloadIsFetchedLeavesNothingBehind) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  std::atomic<bool> server_ok{false};
  auto big = p->server.buffer(64u << 20);  // ready before: the header leaves at once
  ASSERT_TRUE(big);
  auto core = test::core_of(p->server);
  std::jthread srv([&] {
    auto m = p->server.receive(secs(5));
    if (!m) return;
    auto token = m->buffer.*get(test::TokenOf{});
    token->answered = true;  // answered here, by hand, with the buffer made beforehand
    if (!core->reply(token->seq, std::move(*big), net::detail::kReplyOk, token->credit_bytes))
      return;
    auto m2 = p->server.receive(secs(5));
    if (!m2 || !answer(std::move(*m2), 1002)) return;
    server_ok = true;
  });
  net::Buffer first = numbered(p->client, 64, 1);
  auto st = p->client.call(first, Deadline::after(10ms));
  if (st) {
    p->client.close();  // the server's second receive() ends at once
    GTEST_SKIP() << "64 MiB fetched within 10 ms: the case is not reached on this machine";
  }
  ASSERT_EQ(st.error().code, Errc::TimedOut);
  Credit c = credit_of(p->client);
  std::printf("after the time-out: %llu message(s) out, %zu listed\n",
              static_cast<unsigned long long>(c.msgs), c.listed);
  EXPECT_EQ(c.msgs, c.listed) << "a late_call entry without its credit, or credit unlisted";
  const bool header_in = c.listed == 0;  // else the reply's header had not come in 10 ms either
  net::Buffer second = numbered(p->client, 64, 2);
  st = p->client.call(second, secs(5));
  ASSERT_TRUE(st) << st.error().message();
  EXPECT_EQ(number_of(second), 1002u);
  EXPECT_EQ(second.size(), 64u);
  srv.join();
  ASSERT_TRUE(server_ok);
  c = settle(p->client, nullptr, secs(3));
  EXPECT_EQ(c.msgs, 0u);
  EXPECT_EQ(c.bytes, 0u);
  EXPECT_EQ(c.listed, 0u);
  auto stray = p->client.receive(Deadline::after(200ms));
  EXPECT_FALSE(stray) << "the old payload came through receive()";
  // Everything above holds in either case; the one this test is for needs the header in time.
  if (!header_in) GTEST_SKIP() << "the reply's header came after the deadline (a loaded machine)";
}

// ---- receive_batch() ----

// A sender waiting for credit (2 messages) against a receiver taking batches of 3: every
// message arrives once, in order, within seconds (the batch gives the credit back).
TEST(ReviewReq, ReceiveBatchGivesCreditBackToASenderWaitingForIt) {
  net::ListenOptions lo;
  lo.inbox_messages = 2;
  lo.inbox_bytes = 4096;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  constexpr std::uint32_t kN = 300;
  std::atomic<bool> sent{false};
  std::thread tx([&] {
    for (std::uint32_t i = 0; i < kN; ++i)
      if (!p->client.send(numbered(p->client, i % 50 == 0 ? (1u << 20) : 1500, i), secs(5))) return;
    sent = true;
  });
  std::vector<net::Message> batch(3);
  std::uint32_t next = 0;
  while (next < kN) {
    auto n = p->server.receive_batch(batch, secs(5));
    ASSERT_TRUE(n) << next << ": " << n.error().message();
    for (std::size_t j = 0; j < *n; ++j) {
      ASSERT_EQ(batch[j].kind, Kind::Message) << batch[j].why;
      ASSERT_EQ(number_of(batch[j].buffer), next++);
    }
  }
  tx.join();
  EXPECT_TRUE(sent);
}

// Requests left unanswered in the span from the last batch are dropped by the next call (their
// tokens answer NoReply, taking the worker's lock): no deadlock, each comes back to the client
// once as NoReply, and a request answered meanwhile is not answered twice.
TEST(ReviewReq, ReceiveBatchDroppingTheLastBatchsRequestsAnswersNoReplyOnce) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  constexpr std::uint32_t kN = 6;
  for (std::uint32_t i = 0; i < kN; ++i)
    ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, i)));
  std::vector<net::Message> batch(kN);
  std::size_t taken = 0;
  while (taken < kN) {
    auto n = p->server.receive_batch(std::span(batch).subspan(taken), secs(5));
    ASSERT_TRUE(n) << n.error().message();
    taken += *n;
  }
  ASSERT_TRUE(answer(std::move(batch[0]), 1000));
  // The next batch drops the other five (and the answered one's empty copy).
  ASSERT_TRUE(p->client.send(numbered(p->client, 64, 77)));
  auto n = p->server.receive_batch(batch, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  ASSERT_EQ(batch[0].kind, Kind::Message);
  int ok = 0;
  int no_reply = 0;
  for (Deadline d = secs(5); ok + no_reply < static_cast<int>(kN) && !d.expired();) {
    auto m = p->client.receive(d);
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Reply) << m->why;
    (m->error == Errc::NoReply ? no_reply : ok) += 1;
  }
  EXPECT_EQ(ok, 1);
  EXPECT_EQ(no_reply, static_cast<int>(kN) - 1);
  EXPECT_EQ(credit_of(p->client).msgs, 0u);
  EXPECT_FALSE(p->client.receive(Deadline::after(100ms))) << "a reply too many";
}

// The end comes once, after everything the peer sent, rendezvous replies included: the server
// answers a send_request() with 8 MiB and closes at once (its Bye held behind the fetch).
TEST(ReviewReq, ARendezvousReplyBeingFetchedWhenThePeerClosesComesBeforeTheEnd) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 5)));
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 6)));
  {
    auto a = p->server.receive(secs(5));
    auto b = p->server.receive(secs(5));
    ASSERT_TRUE(a && b);
    ASSERT_TRUE(a->buffer.resize(8u << 20));
    ASSERT_TRUE(answer(std::move(*a), 1005));
    ASSERT_TRUE(p->server.send(numbered(p->server, 64, 9)));
    ASSERT_TRUE(answer(std::move(*b), 1006));
    p->server.close();
  }
  std::vector<net::Message> batch(8);
  std::vector<std::uint32_t> got;
  int ends = 0;
  for (Deadline d = secs(5); ends == 0 && !d.expired();) {
    auto n = p->client.receive_batch(batch, d);
    ASSERT_TRUE(n) << n.error().message();
    for (std::size_t j = 0; j < *n; ++j) {
      if (batch[j].kind == Kind::PeerClosed) {
        ++ends;
        EXPECT_EQ(j + 1, *n) << "the end before other messages";
        continue;
      }
      got.push_back(number_of(batch[j].buffer));
    }
  }
  const std::vector<std::uint32_t> want{1005, 9, 1006};
  EXPECT_EQ(got, want);
  EXPECT_EQ(ends, 1);
  auto again = p->client.receive_batch(batch, Deadline::after(100ms));
  EXPECT_FALSE(again) << "a second end";
}

// Our own close() while a 32 MiB reply to a send_request() is being fetched: no hang, no crash,
// and the listed request goes with the channel.
TEST(ReviewReq, ClosingWhileARendezvousReplyIsFetchedNeitherHangsNorCrashes) {
  auto p = make_pair();
  ASSERT_TRUE(p);
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 1)));
  auto m = p->server.receive(secs(5));
  ASSERT_TRUE(m);
  ASSERT_TRUE(m->buffer.resize(32u << 20));
  ASSERT_TRUE(answer(std::move(*m), 1001));
  (void)p->client.receive(Deadline::after(2ms));  // its header, maybe some of the payload
  const auto t0 = std::chrono::steady_clock::now();
  p->client.close();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
  auto r = p->client.receive(Deadline::after(10ms));
  EXPECT_FALSE(r);
  auto end = p->server.receive(secs(5));
  ASSERT_TRUE(end) << end.error().message();
  EXPECT_EQ(end->kind, Kind::PeerClosed);
}

// ---- the inbox's slots after close(): a lingering channel ----

// Fixed: the slot numbers move on past a dropped inbox (drop_inbox_locked), and a payload whose
// place is gone or filled is dropped before a reply token exists (deliver_locked). Before:
// close() (and each K5 linger_tick) swapped the inbox out without moving inbox_head_, so the slot
// number a rendezvous payload kept before the swap now names an index of the NEW inbox. A
// message that arrives during the linger is pushed at that index, and when the old payload lands
// (deliver_locked: `slot - inbox_head_ < inbox_.size()`) it overwrites that message under the
// worker's lock. A Request's ReplyToken destroyed there answers NoReply: ChannelCore::reply()
// takes the same lock again, in the keeper's thread, inside ucp_worker_progress: the keeper hangs
// holding the worker's lock, and with it every channel of that worker (a listener's: all its
// clients) and every heartbeat, linger and close the keeper runs for the process.
// Not a test: run as a program of its own (a hang there cannot hang the test run). Exits 3 if
// the client's worker lock cannot be taken 2 s after the payload landed.
TEST(ReviewReqHelper, DISABLED_ARequestArrivingWhileALingeringChannelsPayloadLands) {
  if (std::getenv("MBMQ_REVIEW_REQ_HELPER") == nullptr) GTEST_SKIP() << "a helper";
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;  // nothing progresses the server's worker but this thread
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto p = make_pair(lo, co);
  ASSERT_TRUE(p);
  constexpr std::size_t kSize = 32 << 10;  // rendezvous (UCX_RNDV_THRESH=4096 in the env)
  std::shared_ptr<net::detail::ChannelCore> core = test::core_of(p->client);
  // The client's, fetched by the server only later: the client's Bye is held behind it there.
  ASSERT_TRUE(p->client.send(test::filled(p->client, kSize, 'm')));
  // The server's, whose fetch the client starts now (its slot: 0); the server does not progress.
  ASSERT_TRUE(p->server.send(test::filled(p->server, kSize, 's')));
  bool in_flight = false;
  for (Deadline d = secs(3); !in_flight && !d.expired();) {
    (void)p->client.receive(Deadline::after(2ms));
    os::LockGuard lock(core->w_->mu);
    in_flight = core->rx_in_flight_locked();
  }
  ASSERT_TRUE(in_flight) << "the server's payload was not rendezvous (UCX_RNDV_THRESH?)";
  p->client.close();  // lingers (K5): the inbox swapped out, inbox_head_ still 0
  {
    os::LockGuard lock(core->w_->mu);
    ASSERT_TRUE((*core).*get(test::LingeringOf{}));
    ASSERT_TRUE(core->rx_in_flight_locked());
  }
  // The fetch takes legs both ways (UCX 1.13 over TCP: the server answers the client's request
  // for the data, the client answers that, then the data comes). Each side progresses in turn:
  // the server with the client's worker lock held (so the keeper's linger_tick() waits), then
  // the keeper alone.
  std::this_thread::sleep_for(50ms);
  {
    os::LockGuard lock(core->w_->mu);
    for (int k = 0; k < 3; ++k) (void)p->server.receive(Deadline::after(10ms));
  }
  std::this_thread::sleep_for(50ms);
  {
    // The last leg: the request goes first, then the payload's data; the keeper's next tick
    // takes both from the socket in one progress step.
    os::LockGuard lock(core->w_->mu);
    ASSERT_TRUE(core->rx_in_flight_locked()) << "fetched already";
    ASSERT_TRUE(p->server.send_request(test::filled(p->server, 64, 'r')));  // at index 0: its slot
    for (int k = 0; k < 3; ++k) (void)p->server.receive(Deadline::after(10ms));  // data goes
    std::this_thread::sleep_for(20ms);
  }
  std::this_thread::sleep_for(200ms);  // the keeper's ticks
  std::atomic<bool> got{false};
  std::thread t([&] {
    os::LockGuard lock(core->w_->mu);
    got = true;
  });
  for (Deadline d = secs(2); !got.load() && !d.expired();) std::this_thread::sleep_for(5ms);
  if (!got.load()) {
    std::printf("helper: the client's worker lock is held for ever (keeper deadlocked)\n");
    std::fflush(stdout);
    std::_Exit(3);
  }
  t.join();
  std::printf("helper: no deadlock\n");
}

TEST(ReviewReq, ARequestArrivingWhileALingeringChannelsPayloadLandsDoesNotDeadlockTheKeeper) {
  int hung = 0;
  for (int round = 0; round < 3 && hung == 0; ++round) {
    auto pid = test::spawn_helper(
        "ReviewReqHelper.DISABLED_ARequestArrivingWhileALingeringChannelsPayloadLands",
        {"MBMQ_REVIEW_REQ_HELPER=1", "UCX_RNDV_THRESH=4096"});
    ASSERT_TRUE(pid) << pid.error().message();
    int st = 0;
    bool done = false;
    for (Deadline d = secs(8); !d.expired();) {
      if (::waitpid(*pid, &st, WNOHANG) == *pid) {
        done = true;
        break;
      }
      std::this_thread::sleep_for(5ms);
    }
    if (!done) {
      ::kill(*pid, SIGKILL);
      (void)::waitpid(*pid, &st, 0);
      hung = -1;
      break;
    }
    ASSERT_TRUE(WIFEXITED(st)) << "helper status 0x" << std::hex << st;
    if (WEXITSTATUS(st) == 3) hung = round + 1;
    ASSERT_TRUE(WEXITSTATUS(st) == 0 || WEXITSTATUS(st) == 3) << "helper exit " << WEXITSTATUS(st);
  }
  EXPECT_EQ(hung, 0) << "the keeper deadlocked on a ReplyToken destroyed under the worker's lock"
                     << " (round " << hung << ")";
}

// ---- threads ----

// send_request() on one thread, call() on another, receive() on a third, against an echoing
// server: every request gets its own reply once, and the credit is all back at the end.
TEST(ReviewReq, SendRequestCallAndReceiveOnThreeThreadsKeepTheCreditExact) {
  net::ListenOptions lo;
  lo.inbox_messages = 4;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  constexpr std::uint32_t kReq = 300;
  constexpr std::uint32_t kCalls = 300;
  std::atomic<bool> stop{false};
  std::thread srv([&] {
    while (!stop.load()) {
      auto m = p->server.receive(Deadline::after(20ms));
      if (!m) continue;
      if (m->kind != Kind::Request) return;
      if (!answer(std::move(*m), number_of(m->buffer) + 1'000'000)) return;
    }
  });
  std::atomic<int> call_errors{0};
  std::thread caller([&] {
    for (std::uint32_t i = 0; i < kCalls; ++i) {
      net::Buffer b = numbered(p->client, 64 + i % 200, 100'000 + i);
      auto st = p->client.call(b, secs(5));
      if (!st || number_of(b) != 1'100'000 + i) ++call_errors;
    }
  });
  std::atomic<int> send_errors{0};
  std::thread sender([&] {
    for (std::uint32_t i = 0; i < kReq; ++i)
      if (!p->client.send_request(numbered(p->client, i % 17 == 0 ? (1u << 20) : 64, i), secs(5)))
        ++send_errors;
  });
  std::vector<int> seen(kReq, 0);
  std::uint32_t replies = 0;
  for (Deadline d = secs(8); replies < kReq && !d.expired();) {
    auto m = p->client.receive(Deadline::after(50ms));
    if (!m) continue;
    ASSERT_EQ(m->kind, Kind::Reply) << m->why;
    const std::uint32_t i = number_of(m->buffer) - 1'000'000;
    ASSERT_LT(i, kReq) << "a call's reply came through receive()";
    ++seen[i];
    ++replies;
  }
  caller.join();
  sender.join();
  stop = true;
  srv.join();
  EXPECT_EQ(call_errors.load(), 0);
  EXPECT_EQ(send_errors.load(), 0);
  EXPECT_EQ(replies, kReq);
  for (std::uint32_t i = 0; i < kReq; ++i) EXPECT_EQ(seen[i], 1) << i;
  const Credit c = credit_of(p->client);
  EXPECT_EQ(c.msgs, 0u);
  EXPECT_EQ(c.bytes, 0u);
  EXPECT_EQ(c.listed, 0u);
}

// ---- hostile server ----

// A server answering a 64 B send_request() with a much larger reply (1 MiB here; up to the
// client's own limit, 64 MiB by default, whatever the listener's max_message) is accepted: R2's
// bound is "one reply of up to our limit per request we sent" (documented), pinned here; the
// request's credit comes back, not the reply's size.
TEST(ReviewReq, AReplyMuchLargerThanItsRequestIsAcceptedUpToOurLimit) {
  net::ListenOptions lo;
  lo.max_message = 1u << 20;
  auto p = make_pair(lo, {});
  ASSERT_TRUE(p);
  ASSERT_TRUE(p->client.send_request(numbered(p->client, 64, 1)));
  auto m = p->server.receive(secs(5));
  ASSERT_TRUE(m);
  auto token = m->buffer.*get(test::TokenOf{});
  ASSERT_TRUE(token);
  token->answered = true;
  auto core = test::core_of(p->server);
  auto big = p->server.buffer(1u << 20);
  ASSERT_TRUE(big);
  ASSERT_TRUE(big->resize(1u << 20));
  ASSERT_TRUE(core->reply(token->seq, std::move(*big), net::detail::kReplyOk, 64));
  auto r = p->client.receive(secs(5));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(r->kind, Kind::Reply) << r->why;
  EXPECT_EQ(r->buffer.size(), 1u << 20);
  EXPECT_EQ(credit_of(p->client).msgs, 0u);
}

}  // namespace
}  // namespace mbmq
