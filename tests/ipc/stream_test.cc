// Streaming one-way messages (#14): send_batch, receive_batch, Channel::buffer with a deadline
// (P6r), and slots given back without a descriptor (P7r). Each claim of channel.h's streaming
// API has a test here that fails if the claim is false: order, nothing lost or duplicated,
// back-pressure that waits and honours its deadline, a peer's death that ends the wait, the
// returned-bits word a peer can scribble, either side killed mid-stream, and no system call per
// message while the receiver spins.
//
// The soak (10^8 messages, label soak) is soak.stream_100M in tests/CMakeLists.txt; its size is
// MBMQ_STREAM_SOAK_MESSAGES (default here: 2,000,000; 400,000 in the sanitizer builds).
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "ipc/test_access.h"
#include "mbmq/introspect.h"
#include "mbmq/mbmq.h"
#include "os/process.h"
#include "os/syscall_count.h"
#include "peer_util.h"
#include "shm/layout.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::secs;

constexpr std::size_t kBatch = 16;

ChannelOptions stream_options(WaitMode mode, std::uint32_t slots = 64, std::uint32_t slot = 256) {
  ChannelOptions o;
  o.slots_per_side = slots;
  o.slot_size = slot;
  o.wait = WaitPolicy{mode, std::chrono::microseconds(50)};
  return o;
}

// A message of the stream: its sequence number, then bytes derived from it.
void write_msg(Buffer& b, std::uint64_t seq) {
  std::memcpy(b.data().data(), &seq, sizeof seq);
  test::fill(b.data().subspan(sizeof seq), seq);
}
// The sequence number if the message is intact, else ~0.
std::uint64_t read_msg(const Buffer& b) {
  std::uint64_t seq = 0;
  if (b.size() < sizeof seq) return ~std::uint64_t{0};
  std::memcpy(&seq, b.data().data(), sizeof seq);
  return test::check(b.data().subspan(sizeof seq), seq) ? seq : ~std::uint64_t{0};
}

// Streams `count` messages from `from`, message s of size_of(s) bytes, in batches of up to
// kBatch: what is free now joins the batch; with nothing free and an empty batch, it waits for
// room up to the deadline. Returns how many were sent; stops at the first error (*why).
template <class SizeOf>
std::uint64_t produce_sized(Channel& from, std::uint64_t count, SizeOf size_of, Deadline deadline,
                            Status* why) {
  std::vector<Buffer> batch;
  batch.reserve(kBatch);
  std::uint64_t seq = 0;
  while (seq < count) {
    while (batch.size() < kBatch && seq + batch.size() < count) {
      const std::uint64_t s = seq + batch.size();
      auto b = batch.empty() ? from.buffer(size_of(s), deadline) : from.buffer(size_of(s));
      if (!b && !batch.empty() && b.error().code == Errc::NoBuffers) break;  // send these first
      if (!b) {
        *why = fail(b.error());
        return seq;
      }
      write_msg(*b, s);
      batch.push_back(std::move(*b));
    }
    auto n = from.send_batch(batch);
    if (!n) {
      *why = fail(n.error());
      return seq;
    }
    seq += *n;
    batch.erase(batch.begin(), batch.begin() + static_cast<std::ptrdiff_t>(*n));
  }
  return seq;
}
std::uint64_t produce(Channel& from, std::uint64_t count, std::size_t size, Deadline deadline,
                      Status* why) {
  return produce_sized(
      from, count, [size](std::uint64_t) { return size; }, deadline, why);
}

// Receives until `count` messages or PeerClosed; every message checked in order. Returns how
// many arrived intact and in order; *ended: the final PeerClosed came.
std::uint64_t consume(Channel& at, std::uint64_t count, Deadline deadline, bool* ended,
                      std::string* bad) {
  std::vector<Message> got(kBatch);
  std::uint64_t next = 0;
  *ended = false;
  while (next < count) {
    auto n = at.receive_batch(got, deadline);
    if (!n) {
      *bad = n.error().message();
      return next;
    }
    for (std::size_t i = 0; i < *n; ++i) {
      Message& m = got[i];
      if (m.kind == Kind::PeerClosed) {
        *ended = true;
        return next;
      }
      const std::uint64_t seq = read_msg(m.buffer);
      if (m.kind != Kind::Message || seq != next) {
        *bad = "message " + std::to_string(next) + " arrived as " + std::to_string(seq);
        return next;
      }
      ++next;
      m.buffer.reset();  // given back (P7r)
    }
  }
  return next;
}

// Fills `held` with the next held.size() messages; false on an error.
bool receive_all(Channel& at, std::vector<Message>& held) {
  for (std::size_t have = 0; have < held.size();) {
    auto n = at.receive_batch(std::span(held).subspan(have), secs(10));
    if (!n) return false;
    have += *n;
  }
  return true;
}

// The leak baseline, taken while a channel keeps the peer watcher up; the C library keeps a
// joined thread's stack for reuse, so one is joined first.
test::Snapshot baseline() {
  std::thread([] {}).join();
  return test::snapshot();
}

class StreamModes : public ::testing::TestWithParam<WaitMode> {};

// Far more messages than slots: every slot comes back through `returned` many times, in order,
// with nothing lost or duplicated, in each wait mode (the sleeping ones exercise P6r's wake-ups).
TEST_P(StreamModes, ABatchedStreamBetweenProcessesLosesDuplicatesAndReordersNothing) {
  constexpr std::uint64_t kCount = 200'000;
  auto p = Channel::pair(stream_options(GetParam(), 8));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  pid_t child = test::spawn([&] {
    producer = {};
    bool ended = false;
    std::string bad;
    const std::uint64_t got = consume(consumer, kCount, secs(60), &ended, &bad);
    if (got != kCount)
      std::fprintf(stderr, "consumer: %llu of %llu: %s\n", static_cast<unsigned long long>(got),
                   static_cast<unsigned long long>(kCount), bad.c_str());
    return got == kCount ? 0 : 1;
  });
  ASSERT_GT(child, 0);
  consumer = {};
  Status why;
  EXPECT_EQ(produce(producer, kCount, 100, secs(60), &why), kCount)
      << (why ? "" : why.error().message());
  EXPECT_EQ(test::join(child), 0);
}

INSTANTIATE_TEST_SUITE_P(Modes, StreamModes,
                         ::testing::Values(WaitMode::Spin, WaitMode::Adaptive, WaitMode::Sleep));

// Returned slots travel without a descriptor: after a stream of slot-sized one-way messages, the
// producer's inbound ring never held an entry.
TEST(Stream, SlotsComeBackWithoutADescriptor) {
  auto p = Channel::pair(stream_options(WaitMode::Spin, 4));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  for (std::uint64_t i = 0; i < 100; ++i) {
    auto b = producer.buffer(64, secs(5));
    ASSERT_TRUE(b) << b.error().message();
    write_msg(*b, i);
    ASSERT_TRUE(producer.send(std::move(*b)));
    auto m = consumer.receive(secs(5));
    ASSERT_TRUE(m);
    EXPECT_EQ(read_msg(m->buffer), i);
  }
  const auto seg = detail::TestAccess::segment(producer);
  const auto* back = reinterpret_cast<const shm::Direction*>(seg.data() + shm::kDirOffset +
                                                             sizeof(shm::Direction));
  EXPECT_EQ(back->tail.load(), 0u) << "a slot came back with a descriptor";
}

// receive_batch takes what is there (up to its span) without waiting for more, in order.
TEST(Stream, ReceiveBatchTakesWhatIsThereInOrder) {
  auto p = Channel::pair(stream_options(WaitMode::Spin, 16));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  std::vector<Buffer> bufs;
  for (std::uint64_t i = 0; i < 10; ++i) {
    bufs.push_back(*producer.buffer(64));
    write_msg(bufs.back(), i);
  }
  auto sent = producer.send_batch(bufs);
  ASSERT_TRUE(sent);
  EXPECT_EQ(*sent, 10u);
  for (const Buffer& b : bufs) EXPECT_FALSE(b.valid());
  std::vector<Message> got(4);
  std::uint64_t next = 0;
  while (next < 10) {
    auto n = consumer.receive_batch(got, secs(5));
    ASSERT_TRUE(n);
    EXPECT_EQ(*n, std::min<std::uint64_t>(4, 10 - next));
    for (std::size_t i = 0; i < *n; ++i) EXPECT_EQ(read_msg(got[i].buffer), next++);
  }
  auto none = consumer.receive_batch(got, Deadline::after(20ms));
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::TimedOut);
  std::vector<Message> empty;
  auto zero = consumer.receive_batch(empty, Deadline::after(20ms));
  ASSERT_TRUE(zero);
  EXPECT_EQ(*zero, 0u);
}

// send_batch stops at back-pressure: a prefix is sent, the rest stays the caller's, valid.
TEST(Stream, SendBatchSendsAPrefixAndLeavesTheRestWithTheCaller) {
  auto p = Channel::pair(stream_options(WaitMode::Spin, 4));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  std::vector<Buffer> bufs;
  for (int i = 0; i < 4; ++i) bufs.push_back(*producer.buffer(64));
  Buffer foreign = *consumer.buffer(64);  // not the producer's: refused
  std::swap(bufs[2], foreign);
  auto n = producer.send_batch(bufs);
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 2u);
  EXPECT_FALSE(bufs[0].valid());
  EXPECT_TRUE(bufs[2].valid());
  EXPECT_TRUE(bufs[3].valid());
  std::span<Buffer> rest(bufs.data() + 2, 2);
  auto again = producer.send_batch(rest);
  ASSERT_FALSE(again);  // nothing sent: the error itself
  EXPECT_EQ(again.error().code, Errc::InvalidArgument);
}

// A buffer that must be sealed for an untrusted receiver (an extent above copy_threshold, P3c)
// goes only first in a batch: a failed seal can lose the buffer, and after a prefix its error
// would be lost with it. The next call sends it first, sealed, and the receiver takes it.
TEST(Stream, ABufferToSealEndsABatchAndGoesFirstInTheNext) {
  ChannelOptions o = stream_options(WaitMode::Spin, 4);
  o.trust = {Trust::Cooperative, Trust::Untrusted};
  o.copy_threshold = o.slot_size;  // the sealed path above it (the default copies everything)
  auto p = Channel::pair(o);
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  constexpr std::size_t kBig = 128 * 1024;  // above the copy_threshold (slot_size, 256 B)
  std::vector<Buffer> bufs;
  bufs.push_back(*producer.buffer(64));
  bufs.push_back(*producer.buffer(kBig));
  bufs.push_back(*producer.buffer(64));
  for (std::size_t i = 0; i < bufs.size(); ++i) write_msg(bufs[i], i);
  auto n = producer.send_batch(bufs);
  ASSERT_TRUE(n) << n.error().message();
  EXPECT_EQ(*n, 1u);
  ASSERT_TRUE(bufs[1].valid());
  auto rest = producer.send_batch(std::span<Buffer>(bufs).subspan(1));
  ASSERT_TRUE(rest) << rest.error().message();
  EXPECT_EQ(*rest, 2u);
  for (std::uint64_t i = 0; i < 3; ++i) {
    auto m = consumer.receive(Deadline::after(std::chrono::seconds(5)));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Message);
    EXPECT_EQ(m->buffer.size(), i == 1 ? kBig : 64u);
    std::uint64_t seq = ~0ull;
    std::memcpy(&seq, m->buffer.data().data(), sizeof seq);
    EXPECT_EQ(seq, i) << "out of order";
  }
}

// The batch paths (P3, P5) take plain one-way slots in one go and everything else one by one:
// mixed in one ring, a request, extents and slots arrive in order, each as its kind, and the
// request's reply comes back.
TEST(Stream, AMixedBatchArrivesInOrderEachAsItsKind) {
  auto p = Channel::pair(stream_options(WaitMode::Spin, 16));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  constexpr std::size_t kBig = 8 * 1024;  // above slot_size (256 B): an extent
  std::vector<Buffer> first;
  for (std::uint64_t i = 0; i < 2; ++i) {
    first.push_back(*producer.buffer(64));
    write_msg(first.back(), i);
  }
  ASSERT_EQ(*producer.send_batch(first), 2u);
  Buffer req = *producer.buffer(64);
  write_msg(req, 2);
  ASSERT_TRUE(producer.send_request(std::move(req)));
  std::vector<Buffer> second;
  const std::size_t sizes[] = {64, 64, kBig, 64};
  for (std::uint64_t i = 0; i < 4; ++i) {
    second.push_back(*producer.buffer(sizes[i]));
    write_msg(second.back(), 3 + i);
  }
  std::size_t sent = 0;
  while (sent < second.size()) {
    auto n = producer.send_batch(std::span<Buffer>(second).subspan(sent));
    ASSERT_TRUE(n) << n.error().message();
    sent += *n;
  }
  std::vector<Message> got(16);
  std::uint64_t next = 0;
  while (next < 7) {
    auto n = consumer.receive_batch(got, secs(5));
    ASSERT_TRUE(n) << n.error().message();
    for (std::size_t i = 0; i < *n; ++i, ++next) {
      EXPECT_EQ(read_msg(got[i].buffer), next) << "out of order or corrupt";
      EXPECT_EQ(got[i].kind, next == 2 ? Kind::Request : Kind::Message);
      EXPECT_EQ(got[i].buffer.size(), next == 5 ? kBig : 64u);
      if (next == 2) {
        ASSERT_TRUE(MsgQueue::reply(std::move(got[i])));
      }
    }
  }
  auto reply = producer.receive(secs(5));
  ASSERT_TRUE(reply) << reply.error().message();
  EXPECT_EQ(reply->kind, Kind::Reply);
  EXPECT_EQ(read_msg(reply->buffer), 2u);
  // Every one-way buffer comes back (P7r for the slots, Return for the extent): all 16 slots.
  got.clear();
  std::vector<Buffer> all(16);
  auto n = producer.buffers(64, all, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  std::size_t total = *n;
  while (total < 15) {  // the reply's slot is still held by `reply`
    auto more = producer.buffers(64, std::span<Buffer>(all).subspan(total), secs(5));
    ASSERT_TRUE(more) << more.error().message();
    total += *more;
  }
}

// (#18) A batch counts each of its messages and bytes, on both ends.
TEST(Stream, BatchedMessagesAreCountedOneByOne) {
  const std::string name = "stream-count-" + std::to_string(os::current_pid());
  auto l = Listener::create(name);
  ASSERT_TRUE(l) << l.error().message();
  auto client = connect(name, secs(5));
  ASSERT_TRUE(client) << client.error().message();
  auto server = l->accept(secs(5));
  ASSERT_TRUE(server) << server.error().message();
  constexpr std::uint64_t kN = 1000;
  // Half the pool (16 slots) per batch: the client holds its last batch while the server fills
  // the next.
  constexpr std::uint64_t kHalf = 8;
  std::vector<Buffer> bufs(kHalf);
  std::vector<Message> got(kHalf);
  std::uint64_t sent = 0, received = 0;
  while (received < kN) {
    if (sent < kN) {
      auto n = server->buffers(
          24, std::span<Buffer>(bufs).first(std::min<std::uint64_t>(kHalf, kN - sent)), secs(5));
      ASSERT_TRUE(n) << n.error().message();
      auto s = server->send_batch(std::span<Buffer>(bufs).first(*n));
      ASSERT_TRUE(s) << s.error().message();
      sent += *s;
    }
    auto r = client->receive_batch(got, secs(5));
    ASSERT_TRUE(r) << r.error().message();
    received += *r;
  }
  got.clear();
  auto s = query_stats(name, StatChannels::Yes, secs(5));
  ASSERT_TRUE(s) << s.error().message();
  ASSERT_EQ(s->channels.size(), 1u);
  EXPECT_EQ(s->channels[0].oneway_out, kN);
  EXPECT_EQ(s->channels[0].bytes_out, kN * 24);
  EXPECT_EQ(s->listener.oneway_out, kN);
}

class RoomModes : public ::testing::TestWithParam<WaitMode> {};

// The consumer holds every buffer: buffer(size, deadline) waits, and gives up at its deadline,
// neither early nor much late.
TEST_P(RoomModes, BufferWaitsForRoomAndHonoursItsDeadline) {
  auto p = Channel::pair(stream_options(GetParam(), 4));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  for (std::uint64_t i = 0; i < 4; ++i) {
    auto b = producer.buffer(64, secs(1));
    ASSERT_TRUE(b);
    ASSERT_TRUE(producer.send(std::move(*b)));
  }
  std::vector<Message> held(4);
  ASSERT_TRUE(consumer.receive_batch(held, secs(5)));
  const std::int64_t t0 = monotonic_ns();
  auto b = producer.buffer(64, Deadline::after(100ms));
  const std::int64_t took = monotonic_ns() - t0;
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, Errc::TimedOut);
  EXPECT_GE(took, 100'000'000);
  EXPECT_LT(took, 2'000'000'000);
  // The non-waiting form says NoBuffers at once, as before.
  auto now = producer.buffer(64);
  ASSERT_FALSE(now);
  EXPECT_EQ(now.error().code, Errc::NoBuffers);
}

// A release in another process wakes the producer waiting for room (a shared futex, P6r).
TEST_P(RoomModes, AReleaseInTheConsumerProcessWakesAProducerWaitingForRoom) {
  auto p = Channel::pair(stream_options(GetParam(), 4));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  pid_t child = test::spawn([&] {
    producer = {};
    std::vector<Message> held(4);
    if (!receive_all(consumer, held)) return 1;
    std::this_thread::sleep_for(200ms);  // the producer is asleep on `room` by now
    held[1].buffer.reset();
    auto m = consumer.receive(secs(10));  // the fifth message
    return m && m->kind == Kind::Message ? 0 : 2;
  });
  ASSERT_GT(child, 0);
  consumer = {};
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(producer.send(std::move(*producer.buffer(64))));
  const std::int64_t t0 = monotonic_ns();
  auto b = producer.buffer(64, secs(10));
  const std::int64_t took = monotonic_ns() - t0;
  ASSERT_TRUE(b) << b.error().message();
  EXPECT_LT(took, 5'000'000'000) << "woken by the deadline's neighbourhood, not the release";
  ASSERT_TRUE(producer.send(std::move(*b)));
  EXPECT_EQ(test::join(child), 0);
}

// Extents (payloads above slot_size) come back with a Return descriptor; a producer waiting for
// room is woken by it too.
TEST_P(RoomModes, AReturnedExtentWakesAProducerWaitingForRoom) {
  auto p = Channel::pair(stream_options(GetParam(), 4, 256));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  // Every extent id out: the 65th extent buffer waits.
  std::vector<Message> held;
  for (std::uint32_t i = 0; i < shm::kMaxExtents; ++i) {
    auto b = producer.buffer(4096, secs(1));
    ASSERT_TRUE(b) << i << ": " << b.error().message();
    ASSERT_TRUE(producer.send(std::move(*b)));
    auto m = consumer.receive(secs(5));
    ASSERT_TRUE(m);
    held.push_back(std::move(*m));
  }
  std::thread releaser([&] {
    std::this_thread::sleep_for(200ms);
    held[7].buffer.reset();
  });
  auto b = producer.buffer(4096, secs(10));
  releaser.join();
  ASSERT_TRUE(b) << b.error().message();
}

// The consumer dies holding every buffer: the waiting producer gets PeerClosed at once, not at
// its deadline.
TEST_P(RoomModes, TheConsumersDeathEndsAWaitForRoom) {
  auto p = Channel::pair(stream_options(GetParam(), 4));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  pid_t child = test::spawn([&] {
    producer = {};
    std::vector<Message> held(4);
    if (!receive_all(consumer, held)) return 1;
    std::this_thread::sleep_for(200ms);
    ::kill(::getpid(), SIGKILL);
    return 3;
  });
  ASSERT_GT(child, 0);
  consumer = {};
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(producer.send(std::move(*producer.buffer(64))));
  const std::int64_t t0 = monotonic_ns();
  auto b = producer.buffer(64, secs(20));
  const std::int64_t took = monotonic_ns() - t0;
  ASSERT_FALSE(b);
  EXPECT_EQ(b.error().code, Errc::PeerClosed);
  EXPECT_LT(took, 5'000'000'000);
  EXPECT_EQ(test::join(child), 128 + SIGKILL);
}

INSTANTIATE_TEST_SUITE_P(Modes, RoomModes,
                         ::testing::Values(WaitMode::Spin, WaitMode::Adaptive, WaitMode::Sleep));

// A hostile consumer sets every bit of `returned`: the producer frees only the slot it lent
// one-way (the consumer can only lose its own message by lying about it); the buffers the
// application holds are never handed out twice.
TEST(Stream, ScribbledReturnedBitsNeverHandOutABufferTwice) {
  auto p = Channel::pair(stream_options(WaitMode::Spin, 4));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  auto seg = detail::TestAccess::segment(producer);
  auto* out = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset);
  std::vector<Buffer> mine;
  for (int i = 0; i < 3; ++i) mine.push_back(*producer.buffer(64));
  ASSERT_TRUE(producer.send(std::move(*producer.buffer(64))));  // lent, not given back
  for (auto& w : out->returned) w.store(~std::uint64_t{0});
  auto b = producer.buffer(64);
  ASSERT_TRUE(b) << b.error().message();  // the lent slot, "given back" by the lie
  for (const Buffer& m : mine) EXPECT_NE(b->id(), m.id());
  for (auto& w : out->returned) w.store(~std::uint64_t{0});
  auto none = producer.buffer(64);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::NoBuffers);
  // The consumer takes the message whose slot it lied about and drops it: its bit frees nothing
  // the application holds.
  auto m = consumer.receive(secs(5));
  ASSERT_TRUE(m);
  m->buffer.reset();
  EXPECT_FALSE(producer.buffer(64));
  for (Buffer& x : mine) x.reset();
  b->reset();
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(producer.buffer(64)) << i;  // the pool is whole
}

// Layout v9: a pool of up to kMaxSlotsPerSide slots, `returned` one word per 64. A hostile
// consumer scribbling every word (those past the pool too) frees only what was lent one-way, in
// whichever word its bit is; the channel stays usable and the pool whole.
TEST(Stream, ScribbledReturnedWordsFreeOnlyWhatWasLentInAnyWord) {
  constexpr std::uint32_t kSlots = 200;  // words 0-3; word 3 half used, words 4-6 past the pool
  auto p = Channel::pair(stream_options(WaitMode::Spin, kSlots, 64));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  auto seg = detail::TestAccess::segment(producer);
  auto* out = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset);
  std::vector<Buffer> all(kSlots);
  auto n = producer.buffers(64, all, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  ASSERT_EQ(*n, kSlots);
  // Lend one slot of each word one-way (the 1st, 70th, 140th and last), keep the rest.
  const std::size_t lent[] = {0, 69, 139, kSlots - 1};
  std::vector<std::uint32_t> lent_ids;
  for (std::size_t i : lent) {
    lent_ids.push_back(all[i].id());
    ASSERT_TRUE(producer.send(std::move(all[i])));
  }
  for (auto& w : out->returned) w.store(~std::uint64_t{0});
  std::vector<Buffer> again(8);
  auto got = producer.buffers(64, again, secs(5));
  ASSERT_TRUE(got) << got.error().message();
  EXPECT_EQ(*got, 4u) << "only the four lent slots come back";
  for (std::size_t i = 0; i < *got; ++i) {
    EXPECT_NE(std::find(lent_ids.begin(), lent_ids.end(), again[i].id()), lent_ids.end());
    for (const Buffer& held : all)
      if (held.valid()) {
        EXPECT_NE(again[i].id(), held.id()) << "a buffer handed out twice";
      }
  }
  // The consumer takes the four and drops them; nothing more comes free while the application
  // holds everything.
  std::vector<Message> msgs(4);
  ASSERT_TRUE(receive_all(consumer, msgs));
  msgs.clear();
  auto none = producer.buffer(64);
  ASSERT_FALSE(none);
  EXPECT_EQ(none.error().code, Errc::NoBuffers);
  all.clear();
  again.clear();
  std::vector<Buffer> whole(kSlots);
  auto w = producer.buffers(64, whole, secs(5));
  ASSERT_TRUE(w) << w.error().message();
  EXPECT_EQ(*w, kSlots) << "the pool is whole";
}

// A pool of kMaxSlotsPerSide slots streams: every slot, in every word of `returned`, comes back
// many times; nothing lost, duplicated or reordered.
TEST(Stream, TheDeepestPoolStreamsThroughEveryWordOfReturned) {
  constexpr std::uint64_t kCount = 100'000;
  auto p = Channel::pair(stream_options(WaitMode::Spin, shm::kMaxSlotsPerSide, 64));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  pid_t child = test::spawn([&] {
    producer = {};
    bool ended = false;
    std::string bad;
    const std::uint64_t got = consume(consumer, kCount, secs(60), &ended, &bad);
    if (got != kCount) std::fprintf(stderr, "consumer: %s\n", bad.c_str());
    return got == kCount ? 0 : 1;
  });
  ASSERT_GT(child, 0);
  consumer = {};
  Status why;
  EXPECT_EQ(produce(producer, kCount, 64, secs(60), &why), kCount)
      << (why ? "" : why.error().message());
  EXPECT_EQ(test::join(child), 0);
}

// The producer is killed mid-stream: the consumer gets an unbroken prefix of the stream, then
// PeerClosed; its process keeps no fd or mapping of the channel.
TEST(Stream, AProducerKilledMidStreamLeavesAnUnbrokenPrefixThenPeerClosed) {
  auto warm = Channel::pair();  // keeps the peer watcher thread (and its epoll fd) up
  const test::Snapshot before = baseline();
  {
    auto p = Channel::pair(stream_options(WaitMode::Adaptive, 16));
    ASSERT_TRUE(p);
    auto& [producer, consumer] = *p;
    pid_t child = test::spawn([&] {
      consumer = {};
      Status why;
      (void)produce(producer, ~std::uint64_t{0} >> 1, 200, secs(60), &why);
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
  EXPECT_EQ(test::settled(before), before);
}

// The consumer is killed mid-stream: the producer's next send_batch or wait for room ends with
// PeerClosed (not its deadline); its process keeps no fd or mapping of the channel.
TEST(Stream, AConsumerKilledMidStreamEndsTheProducerWithPeerClosed) {
  auto warm = Channel::pair();  // keeps the peer watcher thread (and its epoll fd) up
  const test::Snapshot before = baseline();
  {
    auto p = Channel::pair(stream_options(WaitMode::Adaptive, 16));
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
    (void)produce(producer, ~std::uint64_t{0} >> 1, 200, secs(30), &why);
    const std::int64_t took = monotonic_ns() - t0;
    killer.join();
    ASSERT_FALSE(why);
    EXPECT_EQ(why.error().code, Errc::PeerClosed) << why.error().message();
    EXPECT_LT(took, 10'000'000'000);
    EXPECT_EQ(test::join(child), 128 + SIGKILL);
  }
  EXPECT_EQ(test::settled(before), before);
}

// Both ends spinning on one CPU (a loaded machine puts them there): Spin mode yields the CPU once
// it has found nothing for its spin budget, so each hand-off costs a yield, not the spinner's
// whole time slice. 100,000 messages through 8 slots are 12,500 hand-offs each way; at even 1 ms
// of time slice each, without the yield, they would take 25 s against this 20 s deadline (CI saw
// 200,000 take a minute). Threads of one process, both pinned to CPU 0.
TEST(Stream, TwoSpinningEndsOnOneCpuHandOffWithoutWaitingForTheTimeSlice) {
  constexpr std::uint64_t kCount = 100'000;
  auto p = Channel::pair(stream_options(WaitMode::Spin, 8));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  const Deadline deadline = secs(20);
  std::uint64_t got = 0, consumer_yields = 0;
  std::string bad;
  bool pinned = true;
  std::thread rx([&] {
    pinned = static_cast<bool>(os::pin_to_cpu(0));
    const std::uint64_t y0 = os::yields_this_thread();
    bool ended = false;
    got = consume(consumer, kCount, deadline, &ended, &bad);
    consumer_yields = os::yields_this_thread() - y0;
  });
  ASSERT_TRUE(os::pin_to_cpu(0));
  const std::uint64_t y0 = os::yields_this_thread();
  const std::int64_t t0 = monotonic_ns();
  Status why;
  const std::uint64_t sent = produce(producer, kCount, 64, deadline, &why);
  const std::uint64_t producer_yields = os::yields_this_thread() - y0;
  rx.join();
  const double took_s = static_cast<double>(monotonic_ns() - t0) / 1e9;
  ASSERT_TRUE(pinned);
  EXPECT_EQ(sent, kCount) << (why ? "" : why.error().message());
  EXPECT_EQ(got, kCount) << bad;
  EXPECT_GT(producer_yields + consumer_yields, 0u) << "sharing a CPU, a spinner must have yielded";
  std::printf("one CPU: %llu messages in %.2f s; yields: producer %llu, consumer %llu\n",
              static_cast<unsigned long long>(kCount), took_s,
              static_cast<unsigned long long>(producer_yields),
              static_cast<unsigned long long>(consumer_yields));
}

// While the receiver spins, neither side makes a system call per message: 0 in total over
// 100,000 messages (threads of one process; the os/ layer counts per thread). A spinning side
// that finds nothing for its spin budget yields the CPU (a sched_yield, counted apart): that is
// waiting, not a message's cost, and is reported.
TEST(Stream, NoSystemCallPerMessageWhileTheReceiverSpins) {
  constexpr std::uint64_t kCount = 100'000;
  auto p = Channel::pair(stream_options(WaitMode::Spin, 64));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  // Warm up first: the first receive registers the end with the peer watcher (a system call).
  ASSERT_TRUE(producer.send(std::move(*producer.buffer(64))));
  ASSERT_TRUE(consumer.receive(secs(5)));
  std::uint64_t consumer_syscalls = 0, consumer_yields = 0, got = 0;
  std::string bad;
  std::thread rx([&] {
    const std::uint64_t s0 = os::work_syscalls_this_thread(), y0 = os::yields_this_thread();
    bool ended = false;
    got = consume(consumer, kCount, secs(60), &ended, &bad);
    consumer_syscalls = os::work_syscalls_this_thread() - s0;
    consumer_yields = os::yields_this_thread() - y0;
  });
  const std::uint64_t s0 = os::work_syscalls_this_thread(), y0 = os::yields_this_thread();
  Status why;
  const std::uint64_t sent = produce(producer, kCount, 64, secs(60), &why);
  const std::uint64_t producer_syscalls = os::work_syscalls_this_thread() - s0;
  const std::uint64_t producer_yields = os::yields_this_thread() - y0;
  rx.join();
  std::printf("yields while waiting: producer %llu, consumer %llu, for %llu messages\n",
              static_cast<unsigned long long>(producer_yields),
              static_cast<unsigned long long>(consumer_yields),
              static_cast<unsigned long long>(kCount));
  EXPECT_EQ(sent, kCount);
  EXPECT_EQ(got, kCount) << bad;
  EXPECT_EQ(producer_syscalls, 0u);
  EXPECT_EQ(consumer_syscalls, 0u);
}

// Review of #14, finding 1: a thread that harvests returned bits frees more slots than it takes;
// another producer thread asleep waiting for room must be woken (frees_ is bumped), not left
// until its deadline. Sleep mode, 4 slots, two producer threads: no wait for room takes 1 s.
TEST(Stream, TwoProducerThreadsInSleepModeNeverWaitForRoomUntilTheDeadline) {
  auto p = Channel::pair(stream_options(WaitMode::Sleep, 4));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  constexpr int kPerThread = 3000;
  std::atomic<std::int64_t> slowest{0};
  std::atomic<int> failures{0};
  auto run = [&] {
    for (int i = 0; i < kPerThread; ++i) {
      const std::int64_t t0 = monotonic_ns();
      auto b = producer.buffer(64, secs(10));
      slowest = std::max(slowest.load(), monotonic_ns() - t0);
      if (!b || !producer.send(std::move(*b))) ++failures;
    }
  };
  std::thread rx([&] {
    std::vector<Message> got(8);
    for (int n = 0; n < 2 * kPerThread;) {
      auto k = consumer.receive_batch(got, secs(10));
      if (!k) break;
      n += static_cast<int>(*k);
    }
  });
  std::thread a(run), b(run);
  a.join();
  b.join();
  rx.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_LT(slowest.load(), 1'000'000'000);
}

std::uint64_t soak_messages() {
  const char* v = std::getenv("MBMQ_STREAM_SOAK_MESSAGES");
  const long long n = v != nullptr ? std::atoll(v) : 0;
  // 400,000 under a sanitizer: the same paths (every 1,000th message an extent) at a fifth.
  return n > 0 ? static_cast<std::uint64_t>(n) : test::sized<std::uint64_t>(2'000'000, 400'000);
}

// Soak: a long stream between processes, sizes varying per message (8 B .. 1 KiB, and every
// 1,000th an extent of 64 KiB), every message's sequence number and bytes checked.
TEST(Stream, SoakNothingLostDuplicatedReorderedOrCorrupted) {
  const std::uint64_t count = soak_messages();
  auto p = Channel::pair(stream_options(WaitMode::Adaptive, 64, 1024));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  pid_t child = test::spawn(
      [&] {
        producer = {};
        bool ended = false;
        std::string bad;
        const std::uint64_t got = consume(consumer, count, secs(3000), &ended, &bad);
        if (got != count) std::fprintf(stderr, "soak consumer: %s\n", bad.c_str());
        return got == count ? 0 : 1;
      },
      3600);
  ASSERT_GT(child, 0);
  consumer = {};
  Status why;
  const std::uint64_t sent = produce_sized(
      producer, count,
      [](std::uint64_t s) -> std::size_t { return s % 1000 == 999 ? 65536 : 8 + s % 1017; },
      secs(3000), &why);
  EXPECT_EQ(sent, count) << (why ? "" : why.error().message());
  EXPECT_EQ(test::join(child), 0);
}

}  // namespace
}  // namespace mbmq
