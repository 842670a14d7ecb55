// Steady state allocates nothing: a counting global operator new, read around 1000 round trips,
// on the calling side and on the serving side.
#include <gtest/gtest.h>

#include "alloc_count.h"  // bench/: the counting global operator new
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::secs;
using test::spawn;

TEST(Allocations, ZeroHeapAllocationsPerCallOnTheCallingSide) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  pid_t pid = spawn([&] {
    client.close();
    for (;;) {
      auto m = server.receive(secs(30));
      if (!m || m->kind != Kind::Request) return 0;
      (void)MsgQueue::reply(std::move(*m));
    }
  });
  server.close();
  auto b = client.buffer(64);
  ASSERT_TRUE(b);
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(client.call(*b, secs(30)));  // warm up
  std::uint64_t before = g_allocs.load();
  bool ok = true;
  for (int i = 0; i < 1000; ++i) ok &= static_cast<bool>(client.call(*b, secs(30)));
  std::uint64_t after = g_allocs.load();
  ASSERT_TRUE(ok);
  EXPECT_EQ(after - before, 0u) << "allocations in 1000 calls";
  client.close();
  EXPECT_EQ(join(pid), 0);
}

TEST(Allocations, ZeroHeapAllocationsPerRequestOnTheServingSide) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(server.redirect(*q, 1));
  pid_t pid = spawn([&] {
    server.close();
    auto b = client.buffer(64);
    for (int i = 0; i < 1101; ++i)
      if (!client.call(*b, secs(30))) return 1;
    return 0;
  });
  client.close();
  auto m = q->wait(secs(30));
  ASSERT_TRUE(m);
  for (int i = 0; i < 100; ++i) m = q->reply_and_wait(std::move(*m), secs(30));  // warm up
  std::uint64_t before = g_allocs.load();
  bool ok = true;
  for (int i = 0; i < 1000; ++i) {
    m = q->reply_and_wait(std::move(*m), secs(30));
    ok &= m.has_value() && m->kind == Kind::Request;
  }
  std::uint64_t after = g_allocs.load();
  ASSERT_TRUE(ok);
  EXPECT_EQ(after - before, 0u) << "allocations in 1000 requests served";
  ASSERT_TRUE(MsgQueue::reply(std::move(*m)));
  EXPECT_EQ(join(pid), 0);
}

}  // namespace
}  // namespace mbmq
