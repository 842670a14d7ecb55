// call()/reply between two processes: payloads from 0 B to 256 MiB, content verified on both
// sides; one-way messages; NoReply; timeouts; misuse.
#include <gtest/gtest.h>

#include <span>
#include <thread>
#include <vector>

#include "test_util.h"

namespace mbmq {
namespace {

using test::check;
using test::fill;
using test::join;
using test::secs;
using test::spawn;

// Server: answers `calls` requests from its queue, verifying request `seq` and writing reply
// `seq + 1'000'000` in place. Returns 0 on success, a distinct code per failure.
int serve(Channel server, int calls) {
  auto q = MsgQueue::create();
  if (!q || !server.redirect(*q, 99)) return 10;
  for (int i = 0; i < calls; ++i) {
    auto m = q->wait(secs(30));
    if (!m) return 11;
    if (m->kind != Kind::Request || m->key != 99) return 12;
    if (!check(m->buffer.data(), static_cast<std::uint64_t>(i))) return 13;
    fill(m->buffer.data(), static_cast<std::uint64_t>(i) + 1'000'000);
    if (!MsgQueue::reply(std::move(*m))) return 14;
  }
  return 0;
}

class CallSizes : public ::testing::TestWithParam<std::size_t> {};

TEST_P(CallSizes, ReplyArrivesInTheSameBufferIntactAcrossProcesses) {
  const std::size_t size = GetParam();
  // 2 calls under a sanitizer (the second still reuses the buffer the first got back): the
  // instrumented fill and check of 256 MiB took 7-8 s a call there.
  constexpr int kCalls = test::sized(3, 2);
  auto ends = Channel::pair();
  ASSERT_TRUE(ends) << ends.error().message();
  auto& [client, server] = *ends;
  pid_t pid = spawn([&] {
    client.close();
    return serve(std::move(server), kCalls);
  });
  server.close();
  auto buf = client.buffer(size);
  ASSERT_TRUE(buf) << buf.error().message();
  for (int i = 0; i < kCalls; ++i) {
    ASSERT_EQ(buf->size(), size);
    fill(buf->data(), static_cast<std::uint64_t>(i));
    std::byte* before = buf->data().data();
    auto r = client.call(*buf, secs(30));
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(buf->data().data(), before) << "the reply must come back in the same memory";
    ASSERT_TRUE(check(buf->data(), static_cast<std::uint64_t>(i) + 1'000'000));
  }
  EXPECT_EQ(join(pid), 0);
}

INSTANTIATE_TEST_SUITE_P(Payloads, CallSizes,
                         ::testing::Values(0, 1, 64, 4096, 1 << 20, 64 << 20, 256 << 20));

// fill() and check() (test_util.h) copy and compare runs of one 512-byte row: the same bytes as
// pattern(), one at a time, past i >> 12 = 256 (1 MiB), at odd sizes; one byte off anywhere fails.
TEST(Test, FillAndCheckAreThePatternByteForByte) {
  std::vector<std::byte> d((3 << 20) + 77);
  for (std::uint64_t seq : {0ULL, 1ULL, 37ULL, 1'000'000ULL, ~0ULL}) {
    for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{255}, std::size_t{256},
                          std::size_t{257}, std::size_t{4097}, d.size()}) {
      std::span<std::byte> s(d.data(), n);
      fill(s, seq);
      std::size_t i = 0;
      while (i < n && s[i] == test::pattern(seq, i)) ++i;
      ASSERT_EQ(i, n) << "seq " << seq << " size " << n << ": byte " << i << " differs";
      ASSERT_TRUE(check(s, seq));
      if (n == 0) continue;
      EXPECT_FALSE(check(s, seq + 1));
      for (std::size_t at : {std::size_t{0}, n / 2, n - 1}) {
        s[at] ^= std::byte{1};
        EXPECT_FALSE(check(s, seq)) << "seq " << seq << " size " << n << " byte " << at;
        s[at] ^= std::byte{1};
      }
    }
  }
}

TEST(Call, OneWayMessagesArriveAndTheirBuffersComeBack) {
  ChannelOptions opt;
  opt.slots_per_side = 2;  // few buffers: they must be given back for the loop to go on
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto& [a, b] = *ends;
  constexpr int kMessages = 50;
  pid_t pid = spawn([&] {
    a.close();
    for (int i = 0; i < kMessages; ++i) {
      auto m = b.receive(secs(30));
      if (!m || m->kind != Kind::Message) return 1;
      if (!check(m->buffer.data(), static_cast<std::uint64_t>(i))) return 2;
    }  // each Message's buffer is given back as it goes out of scope
    return 0;
  });
  b.close();
  for (int i = 0; i < kMessages; ++i) {
    Result<Buffer> buf = fail(Errc::NoBuffers, "");
    Deadline d = secs(10);
    while (!(buf = a.buffer(100)) && buf.error().code == Errc::NoBuffers && !d.expired())
      std::this_thread::yield();
    ASSERT_TRUE(buf) << buf.error().message();
    fill(buf->data(), static_cast<std::uint64_t>(i));
    ASSERT_TRUE(a.send(std::move(*buf)));
  }
  EXPECT_EQ(join(pid), 0);
}

TEST(Call, RequestDroppedByTheCalleeReturnsNoReply) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  pid_t pid = spawn([&] {
    client.close();
    auto m = server.receive(secs(30));
    return m && m->kind == Kind::Request ? 0 : 1;  // dropped without reply
  });
  server.close();
  auto buf = client.buffer(64);
  ASSERT_TRUE(buf);
  auto r = client.call(*buf, secs(30));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::NoReply);
  EXPECT_TRUE(buf->valid()) << "after NoReply the buffer is the caller's again";
  EXPECT_EQ(join(pid), 0);
}

TEST(Call, TimesOutAndTheLateReplyDoesNotDisturbTheNextCall) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  pid_t pid = spawn([&] {
    client.close();
    auto m = server.receive(secs(30));
    if (!m) return 1;
    ::usleep(300'000);  // answer the first request late
    fill(m->buffer.data(), 77);
    if (!MsgQueue::reply(std::move(*m))) return 3;
    auto m2 = server.receive(secs(30));
    if (!m2) return 4;
    fill(m2->buffer.data(), 88);
    return MsgQueue::reply(std::move(*m2)) ? 0 : 5;
  });
  server.close();
  auto buf = client.buffer(64);
  ASSERT_TRUE(buf);
  auto t0 = monotonic_ns();
  auto r = client.call(*buf, Deadline::after(std::chrono::milliseconds(50)));
  auto waited = monotonic_ns() - t0;
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::TimedOut);
  EXPECT_GE(waited, 50'000'000);
  EXPECT_FALSE(buf->valid()) << "a timed-out buffer may still be written by the callee";
  auto buf2 = client.buffer(64);
  ASSERT_TRUE(buf2);
  ASSERT_TRUE(client.call(*buf2, secs(30)));
  EXPECT_TRUE(check(buf2->data(), 88));
  EXPECT_EQ(join(pid), 0);
}

TEST(Call, ATimedOutCallsSlotComesBackWhenItsLateAnswerLands) {
  ChannelOptions opt;
  opt.slots_per_side = 1;  // one buffer: it must be reclaimed for the next allocation to work
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  pid_t pid = spawn([&] {
    client.close();
    auto m = server.receive(secs(30));
    if (!m) return 1;
    ::usleep(200'000);
    if (!MsgQueue::reply(std::move(*m))) return 2;
    ::usleep(500'000);  // stay alive: a closed channel allocates nothing
    return 0;
  });
  server.close();
  auto buf = client.buffer(64);
  ASSERT_TRUE(buf);
  auto r = client.call(*buf, Deadline::after(std::chrono::milliseconds(30)));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::TimedOut);
  auto early = client.buffer(64);
  ASSERT_FALSE(early) << "the callee still holds the only slot";
  EXPECT_EQ(early.error().code, Errc::NoBuffers);
  // The late answer lands about 200 ms after the call; then the slot is ours again.
  Result<Buffer> later = fail(Errc::NoBuffers, "");
  Deadline d = Deadline::after(std::chrono::milliseconds(450));
  while (!(later = client.buffer(64)) && later.error().code == Errc::NoBuffers && !d.expired())
    ::usleep(5'000);
  EXPECT_TRUE(later) << (later ? "" : later.error().message());
  EXPECT_EQ(join(pid), 0);
}

TEST(Call, ReceiveTimesOutWhenNothingArrives) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto t0 = monotonic_ns();
  auto m = ends->second.receive(Deadline::after(std::chrono::milliseconds(30)));
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::TimedOut);
  EXPECT_GE(monotonic_ns() - t0, 30'000'000);
}

TEST(Call, RejectsABufferOfAnotherChannel) {
  auto e1 = Channel::pair();
  auto e2 = Channel::pair();
  ASSERT_TRUE(e1 && e2);
  auto buf = e2->first.buffer(64);
  ASSERT_TRUE(buf);
  auto r = e1->first.call(*buf, secs(1));
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::InvalidArgument);
}

TEST(Call, PoolExhaustionIsReportedNotFatal) {
  ChannelOptions opt;
  opt.slots_per_side = 2;
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto a = ends->first.buffer(10), b = ends->first.buffer(10), c = ends->first.buffer(10);
  ASSERT_TRUE(a && b);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, Errc::NoBuffers);
  a->reset();
  EXPECT_TRUE(ends->first.buffer(10));
}

TEST(Call, ReserveGrowsAnOwnBufferKeepingItsBytes) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto buf = ends->first.buffer(100);
  ASSERT_TRUE(buf);
  fill(buf->data(), 5);
  ASSERT_TRUE(buf->reserve(1 << 20));
  EXPECT_GE(buf->capacity(), std::size_t{1} << 20);
  EXPECT_TRUE(check(buf->data(), 5));
  ASSERT_TRUE(buf->resize(1 << 20));
  EXPECT_EQ(buf->size(), std::size_t{1} << 20);
}

TEST(Call, SendRequestDeliversTheReplyThroughTheQueue) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(client.redirect(*q, 5));
  pid_t pid = spawn([&] {
    client.close();
    auto m = server.receive(secs(30));
    if (!m) return 1;
    fill(m->buffer.data(), 9);
    return MsgQueue::reply(std::move(*m)) ? 0 : 2;
  });
  server.close();
  auto buf = client.buffer(256);
  ASSERT_TRUE(buf);
  ASSERT_TRUE(client.send_request(std::move(*buf)));
  EXPECT_FALSE(buf->valid());
  auto m = q->wait(secs(30));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::Reply);
  EXPECT_EQ(m->key, 5u);
  EXPECT_TRUE(check(m->buffer.data(), 9));
  EXPECT_EQ(join(pid), 0);
}

}  // namespace
}  // namespace mbmq
