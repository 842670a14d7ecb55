// Hostile review of #15 (Publisher/Subscriber): reproducers. Each test is bounded by deadlines (and
// a Watchdog or the children's alarm) so that a hang shows as a failure. A failing test here is a
// CONFIRMED finding; a passing one a REFUTED suspicion.
#include <dirent.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "ipc/topic_core.h"
#include "mbmq/mbmq.h"
#include "os/process.h"
#include "test_util.h"
#include "topic_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::check;
using test::connect_retry;
using test::fill;
using test::join;
using test::join_one;
using test::secs;
using test::spawn;
using Clock = std::chrono::steady_clock;

std::string topic_name(const char* what) { return test::topic_name("mbmq-topic-review-", what); }

int open_fds() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  while (::readdir(d) != nullptr) ++n;
  ::closedir(d);
  return n - 3;  // ".", "..", the DIR's own fd
}

std::int64_t ms_since(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
}

// R1: receive() on one thread holds recv_mu_ across its FUTEX_WAIT (up to its own deadline);
// receive() on a second thread with a short deadline cannot get in and overruns its deadline.
TEST(TopicReview, SecondReceiverDeadlineHonouredWhileFirstSleeps) {
  test::Watchdog wd("SecondReceiverDeadline", 30s);
  const std::string name = topic_name("recv2");
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 4;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  auto sub = join_one(*pub, name);
  ASSERT_TRUE(sub) << sub.error().op;
  std::thread a([&] { (void)sub->receive(Deadline::after(3s)); });  // nothing will come
  std::this_thread::sleep_for(200ms);                               // a is asleep now
  const auto t0 = Clock::now();
  auto r = sub->receive(Deadline::after(100ms));
  const auto took = ms_since(t0);
  a.join();
  EXPECT_FALSE(r);
  EXPECT_LT(took, 1000) << "receive(100 ms) returned after " << took << " ms";
}

// R2: publish() under Block holds the publisher's mutex while it waits for room; buffer() with a
// 100 ms deadline on another thread (free samples available) overruns its deadline.
TEST(TopicReview, BufferDeadlineHonouredWhileAnotherThreadPublishWaits) {
  test::Watchdog wd("BufferDeadline", 30s);
  const std::string name = topic_name("bufdl");
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 1;
  o.policy = SlowSubscriber::Block;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  auto sub = join_one(*pub, name);  // never receives
  ASSERT_TRUE(sub) << sub.error().op;
  {
    auto b = pub->buffer(8, secs(1));
    ASSERT_TRUE(b);
    ASSERT_TRUE(pub->publish(std::move(*b), secs(1)));  // the subscriber is at keep now
  }
  auto b2 = pub->buffer(8, secs(1));
  ASSERT_TRUE(b2);
  std::thread a([&] { (void)pub->publish(std::move(*b2), Deadline::after(3s)); });
  std::this_thread::sleep_for(200ms);
  const auto t0 = Clock::now();
  auto b3 = pub->buffer(8, Deadline::after(100ms));
  const auto took = ms_since(t0);
  a.join();
  EXPECT_LT(took, 1000) << "buffer(100 ms) returned after " << took << " ms";
}

// R3: a "subscriber" is any connection; its channel can carry extents (memfds) to the publisher,
// which maps each one and keeps its fd until the sender releases it. One hostile connection makes
// the publisher hold up to 64 more fds and mappings (64 connections: 4096 fds, past a default
// RLIMIT_NOFILE). The design says such messages cost only a queue wake-up.
TEST(TopicReview, HostileConnectionCannotMakePublisherHoldFds) {
  const std::string name = topic_name("extents");
  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  const pid_t kid = spawn([&]() -> int {
    ::close(go[1]);
    Result<Channel> ch = fail(Errc::TimedOut, "connect");
    for (const Deadline end = secs(10); !end.expired(); ::usleep(2000)) {
      ch = connect(name, secs(5));
      if (ch) break;
    }
    if (!ch) return 10;
    auto hello = ch->receive(secs(5));
    if (!hello) return 11;
    std::vector<Buffer> bufs;
    for (int i = 0; i < 64; ++i) {
      auto b = ch->buffer(64 * 1024);  // above the topic channel's 256-byte slots: an extent
      if (!b) break;
      bufs.push_back(std::move(*b));
    }
    int sent = 0;
    for (Buffer& b : bufs)
      if (ch->send(std::move(b))) ++sent;
    char c;
    (void)::read(go[0], &c, 1);  // hold until the parent has measured
    return sent > 0 ? 0 : 12;
  });
  ::close(go[0]);
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 4;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(1, secs(10)));
  const int base = open_fds();
  int peak = base;
  for (const Deadline end = Deadline::after(1500ms); !end.expired();) {
    (void)pub->serve(Deadline::after(20ms));
    peak = std::max(peak, open_fds());
  }
  (void)::write(go[1], "x", 1);
  ::close(go[1]);
  EXPECT_EQ(join(kid), 0);
  EXPECT_LT(peak - base, 8) << "one hostile connection made the publisher hold " << (peak - base)
                            << " more fds";
}

// R4: DropOldest racing a subscriber that holds samples: a held sample must never be rewritten
// (the subscriber re-checks every payload just before releasing it), and missed counts stay exact.
// The publisher publishes until the subscriber has seen seq >= kN (it may skip the subscriber
// while it holds keep samples, so the last seqs may never reach it).
TEST(TopicReview, DropOldestNeverRewritesAHeldSample) {
  const std::string name = topic_name("hold");
  constexpr std::uint64_t kN = 20000;
  constexpr std::uint32_t kKeep = 6;
  const pid_t kid = spawn([&]() -> int {
    auto sub = connect_retry(name);
    if (!sub) return 10;
    std::deque<Sample> held;
    std::mt19937 rng(3);
    std::uint64_t last = 0, got = 0, missed = 0;
    while (last < kN) {
      auto s = sub->receive(secs(10));
      if (!s) {
        std::fprintf(stderr, "R4 child: receive failed: %s (%d) after seq %llu, holding %zu\n",
                     s.error().op, static_cast<int>(s.error().code),
                     static_cast<unsigned long long>(last), held.size());
        return 11;
      }
      if (s->seq() <= last || s->seq() - last - 1 != s->missed()) return 12;
      if (!check(s->data(), s->seq())) return 13;
      last = s->seq();
      ++got;
      missed += s->missed();
      held.push_back(std::move(*s));
      // Hold between 0 and keep - 1 samples while waiting for the next (at keep the publisher
      // skips us, and then nothing would come: the test's own deadlock, not a finding).
      while (held.size() > rng() % kKeep) {
        if (!check(held.front().data(), held.front().seq())) return 14;  // rewritten under us
        held.pop_front();
      }
      if (rng() % 64 == 0) ::usleep(200);
    }
    for (Sample& h : held)
      if (!check(h.data(), h.seq())) return 14;
    return got + missed == last ? 0 : 15;
  });
  TopicOptions o;
  o.samples = 16;
  o.sample_size = 256;
  o.keep = kKeep;
  o.max_subscribers = 2;  // DropOldest: samples > keep * max_subscribers
  o.policy = SlowSubscriber::DropOldest;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(1, secs(10)));
  const Deadline end = secs(60);
  for (std::uint64_t seq = 1; pub->subscribers() != 0 && !end.expired(); ++seq) {
    auto b = pub->buffer(256, secs(5));
    ASSERT_TRUE(b) << b.error().op << " at " << seq;
    fill(b->data(), seq);
    ASSERT_TRUE(pub->publish(std::move(*b), secs(5))) << "at " << seq;
    if (seq > kN) ::usleep(100);
  }
  EXPECT_EQ(join(kid), 0);
  const TopicStats st = pub->stats();
  EXPECT_EQ(st.protocol_errors, 0u);
  std::fprintf(
      stderr, "R4 publisher: published %llu dropped %llu skipped %llu left %llu\n",
      static_cast<unsigned long long>(st.published), static_cast<unsigned long long>(st.dropped),
      static_cast<unsigned long long>(st.skipped), static_cast<unsigned long long>(st.left));
}

// R7: (T10) a burst of samples to a subscriber redirected to a MsgQueue: the queue must hand out
// every sample of the burst promptly, not one per wake-up with the rest waiting for the queue's
// 1 s full-scan safety net.
TEST(TopicReview, QueueDeliversAWholeBurstPromptly) {
  const std::string name = topic_name("burst");
  constexpr int kBursts = 10;
  constexpr int kPerBurst = 6;
  const pid_t kid = spawn([&]() -> int {
    auto q = MsgQueue::create();
    if (!q) return 10;
    auto sub = connect_retry(name);
    if (!sub) return 11;
    if (!sub->redirect(*q, 7)) return 12;
    int slow = 0;
    std::uint64_t last = 0;
    while (last < std::uint64_t{kBursts} * kPerBurst) {
      auto m = q->wait(secs(10));
      if (!m) return 13;
      if (m->kind != Kind::Sample) return 14;
      std::int64_t stamp;
      std::memcpy(&stamp, m->sample.data().data(), sizeof stamp);
      if (Clock::now().time_since_epoch().count() - stamp > 300'000'000) ++slow;
      last = m->sample.seq();
    }
    return slow == 0 ? 0 : 20 + std::min(slow, 100);
  });
  TopicOptions o;
  o.samples = 16;
  o.sample_size = 64;
  o.keep = 8;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(1, secs(10)));
  std::this_thread::sleep_for(100ms);  // the subscriber's queue is asleep, notify armed
  for (int burst = 0; burst < kBursts; ++burst) {
    for (int i = 0; i < kPerBurst; ++i) {
      auto b = pub->buffer(sizeof(std::int64_t), secs(5));
      ASSERT_TRUE(b);
      const std::int64_t stamp = Clock::now().time_since_epoch().count();
      std::memcpy(b->data().data(), &stamp, sizeof stamp);
      ASSERT_TRUE(pub->publish(std::move(*b), secs(5)));
    }
    std::this_thread::sleep_for(200ms);
  }
  EXPECT_EQ(join(kid), 0) << "exit 20+n: n samples waited more than 300 ms in the ring";
}

// R5: sleep announcement vs publish (T4/T5): a subscriber asleep must be woken by the publish, not
// by its 100 ms safety net. Ping-pong: the publisher publishes one sample, the subscriber (asleep:
// WaitMode::Sleep) acks on a pipe, the publisher measures publish -> ack, then pauses 0-3 ms so
// that the next publish races the subscriber's sleep announcement. A lost wake-up is a round of
// ~100 ms (the futex timeout); the machine's load (2 shared cores) shows as other long rounds.
TEST(TopicReview, NoLostWakeUpOfASleepingSubscriber) {
  const std::string name = topic_name("wake");
  constexpr int kN = 400;
  int ack[2];
  ASSERT_EQ(::pipe(ack), 0);
  const pid_t kid = spawn([&]() -> int {
    ::close(ack[0]);
    ConnectOptions co;
    co.wait.mode = WaitMode::Sleep;
    auto sub = connect_retry(name, co);
    if (!sub) return 10;
    // A load probe: a thread that sleeps 1 ms at a time and logs every gap above 30 ms (the
    // machine, not the protocol, stalled this process then). Times: CLOCK_MONOTONIC ms.
    std::atomic<bool> stop{false};
    std::vector<std::pair<std::int64_t, std::int64_t>> gaps;
    std::thread probe([&] {
      auto last = Clock::now();
      while (!stop.load()) {
        std::this_thread::sleep_for(1ms);
        const auto now = Clock::now();
        if (now - last > 30ms)
          gaps.emplace_back(
              std::chrono::duration_cast<std::chrono::milliseconds>(last.time_since_epoch())
                  .count(),
              std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch())
                  .count());
        last = now;
      }
    });
    int rc = 0;
    for (int i = 0; i < kN && rc == 0; ++i) {
      auto s = sub->receive(secs(10));
      if (!s)
        rc = 11;
      else if (::write(ack[1], "a", 1) != 1)
        rc = 12;
    }
    stop.store(true);
    probe.join();
    for (const auto& [a, b] : gaps)
      std::fprintf(stderr, "R5 child: stalled from %lld to %lld ms\n", static_cast<long long>(a),
                   static_cast<long long>(b));
    return rc;
  });
  ::close(ack[1]);
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 4;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(1, secs(10)));
  std::mt19937 rng(11);
  int net = 0, other = 0;
  std::vector<std::int64_t> slow_ms;
  for (int i = 0; i < kN; ++i) {
    auto b = pub->buffer(8, secs(5));
    ASSERT_TRUE(b);
    const auto t0 = Clock::now();
    ASSERT_TRUE(pub->publish(std::move(*b), secs(5)));
    char c;
    ASSERT_EQ(::read(ack[0], &c, 1), 1);
    const auto ms = ms_since(t0);
    if (ms >= 90 && ms <= 115)
      ++net;
    else if (ms > 30)
      ++other;
    if (ms > 30) {
      slow_ms.push_back(ms);
      std::fprintf(
          stderr, "R5 publisher: round from %lld took %lld ms\n",
          static_cast<long long>(
              std::chrono::duration_cast<std::chrono::milliseconds>(t0.time_since_epoch()).count()),
          static_cast<long long>(ms));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
  }
  ::close(ack[0]);
  EXPECT_EQ(join(kid), 0);
  std::ostringstream rounds;
  for (std::int64_t ms : slow_ms) rounds << ' ' << ms;
  // A lost wake-up repeats (every round that loses the race); one or two rounds of ~100 ms are
  // what this shared machine does to a process now and then (the child's probe logs stalls of up
  // to 103 ms with no publish pending), so they are tolerated.
  EXPECT_LE(net, 2) << net << " rounds of 90-115 ms (the safety net), " << other
                    << " other slow rounds (load); slow rounds (ms):" << rounds.str();
}

// R6: rapid joins and leaves, past max_subscribers: the publisher's fds and samples come back.
TEST(TopicReview, RapidJoinLeavePastTheLimitLeaksNothing) {
  test::Watchdog wd("RapidJoinLeave", 60s);
  const std::string name = topic_name("churn");
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 2;
  o.max_subscribers = 2;
  o.policy = SlowSubscriber::DropOldest;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  std::atomic<bool> stop{false};
  const int base = open_fds();
  std::thread server([&] {
    std::uint64_t seq = 0;
    while (!stop.load()) {
      auto b = pub->buffer(8, Deadline::after(20ms));
      if (b) {
        fill(b->data(), ++seq);
        (void)pub->publish(std::move(*b), Deadline::after(20ms));
      }
      (void)pub->serve(Deadline::after(1ms));
    }
  });
  int refused = 0;
  for (int round = 0; round < 60; ++round) {
    std::vector<Subscriber> subs;
    for (int i = 0; i < 4; ++i) {  // two over the limit
      auto s = Subscriber::connect(name, Deadline::after(2s));
      if (s) {
        (void)s->receive(Deadline::after(1ms));
        subs.push_back(std::move(*s));
      } else {
        ++refused;
      }
    }
  }
  const Deadline end = secs(5);
  while (pub->subscribers() != 0 && !end.expired()) std::this_thread::sleep_for(5ms);
  stop.store(true);
  server.join();
  EXPECT_GT(refused, 0);
  EXPECT_EQ(pub->subscribers(), 0u);
  EXPECT_EQ(pub->stats().free_samples, o.samples);
  EXPECT_LE(open_fds() - base, 2);
}

// R8: DropOldest with the default options: one untrusted process that opens 4 subscriptions and
// holds keep samples on each must not exhaust the pool (found with samples 64, keep 16: buffer()
// timed out). Fixed: DropOldest requires samples > keep * max_subscribers, and the defaults are
// samples 512, keep 4, max_subscribers 64.
TEST(TopicReview, DropOldestDefaultsSurviveOneHostileProcess) {
  const std::string name = topic_name("hoard");
  int done[2];
  ASSERT_EQ(::pipe(done), 0);
  const pid_t kid = spawn([&]() -> int {
    ::close(done[1]);
    std::vector<Subscriber> subs;
    for (int i = 0; i < 4; ++i) {
      auto s = connect_retry(name);
      if (!s) return 10;
      subs.push_back(std::move(*s));
    }
    // Subscription i keeps (forever) the samples whose seq % 4 == i and releases the others, so
    // the four hold 4 * keep = 64 distinct samples. Until the publisher is done (its byte on
    // `done`: nothing more will come; the hoard is held until that byte is read below), 64 are
    // held, or 10 s pass.
    std::vector<Sample> hoard;
    const auto publisher_done = [&] {
      pollfd pfd{done[0], POLLIN, 0};
      return ::poll(&pfd, 1, 0) > 0;
    };
    for (const Deadline end = secs(10); !end.expired() && hoard.size() < 64 && !publisher_done();) {
      for (std::size_t i = 0; i < subs.size(); ++i) {
        auto got = subs[i].receive(Deadline::after(1ms));
        if (got && got->seq() % 4 == i) hoard.push_back(std::move(*got));
      }
    }
    std::fprintf(stderr, "R8 child: hoarding %zu samples\n", hoard.size());
    char c;
    (void)::read(done[0], &c, 1);
    return 0;
  });
  ::close(done[0]);
  TopicOptions o;  // the defaults
  o.policy = SlowSubscriber::DropOldest;
  o.sample_size = 256;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(4, secs(10)));
  int failed = 0;
  for (int seq = 1; seq <= 150; ++seq) {
    auto b = pub->buffer(8, Deadline::after(50ms));
    if (!b) {
      ++failed;
      continue;
    }
    fill(b->data(), static_cast<std::uint64_t>(seq));
    (void)pub->publish(std::move(*b), Deadline::after(50ms));
    std::this_thread::sleep_for(1ms);
  }
  const TopicStats st = pub->stats();
  const std::uint32_t free_samples = st.free_samples;
  std::fprintf(stderr, "R8: published %llu skipped %llu dropped %llu free %u failed %d\n",
               static_cast<unsigned long long>(st.published),
               static_cast<unsigned long long>(st.skipped),
               static_cast<unsigned long long>(st.dropped), free_samples, failed);
  (void)::write(done[1], "x", 1);
  ::close(done[1]);
  EXPECT_EQ(join(kid), 0);
  EXPECT_EQ(failed, 0) << "buffer() timed out " << failed << " times; free samples "
                       << free_samples;
}

// R10: fork() after a Publisher exists. The child's copy shares the pool and the subscribers'
// segments but has its own private records (free list, seq, ring tails): a publish from the child
// must be refused, or the two processes hand out the same sample and ring entry.
TEST(TopicReview, PublisherCopyInAForkedChildIsRefused) {
  const std::string name = topic_name("fork");
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 4;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  auto sub = join_one(*pub, name);
  ASSERT_TRUE(sub) << sub.error().op;
  const pid_t kid = spawn([&]() -> int {
    auto b = pub->buffer(8, Deadline::after(1s));
    if (!b) return 1;  // refused: good
    fill(b->data(), 777);
    return pub->publish(std::move(*b), Deadline::after(1s)) ? 0 : 1;
  });
  const int child = join(kid);
  EXPECT_NE(child, 0) << "the forked child published through its copy of the Publisher";
  // What the subscriber sees when it did: the child's sample, held; then the parent publishes.
  auto held = sub->receive(Deadline::after(500ms));
  {
    auto b = pub->buffer(8, secs(1));
    ASSERT_TRUE(b);
    fill(b->data(), 1);
    ASSERT_TRUE(pub->publish(std::move(*b), secs(1)));
  }
  if (held) {
    EXPECT_TRUE(check(held->data(), held->seq() == 1 ? 777 : held->seq()))
        << "a held sample (seq " << held->seq() << ") was rewritten under its holder";
  }
  auto next = sub->receive(Deadline::after(500ms));
  EXPECT_TRUE(next) << "the parent's sample never reached the subscriber (its ring entry was "
                       "the child's)";
  if (next) {
    EXPECT_TRUE(check(next->data(), 1));
  }
}

// R9: the cost of publish() with one subscriber must not grow with max_subscribers (the
// subscriber table is sized max_subscribers, up to 65536, and publish() walks it three times,
// plus a fill of skip_). Fixed (loops stop at the highest active index). A timing, so not in the
// suite (performance is measured in benchmarks): run it by hand with
// --gtest_also_run_disabled_tests.
TEST(TopicReview, DISABLED_PublishCostDoesNotScaleWithMaxSubscribers) {
  auto per_publish_ns = [](std::uint32_t max_subs) -> double {
    const std::string name = topic_name("scale");
    TopicOptions o;
    o.samples = 8;
    o.sample_size = 64;
    o.keep = 4;
    o.max_subscribers = max_subs;
    o.policy = SlowSubscriber::Block;
    auto pub = Publisher::create(name, o);
    if (!pub) return -1;
    auto sub = join_one(*pub, name);
    if (!sub) return -1;
    constexpr int kN = 1000;
    const auto t0 = Clock::now();
    for (int i = 0; i < kN; ++i) {
      auto b = pub->buffer(8, secs(1));
      if (!b || !pub->publish(std::move(*b), secs(1))) return -1;
      (void)sub->receive(secs(1));  // taken and dropped: the subscriber never fills (Block)
    }
    return static_cast<double>(
               std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count()) /
           kN;
  };
  const double small = per_publish_ns(1);
  const double large = per_publish_ns(65536);
  ASSERT_GT(small, 0);
  ASSERT_GT(large, 0);
  std::fprintf(stderr, "R9: %.0f ns per publish (max_subscribers 1), %.0f ns (65536)\n", small,
               large);
  EXPECT_LT(large, 5 * small + 2000);
}

// R11: deadlines under signals (EINTR): receive() and a Block publish() with a 300 ms deadline,
// their threads hit by a signal every millisecond, end between 300 and 800 ms.
void on_usr1(int) {}
TEST(TopicReview, DeadlinesHonouredUnderSignals) {
  test::Watchdog wd("DeadlinesUnderSignals", 30s);
  struct sigaction sa {};
  sa.sa_handler = on_usr1;  // no SA_RESTART
  ASSERT_EQ(::sigaction(SIGUSR1, &sa, nullptr), 0);
  const std::string name = topic_name("eintr");
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 1;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  auto sub = join_one(*pub, name);
  ASSERT_TRUE(sub) << sub.error().op;
  const pthread_t me = ::pthread_self();
  std::atomic<bool> stop{false};
  std::thread pest([&] {
    while (!stop.load()) {
      ::pthread_kill(me, SIGUSR1);
      std::this_thread::sleep_for(1ms);
    }
  });
  auto t0 = Clock::now();
  auto r = sub->receive(Deadline::after(300ms));
  const auto recv_ms = ms_since(t0);
  EXPECT_FALSE(r);
  {
    auto b = pub->buffer(8, secs(1));
    ASSERT_TRUE(b);
    ASSERT_TRUE(pub->publish(std::move(*b), secs(1)));  // the subscriber is at keep now
  }
  auto b2 = pub->buffer(8, secs(1));
  ASSERT_TRUE(b2);
  t0 = Clock::now();
  auto st = pub->publish(std::move(*b2), Deadline::after(300ms));
  const auto pub_ms = ms_since(t0);
  stop.store(true);
  pest.join();
  EXPECT_FALSE(st);
  EXPECT_GE(recv_ms, 290);
  EXPECT_LT(recv_ms, 800);
  EXPECT_GE(pub_ms, 290);
  EXPECT_LT(pub_ms, 800);
  signal(SIGUSR1, SIG_DFL);
}

// R13: one local process (same uid, passes the default AccessPolicy) opens max_subscribers (64 by
// default) connections that do nothing: every later honest subscriber is refused. Nothing bounds
// subscriptions per peer (uid/pid) or evicts idle ones. Not fixed: a known limitation, stated in
// include/mbmq/topic.h (TopicOptions::max_subscribers) and the README; limit who may subscribe
// with TopicOptions::access. Kept as the reproducer, not run.
TEST(TopicReview, DISABLED_OneProcessCannotTakeEverySubscriberSlot) {
  const std::string name = topic_name("squat");
  int done[2];
  ASSERT_EQ(::pipe(done), 0);
  const pid_t kid = spawn([&]() -> int {
    ::close(done[1]);
    std::vector<Channel> held;
    for (const Deadline end = secs(10); held.size() < 64 && !end.expired();) {
      auto ch = connect(name, secs(2));
      if (ch)
        held.push_back(std::move(*ch));  // never reads the hello, never leaves
      else
        ::usleep(1000);
    }
    char c;
    (void)::read(done[0], &c, 1);
    return held.size() == 64 ? 0 : 10;
  });
  ::close(done[0]);
  TopicOptions o;  // max_subscribers 64
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 4;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(64, secs(10)));
  auto honest = join_one(*pub, name);
  (void)::write(done[1], "x", 1);
  ::close(done[1]);
  EXPECT_EQ(join(kid), 0);
  EXPECT_TRUE(honest) << "an honest subscriber was refused: " << honest.error().op;
}

// R14: (T10) a Subscriber redirected to a queue and then destroyed: the queue must not hand the
// application the publisher's internal notifications as Kind::Message under the subscription's
// key (the tap is gone, so Endpoint::poll no longer filters them).
TEST(TopicReview, DestroyedRedirectedSubscriberLeaksNoNotifications) {
  test::Watchdog wd("DestroyedRedirected", 30s);
  const std::string name = topic_name("tapgone");
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 64;
  o.keep = 4;
  o.max_subscribers = 1;
  o.policy = SlowSubscriber::DropOldest;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  const auto t0 = Clock::now();
  {
    auto sub = join_one(*pub, name);
    ASSERT_TRUE(sub) << sub.error().op;
    std::fprintf(stderr, "R14: joined after %lld ms\n", static_cast<long long>(ms_since(t0)));
    ASSERT_TRUE(sub->redirect(*q, 7));
    EXPECT_FALSE(q->wait(Deadline::after(20ms)));  // nothing yet: the tap arms `notify`
  }  // the Subscriber goes; its end stays in the queue until the queue notices
  std::fprintf(stderr, "R14: subscriber gone after %lld ms\n",
               static_cast<long long>(ms_since(t0)));
  for (int i = 0; i < 3; ++i) {
    auto b = pub->buffer(8, secs(1));
    ASSERT_TRUE(b);
    ASSERT_TRUE(pub->publish(std::move(*b), secs(1)));
  }
  int messages = 0;
  for (int i = 0; i < 10; ++i) {
    auto m = q->wait(Deadline::after(50ms));
    if (!m) break;
    if (m->kind == Kind::Message) ++messages;
  }
  EXPECT_EQ(messages, 0) << "the application got " << messages
                         << " raw notifications under the subscription's key";
}

}  // namespace
}  // namespace mbmq
