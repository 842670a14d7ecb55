// Topic (#15): Publisher and Subscribers in separate processes (fork), and in threads of one
// process (for TSan). docs/design/topic.md names the steps (T1)-(T9).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ipc/topic_core.h"
#include "mbmq/mbmq.h"
#include "os/process.h"
#include "os/syscall_count.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::check;
using test::fill;
using test::join;
using test::secs;
using test::spawn;

std::string topic_name(const char* what) {
  static int n = 0;
  return std::string("mbmq-topic-test-") + what + "-" + std::to_string(::getpid()) + "-" +
         std::to_string(n++);
}

// Children are forked before the publisher exists (so none inherits another's channel), and
// connect once it listens.
Result<Subscriber> connect_retry(const std::string& name, ConnectOptions o = {}) {
  const Deadline end = secs(10);
  for (;;) {
    auto s = Subscriber::connect(name, secs(5), o);
    if (s || end.expired()) return s;
    ::usleep(2000);
  }
}

std::size_t size_of(std::uint64_t seq) { return 1 + (seq * 977) % 3000; }

// A subscriber that checks every sample from seq 1 to n: in order, nothing missed, payload intact.
int receive_all(const std::string& name, std::uint64_t n, WaitPolicy wait = {}) {
  ConnectOptions o;
  o.wait = wait;
  auto sub = connect_retry(name, o);
  if (!sub) return 10;
  for (std::uint64_t want = 1; want <= n; ++want) {
    auto s = sub->receive(secs(10));
    if (!s) return 11;
    if (s->seq() != want || s->missed() != 0) return 12;
    if (s->size() != size_of(want) || !check(s->data(), want)) return 13;
  }
  return 0;
}

Status publish_one(Publisher& pub, std::uint64_t seq, Deadline d) {
  Buffer b = MBMQ_TRY(pub.buffer(size_of(seq), d));
  fill(b.data(), seq);
  return pub.publish(std::move(b), d);
}

// Every subscriber gone and every sample back in the pool.
void expect_all_free(Publisher& pub, std::uint32_t samples) {
  const Deadline end = secs(5);
  while (pub.subscribers() != 0 && !end.expired()) (void)pub.serve(Deadline::after(10ms));
  EXPECT_EQ(pub.subscribers(), 0u);
  EXPECT_EQ(pub.stats().free_samples, samples);
}

TEST(Topic, EverySubscriberSeesEverySampleInOrder) {
  const std::string name = topic_name("all");
  constexpr std::uint64_t kN = 3000;
  constexpr int kSubs = 3;
  std::vector<pid_t> kids;
  for (int i = 0; i < kSubs; ++i) kids.push_back(spawn([&] { return receive_all(name, kN); }));
  TopicOptions o;
  o.samples = 32;
  o.sample_size = 4096;
  o.keep = 8;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(kSubs, secs(10)));
  for (std::uint64_t seq = 1; seq <= kN; ++seq) {
    auto st = publish_one(*pub, seq, secs(10));
    ASSERT_TRUE(st) << st.error().op;
  }
  for (pid_t k : kids) EXPECT_EQ(join(k), 0);
  const TopicStats s = pub->stats();
  EXPECT_EQ(s.published, kN);
  EXPECT_EQ(s.deliveries, kN * kSubs);  // 3000 samples through a pool of 32: reused
  EXPECT_EQ(s.dropped + s.skipped + s.refused, 0u);
  expect_all_free(*pub, o.samples);
}

TEST(Topic, WakingSleepingSubscribersCostsOneSystemCall) {
  const std::string name = topic_name("wake");
  constexpr std::uint64_t kN = 40;
  constexpr int kSubs = 4;
  std::vector<pid_t> kids;
  for (int i = 0; i < kSubs; ++i)
    kids.push_back(spawn([&] { return receive_all(name, kN, WaitPolicy{WaitMode::Sleep, {}}); }));
  TopicOptions o;
  o.samples = 16;
  o.sample_size = 4096;
  o.keep = 8;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub);
  ASSERT_TRUE(pub->wait_for_subscribers(kSubs, secs(10)));
  std::uint64_t worst = 0;
  for (std::uint64_t seq = 1; seq <= kN; ++seq) {
    ::usleep(20000);  // the subscribers are asleep by now
    auto b0 = pub->buffer(size_of(seq), secs(5));
    ASSERT_TRUE(b0);
    Buffer b = std::move(*b0);
    fill(b.data(), seq);
    const std::uint64_t before = os::syscalls_this_thread();
    ASSERT_TRUE(pub->publish(std::move(b), secs(5)));
    worst = std::max(worst, os::syscalls_this_thread() - before);
  }
  for (pid_t k : kids) EXPECT_EQ(join(k), 0);
  // One FUTEX_WAKE for all four, not four (the look at the publisher's own queue makes none).
  EXPECT_LE(worst, 1u);
  EXPECT_GE(pub->stats().wakes, kN / 2);
  EXPECT_LE(pub->stats().wakes, kN);
  expect_all_free(*pub, o.samples);
}

}  // namespace
}  // namespace mbmq
