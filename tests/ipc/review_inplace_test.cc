// Hostile review of the stream's own path (#14, de82c01: Channel::reserve(), Reservation::commit(),
// Channel::receive_in_place(); RingConsumer::untake() then, since removed). Each test states the
// guarantee it checks.
// Tests marked "CONFIRMED BUG" failed on de82c01 and pass with the fixes that followed the review
// (endpoint_stream.cc: internal entries consumed through accept(), an error once the end was
// delivered; ensure_watched() in reserve() and alloc_until()); tests marked "PRE-EXISTING" failed
// on the Buffer path too; the others passed on de82c01 (the new path keeps the Buffer path's
// guarantees).
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ipc/inplace_util.h"
#include "ipc/test_access.h"
#include "mbmq/mbmq.h"
#include "os/process.h"
#include "shm/layout.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::secs;

using test::free_buffers;
using test::inplace_options;
using test::read_msg;
using test::write_msg;

// Sends seqs [first, first + count) through reserve()/commit() (test::produce_in_place).
bool produce(Channel& ch, std::uint64_t first, std::uint64_t count, std::size_t size) {
  Status why;
  return test::produce_in_place(ch, first, count, size, 32, secs(5), &why) == count;
}

shm::Direction* dir0(Channel& side0) {
  auto seg = detail::TestAccess::segment(side0);
  return reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset);
}

// CONFIRMED BUG (ReviewInPlace.AReturnDescriptorAheadOfTheStreamIsNotAMessageOfAnotherKind).
// receive_in_place() returns 0 for "the next message is of another kind", but it also does so
// when the entry at the head is no message at all: an extent's Return (or a ReleaseExtent hint,
// or the late reply to a call that timed out), which receive() consumes silently before
// delivering the next plain one-way message as a Message. Any end that both sends extents and
// consumes a stream gets this: receive() hands it a stream message the contract said was not one.
// Cause: endpoint_stream.cc take_in_place_locked(): every descriptor take_peer_slot_one_way()
// refuses is untaken, including those that deliver nothing.
TEST(ReviewInPlace, AReturnDescriptorAheadOfTheStreamIsNotAMessageOfAnotherKind) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [a, b] = *p;
  // b sends a one-way extent to a; a drops it: its Return descriptor goes into b's inbound ring.
  auto x = b.buffer(4096);
  ASSERT_TRUE(x);
  ASSERT_TRUE(b.send(std::move(*x)));
  {
    auto m = a.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->buffer.size(), 4096u);
  }
  // Then a streams three plain one-way messages to b.
  ASSERT_TRUE(produce(a, 0, 3, 64));
  InPlace in;
  auto n = b.receive_in_place(in, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  EXPECT_EQ(*n, 3u) << "a Return ahead of the stream made receive_in_place() say 'another kind'";
  if (*n == 0) {
    auto m = b.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_NE(m->kind, Kind::Message)
        << "0 promised a message of another kind; receive() delivered a plain one-way message ("
        << read_msg(m->buffer.data()) << ")";
  }
}

// CONFIRMED BUG, the same cause
// (ReviewInPlace.ALateReplyAheadOfTheStreamIsNotAMessageOfAnotherKind): the late reply to a call()
// that timed out (Abandoned: consumed silently by receive()) ahead of the stream. The fix must
// cover Reply too (accept(): Internal -> go on), not only Return and ReleaseExtent.
TEST(ReviewInPlace, ALateReplyAheadOfTheStreamIsNotAMessageOfAnotherKind) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [a, b] = *p;
  auto buf = b.buffer(16);
  ASSERT_TRUE(buf);
  Buffer call = std::move(*buf);
  auto r = b.call(call, Deadline::after(30ms));  // a does not answer in time
  ASSERT_FALSE(r);
  ASSERT_EQ(r.error().code, Errc::TimedOut);
  auto req = a.receive(secs(5));
  ASSERT_TRUE(req) << req.error().message();
  ASSERT_EQ(req->kind, Kind::Request);
  ASSERT_TRUE(MsgQueue::reply(std::move(*req)));  // the late reply, then the stream
  ASSERT_TRUE(produce(a, 0, 3, 64));
  InPlace in;
  auto n = b.receive_in_place(in, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  EXPECT_EQ(*n, 3u)
      << "a late reply ahead of the stream made receive_in_place() say 'another kind'";
  if (*n == 0) {
    auto m = b.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_NE(m->kind, Kind::Message)
        << "0 promised a message of another kind; receive() delivered a plain one-way message";
  }
}

// close() from another thread ends a reserve() waiting for room and a receive_in_place() waiting
// for messages at once (InvalidArgument: closed locally; the producer may see the peer's close
// first), in every wait mode. (Passed on de82c01.)
TEST(ReviewInPlace, CloseFromAnotherThreadEndsWaitingReserveAndReceiveInPlace) {
  for (WaitMode mode : {WaitMode::Spin, WaitMode::Adaptive, WaitMode::Sleep}) {
    auto p = Channel::pair(inplace_options(mode, 16));
    ASSERT_TRUE(p);
    auto& [tx, rx] = *p;
    Reservation full;
    ASSERT_EQ(*tx.reserve(full, 64, 16, secs(5)), 16u);
    Errc reserve_err{}, receive_err{};
    std::int64_t reserve_took = 0, receive_took = 0;
    std::thread producer([&] {
      Reservation r;
      const std::int64_t t0 = monotonic_ns();
      auto n = tx.reserve(r, 64, 4, secs(20));
      reserve_took = monotonic_ns() - t0;
      reserve_err = n ? Errc{} : n.error().code;
    });
    std::thread consumer([&] {
      InPlace in;
      const std::int64_t t0 = monotonic_ns();
      auto n = rx.receive_in_place(in, secs(20));
      receive_took = monotonic_ns() - t0;
      receive_err = n ? Errc{} : n.error().code;
    });
    std::this_thread::sleep_for(100ms);
    rx.close();  // first: tx's close would end rx's wait as PeerClosed (0, "use receive()")
    consumer.join();
    tx.close();
    producer.join();
    EXPECT_EQ(receive_err, Errc::InvalidArgument);
    EXPECT_TRUE(reserve_err == Errc::InvalidArgument || reserve_err == Errc::PeerClosed)
        << static_cast<int>(reserve_err);
    EXPECT_LT(reserve_took, 2'000'000'000);
    EXPECT_LT(receive_took, 2'000'000'000);
  }
}

// CONFIRMED (contract) (ReviewInPlace.AfterTheEndReceiveInPlaceFailsAsReceiveDoes).
// Once receive() has delivered the final PeerClosed, receive() fails with PeerClosed, but
// receive_in_place() returns 0 ("use receive()") at once, forever, whatever its deadline: a loop
// that treats 0 as "call receive() and go on" and tolerates receive()'s error spins. Cause:
// endpoint_stream.cc receive_in_place(): only LocalClosed is an error; take_in_place_locked()
// says *other for any state but Open, end_reported_ or not.
TEST(ReviewInPlace, AfterTheEndReceiveInPlaceFailsAsReceiveDoes) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  tx.close();
  InPlace in;
  auto first = rx.receive_in_place(in, secs(5));
  ASSERT_TRUE(first);
  EXPECT_EQ(*first, 0u);
  auto end = rx.receive(secs(5));
  ASSERT_TRUE(end);
  ASSERT_EQ(end->kind, Kind::PeerClosed);
  auto after = rx.receive(Deadline::after(100ms));
  ASSERT_FALSE(after);
  EXPECT_EQ(after.error().code, Errc::PeerClosed);
  auto again = rx.receive_in_place(in, Deadline::never());
  EXPECT_FALSE(again) << "receive_in_place() returned " << *again << " after the end";
  if (!again) {
    EXPECT_EQ(again.error().code, Errc::PeerClosed);
  }
}

// A hostile producer publishes a second descriptor naming a slot the consumer still reads in
// place: not taken (held), left to receive(), which closes the channel; the bytes being read are
// not given back. (Passed on de82c01.)
TEST(ReviewInPlace, AHostileDescriptorNamingAHeldSlotIsNotTakenTwice) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  ASSERT_TRUE(produce(tx, 0, 1, 64));
  InPlace in;
  ASSERT_EQ(*rx.receive_in_place(in, secs(5)), 1u);
  ASSERT_EQ(read_msg(in[0]), 0u);
  shm::Direction* d = dir0(tx);
  // Entry 1: the same descriptor again (the same slot, still held by `in`).
  d->ring[1].size = d->ring[0].size;
  d->ring[1].gen = d->ring[0].gen;
  d->ring[1].buffer = d->ring[0].buffer;
  d->ring[1].kind = d->ring[0].kind;
  d->ring[1].seq.store(2, std::memory_order_release);
  d->tail.store(2, std::memory_order_release);
  InPlace in2;
  auto n = rx.receive_in_place(in2, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  EXPECT_EQ(*n, 0u);
  auto m = rx.receive(secs(5));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed);
  EXPECT_EQ(m->error, Errc::Protocol);
  EXPECT_EQ(read_msg(in[0]), 0u);
  const std::uint64_t ret = d->returned[0].load();
  in.reset();
  EXPECT_EQ(d->returned[0].load(), ret) << "a slot went back to a channel that is over";
}

// A hostile consumer sets every `returned` bit while the producer holds slots reserved (App):
// none of them is freed, no slot is handed out twice, and the stream arrives intact.
// (Passed on de82c01.)
TEST(ReviewInPlace, ScribbledReturnedBitsNeverFreeAReservedSlot) {
  auto p = Channel::pair(inplace_options(WaitMode::Adaptive, 64));
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  Reservation r1, r2;
  ASSERT_EQ(*tx.reserve(r1, 64, 32, secs(5)), 32u);
  shm::Direction* d = dir0(tx);
  for (auto& w : d->returned) w.store(~std::uint64_t{0});
  ASSERT_EQ(*tx.reserve(r2, 64, 64, secs(5)), 32u);
  std::set<const std::byte*> seen;
  for (std::size_t i = 0; i < 32; ++i) {
    EXPECT_TRUE(seen.insert(r1.slot(i).data()).second);
    EXPECT_TRUE(seen.insert(r2.slot(i).data()).second);
    write_msg(r1.slot(i), i);
    write_msg(r2.slot(i), 32 + i);
  }
  ASSERT_EQ(*r1.commit(32), 32u);
  ASSERT_EQ(*r2.commit(32), 32u);
  InPlace in;
  std::uint64_t next = 0;
  while (next < 64) {
    auto n = rx.receive_in_place(in, secs(5));
    ASSERT_TRUE(n) << n.error().message();
    ASSERT_GT(*n, 0u);
    for (std::size_t i = 0; i < *n; ++i, ++next) ASSERT_EQ(read_msg(in[i]), next);
  }
}

// A Reservation used with another channel gives the first one's slots back, and commits to the
// second. (Passed on de82c01.)
TEST(ReviewInPlace, AReservationReusedOnAnotherChannelGivesTheFirstsSlotsBack) {
  auto p = Channel::pair(inplace_options());
  auto q = Channel::pair(inplace_options());
  ASSERT_TRUE(p && q);
  auto& [a, b] = *p;
  auto& [c, d] = *q;
  Reservation r;
  ASSERT_EQ(*a.reserve(r, 64, 10, secs(5)), 10u);
  ASSERT_EQ(*c.reserve(r, 64, 5, secs(5)), 5u);
  EXPECT_EQ(free_buffers(a, 64), 64u);
  for (std::size_t i = 0; i < 5; ++i) write_msg(r.slot(i), i);
  ASSERT_EQ(*r.commit(5), 5u);
  InPlace in;
  ASSERT_EQ(*d.receive_in_place(in, secs(5)), 5u);
  for (std::size_t i = 0; i < 5; ++i) EXPECT_EQ(read_msg(in[i]), i);
  ASSERT_TRUE(produce(a, 0, 2, 64));
  ASSERT_EQ(*b.receive_in_place(in, secs(5)), 2u);  // d's 5 go back first
  EXPECT_EQ(free_buffers(c, 64), 64u);
}

// A Reservation and an InPlace outlive their channels (closed, then destroyed): commit() fails,
// the bytes stay readable, and reset()/destruction are safe. (Passed on de82c01.)
TEST(ReviewInPlace, AReservationAndAnInPlaceOutliveTheirChannel) {
  Reservation r;
  InPlace in;
  {
    auto p = Channel::pair(inplace_options());
    ASSERT_TRUE(p);
    auto& [tx, rx] = *p;
    ASSERT_EQ(*tx.reserve(r, 64, 4, secs(5)), 4u);
    write_msg(r.slot(0), 7);
    ASSERT_EQ(*r.commit(1), 1u);
    ASSERT_EQ(*rx.receive_in_place(in, secs(5)), 1u);
    tx.close();
  }
  auto k = r.commit(1);
  ASSERT_FALSE(k);
  EXPECT_EQ(k.error().code, Errc::InvalidArgument);
  EXPECT_EQ(read_msg(in[0]), 7u);
  write_msg(r.slot(0), 8);  // still mapped
  r.reset();
  in.reset();
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  ASSERT_TRUE(produce(p->first, 0, 1, 64));
  ASSERT_EQ(*p->second.receive_in_place(in, secs(5)), 1u);
}

// Two threads on one end: one waits in receive_in_place() (Deadline::never()), the other's
// receive_in_place() and receive() honour their own deadlines, and redirect() is refused while
// the first waits. (Passed on de82c01.)
TEST(ReviewInPlace, AnotherThreadsCallsHonourTheirDeadlinesWhileOneWaitsInPlace) {
  for (WaitMode mode : {WaitMode::Spin, WaitMode::Adaptive, WaitMode::Sleep}) {
    auto p = Channel::pair(inplace_options(mode));
    ASSERT_TRUE(p);
    auto& [tx, rx] = *p;
    std::atomic<bool> started{false};
    std::size_t got = 0;
    std::thread waiter([&] {
      InPlace in;
      started.store(true);
      auto n = rx.receive_in_place(in, Deadline::never());
      got = n ? *n : 999;
    });
    while (!started.load()) std::this_thread::yield();
    std::this_thread::sleep_for(20ms);
    InPlace in2;
    std::int64_t t0 = monotonic_ns();
    auto n2 = rx.receive_in_place(in2, Deadline::after(50ms));
    std::int64_t took = monotonic_ns() - t0;
    ASSERT_FALSE(n2);
    EXPECT_EQ(n2.error().code, Errc::TimedOut);
    EXPECT_LT(took, 2'000'000'000);
    t0 = monotonic_ns();
    auto m = rx.receive(Deadline::after(50ms));
    took = monotonic_ns() - t0;
    ASSERT_FALSE(m);
    EXPECT_EQ(m.error().code, Errc::TimedOut);
    EXPECT_LT(took, 2'000'000'000);
    auto q = MsgQueue::create();
    ASSERT_TRUE(q);
    auto red = rx.redirect(*q, 1);
    ASSERT_FALSE(red);
    EXPECT_EQ(red.error().code, Errc::Busy);
    ASSERT_TRUE(produce(tx, 0, 3, 64));
    waiter.join();
    EXPECT_GE(got, 1u);
    EXPECT_LE(got, 3u);
  }
}

// A producer waiting in reserve() for room is woken when another thread's Reservation gives its
// slots back (unreserve: a local free), in every wait mode, well before its deadline.
// (Passed on de82c01.)
TEST(ReviewInPlace, AReserveWaitingForRoomIsWokenByALocalUnreserve) {
  for (WaitMode mode : {WaitMode::Spin, WaitMode::Adaptive, WaitMode::Sleep}) {
    auto p = Channel::pair(inplace_options(mode, 16));
    ASSERT_TRUE(p);
    auto& [tx, rx] = *p;
    Reservation r1;
    ASSERT_EQ(*tx.reserve(r1, 64, 16, secs(5)), 16u);
    std::int64_t took = 0;
    std::size_t got = 0;
    std::thread waiter([&] {
      Reservation r2;
      const std::int64_t t0 = monotonic_ns();
      auto n = tx.reserve(r2, 64, 4, secs(20));
      took = monotonic_ns() - t0;
      got = n ? *n : 0;
    });
    std::this_thread::sleep_for(50ms);
    r1.reset();
    waiter.join();
    EXPECT_EQ(got, 4u);
    EXPECT_LT(took, 2'000'000'000);
    (void)rx;
  }
}

// Messages set aside by call() (one-way messages that arrived while it waited for its reply) come
// first, in order, through receive(); receive_in_place() says 0 until they are all taken, then
// the stream goes on in place. (Passed on de82c01.)
TEST(ReviewInPlace, MessagesSetAsideByACallKeepTheirPlaceInTheStream) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [a, b] = *p;
  std::thread server([&] {
    auto req = a.receive(secs(5));
    if (!req || req->kind != Kind::Request) return;
    (void)produce(a, 0, 3, 64);  // before the reply: b's call() sets them aside
    (void)MsgQueue::reply(std::move(*req));
  });
  auto buf = b.buffer(16);
  ASSERT_TRUE(buf);
  Buffer call = std::move(*buf);
  ASSERT_TRUE(b.call(call, secs(5)));
  server.join();
  ASSERT_TRUE(produce(a, 3, 3, 64));
  InPlace in;
  std::uint64_t next = 0;
  while (next < 6) {
    auto n = b.receive_in_place(in, secs(5));
    ASSERT_TRUE(n) << n.error().message();
    for (std::size_t i = 0; i < *n; ++i, ++next) ASSERT_EQ(read_msg(in[i]), next);
    if (*n > 0) continue;
    ASSERT_LT(next, 3u) << "0 after the messages set aside";
    auto m = b.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Message);
    ASSERT_EQ(read_msg(m->buffer.data()), next);
    ++next;
  }
}

// A consumer end redirected to a MsgQueue: receive_in_place() is refused (InvalidArgument), and
// what reserve()/commit() sends arrives through the queue, woken (Sleep mode). (Passed on de82c01.)
TEST(ReviewInPlace, ARedirectedConsumerGetsCommittedMessagesThroughItsQueue) {
  auto p = Channel::pair(inplace_options(WaitMode::Sleep));
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  auto q = MsgQueue::create(WaitPolicy{WaitMode::Sleep, std::chrono::microseconds(0)});
  ASSERT_TRUE(q);
  ASSERT_TRUE(rx.redirect(*q, 42));
  InPlace in;
  auto n = rx.receive_in_place(in, secs(1));
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().code, Errc::InvalidArgument);
  std::thread producer([&] {
    std::this_thread::sleep_for(50ms);  // the queue sleeps first
    (void)produce(tx, 0, 40, 64);
  });
  for (std::uint64_t i = 0; i < 40; ++i) {
    auto m = q->wait(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Message);
    EXPECT_EQ(m->key, 42u);
    ASSERT_EQ(read_msg(m->buffer.data()), i);
  }
  producer.join();
}

// An untrusted producer end streams through reserve()/commit() to a cooperative consumer reading
// in place. (Passed on de82c01.)
TEST(ReviewInPlace, AnUntrustedProducerStreamsToACooperativeConsumerInPlace) {
  ChannelOptions o = inplace_options();
  o.trust = {Trust::Untrusted, Trust::Cooperative};
  auto p = Channel::pair(o);
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  bool sent = false;
  std::thread producer([&] { sent = produce(tx, 0, 1000, 200); });
  InPlace in;
  std::uint64_t next = 0;
  while (next < 1000) {
    auto n = rx.receive_in_place(in, secs(5));
    ASSERT_TRUE(n) << n.error().message();
    ASSERT_GT(*n, 0u);
    for (std::size_t i = 0; i < *n; ++i, ++next) ASSERT_EQ(read_msg(in[i]), next);
  }
  in.reset();
  producer.join();
  EXPECT_TRUE(sent);
}

// A hostile consumer publishes an impossible head: commit() fails with Protocol, sends nothing,
// and leaves the slots reserved (given back by reset()); a head that claims a full ring is
// WouldBlock. (Passed on de82c01.)
TEST(ReviewInPlace, AHostileHeadFailsCommitWithoutLosingTheReservation) {
  {
    auto p = Channel::pair(inplace_options());
    ASSERT_TRUE(p);
    auto& [tx, rx] = *p;
    Reservation r;
    ASSERT_EQ(*tx.reserve(r, 64, 8, secs(5)), 8u);
    dir0(tx)->head.store(1u << 20);  // ahead of the tail: Corrupt
    auto k = r.commit(8);
    ASSERT_FALSE(k);
    EXPECT_EQ(k.error().code, Errc::Protocol);
    EXPECT_EQ(r.size(), 8u);
    r.reset();
    (void)rx;
  }
  {
    auto p = Channel::pair(inplace_options());
    ASSERT_TRUE(p);
    auto& [tx, rx] = *p;
    Reservation r;
    ASSERT_EQ(*tx.reserve(r, 64, 8, secs(5)), 8u);
    dir0(tx)->head.store(0u - shm::kRingCapacity + 4);  // 1020 entries "in use": room for 4
    auto k = r.commit(8);
    ASSERT_FALSE(k);
    EXPECT_EQ(k.error().code, Errc::WouldBlock);
    EXPECT_EQ(r.size(), 8u);
    (void)rx;
  }
}

// PRE-EXISTING (also the Buffer path: ReviewInPlace.AForkedProducerInBuffersLearnsOfTheDeath).
// A producer in a forked child whose only calls are reserve()/commit() never watches its peer
// (ensure_watched() is called by receive paths only): when the consumer dies, reserve() waits for
// room until its deadline (Deadline::never(): forever) instead of ending with PeerClosed.
// Cause: endpoint_stream.cc reserve() (and endpoint.cc alloc_until()) do not ensure_watched().
int forked_producer_outcome(bool in_place) {
  auto p = Channel::pair(inplace_options(WaitMode::Adaptive, 16));
  if (!p) return -1;
  auto& [producer, consumer] = *p;
  // The producer: a child of its own (its end was never watched in its process).
  pid_t prod = test::spawn([&] {
    consumer = {};
    const std::int64_t t0 = monotonic_ns();
    Status why;
    if (in_place) {
      Reservation r;
      for (std::uint64_t seq = 0;; ++seq) {
        auto n = producer.reserve(r, 64, 1, secs(8));
        if (!n) {
          why = fail(n.error());
          break;
        }
        write_msg(r.slot(0), seq);
        if (auto k = r.commit(1); !k) {
          why = fail(k.error());
          break;
        }
      }
    } else {
      std::vector<Buffer> bufs(1);
      for (;;) {
        auto n = producer.buffers(64, bufs, secs(8));
        if (!n) {
          why = fail(n.error());
          break;
        }
        if (auto k = producer.send_batch({bufs.data(), 1}); !k) {
          why = fail(k.error());
          break;
        }
      }
    }
    const std::int64_t took = monotonic_ns() - t0;
    if (why.error().code == Errc::PeerClosed && took < 6'000'000'000) return 0;
    return why.error().code == Errc::TimedOut ? 2 : 3;
  });
  // The consumer: another child, which takes a few messages then stops and is killed.
  pid_t cons = test::spawn([&] {
    producer = {};
    for (int i = 0; i < 4; ++i) (void)consumer.receive(secs(5));
    ::pause();
    return 0;
  });
  producer = {};
  consumer = {};
  std::this_thread::sleep_for(300ms);
  ::kill(cons, SIGKILL);
  (void)test::join(cons);
  return test::join(prod);
}

TEST(ReviewInPlace, AForkedProducerInReserveLearnsOfTheConsumersDeath) {
  EXPECT_EQ(forked_producer_outcome(true), 0) << "2: reserve() waited to its deadline (TimedOut)";
}

TEST(ReviewInPlace, AForkedProducerInBuffersLearnsOfTheDeath) {
  EXPECT_EQ(forked_producer_outcome(false), 0) << "2: buffers() waited to its deadline (TimedOut)";
}

// Second review (2026-12-03): reserve() with no slot free reaps the ring for its own buffers (as
// alloc() does) and sets the messages it passes aside; receive_in_place() then says 0 (documented:
// "messages of any kind were set aside earlier") and receive() delivers them, in order, as plain
// messages; once they are taken, the stream goes on in place.
TEST(ReviewInPlace, PlainMessagesSetAsideByReserveComeThroughReceiveInOrder) {
  auto p = Channel::pair(inplace_options());  // 64 slots a side
  ASSERT_TRUE(p);
  auto& [a, b] = *p;
  ASSERT_TRUE(produce(a, 0, 3, 64));
  Reservation all, more;
  ASSERT_EQ(*b.reserve(all, 64, 64, secs(5)), 64u);  // b's pool: all reserved
  auto r = b.reserve(more, 64, 1, Deadline::after(20ms));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::TimedOut);
  InPlace in;
  for (std::uint64_t seq = 0; seq < 3; ++seq) {
    auto n = b.receive_in_place(in, secs(5));
    ASSERT_TRUE(n) << n.error().message();
    EXPECT_EQ(*n, 0u);
    auto m = b.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(m->kind, Kind::Message);
    EXPECT_EQ(read_msg(m->buffer.data()), seq);
  }
  ASSERT_TRUE(produce(a, 3, 2, 64));
  auto n = b.receive_in_place(in, secs(5));
  ASSERT_TRUE(n);
  ASSERT_EQ(*n, 2u);
  EXPECT_EQ(read_msg(in[0]), 3u);
  EXPECT_EQ(read_msg(in[1]), 4u);
}

}  // namespace
}  // namespace mbmq
