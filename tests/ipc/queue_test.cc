// MsgQueue: many channels from several processes into one queue; several threads on one queue.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::secs;
using test::spawn;

struct Stamp {
  std::uint32_t channel;
  std::uint32_t seq;
};

TEST(Queue, ManyChannelsFromSeveralProcessesEachMessageDeliveredOnceWithItsKey) {
  constexpr int kChannels = 256, kProcs = 4, kCalls = 20;
  ChannelOptions opt;
  opt.slots_per_side = 2;
  opt.slot_size = 4096;
  std::vector<Channel> clients, servers;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  for (int i = 0; i < kChannels; ++i) {
    auto p = Channel::pair(opt);
    ASSERT_TRUE(p) << p.error().message();
    ASSERT_TRUE(p->second.redirect(*q, 1000 + static_cast<std::uint64_t>(i)));
    clients.push_back(std::move(p->first));
    servers.push_back(std::move(p->second));
  }
  std::vector<pid_t> pids;
  for (int p = 0; p < kProcs; ++p) {
    pids.push_back(spawn([&, p] {
      for (auto& s : servers) s.close();
      for (int i = 0; i < kChannels; ++i)
        if (i % kProcs != p) clients[static_cast<std::size_t>(i)].close();
      for (int seq = 0; seq < kCalls; ++seq) {
        for (int i = p; i < kChannels; i += kProcs) {
          Channel& c = clients[static_cast<std::size_t>(i)];
          auto b = c.buffer(sizeof(Stamp));
          if (!b) return 1;
          Stamp st{static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(seq)};
          std::memcpy(b->data().data(), &st, sizeof(st));
          if (!c.call(*b, secs(30))) return 2;
          Stamp back;
          std::memcpy(&back, b->data().data(), sizeof(back));
          if (back.channel != st.channel || back.seq != st.seq + 1) return 3;
        }
      }
      return 0;
    }));
  }
  for (auto& c : clients) c.close();
  std::vector<int> next(kChannels, 0);
  int total = 0, closed = 0;
  while (closed < kChannels) {
    auto m = q->wait(secs(60));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_GE(m->key, 1000u);
    auto ch = static_cast<std::size_t>(m->key - 1000);
    ASSERT_LT(ch, static_cast<std::size_t>(kChannels));
    if (m->kind == Kind::PeerClosed) {
      EXPECT_EQ(m->error, Errc::PeerClosed);
      ++closed;
      continue;
    }
    ASSERT_EQ(m->kind, Kind::Request);
    Stamp st;
    std::memcpy(&st, m->buffer.data().data(), sizeof(st));
    ASSERT_EQ(st.channel, ch) << "message delivered with another channel's key";
    ASSERT_EQ(static_cast<int>(st.seq), next[ch]) << "lost, duplicated or reordered";
    ++next[ch];
    ++st.seq;
    std::memcpy(m->buffer.data().data(), &st, sizeof(st));
    ASSERT_TRUE(MsgQueue::reply(std::move(*m)));
    ++total;
  }
  EXPECT_EQ(total, kChannels * kCalls);
  for (pid_t pid : pids) EXPECT_EQ(join(pid), 0);
  EXPECT_EQ(q->channel_count(), 0u);
}

TEST(Queue, SeveralThreadsWaitOnOneQueueAndEachRequestIsServedOnce) {
  constexpr int kChannels = 6, kCallsEach = 300, kServerThreads = 3;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  std::vector<Channel> clients, servers;
  for (int i = 0; i < kChannels; ++i) {
    auto p = Channel::pair();
    ASSERT_TRUE(p);
    ASSERT_TRUE(p->second.redirect(*q, static_cast<std::uint64_t>(i)));
    clients.push_back(std::move(p->first));
    servers.push_back(std::move(p->second));
  }
  pid_t pid = spawn([&] {
    for (auto& s : servers) s.close();
    std::atomic<int> bad{0};
    std::vector<std::thread> ts;
    for (int i = 0; i < kChannels; ++i) {
      ts.emplace_back([&, i] {
        Channel& c = clients[static_cast<std::size_t>(i)];
        auto b = c.buffer(8);
        if (!b) {
          ++bad;
          return;
        }
        for (std::uint64_t k = 0; k < kCallsEach; ++k) {
          std::uint64_t v = (static_cast<std::uint64_t>(i) << 32) | k;
          std::memcpy(b->data().data(), &v, 8);
          if (!c.call(*b, secs(30))) {
            ++bad;
            return;
          }
          std::uint64_t back;
          std::memcpy(&back, b->data().data(), 8);
          if (back != v * 3) {
            ++bad;
            return;
          }
        }
      });
    }
    for (auto& t : ts) t.join();
    return bad.load() == 0 ? 0 : 1;
  });
  for (auto& c : clients) c.close();
  std::atomic<int> served{0}, closed{0}, errors{0};
  std::vector<std::atomic<int>> per_thread(kServerThreads);
  std::vector<std::thread> workers;
  for (int t = 0; t < kServerThreads; ++t) {
    workers.emplace_back([&, t] {
      while (closed.load() < kChannels) {
        auto m = q->wait(Deadline::after(std::chrono::milliseconds(200)));
        if (!m) {
          if (m.error().code != Errc::TimedOut) ++errors;
          continue;
        }
        if (m->kind == Kind::PeerClosed) {
          ++closed;
          continue;
        }
        std::uint64_t v;
        std::memcpy(&v, m->buffer.data().data(), 8);
        if ((v >> 32) != m->key) ++errors;
        v *= 3;
        std::memcpy(m->buffer.data().data(), &v, 8);
        if (!MsgQueue::reply(std::move(*m))) ++errors;
        ++served;
        ++per_thread[static_cast<std::size_t>(t)];
      }
    });
  }
  for (auto& w : workers) w.join();
  EXPECT_EQ(join(pid), 0);
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(served.load(), kChannels * kCallsEach);
  EXPECT_EQ(closed.load(), kChannels);
}

TEST(Queue, WaitTimesOutOnAQuietQueue) {
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto p = Channel::pair();
  ASSERT_TRUE(p && p->second.redirect(*q, 1));
  auto t0 = monotonic_ns();
  auto m = q->wait(Deadline::after(std::chrono::milliseconds(40)));
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::TimedOut);
  EXPECT_GE(monotonic_ns() - t0, 40'000'000);
}

TEST(Queue, AWaiterBlockedForOneSecondOnAQuietQueueUsesAlmostNoCpu) {
  auto q = MsgQueue::create();  // the default, adaptive policy: a short spin, then the futex
  ASSERT_TRUE(q);
  auto p = Channel::pair();
  ASSERT_TRUE(p && p->second.redirect(*q, 1));
  std::int64_t cpu0 = os::thread_cpu_ns(), t0 = monotonic_ns();
  auto m = q->wait(Deadline::after(std::chrono::seconds(1)));
  std::int64_t cpu = os::thread_cpu_ns() - cpu0, wall = monotonic_ns() - t0;
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::TimedOut);
  EXPECT_GE(wall, 1'000'000'000);
  std::printf("quiet queue: %.3f ms CPU in %.0f ms waiting\n", static_cast<double>(cpu) / 1e6,
              static_cast<double>(wall) / 1e6);
  EXPECT_LT(cpu, 20'000'000) << "a polling loop, not a sleep";
}

TEST(Queue, ACallerBlockedForOneSecondOnAQuietChannelUsesAlmostNoCpu) {
  auto p = Channel::pair();
  ASSERT_TRUE(p);
  std::int64_t cpu0 = os::thread_cpu_ns();
  auto m = p->second.receive(Deadline::after(std::chrono::seconds(1)));
  std::int64_t cpu = os::thread_cpu_ns() - cpu0;
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::TimedOut);
  EXPECT_LT(cpu, 20'000'000) << "a polling loop, not a sleep";
}

TEST(Queue, DestroyingTheQueueClosesItsChannelsSoCallersDoNotHang) {
  auto p = Channel::pair();
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  std::optional<MsgQueue> q(MsgQueue::create().value());
  ASSERT_TRUE(server.redirect(*q, 1));
  std::thread killer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    q.reset();
  });
  auto b = client.buffer(8);
  ASSERT_TRUE(b);
  auto r = client.call(*b, secs(10));
  killer.join();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, Errc::PeerClosed);
}

}  // namespace
}  // namespace mbmq
