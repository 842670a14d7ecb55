// The whole channel and queue path between threads of one process: the same code the processes
// run, where ThreadSanitizer can check it (it cannot see another process).
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include "test_util.h"

namespace mbmq {
namespace {

using test::secs;

class ThreadsModes : public ::testing::TestWithParam<WaitMode> {};

TEST_P(ThreadsModes, CallsBetweenTwoThreadsCarryTheirData) {
  ChannelOptions opt;
  opt.wait.mode = GetParam();
  auto ends = Channel::pair(opt);
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  constexpr int kCalls = 2000;
  std::thread srv([&] {
    for (int i = 0; i < kCalls; ++i) {
      auto m = server.receive(secs(30));
      if (!m || m->kind != Kind::Request) return;
      std::uint32_t v;
      std::memcpy(&v, m->buffer.data().data(), 4);
      v += 1;
      std::memcpy(m->buffer.data().data(), &v, 4);
      (void)MsgQueue::reply(std::move(*m));
    }
  });
  auto b = client.buffer(4);
  ASSERT_TRUE(b);
  for (std::uint32_t i = 0; i < kCalls; ++i) {
    std::memcpy(b->data().data(), &i, 4);
    ASSERT_TRUE(client.call(*b, secs(30)));
    std::uint32_t v;
    std::memcpy(&v, b->data().data(), 4);
    ASSERT_EQ(v, i + 1);
  }
  srv.join();
}

INSTANTIATE_TEST_SUITE_P(Modes, ThreadsModes,
                         ::testing::Values(WaitMode::Spin, WaitMode::Adaptive, WaitMode::Sleep));

TEST(Threads, ManyCallerThreadsManyServerThreadsOneQueue) {
  constexpr int kChannels = 4, kCalls = 500, kWorkers = 2;
  WaitPolicy p;
  p.mode = WaitMode::Sleep;
  auto q = MsgQueue::create(p);
  ASSERT_TRUE(q);
  std::vector<Channel> clients;
  std::vector<Channel> servers;
  for (int i = 0; i < kChannels; ++i) {
    auto e = Channel::pair();
    ASSERT_TRUE(e);
    ASSERT_TRUE(e->second.redirect(*q, static_cast<std::uint64_t>(i)));
    clients.push_back(std::move(e->first));
    servers.push_back(std::move(e->second));
  }
  std::atomic<int> served{0}, bad{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> workers;
  for (int w = 0; w < kWorkers; ++w) {
    workers.emplace_back([&] {
      while (!done.load()) {
        auto m = q->wait(Deadline::after(std::chrono::milliseconds(20)));
        if (!m) continue;
        if (m->kind != Kind::Request) continue;
        std::uint64_t v;
        std::memcpy(&v, m->buffer.data().data(), 8);
        if (v >> 32 != m->key) ++bad;
        v ^= 0xFFFF;
        std::memcpy(m->buffer.data().data(), &v, 8);
        if (auto r = MsgQueue::reply(std::move(*m)); !r) {
          std::fprintf(stderr, "reply: %s\n", r.error().message().c_str());
          ++bad;
        }
        ++served;
      }
    });
  }
  std::vector<std::thread> callers;
  for (int i = 0; i < kChannels; ++i) {
    callers.emplace_back([&, i] {
      Channel& c = clients[static_cast<std::size_t>(i)];
      auto b = c.buffer(8);
      if (!b) {
        ++bad;
        return;
      }
      for (std::uint64_t k = 0; k < kCalls; ++k) {
        std::uint64_t v = (static_cast<std::uint64_t>(i) << 32) | k;
        std::memcpy(b->data().data(), &v, 8);
        if (auto r = c.call(*b, secs(30)); !r) {
          std::fprintf(stderr, "caller %d call %llu: %s\n", i, static_cast<unsigned long long>(k),
                       r.error().message().c_str());
          ++bad;
          return;
        }
        std::uint64_t r;
        std::memcpy(&r, b->data().data(), 8);
        if (r != (v ^ 0xFFFF)) ++bad;
      }
    });
  }
  for (auto& t : callers) t.join();
  done.store(true);
  for (auto& t : workers) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(served.load(), kChannels * kCalls);
}

TEST(Threads, CloseFromAnotherThreadEndsAWaitingCall) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto b = ends->first.buffer(8);
  ASSERT_TRUE(b);
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ends->second.close();
  });
  auto r = ends->first.call(*b, secs(10));
  closer.join();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::PeerClosed);
}

}  // namespace
}  // namespace mbmq
