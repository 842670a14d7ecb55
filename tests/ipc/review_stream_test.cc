// Hostile review of #14's streaming changes (batch paths, layout v9): one reproducer per
// suspicion, now regression tests. Two failed on the code reviewed and are fixed: an untrusted
// end whose private slot copies cannot be allocated (S5: std::bad_alloc escaped connect() and
// pair(); now Errc::System, ENOMEM, from Endpoint::make) and a one-way status counted by
// accept() but not by the batch path (now such a descriptor takes the accept() path). The rest
// are suspicions the code withstood. A hostile peer is played by writing the shared segment
// directly (TestAccess).
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cstring>
#include <string>
#include <vector>

#include "ipc/test_access.h"
#include "mbmq/introspect.h"
#include "mbmq/mbmq.h"
#include "os/fd.h"
#include "os/process.h"
#include "shm/layout.h"
#include "shm/ring.h"
#include "shm/segment.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::secs;

ChannelOptions opts(std::uint32_t slots = 16, std::uint32_t slot = 64) {
  ChannelOptions o;
  o.slots_per_side = slots;
  o.slot_size = slot;
  o.wait = WaitPolicy{WaitMode::Spin, std::chrono::microseconds(50)};
  return o;
}

shm::Direction* dir(Channel& c, int d) {
  auto seg = detail::TestAccess::segment(c);
  return reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset +
                                           static_cast<std::size_t>(d) * sizeof(shm::Direction));
}

// Writes raw entries into direction d's ring as a hostile producer would (its real producer must
// not send afterwards), then publishes the tail once, as a batch does.
void hostile_batch(shm::Direction* d, const std::vector<shm::Desc>& ds) {
  std::uint32_t t = d->tail.load();
  for (const shm::Desc& x : ds) {
    shm::RingEntry& e = d->ring[t % shm::kRingCapacity];
    e.store(x);
    ++t;
    e.seq.store(t, std::memory_order_release);
  }
  d->tail.store(t, std::memory_order_release);
}

shm::Desc one_way(std::uint32_t buffer, std::uint32_t size, std::uint16_t status = 0,
                  std::uint16_t flags = 0) {
  return shm::Desc{
      buffer, size, 1,
      static_cast<std::uint16_t>(static_cast<std::uint16_t>(shm::DescKind::OneWay) | flags),
      status};
}

// Receives until a PeerClosed message (or 4 s): how many messages came before it, and its error.
struct Outcome {
  std::size_t messages = 0;
  bool ended = false;
  Errc error = Errc::PeerClosed;
};
Outcome drain_batch(Channel& c) {
  Outcome o;
  std::vector<Message> ms(64);
  const Deadline until = secs(4);
  while (!o.ended && !until.expired()) {
    auto n = c.receive_batch(ms, Deadline::after(std::chrono::milliseconds(200)));
    if (!n) {
      if (n.error().code == Errc::TimedOut) continue;
      o.ended = true;
      o.error = n.error().code;
      break;
    }
    for (std::size_t i = 0; i < *n; ++i) {
      if (ms[i].kind == Kind::PeerClosed) {
        o.ended = true;
        o.error = ms[i].error;
        break;
      }
      ++o.messages;
    }
  }
  return o;
}

// S1: the batch consumer's inline checks (take_peer_slot_one_way) against accept(): each hostile
// descriptor, after one valid one in the same batch, must end the channel with Protocol (the
// valid prefix delivered), never be delivered, never crash.
struct BadDesc {
  const char* name;
  shm::Desc d;
};
class ReviewStreamBad : public ::testing::TestWithParam<BadDesc> {};

TEST_P(ReviewStreamBad, AHostileEntryInABatchEndsTheChannelAfterTheValidPrefix) {
  auto p = Channel::pair(opts(16, 64));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  hostile_batch(dir(producer, 0), {one_way(0, 8), GetParam().d});
  const Outcome o = drain_batch(consumer);
  EXPECT_EQ(o.messages, 1u) << GetParam().name;
  EXPECT_TRUE(o.ended) << GetParam().name;
  EXPECT_EQ(o.error, Errc::Protocol) << GetParam().name;
}

INSTANTIATE_TEST_SUITE_P(
    Review, ReviewStreamBad,
    ::testing::Values(
        BadDesc{"same slot twice in one batch", one_way(0, 8)},
        BadDesc{"larger than a slot", one_way(1, 65)},
        BadDesc{"the consumer's own slot", one_way(16 + 3, 8)},
        BadDesc{"beyond every slot", one_way(2 * 16 + 5, 8)},
        BadDesc{"an extent never announced", one_way(shm::kExtentBit | 3, 8)},
        BadDesc{"handles announced, none sent", one_way(2, 8, 0, shm::kDescHasHandles)},
        BadDesc{"replaced flag on a one-way", one_way(2, 8, 0, shm::kDescReplaced)},
        BadDesc{"a reply for nothing",
                shm::Desc{16 + 1, 8, 1, static_cast<std::uint16_t>(shm::DescKind::Reply), 0}}),
    [](const auto& p) { return "case" + std::to_string(p.index); });

// S2: the inline path counts a batch with count_in_one_way(), accept() with count_in(): a
// one-way descriptor carrying status NoReply (a hostile producer's) is counted as no_reply_in
// by one path and not the other (receive()/receive_batch() take the inline path, a MsgQueue
// accept()). The stats of a channel must not depend on how it is received.
std::uint64_t no_reply_in_after(bool batch, const std::string& name) {
  auto l = Listener::create(name);
  if (!l) return ~0ull;
  auto client = connect(name, secs(5));
  if (!client) return ~0ull;
  auto server = l->accept(secs(5));
  if (!server) return ~0ull;
  // The client (side 0) plays a hostile producer: slot 0 one-way, status NoReply.
  hostile_batch(dir(*client, 0),
                {one_way(0, 8, static_cast<std::uint16_t>(shm::DescStatus::NoReply))});
  if (batch) {
    std::vector<Message> ms(4);
    auto n = server->receive_batch(ms, secs(2));
    if (!n || *n != 1 || ms[0].kind != Kind::Message) return ~0ull - 1;
  } else {
    // Through a MsgQueue (poll_locked -> accept(), one by one), as a server loop receives.
    auto q = MsgQueue::create();
    if (!q || !server->redirect(*q, 7)) return ~0ull - 1;
    auto m = q->wait(secs(2));
    if (!m || m->kind != Kind::Message) return ~0ull - 1;
  }
  auto s = query_stats(name, StatChannels::Yes, secs(5));
  if (!s || s->channels.size() != 1) return ~0ull - 2;
  return s->channels[0].no_reply_in;
}

TEST(ReviewStream, BatchAndOneByOneReceiveCountAHostileStatusAlike) {
  const std::string base = "rev-stream-cnt-" + std::to_string(os::current_pid());
  const std::uint64_t one = no_reply_in_after(false, base + "-1");
  const std::uint64_t batch = no_reply_in_after(true, base + "-b");
  ASSERT_LT(one, ~0ull - 2);
  ASSERT_LT(batch, ~0ull - 2);
  EXPECT_EQ(one, batch) << "a MsgQueue counted " << one << " no_reply_in, receive_batch() "
                        << batch;
}

// S3: layout v9's ring reserve at the deepest pool: 2 * (448 + 64) == 1024. Side A fills the
// A->B ring with every buffer it has, one-way (448 slots by send_batch, 64 extents), and B does
// not read them; B sends A a request in each of its 512 buffers; A answers all 512. Every reply
// must find room (the ring is then exactly full), none WouldBlock or Protocol.
TEST(ReviewStream, EveryReplyFindsRoomWhenBothPoolsAreInFlightAtTheDeepestPool) {
  constexpr std::uint32_t kSlots = shm::kMaxSlotsPerSide;
  auto p = Channel::pair(opts(kSlots, 64));
  ASSERT_TRUE(p) << p.error().message();
  auto& [a, b] = *p;
  // A: every slot one-way, in batches.
  std::vector<Buffer> bufs(kSlots);
  auto n = a.buffers(64, bufs, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  ASSERT_EQ(*n, kSlots);
  std::size_t sent = 0;
  while (sent < kSlots) {
    auto s = a.send_batch(std::span<Buffer>(bufs).subspan(sent));
    ASSERT_TRUE(s) << s.error().message();
    ASSERT_GT(*s, 0u);
    sent += *s;
  }
  // A: every extent one-way.
  for (std::uint32_t i = 0; i < shm::kMaxExtents; ++i) {
    auto x = a.buffer(128);
    ASSERT_TRUE(x) << i << ": " << x.error().message();
    ASSERT_TRUE(a.send(std::move(*x))) << i;
  }
  // B: a request in every buffer it has.
  for (std::uint32_t i = 0; i < kSlots + shm::kMaxExtents; ++i) {
    auto x = b.buffer(i < kSlots ? 64 : 128);
    ASSERT_TRUE(x) << i << ": " << x.error().message();
    auto st = b.send_request(std::move(*x));
    ASSERT_TRUE(st) << i << ": " << st.error().message();
  }
  // A: answers each.
  std::vector<Message> reqs(kSlots + shm::kMaxExtents);
  std::size_t have = 0;
  while (have < reqs.size()) {
    auto r = a.receive_batch(std::span(reqs).subspan(have), secs(5));
    ASSERT_TRUE(r) << r.error().message();
    have += *r;
  }
  std::size_t answered = 0;
  for (Message& m : reqs) {
    ASSERT_EQ(m.kind, Kind::Request);
    auto st = MsgQueue::reply(std::move(m));
    EXPECT_TRUE(st) << "reply " << answered << ": " << st.error().message();
    if (!st) break;
    ++answered;
  }
  EXPECT_EQ(answered, reqs.size());
  // B gets all 1,024 entries: the one-way messages and the replies.
  std::vector<Message> got(64);
  std::size_t total = 0, replies = 0;
  while (total < 2 * (kSlots + shm::kMaxExtents)) {
    auto r = b.receive_batch(got, secs(5));
    ASSERT_TRUE(r) << r.error().message();
    for (std::size_t i = 0; i < *r; ++i) {
      ASSERT_NE(got[i].kind, Kind::PeerClosed) << got[i].why;
      if (got[i].kind == Kind::Reply) ++replies;
      got[i].buffer.reset();
    }
    total += *r;
  }
  EXPECT_EQ(replies, kSlots + shm::kMaxExtents);
}

// S4: the batch producer's room check reads the consumer's head only when its cached copy says
// the ring may be full; a hostile head published ahead of the tail must then be a protocol
// error, never entries written over ones not yet read. Rounds of a full pool bring the tail
// near a ring's worth, so that the next batch reads the (scribbled) head.
TEST(ReviewStream, AHeadAheadOfTheTailFailsASendBatchWithProtocol) {
  constexpr std::uint32_t kSlots = shm::kMaxSlotsPerSide;
  auto p = Channel::pair(opts(kSlots, 64));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  std::vector<Buffer> bufs(kSlots);
  std::vector<Message> ms(kSlots);
  for (int round = 0; round < 2; ++round) {
    auto n = producer.buffers(64, bufs, secs(5));
    ASSERT_TRUE(n) << n.error().message();
    std::size_t sent = 0;
    while (sent < *n) {
      auto s = producer.send_batch(std::span<Buffer>(bufs).subspan(sent, *n - sent));
      ASSERT_TRUE(s) << s.error().message();
      sent += *s;
    }
    std::size_t have = 0;
    while (have < sent) {
      auto r = consumer.receive_batch(std::span(ms).subspan(have, sent - have), secs(5));
      ASSERT_TRUE(r) << r.error().message();
      have += *r;
    }
    for (auto& m : ms) m.buffer.reset();
  }
  shm::Direction* d = dir(producer, 0);
  // The hostile consumer: a head more than a ring ahead (a head a few entries ahead is not
  // noticed once the tail has passed it; only the liar's own entries are then at risk).
  d->head.store(d->tail.load() + 2000);
  auto n = producer.buffers(64, bufs, secs(5));
  ASSERT_TRUE(n) << n.error().message();
  Errc last = Errc::PeerClosed;
  bool failed = false;
  for (std::size_t sent = 0; sent < *n;) {
    auto s = producer.send_batch(std::span<Buffer>(bufs).subspan(sent, *n - sent));
    if (!s) {
      failed = true;
      last = s.error().code;
      break;
    }
    sent += *s;
  }
  EXPECT_TRUE(failed) << "a head ahead of the tail never noticed";
  EXPECT_EQ(last, Errc::Protocol);
}

// S5: layout v9 raises the pool to 448 slots; an untrusted end allocates a private copy of every
// slot of both sides at construction (PeerTrust: 2 * slots_per_side * slot_size, up to 14 GiB),
// chosen by the segment's creator (for a connecting client: the listener, i.e. the peer). An
// allocation that fails must be an error of that channel (Errc::NoMemory or similar), not
// std::bad_alloc escaping (a crash). Here the limit is RLIMIT_AS in a child: the two mappings of
// the segment fit, the private copy does not.
TEST(ReviewStream, AnUntrustedEndOfTheDeepestPoolDoesNotCrashWhenItsCopiesCannotBeAllocated) {
  pid_t child = test::spawn(
      [] {
        constexpr std::uint64_t kSeg = 2ull * shm::kMaxSlotsPerSide * shm::kMaxSlotSize;
        rlimit r{};
        r.rlim_cur = r.rlim_max = 2 * kSeg + (1ull << 30);  // two mappings + 1 GiB, not a third
        if (::setrlimit(RLIMIT_AS, &r) != 0) return 3;
        ChannelOptions o = opts(shm::kMaxSlotsPerSide, shm::kMaxSlotSize);
        o.trust = {Trust::Untrusted, Trust::Cooperative};
        try {
          auto p = Channel::pair(o);
          if (p) return 0;  // allocated after all
          std::fprintf(stderr, "pair: %s\n", p.error().message().c_str());
          return 0;  // a clean error
        } catch (const std::bad_alloc&) {
          return 2;  // escaped the Result API: uncaught in an application, std::terminate
        }
      },
      60);
  ASSERT_GT(child, 0);
  EXPECT_EQ(test::join(child), 0) << "2: std::bad_alloc escaped Channel::pair";
}

// S5b: the same through the rendezvous: the listener (the peer) picks the geometry; a client
// connecting with Trust::Untrusted allocates 2 * 448 * 16 MiB of private copies in connect().
TEST(ReviewStream, AListenersDeepestPoolCannotCrashAnUntrustedClientsConnect) {
  const std::string name = "rev-stream-deep-" + std::to_string(os::current_pid());
  ListenOptions lo;
  lo.channel = opts(shm::kMaxSlotsPerSide, shm::kMaxSlotSize);
  lo.channel.trust = {Trust::Untrusted, Trust::Cooperative};
  auto l = Listener::create(name, lo);
  ASSERT_TRUE(l) << l.error().message();
  pid_t child = test::spawn(
      [&] {
        constexpr std::uint64_t kSeg = 2ull * shm::kMaxSlotsPerSide * shm::kMaxSlotSize;
        rlimit r{};
        r.rlim_cur = r.rlim_max = kSeg + (2ull << 30);  // the mapping + 2 GiB, not the copies
        if (::setrlimit(RLIMIT_AS, &r) != 0) return 3;
        try {
          auto c = connect(name, secs(10), WaitPolicy{}, Trust::Untrusted);
          if (!c) std::fprintf(stderr, "connect: %s\n", c.error().message().c_str());
          return 0;  // connected, or a clean error
        } catch (const std::bad_alloc&) {
          return 2;
        }
      },
      60);
  ASSERT_GT(child, 0);
  auto server = l->accept(secs(10));
  EXPECT_EQ(test::join(child), 0) << "2: std::bad_alloc escaped connect()";
}

// S6: a buffer lent in a batch, the consumer holding it, then the consumer's end closed: the
// messages dropped after close give nothing back twice; the producer sees PeerClosed.
TEST(ReviewStream, ABatchHeldAcrossTheConsumersCloseIsDroppedOnce) {
  auto p = Channel::pair(opts(64, 64));
  ASSERT_TRUE(p);
  auto& [producer, consumer] = *p;
  std::vector<Buffer> bufs(64);
  auto n = producer.buffers(64, bufs, secs(5));
  ASSERT_TRUE(n);
  ASSERT_EQ(*n, 64u);
  auto s = producer.send_batch(bufs);
  ASSERT_TRUE(s);
  ASSERT_EQ(*s, 64u);
  std::vector<Message> ms(64);
  std::size_t have = 0;
  while (have < ms.size()) {
    auto r = consumer.receive_batch(std::span(ms).subspan(have), secs(5));
    ASSERT_TRUE(r) << r.error().message();
    have += *r;
  }
  std::uint64_t before[shm::kReturnedWords];
  for (std::uint32_t w = 0; w < shm::kReturnedWords; ++w)
    before[w] = dir(producer, 0)->returned[w].load();
  consumer.close();
  ms.clear();  // dropped after close: no bits set
  for (std::uint32_t w = 0; w < shm::kReturnedWords; ++w)
    EXPECT_EQ(dir(producer, 0)->returned[w].load(), before[w]) << "word " << w;
  auto m = producer.receive(secs(5));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed);
}

// S7: layout v9 refuses a v8 segment (version 8, ring_capacity 256) at attach, with Protocol,
// before anything of it is used.
TEST(ReviewStream, AVersion8SegmentIsRefusedAtAttach) {
  for (int variant = 0; variant < 2; ++variant) {
    auto s = shm::Segment::create(16, 64, shm::Limits{});
    ASSERT_TRUE(s) << s.error().message();
    auto* h = reinterpret_cast<shm::SegmentHeader*>(s->base());
    h->version = 8;
    if (variant == 1) h->ring_capacity = 256;
    auto dup = os::dup_fd(s->fd());
    ASSERT_TRUE(dup);
    auto a = shm::Segment::attach(std::move(*dup));
    ASSERT_FALSE(a) << variant;
    EXPECT_EQ(a.error().code, Errc::Protocol) << variant;
  }
}

}  // namespace
}  // namespace mbmq
