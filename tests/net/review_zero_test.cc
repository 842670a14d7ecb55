// Hostile review of c3f66ee (net::Channel::buffer() zeroes a recycled payload vector only when its
// Spares tag names another channel; a buffer() buffer is sent on its own channel only): can any
// channel's bytes reach another channel's buffer() (and so, sent partly filled, its peer)?
// Confirmed_* fail on c3f66ee; Suspected_* pass there (what was suspected and found to hold).
// Server channels of one listener share its worker, and so its Spares (test::make_many).
//
// On c3f66ee (Release, 2 busy vCPUs, 5 runs, every run alike) the Confirmed_* failed:
//   (1) ACallsReply...: a Buffer received on channel A and call()ed on sibling B keeps
//       channel_ = A while B's reply lands in it; dropped, its vector is kept tagged A, and A's
//       buffer(1 MiB) held all 1,048,576 bytes of B's peer's reply; sent after a 16-byte header,
//       A's peer got 1,048,560 of them.
//   (2) AReceivedBufferShrunk...: a Buffer received on A, resize()d down to 256 KiB (the vector
//       keeps all 1 MiB) and sent (or call()ed, 2b) on B is given back tagged B (op->ch_id, or
//       call()'s give(.., id_)) though B's peer got its first 256 KiB only: B's buffer(1 MiB)
//       held 786,432 bytes of A's that were never sent on B.
//   Both pass with (tried in a scratch copy, not committed): in send()/call(), just before
//   send_locked, buf.bytes_.resize(n) (what is kept is what this channel's peer got; vector
//   growth zero-fills, so the tail is never seen again), and in call() buf.channel_ = id_ where
//   the reply's bytes become buf's.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <thread>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::filled;
using test::make_many;
using test::secs;

constexpr std::size_t kMiB = std::size_t{1} << 20;

// Diagnostics only: private members (net/net_access.h).
using test::spares_of;
std::uint64_t id_of(net::Channel& c) { return test::core_of(c)->id_; }
// Unlocked read: called while nothing else touches the spares of this test's worker.
std::size_t kept_of(const net::detail::Spares& s, std::size_t cap) {
  std::size_t k = 0;
  for (const auto& v : s.*get(test::VecsOf{})) k += v.capacity() >= cap;
  return k;
}
// How many bytes of `s` are `b`: 4 KiB runs with none (memchr) or only `b` (memcmp) are counted
// whole, the others byte by byte (std::count over megabytes is seconds in the ASan build, whose
// test files are -O0; the buffers here are runs of one byte).
std::size_t count_of(std::span<const std::byte> s, std::byte b) {
  constexpr std::size_t kRun = 4096;
  std::byte only_b[kRun];
  std::memset(only_b, std::to_integer<int>(b), kRun);
  std::size_t n = 0;
  for (std::size_t at = 0; at < s.size(); at += kRun) {
    const std::size_t len = std::min(kRun, s.size() - at);
    const std::byte* run = s.data() + at;
    if (std::memchr(run, std::to_integer<int>(b), len) == nullptr) continue;
    if (std::memcmp(run, only_b, len) == 0)
      n += len;
    else
      n += static_cast<std::size_t>(std::count(run, run + len, b));
  }
  return n;
}
// Progresses the listener's worker (through `ch`, a channel of it, with nothing to receive) until
// its spares keep `want` vectors of at least `cap` bytes, or 5 s.
bool progress_until_kept(net::Channel& ch, std::size_t cap, std::size_t want) {
  auto sp = spares_of(ch);
  const std::int64_t until = monotonic_ns() + 5'000'000'000;
  while (monotonic_ns() < until) {
    (void)ch.receive(Deadline::after(2ms));
    if (kept_of(*sp, cap) >= want) return true;
  }
  return false;
}

// (1) Fixed: call() retags the buffer its reply lands in. Before: a received Buffer is not tied
// to its channel (made_ is false): call()ing it on a sibling
// channel B is allowed, and B's reply lands in it. But the Buffer keeps channel_ = A (call() does
// not retag it), so when it is dropped its vector (B's reply bytes) is kept tagged A, and A's
// next buffer() takes it unzeroed: B's peer's reply reaches A's application, and, sent partly
// filled (as the commit's own rationale has it), A's peer.
TEST(ReviewZero, ACallsReplyInAReceivedBufferIsKeptAsTheCallingChannels) {
  auto m = make_many(2, {}, {});
  ASSERT_TRUE(m);
  net::Channel& a = m->server[0];
  net::Channel& b = m->server[1];
  ASSERT_EQ(spares_of(a), spares_of(b));  // one worker: the listener's
  // A's peer sends 1 MiB of 'a'; A's application receives it.
  ASSERT_TRUE(m->client[0].send(filled(m->client[0], kMiB, 'a'), secs(10)));
  auto got = a.receive(secs(10));
  ASSERT_TRUE(got) << got.error().message();
  ASSERT_EQ(got->buffer.size(), kMiB);
  // A's application calls B's peer with it (a relay); B's peer answers 1 MiB of its secret 'B'.
  std::thread peer([&] {
    auto r = m->client[1].receive(secs(10));
    ASSERT_TRUE(r) << r.error().message();
    ASSERT_EQ(r->kind, Kind::Request);
    std::memset(r->buffer.data().data(), 'B', r->buffer.size());
    ASSERT_TRUE(net::Channel::reply(std::move(*r)));
  });
  {
    net::Buffer relay = std::move(got->buffer);
    Status st = b.call(relay, secs(10));
    peer.join();
    ASSERT_TRUE(st) << st.error().message();
    ASSERT_EQ(relay.size(), kMiB);
    ASSERT_EQ(count_of(relay.data(), std::byte{'B'}), kMiB);
  }  // dropped: its vector (B's reply) goes to the spares, tagged with the Buffer's channel_ (A)
  // A's buffer(): fills 16 bytes of a header and sends the whole of it, as a partly filled buffer.
  auto own = a.buffer(kMiB);
  ASSERT_TRUE(own) << own.error().message();
  const std::size_t foreign = count_of(own->data(), std::byte{'B'});
  std::memset(own->data().data(), 'h', 16);
  ASSERT_TRUE(a.send(std::move(*own), secs(10)));
  auto leaked = m->client[0].receive(secs(10));
  ASSERT_TRUE(leaked) << leaked.error().message();
  const std::size_t at_peer = count_of(leaked->buffer.data(), std::byte{'B'});
  std::printf("channel 0's buffer() holds %zu bytes of channel 1's reply; its peer got %zu\n",
              foreign, at_peer);
  EXPECT_EQ(foreign, 0u) << "another channel's bytes in a buffer()";
  EXPECT_EQ(at_peer, 0u) << "another channel's bytes reached this channel's peer";
}

// (2) Fixed: call()/send() cut another channel's buffer's vector to its size() first. Before: a
// received Buffer of A, shrunk (Buffer::resize below its size only sets size(): the vector
// keeps all of A's bytes) and sent on B: send_done gives the vector back tagged B (op->ch_id), but
// only its first size() bytes went to B's peer. B's next buffer() takes it unzeroed: the rest,
// A's bytes never sent on B, reach B's application (and B's peer, sent partly filled).
TEST(ReviewZero, AReceivedBufferShrunkAndSentOnASiblingLeavesNoTailToTheSibling) {
  auto m = make_many(2, {}, {});
  ASSERT_TRUE(m);
  net::Channel& a = m->server[0];
  net::Channel& b = m->server[1];
  ASSERT_EQ(spares_of(a), spares_of(b));
  ASSERT_TRUE(m->client[0].send(filled(m->client[0], kMiB, 'a'), secs(10)));
  auto got = a.receive(secs(10));
  ASSERT_TRUE(got) << got.error().message();
  ASSERT_EQ(got->buffer.size(), kMiB);
  // Forward a 256 KiB prefix on B (rendezvous: its vector comes back through send_done).
  constexpr std::size_t kPrefix = 256u << 10;
  ASSERT_TRUE(got->buffer.resize(kPrefix));
  std::memset(got->buffer.data().data(), 'f', kPrefix);
  ASSERT_TRUE(b.send(std::move(got->buffer), secs(10)));
  auto fwd = m->client[1].receive(secs(10));  // B's peer fetches the prefix
  ASSERT_TRUE(fwd) << fwd.error().message();
  ASSERT_EQ(fwd->buffer.size(), kPrefix);
  EXPECT_EQ(count_of(fwd->buffer.data(), std::byte{'a'}), 0u);
  ASSERT_TRUE(progress_until_kept(b, kMiB, 1)) << "the sent vector never came back";
  auto next = b.buffer(kMiB);
  ASSERT_TRUE(next) << next.error().message();
  const std::size_t foreign = count_of(next->data(), std::byte{'a'});
  std::printf("channel 1's buffer() holds %zu bytes of channel 0's payload never sent on 1\n",
              foreign);
  EXPECT_EQ(foreign, 0u) << "another channel's bytes (never sent on this one) in a buffer()";
}

// (2b) Fixed as (2). Before: the same through call(): the request's vector is given back tagged
// with the calling channel B (call(): give(buf.bytes_, id_)) when the reply replaces it, though
// only its first size() bytes went to B's peer.
TEST(ReviewZero, AReceivedBufferShrunkAndCalledOnASiblingLeavesNoTailToTheSibling) {
  auto m = make_many(2, {}, {});
  ASSERT_TRUE(m);
  net::Channel& a = m->server[0];
  net::Channel& b = m->server[1];
  ASSERT_EQ(spares_of(a), spares_of(b));
  ASSERT_TRUE(m->client[0].send(filled(m->client[0], kMiB, 'a'), secs(10)));
  auto got = a.receive(secs(10));
  ASSERT_TRUE(got) << got.error().message();
  ASSERT_EQ(got->buffer.size(), kMiB);
  constexpr std::size_t kPrefix = 256u << 10;
  std::thread peer([&] {
    auto r = m->client[1].receive(secs(10));
    ASSERT_TRUE(r) << r.error().message();
    ASSERT_EQ(r->kind, Kind::Request);
    EXPECT_EQ(r->buffer.size(), kPrefix);
    EXPECT_EQ(count_of(r->buffer.data(), std::byte{'a'}), 0u);
    ASSERT_TRUE(r->buffer.resize(16));  // a short answer
    ASSERT_TRUE(net::Channel::reply(std::move(*r)));
  });
  {
    net::Buffer relay = std::move(got->buffer);
    ASSERT_TRUE(relay.resize(kPrefix));
    std::memset(relay.data().data(), 'f', kPrefix);
    Status st = b.call(relay, secs(10));
    peer.join();
    ASSERT_TRUE(st) << st.error().message();
    ASSERT_EQ(relay.size(), 16u);
  }
  auto next = b.buffer(kMiB);
  ASSERT_TRUE(next) << next.error().message();
  const std::size_t foreign = count_of(next->data(), std::byte{'a'});
  std::printf("channel 1's buffer() holds %zu bytes of channel 0's payload never sent on 1\n",
              foreign);
  EXPECT_EQ(foreign, 0u) << "another channel's bytes (never sent on this one) in a buffer()";
}

// Spares::give's eviction and take() keep v_ and from_ in step: every vector comes back with the
// tag it was given with (its first byte is its tag here), through evictions of the smallest.
TEST(ReviewZero, SparesTagsFollowTheirVectorsThroughEvictionAndTake) {
  net::detail::Spares s;
  constexpr std::size_t kBase = 100u << 10;
  auto vec = [](std::size_t cap, std::uint8_t tag) {
    std::vector<std::byte> v;
    v.reserve(cap);
    v.resize(cap, std::byte{tag});
    return v;
  };
  // 16 small ones (tags 1-16), then 4 of 2 MiB (tags 101-104): the 4 smallest go.
  for (std::uint8_t i = 1; i <= 16; ++i) s.give(vec(kBase + i * 4096u, i), i);
  for (std::uint8_t i = 101; i <= 104; ++i) s.give(vec(2 * kMiB + i * 4096u, i), i);
  int mismatches = 0, found = 0;
  for (std::uint8_t i = 1; i <= 16; ++i) {
    std::uint64_t from = 0;
    auto v = s.take(kBase + i * 4096u, 0, &from);
    if (v.empty()) continue;  // evicted, or taken already as a fit for a smaller one
    ++found;
    if (from != std::to_integer<std::uint8_t>(v[0])) ++mismatches;
  }
  for (std::uint8_t i = 101; i <= 104; ++i) {
    std::uint64_t from = 0;
    auto v = s.take(2 * kMiB, i, &from);  // prefer each tag in turn: that one, if kept
    ASSERT_FALSE(v.empty());
    ++found;
    if (from != std::to_integer<std::uint8_t>(v[0])) ++mismatches;
    EXPECT_EQ(from, i) << "take() did not prefer the asked channel's vector";
  }
  std::printf("%d vectors taken back, %d with another's tag\n", found, mismatches);
  EXPECT_GE(found, 12 + 4);
  EXPECT_EQ(mismatches, 0);
}

// Channel ids are never 0 (the "no channel" tag, Spares::give's default) and never repeat.
TEST(ReviewZero, ChannelIdsAreNonZeroAndUnique) {
  std::set<std::uint64_t> ids;
  for (int round = 0; round < 3; ++round) {
    auto m = make_many(3, {}, {});
    ASSERT_TRUE(m);
    for (std::size_t i = 0; i < 3; ++i) {
      for (net::Channel* c : {&m->server[i], &m->client[i]}) {
        const std::uint64_t id = id_of(*c);
        EXPECT_NE(id, 0u);
        EXPECT_TRUE(ids.insert(id).second) << "id " << id << " reused";
      }
    }
  }
}

// A reply from a received request grown by resize() (zeroes what grows) is given back by
// send_done tagged with its channel: a sibling's buffer() gets it zeroed.
TEST(ReviewZero, AGrownRequestsReplyIsZeroedForASibling) {
  auto m = make_many(2, {}, {});
  ASSERT_TRUE(m);
  std::thread caller([&] {
    auto req = filled(m->client[0], 100u << 10, 'q');
    Status st = m->client[0].call(req, secs(10));
    ASSERT_TRUE(st) << st.error().message();
    EXPECT_EQ(req.size(), kMiB);
    EXPECT_EQ(count_of(req.data(), std::byte{'r'}), kMiB);
  });
  auto got = m->server[0].receive(secs(10));
  ASSERT_TRUE(got) << got.error().message();
  ASSERT_EQ(got->kind, Kind::Request);
  ASSERT_TRUE(got->buffer.resize(kMiB));
  EXPECT_EQ(count_of(got->buffer.data().subspan(100u << 10), std::byte{0}), kMiB - (100u << 10));
  std::memset(got->buffer.data().data(), 'r', kMiB);
  ASSERT_TRUE(net::Channel::reply(std::move(*got)));
  caller.join();
  ASSERT_TRUE(progress_until_kept(m->server[0], kMiB, 1));
  auto other = m->server[1].buffer(kMiB);
  ASSERT_TRUE(other);
  EXPECT_EQ(count_of(other->data(), std::byte{0}), kMiB) << "channel 0's reply in channel 1's";
}

// A forced close's cancelled send: send_done gives its vector back (UCS_ERR_CANCELED) tagged with
// the sending channel, whose bytes they are: a sibling's buffer() gets it zeroed.
TEST(ReviewZero, AForceClosedChannelsCancelledSendIsZeroedForASibling) {
  constexpr std::size_t kBig = 8 * kMiB;
  // Both peer_timeouts 0: with either, the keeper would progress the clients' workers too (K1;
  // the listener's peer_timeout reaches the clients in its HelloAck), and client 0 could fetch.
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  auto m = make_many(2, lo, co);
  ASSERT_TRUE(m);
  // Sent, not fetched (nothing progresses client 0's worker): UCX holds the vector.
  ASSERT_TRUE(m->server[0].send(filled(m->server[0], kBig, 'S'), secs(10)));
  auto core = test::core_of(m->server[0]);
  {
    os::LockGuard lock(core->w_->mu);
    core->fail_locked(Errc::PeerClosed, "review: forced close");  // ucp_ep_close_nbx(FORCE)
  }
  ASSERT_TRUE(progress_until_kept(m->server[1], kBig, 1)) << "the cancelled send's vector";
  {
    auto sp = spares_of(m->server[1]);
    std::uint64_t from = 0;
    auto v = sp->take(kBig, 0, &from);
    ASSERT_EQ(v.size(), kBig);
    EXPECT_EQ(from, core->id_) << "tagged with another channel than its sender";
    sp->give(std::move(v), from);
  }
  auto other = m->server[1].buffer(kBig);
  ASSERT_TRUE(other);
  EXPECT_EQ(count_of(other->data(), std::byte{0}), kBig) << "channel 0's bytes in channel 1's";
}

// The InvalidArgument rule for buffer() buffers holds for send_request() and for copies and moves
// of them (channel_ and made_ travel with the buffer).
TEST(ReviewZero, ABufferOfAnotherChannelIsRefusedByEveryWayOut) {
  auto m = make_many(2, {}, {});
  ASSERT_TRUE(m);
  net::Buffer a = filled(m->server[0], kMiB, 's');
  net::Buffer copy = a;
  net::Buffer moved = std::move(a);
  for (net::Buffer* x : {&copy, &moved}) {
    Status st = m->server[1].send_request(std::move(*x));
    ASSERT_FALSE(st);
    EXPECT_EQ(st.error().code, Errc::InvalidArgument);
    st = m->server[1].send(std::move(*x));
    ASSERT_FALSE(st);
    EXPECT_EQ(st.error().code, Errc::InvalidArgument);
    st = m->server[1].call(*x, Deadline::after(100ms));
    ASSERT_FALSE(st);
    EXPECT_EQ(st.error().code, Errc::InvalidArgument);
    EXPECT_TRUE(x->valid());
  }
}

// Two threads, each on its own sibling channel, take buffer()s over and over, check they hold
// only zeros or their own channel's byte, fill them with it and drop them (tags under the spares'
// lock; buffer() unlocked): no byte of the other channel is ever seen.
TEST(ReviewZero, SiblingThreadsNeverSeeEachOthersBytesInBuffer) {
  auto m = make_many(2, {}, {});
  ASSERT_TRUE(m);
  std::atomic<int> foreign{0}, own_seen{0};
  auto run = [&](net::Channel& ch, std::byte mine, std::byte theirs) {
    for (int i = 0; i < 300; ++i) {
      const std::size_t n = (i % 3 == 0) ? kMiB : (700u << 10);
      auto b = ch.buffer(n);
      ASSERT_TRUE(b);
      if (count_of(b->data(), theirs) != 0) foreign.fetch_add(1);
      if (count_of(b->data(), mine) != 0) own_seen.fetch_add(1);
      std::memset(b->data().data(), std::to_integer<int>(mine), n);
    }
  };
  std::thread t0([&] { run(m->server[0], std::byte{'0'}, std::byte{'1'}); });
  std::thread t1([&] { run(m->server[1], std::byte{'1'}, std::byte{'0'}); });
  t0.join();
  t1.join();
  std::printf("buffer()s with another channel's bytes: %d; with their own: %d\n", foreign.load(),
              own_seen.load());
  EXPECT_EQ(foreign.load(), 0);
}

}  // namespace
}  // namespace mbmq
