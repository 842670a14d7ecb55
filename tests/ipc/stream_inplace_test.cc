// The stream's own path (#14, mbmq/stream.h): Channel::reserve(), Reservation::commit(),
// Channel::receive_in_place(). Each claim of the header has a test here that fails if it is
// false: order and sizes, interplay with the Buffer API in both directions, slots not committed
// going back, argument errors, back-pressure with its deadline, a message of another kind left
// for receive() in its place, an untrusted end, a scribbled descriptor closing only its channel,
// either side killed mid-stream, and no system call or allocation per message while the
// receiver spins.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "alloc_count.h"  // bench/: the counting global operator new
#include "ipc/inplace_util.h"
#include "ipc/test_access.h"
#include "mbmq/mbmq.h"
#include "os/process.h"
#include "os/syscall_count.h"
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

// Sends messages 0 .. count - 1 of `size` bytes, up to `batch` at a time (test::produce_in_place).
std::uint64_t produce(Channel& ch, std::uint64_t count, std::size_t size, std::size_t batch,
                      Deadline deadline, Status* why) {
  return test::produce_in_place(ch, 0, count, size, batch, deadline, why);
}

// Receives in place until `count` messages, or until receive_in_place() says another kind of
// message is next (then receive() takes it: PeerClosed sets *ended). How many arrived intact and
// in order.
std::uint64_t consume(Channel& ch, std::uint64_t count, Deadline deadline, bool* ended,
                      std::string* bad) {
  InPlace in;
  std::uint64_t next = 0;
  *ended = false;
  while (next < count) {
    auto n = ch.receive_in_place(in, deadline);
    if (!n) {
      *bad = n.error().message();
      return next;
    }
    for (std::size_t i = 0; i < *n; ++i, ++next)
      if (read_msg(in[i]) != next) {
        *bad = "message " + std::to_string(next) + " arrived as " + std::to_string(read_msg(in[i]));
        return next;
      }
    if (*n > 0) continue;
    auto m = ch.receive(deadline);
    if (!m) {
      *bad = m.error().message();
      return next;
    }
    if (m->kind == Kind::PeerClosed) {
      *ended = true;
      return next;
    }
    *bad = "a message of another kind";
    return next;
  }
  return next;
}

TEST(StreamInPlace, ReservedSlotsArriveInOrderWithTheirOwnSizes) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  Reservation r;
  auto n = tx.reserve(r, 100, 10, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  ASSERT_EQ(*n, 10u);
  EXPECT_EQ(r.size(), 10u);
  EXPECT_EQ(r.capacity(), 256u);
  for (std::size_t i = 0; i < 10; ++i) {
    EXPECT_EQ(r.slot(i).size(), 100u);
    ASSERT_TRUE(r.resize(i, 8 + i * 20));
    write_msg(r.slot(i), i);
  }
  auto k = r.commit(4);  // a prefix; the rest stay reserved, renumbered from 0
  ASSERT_TRUE(k);
  EXPECT_EQ(*k, 4u);
  EXPECT_EQ(r.size(), 6u);
  EXPECT_EQ(read_msg(r.slot(0)), 4u);
  ASSERT_TRUE(r.commit(6));
  EXPECT_TRUE(r.empty());
  InPlace in;
  std::size_t got = 0;
  while (got < 10) {
    auto m = rx.receive_in_place(in, secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_GT(*m, 0u);
    for (std::size_t i = 0; i < *m; ++i, ++got) {
      EXPECT_EQ(in[i].size(), 8 + got * 20);
      EXPECT_EQ(read_msg(in[i]), got);
    }
  }
  EXPECT_EQ(free_buffers(tx, 64), 54u);  // 10 still held by the consumer's InPlace
  in.reset();
  EXPECT_EQ(free_buffers(tx, 64), 64u);  // given back (P7r)
}

// Either end may use either API: reserve/commit to receive_batch, send_batch to receive_in_place.
TEST(StreamInPlace, MixesWithTheBufferApiBothWays) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [a, b] = *p;
  Status why;
  ASSERT_EQ(produce(a, 40, 64, 16, secs(5), &why), 40u);
  std::vector<Message> msgs(64);
  std::size_t got = 0;
  while (got < 40) {
    auto n = b.receive_batch(msgs, secs(5));
    ASSERT_TRUE(n) << n.error().message();
    for (std::size_t i = 0; i < *n; ++i, ++got) {
      EXPECT_EQ(msgs[i].kind, Kind::Message);
      EXPECT_EQ(read_msg(msgs[i].buffer.data()), got);
    }
  }
  std::vector<Buffer> bufs(20);
  auto k = b.buffers(64, bufs, secs(5));
  ASSERT_TRUE(k);
  for (std::size_t i = 0; i < *k; ++i) write_msg(bufs[i].data(), i);
  ASSERT_EQ(*b.send_batch({bufs.data(), *k}), *k);
  bool ended = false;
  std::string bad;
  EXPECT_EQ(consume(a, *k, secs(5), &ended, &bad), *k) << bad;
}

// Slots reserved and not committed go back: at reset(), at the next reserve() into the same
// Reservation, and when it is destroyed.
TEST(StreamInPlace, SlotsNotCommittedGoBackToThePool) {
  auto p = Channel::pair(inplace_options(WaitMode::Adaptive, 64));
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  {
    Reservation r;
    ASSERT_EQ(*tx.reserve(r, 64, 64, secs(5)), 64u);
    EXPECT_EQ(free_buffers(tx, 64), 0u);
    for (std::size_t i = 0; i < 10; ++i) write_msg(r.slot(i), i);
    ASSERT_EQ(*r.commit(10), 10u);
    ASSERT_EQ(*tx.reserve(r, 64, 5, secs(5)), 5u);  // the 54 left go back first
    EXPECT_EQ(free_buffers(tx, 64), 49u);
    r.reset();
    EXPECT_EQ(free_buffers(tx, 64), 54u);
    ASSERT_EQ(*tx.reserve(r, 64, 30, secs(5)), 30u);
  }  // destroyed: the 30 go back
  EXPECT_EQ(free_buffers(tx, 64), 54u);
  bool ended = false;
  std::string bad;
  EXPECT_EQ(consume(rx, 10, secs(5), &ended, &bad), 10u) << bad;
}

TEST(StreamInPlace, BadArgumentsAreRefusedAndLeaveNothingReserved) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  Reservation r;
  auto big = tx.reserve(r, 257, 4, secs(1));
  ASSERT_FALSE(big);
  EXPECT_EQ(big.error().code, Errc::InvalidArgument);
  auto zero = tx.reserve(r, 64, 0, secs(1));
  ASSERT_FALSE(zero);
  EXPECT_EQ(zero.error().code, Errc::InvalidArgument);
  EXPECT_TRUE(r.empty());
  auto none = r.commit(1);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::InvalidArgument);
  ASSERT_EQ(*tx.reserve(r, 64, 1000, secs(1)), Reservation::kMaxSlots);  // at most kMaxSlots
  auto over = r.commit(Reservation::kMaxSlots + 1);
  ASSERT_FALSE(over);
  EXPECT_EQ(over.error().code, Errc::InvalidArgument);
  EXPECT_EQ(r.size(), Reservation::kMaxSlots);  // still reserved
  EXPECT_FALSE(r.resize(0, 257));
  EXPECT_FALSE(r.resize(Reservation::kMaxSlots, 8));
  EXPECT_EQ(r.slot(0).size(), 64u);
  EXPECT_EQ(*r.commit(0), 0u);
  Channel closed;
  auto c = closed.reserve(r, 64, 1, secs(1));
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, Errc::InvalidArgument);
  InPlace in;
  auto ci = closed.receive_in_place(in, secs(1));
  ASSERT_FALSE(ci);
  EXPECT_EQ(ci.error().code, Errc::InvalidArgument);
  (void)rx;
}

// Back-pressure: with every slot lent and none given back, reserve() waits, honours its deadline,
// and returns as soon as the consumer gives a batch back (from another thread).
TEST(StreamInPlace, ReserveWaitsForRoomAndHonoursItsDeadline) {
  for (WaitMode mode : {WaitMode::Spin, WaitMode::Adaptive, WaitMode::Sleep}) {
    auto p = Channel::pair(inplace_options(mode, 16));
    ASSERT_TRUE(p);
    auto& [tx, rx] = *p;
    Status why;
    ASSERT_EQ(produce(tx, 16, 64, 16, secs(5), &why), 16u);
    Reservation r;
    const std::int64_t t0 = monotonic_ns();
    auto none = tx.reserve(r, 64, 4, Deadline::after(50ms));
    const std::int64_t took = monotonic_ns() - t0;
    ASSERT_FALSE(none);
    EXPECT_EQ(none.error().code, Errc::TimedOut);
    EXPECT_GE(took, 50'000'000);
    EXPECT_LT(took, 5'000'000'000);
    InPlace in;
    ASSERT_EQ(*rx.receive_in_place(in, secs(5)), 16u);
    std::thread giver([&] {
      std::this_thread::sleep_for(20ms);
      in.reset();
    });
    auto some = tx.reserve(r, 64, 4, secs(10));
    giver.join();
    ASSERT_TRUE(some) << some.error().message();
    EXPECT_EQ(*some, 4u);
  }
}

// A message of another kind (handles, a request, an extent) is left for receive(), in its place
// in the stream: receive_in_place() stops before it and returns 0 when it is next.
TEST(StreamInPlace, AMessageOfAnotherKindIsLeftForReceiveInItsPlace) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  Status why;
  ASSERT_EQ(produce(tx, 3, 64, 3, secs(5), &why), 3u);
  auto with_fd = tx.buffer(64);
  ASSERT_TRUE(with_fd);
  ASSERT_TRUE(with_fd->attach_fd(::dup(0)));
  ASSERT_TRUE(tx.send(std::move(*with_fd)));
  auto extent = tx.buffer(4096);  // above slot_size: an extent
  ASSERT_TRUE(extent);
  ASSERT_TRUE(tx.send(std::move(*extent)));
  Reservation r;
  ASSERT_EQ(*tx.reserve(r, 64, 2, secs(5)), 2u);
  write_msg(r.slot(0), 3);
  write_msg(r.slot(1), 4);
  ASSERT_EQ(*r.commit(2), 2u);
  InPlace in;
  ASSERT_EQ(*rx.receive_in_place(in, secs(5)), 3u);
  EXPECT_EQ(read_msg(in[2]), 2u);
  ASSERT_EQ(*rx.receive_in_place(in, secs(5)), 0u);  // the message with a handle is next
  auto m1 = rx.receive(secs(5));
  ASSERT_TRUE(m1);
  EXPECT_EQ(m1->buffer.handle_count(), 1u);
  ASSERT_EQ(*rx.receive_in_place(in, secs(5)), 0u);  // then the extent
  auto m2 = rx.receive(secs(5));
  ASSERT_TRUE(m2);
  EXPECT_EQ(m2->buffer.size(), 4096u);
  ASSERT_EQ(*rx.receive_in_place(in, secs(5)), 2u);
  EXPECT_EQ(read_msg(in[0]), 3u);
  EXPECT_EQ(read_msg(in[1]), 4u);
  tx.close();
  ASSERT_EQ(*rx.receive_in_place(in, secs(5)), 0u);  // the end is next
  auto end = rx.receive(secs(5));
  ASSERT_TRUE(end);
  EXPECT_EQ(end->kind, Kind::PeerClosed);
}

// What the peer published before it closed is still read in place (P8), then the end is next:
// receive_in_place() says 0 for the end only, never for a plain message (examples/stream failed
// 15 of 40 runs under load before: the producer's exit turned its last messages into "another
// kind"). Then, once receive() has delivered the end, the error receive() gives.
TEST(StreamInPlace, MessagesPublishedBeforeThePeerClosedAreStillReadInPlace) {
  auto p = Channel::pair(inplace_options());
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  Status why;
  ASSERT_EQ(produce(tx, 40, 64, 16, secs(5), &why), 40u);
  tx.close();
  // The close is seen (the hang-up, on the watcher thread) before the first look.
  const std::int64_t t0 = monotonic_ns();
  while (!detail::TestAccess::peer_closed(rx) && monotonic_ns() - t0 < 5'000'000'000)
    std::this_thread::sleep_for(1ms);
  ASSERT_TRUE(detail::TestAccess::peer_closed(rx));
  bool ended = false;
  std::string bad;
  EXPECT_EQ(consume(rx, 1000, secs(5), &ended, &bad), 40u) << bad;
  EXPECT_TRUE(ended) << bad;
  InPlace in;
  auto after = rx.receive_in_place(in, secs(1));
  ASSERT_FALSE(after);
  EXPECT_EQ(after.error().code, Errc::PeerClosed);
}

// An untrusted end copies every payload: receive_in_place() never shows it the peer's memory, and
// says so by returning 0; receive() delivers the copies.
TEST(StreamInPlace, AnUntrustedEndIsToldToUseReceive) {
  ChannelOptions o = inplace_options();
  o.trust = {Trust::Cooperative, Trust::Untrusted};
  auto p = Channel::pair(o);
  ASSERT_TRUE(p);
  auto& [tx, rx] = *p;
  Status why;
  ASSERT_EQ(produce(tx, 2, 64, 2, secs(5), &why), 2u);
  InPlace in;
  ASSERT_EQ(*rx.receive_in_place(in, secs(5)), 0u);
  auto m = rx.receive(secs(5));
  ASSERT_TRUE(m);
  EXPECT_EQ(read_msg(m->buffer.data()), 0u);
}

// A descriptor the peer scribbled after commit (a slot out of its range) is not read in place:
// receive_in_place() leaves it to receive(), which closes this channel with Protocol; another
// channel streams on.
TEST(StreamInPlace, AScribbledDescriptorClosesOnlyItsChannel) {
  auto p = Channel::pair(inplace_options());
  auto q = Channel::pair(inplace_options());
  ASSERT_TRUE(p && q);
  auto& [tx, rx] = *p;
  Status why;
  ASSERT_EQ(produce(tx, 1, 64, 1, secs(5), &why), 1u);
  auto seg = detail::TestAccess::segment(tx);
  auto* dir = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset);
  // Slot 64 + 5: one of the receiver's own side (side 1's slots follow side 0's 64).
  dir->ring[0].buffer = 64 + 5;
  InPlace in;
  auto n = rx.receive_in_place(in, secs(5));
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 0u);
  auto m = rx.receive(secs(5));  // the channel's end, saying why
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed);
  EXPECT_EQ(m->error, Errc::Protocol);
  auto again = rx.receive_in_place(in, secs(1));
  EXPECT_TRUE(!again || *again == 0);
  auto& [tx2, rx2] = *q;
  ASSERT_EQ(produce(tx2, 50, 64, 16, secs(5), &why), 50u);
  bool ended = false;
  std::string bad;
  EXPECT_EQ(consume(rx2, 50, secs(5), &ended, &bad), 50u) << bad;
}

// The producer is killed mid-stream: the consumer gets an unbroken prefix, then PeerClosed.
TEST(StreamInPlace, AProducerKilledMidStreamLeavesAnUnbrokenPrefixThenPeerClosed) {
  auto p = Channel::pair(inplace_options(WaitMode::Adaptive, 16));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  pid_t child = test::spawn([&] {
    consumer = {};
    Status why;
    (void)produce(producer, ~std::uint64_t{0} >> 1, 200, 8, secs(60), &why);
    return 1;
  });
  ASSERT_GT(child, 0);
  producer = {};
  std::thread killer([&] {
    std::this_thread::sleep_for(300ms);
    ::kill(child, SIGKILL);
  });
  bool ended = false;
  std::string bad;
  const std::uint64_t got = consume(consumer, ~std::uint64_t{0}, secs(30), &ended, &bad);
  killer.join();
  EXPECT_TRUE(ended) << bad;
  EXPECT_TRUE(bad.empty()) << bad;
  EXPECT_GT(got, 0u);
  EXPECT_EQ(test::join(child), 128 + SIGKILL);
}

// The consumer is killed mid-stream: the producer's next reserve() or commit() ends with
// PeerClosed, well before its deadline.
TEST(StreamInPlace, AConsumerKilledMidStreamEndsTheProducerWithPeerClosed) {
  auto p = Channel::pair(inplace_options(WaitMode::Adaptive, 16));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  pid_t child = test::spawn([&] {
    producer = {};
    bool ended = false;
    std::string bad;
    (void)consume(consumer, ~std::uint64_t{0}, secs(60), &ended, &bad);
    return 1;
  });
  ASSERT_GT(child, 0);
  consumer = {};
  std::thread killer([&] {
    std::this_thread::sleep_for(300ms);
    ::kill(child, SIGKILL);
  });
  Status why;
  const std::int64_t t0 = monotonic_ns();
  (void)produce(producer, ~std::uint64_t{0} >> 1, 200, 8, secs(30), &why);
  const std::int64_t took = monotonic_ns() - t0;
  killer.join();
  ASSERT_FALSE(why);
  EXPECT_EQ(why.error().code, Errc::PeerClosed) << why.error().message();
  EXPECT_LT(took, 10'000'000'000);
  EXPECT_EQ(test::join(child), 128 + SIGKILL);
}

// While the receiver spins: no system call and no allocation per message on either side
// (threads of one process; the os/ layer counts per thread), 100,000 messages.
TEST(StreamInPlace, NoSystemCallOrAllocationPerMessageWhileTheReceiverSpins) {
  constexpr std::uint64_t kCount = 100'000;
  auto p = Channel::pair(inplace_options(WaitMode::Spin, 64, 64));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  Status why;
  ASSERT_EQ(produce(producer, 1, 64, 1, secs(5), &why), 1u);  // warm up: the peer watcher
  bool ended = false;
  std::string bad;
  ASSERT_EQ(consume(consumer, 1, secs(5), &ended, &bad), 1u);
  std::uint64_t consumer_syscalls = 0, got = 0;
  std::atomic<bool> ready{false};
  std::thread rx([&] {
    const std::uint64_t s0 = os::work_syscalls_this_thread();
    ready.store(true);
    bool e = false;
    got = consume(consumer, kCount, secs(60), &e, &bad);
    consumer_syscalls = os::work_syscalls_this_thread() - s0;
  });
  while (!ready.load()) std::this_thread::yield();
  // Both sides, process-wide (the thread started above): from here to the join.
  const std::uint64_t a0 = g_allocs.load();
  const std::uint64_t s0 = os::work_syscalls_this_thread();
  const std::uint64_t sent = produce(producer, kCount, 64, 32, secs(60), &why);
  const std::uint64_t producer_syscalls = os::work_syscalls_this_thread() - s0;
  rx.join();
  const std::uint64_t allocs = g_allocs.load() - a0;
  EXPECT_EQ(sent, kCount);
  EXPECT_EQ(got, kCount) << bad;
  EXPECT_EQ(producer_syscalls, 0u);
  EXPECT_EQ(consumer_syscalls, 0u);
  EXPECT_EQ(allocs, 0u) << "allocations in " << kCount << " messages";
}

// Soak: a long stream between processes through the in-place path, sizes varying per message
// (8 B .. 1 KiB, each slot resized; every 1,000th a 64 KiB extent sent with send() between
// batches, which the consumer gets from receive() when receive_in_place() says 0), every
// message's sequence number and bytes checked. MBMQ_STREAM_SOAK_MESSAGES sets the count
// (default 2,000,000, 400,000 under a sanitizer); 10^8 is soak.stream_inplace_100M (label soak).
TEST(StreamInPlace, SoakNothingLostDuplicatedReorderedOrCorrupted) {
  const char* v = std::getenv("MBMQ_STREAM_SOAK_MESSAGES");
  const long long env = v != nullptr ? std::atoll(v) : 0;
  const std::uint64_t count =
      env > 0 ? static_cast<std::uint64_t>(env) : test::sized<std::uint64_t>(2'000'000, 400'000);
  auto size_of = [](std::uint64_t s) -> std::size_t {
    return s % 1000 == 999 ? 65536 : 8 + s % 1017;
  };
  auto p = Channel::pair(inplace_options(WaitMode::Adaptive, 64, 1024));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  pid_t child = test::spawn(
      [&] {
        producer = {};
        InPlace in;
        std::uint64_t next = 0;
        auto check = [&](std::span<const std::byte> m) {
          if (m.size() != size_of(next) || read_msg(m) != next) {
            std::fprintf(stderr, "soak consumer: message %llu wrong (%zu bytes)\n",
                         static_cast<unsigned long long>(next), m.size());
            return false;
          }
          ++next;
          return true;
        };
        while (next < count) {
          auto n = consumer.receive_in_place(in, secs(3000));
          if (!n) return 2;
          for (std::size_t i = 0; i < *n; ++i)
            if (!check(in[i])) return 1;
          if (*n > 0) continue;
          auto m = consumer.receive(secs(3000));
          if (!m || m->kind != Kind::Message || !check(m->buffer.data())) return 3;
        }
        return 0;
      },
      3600);
  ASSERT_GT(child, 0);
  consumer = {};
  Reservation r;
  std::uint64_t seq = 0;
  Status why;
  while (seq < count && why) {
    if (size_of(seq) > 1024) {
      auto b = producer.buffer(size_of(seq), secs(3000));
      if (!b) {
        why = fail(b.error());
        break;
      }
      write_msg(b->data(), seq);
      why = producer.send(std::move(*b));
      if (why) ++seq;
      continue;
    }
    // Up to the next extent, at most 32 in place.
    const std::uint64_t until = std::min<std::uint64_t>(count, (seq / 1000) * 1000 + 999);
    auto n = producer.reserve(r, 8, std::min<std::uint64_t>(32, until - seq), secs(3000));
    if (!n) {
      why = fail(n.error());
      break;
    }
    for (std::size_t i = 0; i < *n; ++i) {
      if (!r.resize(i, size_of(seq + i))) std::abort();
      write_msg(r.slot(i), seq + i);
    }
    auto k = r.commit(*n);
    if (!k) {
      why = fail(k.error());
      break;
    }
    seq += *k;
  }
  EXPECT_EQ(seq, count) << (why ? "" : why.error().message());
  EXPECT_EQ(test::join(child), 0);
}

}  // namespace
}  // namespace mbmq
