// A peer that scribbles garbage over its shared segment: only that channel fails (Protocol or
// PeerClosed), the victim never crashes or hangs, and channels beside it keep working.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "ipc/test_access.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::secs;
using test::spawn;

void scribble(std::span<std::byte> seg, std::uint32_t seed) {
  std::mt19937 rng(seed);
  for (auto& b : seg) b = static_cast<std::byte>(rng());
}

TEST(Hostile, GarbageOverOneSegmentFailsOnlyThatChannel) {
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto honest = Channel::pair();
  auto hostile = Channel::pair();
  ASSERT_TRUE(honest && hostile);
  ASSERT_TRUE(honest->second.redirect(*q, 1));
  ASSERT_TRUE(hostile->second.redirect(*q, 2));
  constexpr int kCalls = 300;
  pid_t good = spawn([&] {
    honest->second.close();
    hostile->first.close();
    hostile->second.close();
    auto b = honest->first.buffer(64);
    for (int i = 0; i < kCalls; ++i) {
      test::fill(b->data(), static_cast<std::uint64_t>(i));
      if (auto r = honest->first.call(*b, secs(30)); !r) {
        std::fprintf(stderr, "honest call %d: %s\n", i, r.error().message().c_str());
        return 1;
      }
      if (!test::check(b->data(), static_cast<std::uint64_t>(i) + 1)) return 2;
    }
    return 0;
  });
  pid_t bad = spawn([&] {
    honest->first.close();
    honest->second.close();
    hostile->second.close();
    auto b = hostile->first.buffer(64);
    (void)hostile->first.send(std::move(*b));  // something legitimate first
    auto seg = detail::TestAccess::segment(hostile->first);
    for (std::uint32_t round = 0; round < 200; ++round) {
      scribble(seg, round);
      ::usleep(500);
    }
    ::pause();  // stays alive: the victim must notice the garbage, not a death
    return 0;
  });
  honest->first.close();
  hostile->first.close();
  int served = 0;
  bool hostile_ended = false;
  // Garbage from a peer that never wakes us is seen at our next wake-up: a message, a hang-up or
  // a deadline. So the server waits with a short deadline, as a real one with periodic work would.
  Deadline overall = secs(30);
  while (served < kCalls || !hostile_ended) {
    auto m = q->wait(Deadline::after(std::chrono::milliseconds(100)));
    if (!m && m.error().code == Errc::TimedOut && !overall.expired()) continue;
    ASSERT_TRUE(m) << m.error().message() << " after serving " << served
                   << " honest calls; hostile ended: " << hostile_ended;
    if (m->key == 2) {
      if (m->kind == Kind::PeerClosed) {
        EXPECT_EQ(m->error, Errc::Protocol);
        hostile_ended = true;
      }
      continue;  // whatever else it delivered before breaking is dropped
    }
    if (m->kind == Kind::PeerClosed) continue;
    ASSERT_EQ(m->kind, Kind::Request);
    std::vector<std::byte> expect(64);
    test::fill(expect, static_cast<std::uint64_t>(served));
    ASSERT_EQ(std::memcmp(expect.data(), m->buffer.data().data(), 64), 0);
    test::fill(m->buffer.data(), static_cast<std::uint64_t>(served) + 1);
    ASSERT_TRUE(MsgQueue::reply(std::move(*m)));
    ++served;
  }
  EXPECT_EQ(join(good), 0);
  ASSERT_TRUE(os::kill_process(bad, SIGKILL));
  EXPECT_EQ(join(bad), 128 + SIGKILL);
}

TEST(Hostile, ACallerWhoseServerScribblesGetsAnErrorNotACrash) {
  for (std::uint32_t seed = 0; seed < 30; ++seed) {
    auto ends = Channel::pair();
    ASSERT_TRUE(ends);
    auto& [client, server] = *ends;
    pid_t pid = spawn([&] {
      client.close();
      auto m = server.receive(secs(30));
      if (!m) return 1;
      scribble(detail::TestAccess::segment(server), seed);
      (void)MsgQueue::reply(std::move(*m));  // a reply into a garbage ring, or none at all
      ::usleep(100'000);
      return 0;
    });
    server.close();
    auto b = client.buffer(64);
    ASSERT_TRUE(b);
    auto r = client.call(*b, secs(10));
    // Garbage may be rejected (Protocol), or the server exits (PeerClosed); a reply that
    // validates cannot come from random bytes in practice, but would be no crash either.
    if (!r) {
      EXPECT_TRUE(r.error().code == Errc::Protocol || r.error().code == Errc::PeerClosed ||
                  r.error().code == Errc::NoReply)
          << r.error().message();
    }
    EXPECT_EQ(join(pid), 0);
  }
}

TEST(Hostile, ForgedDescriptorsAreRejected) {
  // The peer pushes descriptors that name buffers it does not own, or sizes beyond capacity.
  struct Case {
    std::uint32_t buffer, size;
    std::uint16_t kind;
  };
  const std::vector<Case> cases = {
      {0, 64, 1},                // a request in *our* slot 0 (side 0 owns slots 0..15)
      {16, 1 << 20, 1},          // the peer's slot but larger than the slot
      {999, 8, 3},               // no such slot
      {16, 8, 2},                // a "reply" for a buffer we never lent
      {0x8000'0000u | 5, 8, 1},  // an extent whose fd never came
      {16, 8, 42},               // unknown kind
      {16, 8, 0x8001},           // a request announcing handles that never came (P3b)
      {16, 8, 0x8004},           // a "return" with handles
  };
  for (const Case& c : cases) {
    auto ends = Channel::pair();
    ASSERT_TRUE(ends);
    auto& [a, b] = *ends;
    // Play side 1 by hand: write a descriptor into dir[1] and publish it.
    auto seg = detail::TestAccess::segment(b);
    auto* dir =
        reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset + sizeof(shm::Direction));
    dir->ring[0].desc = shm::Desc{c.buffer, c.size, 1, c.kind, 0};
    dir->ring[0].seq.store(1, std::memory_order_release);
    dir->tail.store(1, std::memory_order_release);
    auto m = a.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(m->kind, Kind::PeerClosed) << "buffer " << c.buffer << " kind " << c.kind;
    EXPECT_EQ(m->error, Errc::Protocol);
  }
}

}  // namespace
}  // namespace mbmq
