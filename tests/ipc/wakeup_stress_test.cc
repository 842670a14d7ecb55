// No lost wake-up while waiters flip between spinning and sleeping at random (#13's guard, written
// before the queue's redesign): many channels on one queue, callers and the queue's waiter each
// changing their WaitPolicy at random under load, and (since #13's fd()) servers switching between
// wait() and a poll() on the queue's fd; every call must be answered well before its 1 s deadline.
// Threads of one process, so that TSan checks it too (label threads).
#include <gtest/gtest.h>
#include <poll.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;

WaitPolicy random_policy(std::mt19937& rng) {
  switch (rng() % 4) {
    case 0:
      return {WaitMode::Spin, 0ns};
    case 1:
      return {WaitMode::Adaptive, 0ns};  // sleeps after 64 looks: the announce path, often
    case 2:
      return {WaitMode::Adaptive, std::chrono::microseconds(rng() % 50)};
    default:
      return {WaitMode::Sleep, 0ns};
  }
}

TEST(WakeupStress, WaitersFlippingBetweenSpinAndSleepLoseNoWakeUp) {
  constexpr int kChannels = 32, kCallers = 4;
  const auto run_for = std::chrono::milliseconds(1500);
  auto q = MsgQueue::create({WaitMode::Sleep, 0ns});
  ASSERT_TRUE(q);
  std::vector<Channel> clients;
  for (int i = 0; i < kChannels; ++i) {
    auto p = Channel::pair();
    ASSERT_TRUE(p);
    clients.push_back(std::move(p->first));
    ASSERT_TRUE(q->adopt(std::move(p->second), static_cast<std::uint64_t>(i)));
  }
  std::atomic<bool> stop{false};         // callers and the flipper
  std::atomic<bool> server_stop{false};  // after every caller is done (its last call answered)
  std::atomic<std::uint64_t> answered{0}, failed{0};
  std::atomic<std::int64_t> slowest_ns{0};
  // Two servers, answering each request with its number + 1. Each goes at random either the wait
  // path (reply_and_wait, its policy flipped by another thread) or the fd path, as an event loop
  // would (#13): wait(immediate) until TimedOut, then poll() on queue.fd(). Their waits are long
  // (3 s): a lost wake-up of the queue, or of its fd, is not rescued by a deadline, and shows as a
  // call that ran into its own 1 s deadline.
  constexpr int kServers = 2;
  const int qfd = q->fd();
  ASSERT_GE(qfd, 0);
  auto stop_pipe = os::make_pipe();  // readable once the servers are to stop
  ASSERT_TRUE(stop_pipe);
  std::atomic<int> servers_done{0};
  std::atomic<std::uint64_t> fd_wakes{0}, fd_turns{0}, wait_turns{0}, server_errors{0};
  auto answer = [](Message& m) {
    if (m.kind != Kind::Request) return;
    std::uint32_t v = 0;
    std::memcpy(&v, m.buffer.data().data(), 4);
    ++v;
    std::memcpy(m.buffer.data().data(), &v, 4);
  };
  auto serve = [&](unsigned seed) {
    std::mt19937 rng(seed);
    while (!server_stop.load(std::memory_order_relaxed)) {
      if (rng() % 2 == 0) {
        wait_turns.fetch_add(1, std::memory_order_relaxed);
        auto m = q->wait(Deadline::after(3s));
        for (int k = static_cast<int>(rng() % 8); m && k > 0; --k) {
          answer(*m);
          m = q->reply_and_wait(std::move(*m), Deadline::after(3s));
        }
        if (m) {
          answer(*m);
          if (m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
        } else if (m.error().code != Errc::TimedOut) {
          server_errors.fetch_add(1);
        }
        continue;
      }
      fd_turns.fetch_add(1, std::memory_order_relaxed);
      for (int k = static_cast<int>(rng() % 8); k >= 0; --k) {
        for (;;) {
          auto m = q->wait(Deadline::immediate());
          if (!m) {
            if (m.error().code != Errc::TimedOut) server_errors.fetch_add(1);
            break;
          }
          answer(*m);
          if (m->kind == Kind::Request) (void)MsgQueue::reply(std::move(*m));
        }
        pollfd p[2] = {{qfd, POLLIN, 0}, {stop_pipe->first.get(), POLLIN, 0}};
        if (::poll(p, 2, 3000) > 0 && (p[0].revents & POLLIN) != 0)
          fd_wakes.fetch_add(1, std::memory_order_relaxed);
        if (p[1].revents != 0) break;
      }
    }
    servers_done.fetch_add(1);
  };
  std::vector<std::thread> servers;
  for (int s = 0; s < kServers; ++s) servers.emplace_back(serve, 50u + static_cast<unsigned>(s));
  std::thread flipper([&] {
    std::mt19937 rng(1);
    while (!stop.load(std::memory_order_relaxed)) {
      q->set_wait_policy(random_policy(rng));
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
    }
  });
  // Callers: each owns kChannels / kCallers channels, calls on them in turn with random pauses
  // (so the server often finds nothing and goes to sleep), flipping its own policies too.
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      std::mt19937 rng(static_cast<unsigned>(100 + c));
      std::uint32_t n = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        Channel& ch = clients[static_cast<std::size_t>(
            c + kCallers * static_cast<int>(rng() % (kChannels / kCallers)))];
        ch.set_wait_policy(random_policy(rng));
        auto b = ch.buffer(4);
        if (!b) {
          failed.fetch_add(1);
          continue;
        }
        std::memcpy(b->data().data(), &n, 4);
        const std::int64_t start = monotonic_ns();
        Status s = ch.call(*b, Deadline::after(1s));
        const std::int64_t took = monotonic_ns() - start;
        std::uint32_t v = 0;
        if (s) std::memcpy(&v, b->data().data(), 4);
        if (!s || v != n + 1) {
          failed.fetch_add(1);
        } else {
          answered.fetch_add(1);
        }
        std::int64_t prev = slowest_ns.load();
        while (took > prev && !slowest_ns.compare_exchange_weak(prev, took)) {
        }
        ++n;
        if (rng() % 4 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
      }
    });
  }
  std::this_thread::sleep_for(run_for);
  stop = true;
  for (auto& t : callers) t.join();
  flipper.join();
  server_stop = true;
  {
    std::byte b{1};
    ASSERT_TRUE(os::write_full(stop_pipe->second.get(), {&b, 1}));
  }
  // Wakes the servers in wait() to see server_stop (the answer, NoReply, does not matter).
  for (int tries = 0; servers_done.load() < kServers && tries < 100; ++tries) {
    auto b = clients[0].buffer(4);
    if (b) (void)clients[0].call(*b, Deadline::after(100ms));
  }
  for (auto& t : servers) t.join();
  EXPECT_EQ(server_errors.load(), 0u);
  EXPECT_GT(fd_wakes.load(), 0u) << "the fd path never woke: it was not exercised";
  std::printf("servers: %llu turns on the wait path, %llu on the fd path (%llu fd wake-ups)\n",
              static_cast<unsigned long long>(wait_turns.load()),
              static_cast<unsigned long long>(fd_turns.load()),
              static_cast<unsigned long long>(fd_wakes.load()));
  EXPECT_EQ(failed.load(), 0u) << "calls that timed out or came back wrong";
  EXPECT_GT(answered.load(), 100u);
  // A lost wake-up shows as a call that waited for its deadline (1 s); a slow machine is far
  // below that.
  EXPECT_LT(slowest_ns.load(), 500'000'000)
      << "a call waited " << slowest_ns.load() / 1000 << " us: a wake-up was late or lost";
  std::printf("answered %llu calls; slowest %lld us\n",
              static_cast<unsigned long long>(answered.load()),
              static_cast<long long>(slowest_ns.load() / 1000));
}

}  // namespace
}  // namespace mbmq
