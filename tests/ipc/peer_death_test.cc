// A peer that exits, is killed or closes: callers get PeerClosed promptly (the automatic reply),
// never a hang; a server holding a dead caller's request fails its reply cleanly; nothing leaks.
#include <gtest/gtest.h>

#include <algorithm>
#include <thread>
#include <vector>

#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::secs;
using test::spawn;

// One trial: a server child takes the request and then dies (by `how`); returns the time from
// the death to call() returning PeerClosed, in ns (or -1 on a wrong result).
std::int64_t trial(WaitMode mode, bool sigkill) {
  ChannelOptions opt;
  opt.wait.mode = mode;
  auto ends = Channel::pair(opt);
  if (!ends) return -1;
  auto& [client, server] = *ends;
  auto pipe = os::make_pipe();
  if (!pipe) return -1;
  int ready_w = pipe->second.get();
  pid_t pid = spawn([&]() -> int {
    client.close();
    auto m = server.receive(secs(30));
    (void)m;
    std::int64_t t = monotonic_ns();
    (void)os::write_full(ready_w, {reinterpret_cast<std::byte*>(&t), sizeof(t)});
    if (sigkill) ::pause();  // held until killed
    os::exit_now(0);         // exits holding the request (no destructor answers it)
  });
  server.close();
  pipe->second.reset();
  std::int64_t death_ns = 0, returned_ns = 0;
  Status result;
  std::thread caller([&] {
    auto b = client.buffer(64);
    if (!b) return;
    result = client.call(*b, secs(20));
    returned_ns = monotonic_ns();
  });
  std::int64_t t = 0;
  (void)os::read_full(pipe->first.get(), {reinterpret_cast<std::byte*>(&t), sizeof(t)});
  if (sigkill) {
    death_ns = monotonic_ns();
    (void)os::kill_process(pid, SIGKILL);
  } else {
    death_ns = t;
  }
  caller.join();
  int rc = join(pid);
  if (sigkill ? rc != 128 + SIGKILL : rc != 0) return -1;
  if (result || result.error().code != Errc::PeerClosed) return -1;
  return returned_ns - death_ns;
}

void report(const char* name, std::vector<std::int64_t> v) {
  std::sort(v.begin(), v.end());
  auto at = [&](double q) {
    return v[static_cast<std::size_t>(q * static_cast<double>(v.size() - 1))];
  };
  std::printf("%s: %zu trials, detection p50 %.3f ms, p99 %.3f ms, max %.3f ms\n", name, v.size(),
              static_cast<double>(at(0.5)) / 1e6, static_cast<double>(at(0.99)) / 1e6,
              static_cast<double>(v.back()) / 1e6);
}

class PeerDeath : public ::testing::TestWithParam<WaitMode> {};

TEST_P(PeerDeath, CallerGetsPeerClosedWithin100msWhenTheServerIsKilled) {
  std::vector<std::int64_t> lat;
  for (int i = 0; i < 20; ++i) {
    std::int64_t ns = trial(GetParam(), true);
    ASSERT_GE(ns, 0) << "trial " << i << " gave the wrong result";
    lat.push_back(ns);
  }
  report("SIGKILL", lat);
  EXPECT_LT(*std::max_element(lat.begin(), lat.end()), 100'000'000);
}

TEST_P(PeerDeath, CallerGetsPeerClosedWithin100msWhenTheServerExits) {
  std::vector<std::int64_t> lat;
  for (int i = 0; i < 10; ++i) {
    std::int64_t ns = trial(GetParam(), false);
    ASSERT_GE(ns, 0) << "trial " << i << " gave the wrong result";
    lat.push_back(ns);
  }
  report("exit", lat);
  EXPECT_LT(*std::max_element(lat.begin(), lat.end()), 100'000'000);
}

INSTANTIATE_TEST_SUITE_P(Modes, PeerDeath,
                         ::testing::Values(WaitMode::Spin, WaitMode::Adaptive, WaitMode::Sleep));

TEST(PeerDeathServer, ReplyToAKilledCallerFailsCleanlyAndNothingLeaks) {
  // Trial 0 warms up: the watcher thread, its epoll fd and its malloc arena exist after it.
  std::size_t fds0 = 0, maps0 = 0;
  for (int trial = 0; trial < 6; ++trial) {
    if (trial == 1) {
      // Trial 0's end may still be on its way out on the watcher thread: wait until stable.
      for (int stable = 0; stable < 3;) {
        std::size_t f = os::open_fd_count(), m = os::mapping_count();
        ::usleep(20'000);
        stable = (f == os::open_fd_count() && m == os::mapping_count()) ? stable + 1 : 0;
        fds0 = f;
        maps0 = m;
      }
    }
    auto q = MsgQueue::create();
    ASSERT_TRUE(q);
    auto ends = Channel::pair();
    ASSERT_TRUE(ends);
    auto& [client, server] = *ends;
    ASSERT_TRUE(server.redirect(*q, 3));
    pid_t pid = spawn([&] {
      server.close();
      auto b = client.buffer(1 << 20);  // an extent buffer too: its mapping must go away
      if (!b) return 1;
      (void)client.call(*b, secs(30));
      return 2;  // never reached: killed mid-call
    });
    client.close();
    auto m = q->wait(secs(30));
    ASSERT_TRUE(m);
    ASSERT_EQ(m->kind, Kind::Request);
    ASSERT_TRUE(os::kill_process(pid, SIGKILL));
    EXPECT_EQ(join(pid), 128 + SIGKILL);
    auto end = q->wait(secs(5));
    ASSERT_TRUE(end) << end.error().message();
    EXPECT_EQ(end->kind, Kind::PeerClosed);
    EXPECT_EQ(end->key, 3u);
    auto r = MsgQueue::reply(std::move(*m));
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, Errc::PeerClosed);
    if (trial > 0) {
      q = fail(Errc::Busy, "");  // drop the queue, then our ends: nothing of the trial remains
      // (close() keeps an end's memory until the handle goes: another thread may be inside it)
      server = Channel();
      client = Channel();
      // The watcher thread may hold the last reference for a moment after the hang-up.
      Deadline d = secs(2);
      while ((os::open_fd_count() != fds0 || os::mapping_count() != maps0) && !d.expired())
        ::usleep(1000);
      EXPECT_EQ(os::open_fd_count(), fds0) << "trial " << trial;
      EXPECT_EQ(os::mapping_count(), maps0) << "trial " << trial;
    }
  }
}

TEST(PeerDeathServer, ClosingTheClientEndEndsTheServersChannel) {
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  std::thread closer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    client.close();
  });
  auto m = server.receive(secs(10));
  closer.join();
  ASSERT_TRUE(m);
  EXPECT_EQ(m->kind, Kind::PeerClosed);
  auto again = server.receive(secs(1));
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::PeerClosed);
}

}  // namespace
}  // namespace mbmq
