// Hostile review (final, #16 untrusted peers, layout v8 dense ring, send_batch seals, topics):
// reproducers. Each test states the documented property it checks; a failure is a finding.
#include <gtest/gtest.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "hostile_peer.h"
#include "ipc/test_access.h"
#include "mbmq/msg_queue.h"
#include "mbmq/topic.h"
#include "os/fault.h"
#include "os/memfd.h"
#include "shm/layout.h"
#include "shm/ring.h"
#include "test_util.h"
#include "topic_util.h"

namespace mbmq {
namespace {

using test::secs;

// Bytes malloc has handed out and not yet taken back (heap + mmapped chunks).
std::size_t heap_in_use() {
  const struct mallinfo2 mi = ::mallinfo2();
  return mi.uordblks + mi.hblkhd;
}

ChannelOptions untrusted_server(std::uint32_t threshold) {
  ChannelOptions o;
  o.trust = {Trust::Cooperative, Trust::Untrusted};
  o.copy_threshold = threshold;
  return o;
}

// ---- 1. The private-copy memory bound (include/mbmq/channel.h, copy_threshold 0) ----
// Documented: "The memory it costs: one private copy per buffer the untrusted end holds, the size
// of the payload copied". Once the untrusted end holds none of the peer's buffers, none of that
// memory should remain. PeerExtent::shadow is never freed (not on release, not on a
// ReleaseExtent, not on a new generation): a peer that once sent big payloads on k extent ids
// keeps k * (its biggest payload) of the receiver's heap pinned for the channel's life (k <= 64,
// payloads up to 4 GiB - 4 KiB).
TEST(FinalReview, UntrustedPrivateCopiesOutliveTheBuffersTheyCopy) {
  constexpr std::size_t kSize = 48u << 20;  // above glibc's largest mmap threshold
  constexpr int kCount = 6;
  auto p = Channel::pair(untrusted_server(0));  // copy every payload
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  std::vector<Buffer> bufs;
  for (int i = 0; i < kCount; ++i) {
    auto b = client.buffer(kSize, secs(5));
    ASSERT_TRUE(b) << b.error().message();
    std::memset(b->data().data(), i + 1, 4096);
    bufs.push_back(std::move(*b));
  }
  const std::size_t before = heap_in_use();
  for (auto& b : bufs) ASSERT_TRUE(client.send(std::move(b)));
  for (int i = 0; i < kCount; ++i) {
    auto m = server.receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Message);
    ASSERT_EQ(m->buffer.size(), kSize);
    m->buffer.reset();  // held no more: given back to the client
  }
  // The client takes its extents back (and may free them); the server holds nothing.
  for (int i = 0; i < kCount; ++i) {
    auto b = client.buffer(kSize, secs(5));
    ASSERT_TRUE(b) << b.error().message();
  }
  const std::size_t after = heap_in_use();
  const std::size_t retained = after > before ? after - before : 0;
  // Fixed: copies kept for reuse are bounded (shm::kRetainedCopyBytes, 128 MiB per end; here 6 x
  // 48 MiB = 288 MiB were kept).
  EXPECT_LE(retained, shm::kRetainedCopyBytes + (std::size_t{1} << 20))
      << "the untrusted end keeps " << (retained >> 20)
      << " MiB of private copies while holding no buffer of the peer's";
}

// ---- 1b. The reply copy is sized by the caller's capacity, not the answer ----
// An untrusted caller (copy_threshold 0) gets an 8-byte answer to a 64 MiB request: own_view()
// sizes its private copy min(capacity, copy_threshold) = the whole capacity (peer_trust.cc
// own_view), i.e. 64 MiB allocated and zero-filled for 8 bytes, kept after the buffer is gone.
TEST(FinalReview, UntrustedCallerCopyOfASmallReplyIsSizedByTheWholeExtent) {
  constexpr std::size_t kSize = 64u << 20;
  ChannelOptions o;
  o.trust = {Trust::Untrusted, Trust::Cooperative};  // the client (caller) trusts nobody
  auto p = Channel::pair(o);
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  auto b = client.buffer(kSize, secs(5));
  ASSERT_TRUE(b) << b.error().message();
  std::memset(b->data().data(), 3, 4096);
  const std::size_t before = heap_in_use();
  pid_t pid = test::spawn([&] {
    client.close();
    auto m = server.receive(secs(10));
    if (!m || m->kind != Kind::Request) return 10;
    if (!m->buffer.resize(8)) return 11;
    if (!MsgQueue::reply(std::move(*m))) return 12;
    return 0;
  });
  server.close();
  auto st = client.call(*b, secs(10));
  ASSERT_TRUE(st) << st.error().message();
  EXPECT_EQ(b->size(), 8u);
  b->reset();
  const std::size_t after = heap_in_use();
  const std::size_t grown = after > before ? after - before : 0;
  EXPECT_LT(grown, std::size_t{1} << 20)
      << "an 8-byte answer cost the untrusted caller " << (grown >> 20) << " MiB of private copy";
  EXPECT_EQ(test::join(pid), 0);
}

// ---- 1c. What a peer that pays nothing makes an untrusted end allocate (fixed) ----
// copy_threshold 0 (the default now) copies every unsealed payload. A hostile peer announces a
// sparse 1 GiB memfd (never written: it costs the peer nothing) with a 256 MiB payload: the
// receiver zero-fills a 256 MiB private copy and reads 256 MiB of holes. The old default (sealed
// above slot_size) mapped such a payload copy-on-write, allocating nothing. With 64 extent ids
// and payloads up to 4 GiB - 4 KiB, one peer can make an untrusted end commit ~256 GiB.
TEST(FinalReview, AFreeSparseExtentMakesTheUntrustedEndCommitThePayload) {
  constexpr std::uint32_t kPayload = 256u << 20;
  auto p = Channel::pair(untrusted_server(0));
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  auto sparse = os::make_sealed_memfd("sparse", std::size_t{1} << 30);
  ASSERT_TRUE(sparse);
  const std::size_t before = heap_in_use();
  ASSERT_TRUE(detail::TestAccess::forge_extent_request(client, sparse->get(), 1, kPayload, 0));
  // Fixed: the default copies payloads up to 64 MiB only (shm::kDefaultCopyThreshold); a larger
  // one must come sealed, so this one closes the channel (Protocol) without a private copy.
  auto m = server.receive(secs(20));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed);
  EXPECT_EQ(m->error, Errc::Protocol);
  const std::size_t after = heap_in_use();
  const std::size_t grown = after > before ? after - before : 0;
  struct stat st {};
  ASSERT_EQ(::fstat(sparse->get(), &st), 0);
  EXPECT_LT(grown, std::size_t{64} << 20)
      << "the receiver committed " << (grown >> 20) << " MiB of private copy for a payload the "
      << "peer never wrote (and the sparse file now has " << (st.st_blocks * 512 >> 20)
      << " MiB of pages)";
}

// ---- 1e. The private copy's allocation failing ----
// Under an address-space limit (or overcommit off) the private copy a peer asks for cannot be
// allocated: peer_view's std::vector::resize throws std::bad_alloc out of receive() (the library
// reports errors as Result, and an exception escaping a noexcept caller, e.g. a queue's poll,
// terminates). The receiver should refuse the message (or close the channel), not throw or abort.
TEST(FinalReview, APrivateCopyThatCannotBeAllocatedDoesNotThrowOrAbort) {
  const pid_t kid = test::spawn(
      []() -> int {
        constexpr std::uint32_t kPayload = 1536u << 20;
        auto p = Channel::pair(untrusted_server(0));
        if (!p) return 10;
        auto& [client, server] = *p;
        auto file = os::make_sealed_memfd("big", kPayload);
        if (!file) return 11;
        // Room to map the file (1.5 GiB) and a little more, not for a 1.5 GiB private copy too.
        std::size_t vm = 0;
        if (FILE* f = std::fopen("/proc/self/statm", "r")) {
          unsigned long pages = 0;
          if (std::fscanf(f, "%lu", &pages) == 1) vm = pages * 4096ul;
          std::fclose(f);
        }
        const rlim_t lim = vm + kPayload + (512ul << 20);
        const struct rlimit rl { lim, lim };
        if (::setrlimit(RLIMIT_AS, &rl) != 0) return 12;
        if (!detail::TestAccess::forge_extent_request(client, file->get(), 1, kPayload, 0))
          return 13;
        try {
          auto m = server.receive(secs(20));
          if (m && m->kind == Kind::Request) return 14;  // copied after all (the limit was loose)
          return 0;                                      // refused: fine
        } catch (const std::bad_alloc&) {
          return 20;
        }
      },
      60);
  const int rc = test::join(kid);
  EXPECT_EQ(rc, 0) << (rc == 20   ? "std::bad_alloc escaped Channel::receive()"
                       : rc == 14 ? "the copy was allocated (inconclusive)"
                                  : "child failed");
}

// ---- 4. Topics: a Sample dropped in a forked child ----
// The fork checks cover receive(), buffer(), publish(), serve(), but not Sample::reset()
// (SubscriberCore::release, topic.cc): a child that drops its inherited copy of a Sample sets the
// `returned` bit in the shared subscriber segment; the publisher takes the sample back while the
// parent still reads it, and hands it out again: the parent's sample is rewritten under it.
TEST(FinalReview, ASampleDroppedInAForkedChildIsTakenFromTheParent) {
  static int n = 0;
  const std::string name =
      "mbmq-final-review-fork-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
  TopicOptions o;
  o.samples = 2;
  o.sample_size = 64;
  o.keep = 1;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().message();
  Result<Subscriber> sub = test::join_one(*pub, name);
  ASSERT_TRUE(sub) << sub.error().message();
  {
    auto b = pub->buffer(8, secs(1));
    ASSERT_TRUE(b);
    test::fill(b->data(), 1);
    ASSERT_TRUE(pub->publish(std::move(*b), secs(1)));
  }
  auto held = sub->receive(secs(2));
  ASSERT_TRUE(held) << held.error().message();
  ASSERT_TRUE(test::check(held->data(), 1));
  EXPECT_EQ(pub->stats().free_samples, 1u);
  const pid_t kid = test::spawn([&]() -> int {
    held->reset();  // the child's copy of the parent's Sample goes (a destructor in the child)
    return 0;
  });
  ASSERT_EQ(test::join(kid), 0);
  EXPECT_EQ(pub->stats().free_samples, 1u)
      << "the publisher took back the sample the parent still holds";
  // Hand out every free sample and write it: the parent's held sample must not change.
  std::vector<Buffer> out;
  for (int i = 0; i < 2; ++i) {
    auto b = pub->buffer(8, Deadline::after(std::chrono::milliseconds(100)));
    if (!b) break;
    test::fill(b->data(), 9);
    out.push_back(std::move(*b));
  }
  EXPECT_TRUE(test::check(held->data(), 1)) << "the parent's held sample was rewritten";
}

// ---- 4b. Topics: stats() and subscribers() waited out another thread's publish ----
// DeadlineMutex bounds publish()/buffer()/serve()/receive() by their deadlines, but stats() and
// subscribers() take mu_ with no deadline, and publish() under Block held mu_ while it waited for
// room: a monitoring thread asking for stats() hung as long as the publish waited (forever with
// Deadline::never() and a subscriber that is alive but stuck). Fixed: the wait for room lets the
// lock go while it sleeps (TopicCore::wait_events_unlocked).
TEST(FinalReview, PublisherStatsDoNotWaitForABlockedPublish) {
  using namespace std::chrono_literals;
  const std::string name = test::topic_name("mbmq-final-review-", "stats");
  TopicOptions o;
  o.samples = 4;
  o.sample_size = 64;
  o.keep = 1;
  o.policy = SlowSubscriber::Block;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().message();
  Result<Subscriber> sub = test::join_one(*pub, name);
  ASSERT_TRUE(sub) << sub.error().message();
  {
    auto b = pub->buffer(8, secs(1));
    ASSERT_TRUE(b);
    ASSERT_TRUE(pub->publish(std::move(*b), secs(1)));  // the subscriber is full now (keep 1)
  }
  auto b2 = pub->buffer(8, secs(1));
  auto b3 = pub->buffer(8, secs(1));
  ASSERT_TRUE(b2 && b3);
  // 1. A publish that waits for room until its deadline: the other calls go on meanwhile.
  std::optional<Status> first;
  std::thread blocked([&] { first = pub->publish(std::move(*b2), Deadline::after(1s)); });
  std::this_thread::sleep_for(100ms);
  // 500 ms below: a loaded CI machine under ASan; waiting for the publish takes its last 900 ms
  constexpr std::int64_t kBound = 500;
  auto ms_since = [](std::int64_t t0) { return (monotonic_ns() - t0) / 1'000'000; };
  std::int64_t t0 = monotonic_ns();
  (void)pub->stats();
  EXPECT_LT(ms_since(t0), kBound) << "stats() waited for another thread's publish()";
  t0 = monotonic_ns();
  EXPECT_EQ(pub->subscribers(), 1u);
  EXPECT_LT(ms_since(t0), kBound) << "subscribers() waited for another thread's publish()";
  t0 = monotonic_ns();
  *b3 = Buffer{};  // dropped unpublished: back to the pool, under the publisher's lock
  EXPECT_LT(ms_since(t0), kBound) << "a dropped Buffer waited for another thread's publish()";
  blocked.join();
  ASSERT_TRUE(first.has_value());
  ASSERT_FALSE(*first) << "published to a full subscriber under Block";
  EXPECT_EQ(first->error().code, Errc::TimedOut);
  // 2. The same wait ends as soon as the subscriber takes and releases its sample (T6's kick
  // reaches a publisher that waits without its lock).
  std::optional<Status> second;
  // jthread: ends by its deadline, also after a failed ASSERT (else terminate, the finding lost)
  std::jthread waits([&] { second = pub->publish(std::move(*b2), Deadline::after(10s)); });
  std::this_thread::sleep_for(50ms);
  {
    Result<Sample> got = sub->receive(secs(5));
    ASSERT_TRUE(got) << got.error().message();
  }  // released here
  waits.join();
  ASSERT_TRUE(second.has_value());
  EXPECT_TRUE(*second) << second->error().message();
  EXPECT_EQ(pub->stats().published, 2u);
}

// ---- 1d. A sealed send whose mappings fail (P3c error paths) ----
// One failed mmap: the send fails, the buffer stays valid over its (now sealed) bytes, and a
// retry sends it intact. Two: its bytes are unreachable, the buffer becomes invalid and its
// extent goes back to the pool (no leak: 64 extents can still be had).
TEST(FinalReview, ASealedSendWhoseMappingFailsLeavesNoBufferOverUnmappedMemory) {
  constexpr std::size_t kSize = 1u << 20;
  auto p = Channel::pair(untrusted_server(64 * 1024));
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  {
    auto b = client.buffer(kSize, secs(5));
    ASSERT_TRUE(b);
    test::fill(b->data(), 5);
    os::arm_failure(os::Fault::Mmap, 0, 1, ENOMEM);
    auto st = client.send(std::move(*b));
    os::disarm_failures();
    std::printf("one failed mmap: send %s, buffer %s\n", st ? "ok" : "failed",
                b->valid() ? "valid" : "invalid");
    if (!st) {
      ASSERT_TRUE(b->valid());
      EXPECT_TRUE(test::check(b->data(), 5));
      ASSERT_TRUE(client.send(std::move(*b)));
    }
    auto m = server.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_TRUE(test::check(m->buffer.data(), 5));
  }
  {
    auto b = client.buffer(kSize, secs(5));
    ASSERT_TRUE(b);
    test::fill(b->data(), 6);
    os::arm_failure(os::Fault::Mmap, 0, 2, ENOMEM);
    auto st = client.send(std::move(*b));
    os::disarm_failures();
    std::printf("two failed mmaps: send %s, buffer %s\n", st ? "ok" : "failed",
                b->valid() ? "valid" : "invalid");
    if (!st && b->valid()) {
      EXPECT_TRUE(test::check(b->data(), 6));
    }
  }
  std::vector<Buffer> all;
  for (std::uint32_t i = 0; i < shm::kMaxExtents; ++i) {
    auto b = client.buffer(64 * 1024 + 1, Deadline::after(std::chrono::milliseconds(200)));
    ASSERT_TRUE(b) << "extent " << i << ": " << b.error().message();
    all.push_back(std::move(*b));
  }
}

// ---- 2. RingEntry::store / load (layout v8) ----
// Every value the library itself sends survives packing.
TEST(FinalReview, DenseRingRoundTripsEveryValueTheLibrarySends) {
  shm::RingEntry e{};
  const std::uint16_t kinds[] = {1, 2, 3, 4, 5};
  const std::uint16_t flags[] = {0, shm::kDescHasHandles, shm::kDescReplaced, shm::kDescFlags};
  std::vector<std::uint32_t> buffers;
  for (std::uint32_t s = 0; s < 2 * shm::kMaxSlotsPerSide; ++s) buffers.push_back(s);
  for (std::uint32_t x = 0; x < shm::kMaxExtents; ++x) buffers.push_back(shm::kExtentBit | x);
  for (std::uint32_t buf : buffers)
    for (std::uint16_t k : kinds)
      for (std::uint16_t f : flags)
        for (std::uint16_t status = 0; status <= 1; ++status)
          for (std::uint32_t v : {0u, 1u, 0xFFFF'F000u, 0xFFFF'FFFFu}) {
            const shm::Desc d{buf, v, ~v, static_cast<std::uint16_t>(k | f), status};
            e.store(d);
            const shm::Desc r = e.load();
            ASSERT_EQ(r.buffer, d.buffer);
            ASSERT_EQ(r.size, d.size);
            ASSERT_EQ(r.gen, d.gen);
            ASSERT_EQ(r.kind, d.kind);
            ASSERT_EQ(r.status, d.status);
          }
}

// Out-of-contract values alias silently onto valid ones (no assert in store()): slot 0x8000 is
// sent as slot 0, status 16 as Ok, extent id 0x8000 as extent 0, a kind with bits 8-11 set changes
// the status. Only the library's own descriptors are stored, so this is a latent hazard (a
// future status or a larger pool), not reachable by a peer.
// Fixed: RingProducer::push asserts the packing's limits (a bug of ours, never the peer's).
TEST(FinalReviewDeathTest, DenseRingOutOfContractValuesAreRefusedByPush) {
  std::atomic<std::uint32_t> tail{0}, head{0};
  shm::RingEntry ring[8]{};
  shm::RingProducer<8> tx{&tail, &head, ring};
  EXPECT_DEATH((void)tx.push(shm::Desc{0x8000u, 1, 1, 3, 0}), "");
  EXPECT_DEATH((void)tx.push(shm::Desc{shm::kExtentBit | 0x8000u, 1, 1, 3, 0}), "");
  EXPECT_DEATH((void)tx.push(shm::Desc{0, 1, 1, 2, 16}), "");
  EXPECT_EQ(tx.push(shm::Desc{0x7fffu, 1, 1, 3, 15}), shm::RingStatus::Ok);
}

// A hostile producer's raw kind with status bits: every status above NoReply is refused (P5:
// check_back), and a reply's status is taken only from bits 8-11. Packed values unpack into a
// buffer id whose range check (peer_extent, own_state, is_peer_slot) precedes any array access.
TEST(FinalReview, DenseRingHostileStatusBitsUnpackWithinTheMask) {
  shm::RingEntry e{};
  for (std::uint32_t raw = 0; raw <= 0xFFFF; ++raw) {
    e.kind = static_cast<std::uint16_t>(raw);
    const shm::Desc d = e.load();
    ASSERT_LE(d.status, 15u);
    ASSERT_EQ(d.kind & shm::kWireStatusMask, 0u);
  }
}

// A hostile producer writes raw kind values (bits 12-13 are neither flags nor status): a kind
// the receiver does not know must be refused (Errc::Protocol), not taken as a OneWay.
TEST(FinalReview, DenseRingHostileUnknownKindBitsAreRefused) {
  for (std::uint16_t raw : {std::uint16_t{0x0003}, std::uint16_t{0x1003}, std::uint16_t{0x2003},
                            std::uint16_t{0x0103}, std::uint16_t{0x0F01}}) {
    auto p = Channel::pair();
    ASSERT_TRUE(p);
    auto& [client, server] = *p;
    shm::Direction& d = test::dir(client, 0);
    std::uint32_t tail = 0;
    shm::RingEntry& e = d.ring[0];
    e.store(shm::Desc{0, 8, 1, 3, 0});
    e.kind = raw;
    e.seq.store(tail + 1, std::memory_order_release);
    ++tail;
    d.tail.store(tail, std::memory_order_release);
    auto m = server.receive(secs(2));
    const bool accepted = m && (m->kind == Kind::Message || m->kind == Kind::Request);
    std::printf("raw kind 0x%04x: %s\n", raw,
                accepted ? "accepted" : (m ? (m->why ? m->why : "end") : m.error().op));
    if (raw == 0x0003) {
      EXPECT_TRUE(accepted);
    }
    if (raw == 0x1003 || raw == 0x2003) {
      EXPECT_FALSE(accepted) << "raw kind " << raw << " accepted";
    }
  }
}

// ---- 3. send_batch and seals() ----
// A buffer that will be sealed for the untrusted peer is sent only first: after a slot it stops,
// and the next call sends it. A buffer of another channel after a prefix: no out-of-bounds
// lookup (seals() runs only for our own buffers), the prefix is reported, the next call the error.
TEST(FinalReview, SendBatchStopsBeforeASealedBufferAndAForeignOne) {
  auto p = Channel::pair(untrusted_server(64 * 1024));
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  auto other = Channel::pair();
  ASSERT_TRUE(other);
  std::vector<Buffer> v(3);
  auto a = client.buffer(100, secs(5));
  auto big = client.buffer(1u << 20, secs(5));
  auto foreign = other->first.buffer(1u << 20, secs(5));
  ASSERT_TRUE(a && big && foreign);
  v[0] = std::move(*a);
  v[1] = std::move(*big);
  v[2] = std::move(*foreign);
  auto n = client.send_batch(v);
  ASSERT_TRUE(n) << n.error().message();
  EXPECT_EQ(*n, 1u);  // stops before the sealed one
  auto n2 = client.send_batch(std::span<Buffer>(v).subspan(1));
  ASSERT_TRUE(n2) << n2.error().message();
  EXPECT_EQ(*n2, 1u);  // the sealed one alone; stops at the foreign one (its error lost here)
  auto n3 = client.send_batch(std::span<Buffer>(v).subspan(2));
  EXPECT_FALSE(n3);  // ... and reported now
  for (int i = 0; i < 2; ++i) {
    auto m = server.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
  }
}

}  // namespace
}  // namespace mbmq
