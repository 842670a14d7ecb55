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
#include "topic_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::check;
using test::connect_retry;
using test::fill;
using test::join;
using test::secs;
using test::spawn;

std::string topic_name(const char* what) { return test::topic_name("mbmq-topic-test-", what); }

std::size_t size_of(std::uint64_t seq) { return 1 + (seq * 977) % 250; }  // <= every sample_size

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

// A subscriber that may lose samples (DropOldest): what it gets is in order and intact, and what
// it gets plus what it was told it missed is exactly the n published.
int receive_accounted(const std::string& name, std::uint64_t n, unsigned pause_one_in = 0) {
  auto sub = connect_retry(name);
  if (!sub) return 10;
  std::uint64_t got = 0, missed = 0, last = 0;
  std::mt19937 rng(7);
  while (last < n) {
    auto s = sub->receive(secs(10));
    if (!s) return 11;
    if (s->seq() <= last || s->seq() - last - 1 != s->missed()) return 12;
    if (s->size() != size_of(s->seq()) || !check(s->data(), s->seq())) return 13;
    last = s->seq();
    ++got;
    missed += s->missed();
    if (pause_one_in != 0 && rng() % pause_one_in == 0) ::usleep(300);
  }
  return got + missed == n ? 0 : 14;
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

// Joins a subscriber thread also after a failed ASSERT (else terminate): the publisher goes
// first, so that the thread's receive ends.
struct JoinAfterPublisher {
  Result<Publisher>& pub;
  std::thread& t;
  ~JoinAfterPublisher() {
    if (!t.joinable()) return;
    *pub = Publisher{};
    t.join();
  }
};

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
  ASSERT_TRUE(pub) << pub.error().op;
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

// A pipe a child waits on before it reads: the parent decides when a slow subscriber wakes up.
struct Gate {
  os::UniqueFd r, w;
  static Gate make() {
    auto p = os::make_pipe();
    return p ? Gate{std::move(p->first), std::move(p->second)} : Gate{};
  }
  void open() const {
    char c = 1;
    (void)os::write_once(w.get(), &c, 1);
  }
  void wait() const {
    char c = 0;
    (void)os::read_once(r.get(), &c, 1);
  }
};

// (T9) Subscribers killed at random mid-stream, some holding samples: the publisher (Block) never
// waits past its deadline, the others see everything, and every sample comes back.
TEST(Topic, KilledSubscribersAreReclaimed) {
  const std::string name = topic_name("kill");
  constexpr std::uint64_t kN = 2000;
  std::vector<pid_t> good, doomed;
  for (int i = 0; i < 2; ++i) good.push_back(spawn([&] { return receive_all(name, kN); }));
  for (int i = 0; i < 3; ++i)
    doomed.push_back(spawn([&, i] {
      auto sub = connect_retry(name);
      if (!sub) return 10;
      std::vector<Sample> held;  // keeps some: they must come back when we die
      for (int n = 0;; ++n) {
        auto s = sub->receive(secs(10));
        if (!s) return 11;
        if (n % (3 + i) == 0) held.push_back(std::move(*s));
        if (held.size() > 4) held.erase(held.begin());
        if (i == 2 && n > 100) ::pause();  // stops reading: the publisher blocks on it
      }
    }));
  TopicOptions o;
  o.samples = 32;
  o.sample_size = 4096;
  o.keep = 8;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(5, secs(10)));
  std::thread killer([&] {
    std::mt19937 rng(42);
    for (pid_t k : doomed) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20 + rng() % 100));
      (void)os::kill_process(k, SIGKILL);
    }
  });
  std::int64_t worst_ns = 0;
  for (std::uint64_t seq = 1; seq <= kN; ++seq) {
    const std::int64_t t0 = monotonic_ns();
    auto st = publish_one(*pub, seq, Deadline::after(2s));
    worst_ns = std::max(worst_ns, monotonic_ns() - t0);
    ASSERT_TRUE(st) << st.error().op << " at seq " << seq;
  }
  killer.join();
  for (pid_t k : doomed) EXPECT_EQ(join(k), 128 + SIGKILL);
  for (pid_t k : good) EXPECT_EQ(join(k), 0);
  EXPECT_LT(worst_ns, 2'000'000'000);
  EXPECT_GE(pub->stats().left, 3u);  // the three killed (and the others, once they exit)
  expect_all_free(*pub, o.samples);
}

// (T8) DropOldest: a subscriber that stops reading gets exactly the newest `keep`, the first
// counting everything it lost; the publisher never waits for it.
TEST(Topic, DropOldestCountsMissedSamplesExactly) {
  const std::string name = topic_name("drop");
  constexpr std::uint64_t kN = 500;
  constexpr std::uint32_t kKeep = 10;
  Gate gate = Gate::make();
  pid_t slow = spawn([&] {
    auto sub = connect_retry(name);
    if (!sub) return 10;
    gate.wait();  // the publisher has published all kN
    for (std::uint64_t i = 0; i < kKeep; ++i) {
      auto s = sub->receive(secs(5));
      if (!s) return 11;
      const std::uint64_t want = kN - kKeep + 1 + i;
      if (s->seq() != want || !check(s->data(), want)) return 12;
      if (s->missed() != (i == 0 ? kN - kKeep : 0)) return 13;
    }
    auto more = sub->receive(Deadline::after(50ms));
    return (!more && more.error().code == Errc::TimedOut) ? 0 : 14;
  });
  // A subscriber that reads at its own pace: what it gets plus what it missed is everything.
  pid_t jittery = spawn([&] { return receive_accounted(name, kN, 8); });
  TopicOptions o;
  o.samples = 32;
  o.sample_size = 4096;
  o.keep = kKeep;
  o.max_subscribers = 3;  // DropOldest: samples > keep * max_subscribers
  o.policy = SlowSubscriber::DropOldest;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(2, secs(10)));
  for (std::uint64_t seq = 1; seq <= kN; ++seq) {
    auto st = publish_one(*pub, seq, Deadline::immediate());  // never waits
    ASSERT_TRUE(st) << st.error().op << " at seq " << seq;
  }
  gate.open();
  EXPECT_EQ(join(slow), 0);
  EXPECT_EQ(join(jittery), 0);
  const TopicStats s = pub->stats();
  EXPECT_GE(s.dropped, kN - kKeep);
  EXPECT_EQ(s.skipped, 0u);
  expect_all_free(*pub, o.samples);
}

// (T8) DropOldest with a subscriber that takes samples and holds them all: it pins at most
// `keep`, then is skipped (missed counted), and the publisher goes on.
TEST(Topic, DropOldestSkipsASubscriberHoldingKeepSamples) {
  const std::string name = topic_name("hold");
  constexpr std::uint32_t kKeep = 4;
  Gate taken = Gate::make(), go = Gate::make(), released = Gate::make();
  pid_t holder = spawn([&] {
    auto sub = connect_retry(name);
    if (!sub) return 10;
    std::vector<Sample> held;
    for (std::uint32_t i = 0; i < kKeep; ++i) {
      auto s = sub->receive(secs(5));
      if (!s || s->seq() != i + 1) return 11;
      held.push_back(std::move(*s));
    }
    taken.open();
    go.wait();
    held.clear();
    released.open();
    // Samples kKeep+1 .. 99 were skipped for us (we held kKeep and had nothing queued to drop);
    // we released only after the 99th, so the next we get is the 100th.
    auto s = sub->receive(secs(5));
    if (!s) return 12;
    return (s->seq() == 100 && s->missed() == 100 - kKeep - 1) ? 0 : 13;
  });
  TopicOptions o;
  o.samples = 16;
  o.sample_size = 256;
  o.keep = kKeep;
  o.max_subscribers = 3;
  o.policy = SlowSubscriber::DropOldest;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(1, secs(10)));
  for (std::uint64_t seq = 1; seq <= 99; ++seq) {
    ASSERT_TRUE(publish_one(*pub, seq, Deadline::immediate()));
    if (seq == kKeep) taken.wait();  // the holder has taken its kKeep
  }
  EXPECT_EQ(pub->stats().free_samples, o.samples - kKeep);
  go.open();
  released.wait();
  ASSERT_TRUE(publish_one(*pub, 100, secs(1)));
  EXPECT_EQ(join(holder), 0);
  EXPECT_EQ(pub->stats().skipped, 99u - kKeep);
  expect_all_free(*pub, o.samples);
}

// (T8) Refuse: Errc::Busy, and the buffer is still the caller's; Block: Errc::TimedOut at the
// deadline, the same.
void full_subscriber_case(SlowSubscriber policy, Errc expected) {
  const std::string name = topic_name("full");
  constexpr std::uint32_t kKeep = 4;
  Gate gate = Gate::make();
  pid_t slow = spawn([&] {
    auto sub = connect_retry(name);
    if (!sub) return 10;
    gate.wait();
    for (std::uint64_t want = 1; want <= kKeep + 1; ++want) {
      auto s = sub->receive(secs(5));
      if (!s || s->seq() != want || s->missed() != 0 || !check(s->data(), want)) return 11;
    }
    return 0;
  });
  TopicOptions o;
  o.samples = 16;
  o.sample_size = 256;
  o.keep = kKeep;
  o.policy = policy;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(1, secs(10)));
  for (std::uint64_t seq = 1; seq <= kKeep; ++seq) ASSERT_TRUE(publish_one(*pub, seq, secs(1)));
  auto b0 = pub->buffer(size_of(kKeep + 1), secs(1));
  ASSERT_TRUE(b0);
  Buffer b = std::move(*b0);
  fill(b.data(), kKeep + 1);
  const std::int64_t t0 = monotonic_ns();
  auto st = pub->publish(std::move(b), Deadline::after(100ms));
  ASSERT_FALSE(st);
  EXPECT_EQ(st.error().code, expected);
  if (expected == Errc::TimedOut) {
    EXPECT_GE(monotonic_ns() - t0, 90'000'000);
  }
  ASSERT_TRUE(b.valid());  // still ours: retry once the subscriber has read
  gate.open();
  ASSERT_TRUE(pub->publish(std::move(b), secs(5)) || policy == SlowSubscriber::Refuse);
  if (b.valid()) {  // Refuse: retry until the subscriber has released one
    const Deadline end = secs(5);
    Status r = fail(Errc::Busy, "");
    while (!r && !end.expired()) {
      ::usleep(1000);
      r = pub->publish(std::move(b), Deadline::immediate());
    }
    ASSERT_TRUE(r);
  }
  EXPECT_EQ(join(slow), 0);
  if (policy == SlowSubscriber::Refuse) {
    EXPECT_GE(pub->stats().refused, 1u);
  }
  expect_all_free(*pub, o.samples);
}
TEST(Topic, RefuseFailsWithBusyAndKeepsTheBuffer) {
  full_subscriber_case(SlowSubscriber::Refuse, Errc::Busy);
}
TEST(Topic, BlockTimesOutAndKeepsTheBuffer) {
  full_subscriber_case(SlowSubscriber::Block, Errc::TimedOut);
}

// (Threat model) The pool is read-only for subscribers: a write kills the writer, nobody else.
TEST(Topic, SubscriberCannotWriteThePool) {
  const std::string name = topic_name("ro");
  pid_t writer = spawn([&] {
    auto sub = connect_retry(name);
    if (!sub) return 10;
    auto s = sub->receive(secs(5));
    if (!s) return 11;
    auto* p = const_cast<std::byte*>(s->data().data());
    // mprotect cannot make it writable (F_SEAL_FUTURE_WRITE)...
    auto page = reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t{4095};
    if (::mprotect(reinterpret_cast<void*>(page), 4096, PROT_READ | PROT_WRITE) == 0) return 12;
    ::signal(SIGSEGV, SIG_DFL);  // die of it, even under ASan (which would catch it)
    *p = std::byte{0};           // ... and a write faults
    return 13;
  });
  pid_t reader = spawn([&] { return receive_all(name, 1); });
  auto pub = Publisher::create(name, {.samples = 4, .sample_size = 4096, .keep = 2});
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(2, secs(10)));
  ASSERT_TRUE(publish_one(*pub, 1, secs(1)));
  EXPECT_EQ(join(writer), 128 + SIGSEGV);
  EXPECT_EQ(join(reader), 0);
  expect_all_free(*pub, 4);
}

// (Threat model) A subscriber scribbling everything it can write (its own segment: ring states,
// fields, returned bits, sleeping, publisher_waiting) affects only itself: the others get every
// sample intact and in order, the publisher never hangs, and the pool is whole afterwards.
TEST(Topic, HostileSubscriberAffectsOnlyItself) {
  const std::string name = topic_name("hostile");
  constexpr std::uint64_t kN = 3000;
  std::vector<pid_t> good;
  for (int i = 0; i < 2; ++i) good.push_back(spawn([&] { return receive_accounted(name, kN); }));
  std::vector<pid_t> bad;
  // Each scribbler says when it has begun: 3000 publishes take ~10 ms, which a scribbler not yet
  // scheduled would miss entirely (seen in CI: no protocol error caught).
  const Gate scribbling[2] = {Gate::make(), Gate::make()};
  for (int i = 0; i < 2; ++i)
    bad.push_back(spawn([&, i] {
      auto sub = connect_retry(name);
      if (!sub) return 10;
      auto* seg = detail::TopicTestAccess::segment(*sub);
      auto* bytes = reinterpret_cast<unsigned char*>(seg);
      std::mt19937_64 rng(1234 + static_cast<unsigned>(i));
      const Deadline end = secs(20);
      for (std::uint64_t n = 0; !end.expired(); ++n) {
        if (n == 1000) scribbling[i].open();
        switch (rng() % 6) {
          case 0:  // random bytes anywhere
            bytes[rng() % sizeof(shm::TopicSubSegment)] = static_cast<unsigned char>(rng());
            break;
          case 1:  // claim every sample back
            seg->returned[rng() % shm::kTopicReturnedWords].store(~0ull);
            break;
          case 2:  // mark entries taken (or anything) without returning them
            seg->ring[rng() % shm::kTopicRingCapacity].state.store(rng() % 4 == 0 ? rng() : 0);
            break;
          case 3:
            seg->sleeping.store(static_cast<std::uint32_t>(rng()));
            break;
          case 4:
            seg->publisher_waiting.store(0);
            break;
          default:
            if (i == 1) (void)sub->receive(Deadline::immediate());  // also use it
            break;
        }
      }
      return 0;
    }));
  TopicOptions o;
  o.samples = 1024;
  o.sample_size = 4096;
  o.keep = 200;
  o.max_subscribers = 4;  // DropOldest: samples > keep * max_subscribers
  o.policy = SlowSubscriber::DropOldest;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  ASSERT_TRUE(pub->wait_for_subscribers(4, secs(10)));
  for (const Gate& g : scribbling) g.wait();
  for (std::uint64_t seq = 1; seq <= kN; ++seq) {
    auto st = publish_one(*pub, seq, secs(5));
    ASSERT_TRUE(st) << st.error().op << " at seq " << seq;
  }
  for (pid_t k : good) EXPECT_EQ(join(k), 0);
  for (pid_t k : bad) (void)os::kill_process(k, SIGKILL);
  for (pid_t k : bad) (void)join(k);
  EXPECT_GE(pub->stats().protocol_errors, 1u);  // caught scribbling at least once
  expect_all_free(*pub, o.samples);
}

// (T8/T9) A subscriber caught writing garbage into a ring entry the publisher must take back is
// thrown out, and is told so: its receive() ends with Errc::Protocol, not PeerClosed.
TEST(Topic, AThrownOutSubscriberIsToldProtocol) {
  const std::string name = topic_name("verdict");
  Gate published = Gate::make(), scribbled = Gate::make(), checked = Gate::make();
  pid_t liar = spawn([&] {
    auto sub = connect_retry(name);
    if (!sub) return 10;
    published.wait();  // seq 1 is queued at ring position 0
    detail::TopicTestAccess::segment(*sub)->ring[0].state.store(12345);
    scribbled.open();
    checked.wait();
    for (;;) {
      auto s = sub->receive(secs(5));
      if (!s) return s.error().code == Errc::Protocol ? 0 : 11;
    }
  });
  TopicOptions o;
  o.samples = 8;
  o.sample_size = 256;
  o.keep = 2;
  o.max_subscribers = 3;
  o.policy = SlowSubscriber::DropOldest;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub);
  ASSERT_TRUE(pub->wait_for_subscribers(1, secs(10)));
  ASSERT_TRUE(publish_one(*pub, 1, secs(1)));
  published.open();
  scribbled.wait();
  // The third publish finds it at keep and tries to drop position 0: garbage there.
  ASSERT_TRUE(publish_one(*pub, 2, secs(1)));
  ASSERT_TRUE(publish_one(*pub, 3, secs(1)));
  EXPECT_EQ(pub->stats().protocol_errors, 1u);
  EXPECT_EQ(pub->subscribers(), 0u);
  checked.open();
  EXPECT_EQ(join(liar), 0);
  expect_all_free(*pub, o.samples);
}

// Threads of one process (TSan): join mid-stream, receive from there on, leave; publisher gone.
TEST(Topic, ThreadsJoinMidStreamAndSeePublisherLeave) {
  const std::string name = topic_name("threads");
  TopicOptions o;
  o.samples = 16;
  o.sample_size = 1024;
  o.keep = 4;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub) << pub.error().op;
  std::atomic<bool> joined{false};
  std::atomic<int> result{-1};
  std::thread t([&] {
    auto sub = connect_retry(name);  // retried: a loaded CI machine under ASan
    if (!sub) {
      result = 10;
      return;
    }
    joined = true;
    std::uint64_t last = 0;
    for (;;) {
      auto s = sub->receive(secs(5));
      if (!s) {
        if (s.error().code != Errc::PeerClosed || last != 500)
          std::fprintf(stderr, "receive: %s (code %d) after seq %llu\n", s.error().op,
                       static_cast<int>(s.error().code), static_cast<unsigned long long>(last));
        result = (s.error().code == Errc::PeerClosed && last == 500) ? 0 : 11;
        return;
      }
      if (last != 0 && (s->seq() != last + 1 || s->missed() != 0)) {
        result = 12;
        return;
      }
      if (!check(s->data(), s->seq())) {
        result = 13;
        return;
      }
      last = s->seq();
    }
  });
  const JoinAfterPublisher join{pub, t};
  // Publish before anyone listens: nobody holds those samples.
  for (std::uint64_t seq = 1; seq <= 100; ++seq) ASSERT_TRUE(publish_one(*pub, seq, secs(1)));
  // 20 s: a loaded CI machine under ASan (the subscriber retries its connect for 10 s)
  ASSERT_TRUE(pub->wait_for_subscribers(1, secs(20)));
  while (!joined) std::this_thread::sleep_for(1ms);
  for (std::uint64_t seq = 101; seq <= 500; ++seq) ASSERT_TRUE(publish_one(*pub, seq, secs(5)));
  // Wait until it has everything, then go: it sees PeerClosed.
  const Deadline end = secs(5);
  while (pub->stats().free_samples != o.samples && !end.expired()) {
    (void)pub->serve(Deadline::after(1ms));
  }
  *pub = Publisher{};
  t.join();
  EXPECT_EQ(result.load(), 0);
}

// (T9) A publisher killed mid-stream: a sleeping subscriber gets what was queued, then
// Errc::PeerClosed promptly; the samples it holds stay readable.
TEST(Topic, KilledPublisherEndsSubscribersWithPeerClosed) {
  const std::string name = topic_name("pubkill");
  Gate gate = Gate::make();
  pid_t publisher = spawn([&] {
    auto pub = Publisher::create(name, {.samples = 8, .sample_size = 256, .keep = 4});
    if (!pub || !pub->wait_for_subscribers(1, secs(10))) return 10;
    for (std::uint64_t seq = 1; seq <= 3; ++seq)
      if (!publish_one(*pub, seq, secs(1))) return 11;
    gate.open();
    ::pause();  // killed here
    return 0;
  });
  ConnectOptions co;
  co.wait = WaitPolicy{WaitMode::Sleep, {}};
  auto sub = connect_retry(name, co);
  ASSERT_TRUE(sub);
  gate.wait();
  std::vector<Sample> held;
  for (std::uint64_t want = 1; want <= 3; ++want) {
    auto s = sub->receive(secs(5));
    ASSERT_TRUE(s);
    EXPECT_EQ(s->seq(), want);
    held.push_back(std::move(*s));
  }
  std::thread killer([&] {
    std::this_thread::sleep_for(50ms);  // the subscriber is asleep by then
    (void)os::kill_process(publisher, SIGKILL);
  });
  const std::int64_t t0 = monotonic_ns();
  auto end = sub->receive(secs(5));
  const std::int64_t waited = monotonic_ns() - t0;
  killer.join();
  ASSERT_FALSE(end);
  EXPECT_EQ(end.error().code, Errc::PeerClosed);
  EXPECT_LT(waited, 1'000'000'000);  // 50 ms + at most one 100 ms sleep step, with slack
  for (std::uint64_t i = 0; i < 3; ++i) EXPECT_TRUE(check(held[i].data(), i + 1));
  EXPECT_EQ(join(publisher), 128 + SIGKILL);
}

// Past max_subscribers a subscriber is refused (its connect fails), and the others go on.
TEST(Topic, SubscribersPastTheLimitAreRefused) {
  const std::string name = topic_name("limit");
  auto pub =
      Publisher::create(name, {.samples = 8, .sample_size = 256, .keep = 4, .max_subscribers = 1});
  ASSERT_TRUE(pub);
  std::thread t([&] { (void)pub->serve(secs(2)); });
  auto first = Subscriber::connect(name, secs(2));
  auto second = Subscriber::connect(name, secs(2));
  t.join();
  ASSERT_TRUE(first);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code, Errc::PeerClosed);
  EXPECT_EQ(pub->subscribers(), 1u);
  ASSERT_TRUE(publish_one(*pub, 1, secs(1)));
  auto s = first->receive(secs(1));
  ASSERT_TRUE(s);
  EXPECT_EQ(s->seq(), 1u);
}

// (T10) A subscriber redirected to a MsgQueue: one loop serves requests on a channel and the
// subscription's samples (Kind::Sample), every sample in order, then the end as Kind::PeerClosed.
TEST(Topic, OneQueueServesRequestsAndSamples) {
  const std::string name = topic_name("queue");
  constexpr std::uint64_t kN = 2000;
  constexpr int kCalls = 200;
  auto pair = Channel::pair();
  ASSERT_TRUE(pair);
  auto [client, server] = std::move(*pair);
  pid_t kid = spawn([&] {
    client = Channel{};
    auto q = MsgQueue::create();
    if (!q || !server.redirect(*q, 9)) return 10;
    auto sub = connect_retry(name);
    if (!sub) return 11;
    if (!sub->redirect(*q, 7)) return 12;
    if (sub->receive(Deadline::immediate())) return 13;  // redirected: not here
    std::uint64_t last = 0;
    int calls = 0;
    for (;;) {
      auto m = q->wait(secs(10));
      if (!m) return 14;
      if (m->kind == Kind::Sample) {
        if (m->key != 7 || m->sample.seq() != last + 1 || m->sample.missed() != 0) return 15;
        if (!check(m->sample.data(), m->sample.seq())) return 16;
        last = m->sample.seq();
      } else if (m->kind == Kind::Request) {
        if (m->key != 9) return 17;
        ++calls;
        if (!MsgQueue::reply(std::move(*m))) return 18;
      } else if (m->kind == Kind::PeerClosed && m->key == 7) {
        // The publisher went after publishing everything.
        return (last == kN && calls == kCalls) ? 0 : 19;
      } else if (m->kind != Kind::PeerClosed) {
        return 20;
      }
    }
  });
  server = Channel{};
  TopicOptions o;
  o.samples = 32;
  o.sample_size = 512;
  o.keep = 8;
  {
    auto pub = Publisher::create(name, o);
    ASSERT_TRUE(pub) << pub.error().op;
    ASSERT_TRUE(pub->wait_for_subscribers(1, secs(10)));
    int calls = 0;
    for (std::uint64_t seq = 1; seq <= kN; ++seq) {
      auto st = publish_one(*pub, seq, secs(5));
      ASSERT_TRUE(st) << st.error().op << " at seq " << seq;
      if (seq % (kN / kCalls) == 0) {
        auto b = client.buffer(16);
        ASSERT_TRUE(b);
        ASSERT_TRUE(client.call(*b, secs(5)));
        ++calls;
      }
      if (seq % 500 == 0) ::usleep(20000);  // let the queue fall asleep now and then
    }
    EXPECT_EQ(calls, kCalls);
    EXPECT_GE(pub->stats().notifications, 1u);
    const Deadline end = secs(5);
    while (pub->stats().free_samples != o.samples && !end.expired()) ::usleep(1000);
    EXPECT_EQ(pub->stats().free_samples, o.samples);
  }  // the publisher goes: the subscription ends
  EXPECT_EQ(join(kid), 0);
}

// (T10) The same in threads of one process (TSan): a queue waiter and the publisher.
TEST(Topic, ThreadsReceiveSamplesThroughAQueue) {
  const std::string name = topic_name("tqueue");
  TopicOptions o;
  o.samples = 16;
  o.sample_size = 256;
  o.keep = 4;
  auto pub = Publisher::create(name, o);
  ASSERT_TRUE(pub);
  auto q = MsgQueue::create(WaitPolicy{WaitMode::Sleep, {}});
  ASSERT_TRUE(q);
  std::atomic<int> result{-1};
  std::thread t([&] {
    auto sub = connect_retry(name);  // retried: a loaded CI machine under ASan
    if (!sub || !sub->redirect(*q, 3)) {
      result = 10;
      return;
    }
    std::uint64_t last = 0;
    while (last < 300) {
      auto m = q->wait(secs(5));
      if (!m || m->kind != Kind::Sample || m->key != 3) {
        result = 11;
        return;
      }
      if (m->sample.seq() != last + 1 || !check(m->sample.data(), m->sample.seq())) {
        result = 12;
        return;
      }
      last = m->sample.seq();
    }
    result = 0;
  });
  const JoinAfterPublisher join{pub, t};
  // 20 s: a loaded CI machine under ASan (the subscriber retries its connect for 10 s)
  ASSERT_TRUE(pub->wait_for_subscribers(1, secs(20)));
  for (std::uint64_t seq = 1; seq <= 300; ++seq) {
    ASSERT_TRUE(publish_one(*pub, seq, secs(5)));
    if (seq % 50 == 0) std::this_thread::sleep_for(5ms);  // the waiter sleeps
  }
  t.join();
  EXPECT_EQ(result.load(), 0);
}

// Soak: rounds of subscribers that join mid-stream, read, hold, stop, and are killed at random,
// under Block and DropOldest. After each round every sample is back. 3 rounds by default;
// MBMQ_TOPIC_SOAK_ROUNDS (the soak label runs 100).
TEST(Topic, SoakRandomJoinsAndKills) {
  int rounds = 3;
  if (const char* v = std::getenv("MBMQ_TOPIC_SOAK_ROUNDS")) rounds = std::atoi(v);
  std::mt19937 rng(2026);
  for (int round = 0; round < rounds; ++round) {
    const std::string name = topic_name("soak");
    TopicOptions o;
    o.samples = 64;  // > keep * max_subscribers (DropOldest rounds)
    o.sample_size = 512;
    o.keep = 6;
    o.max_subscribers = 10;
    o.policy = round % 2 == 0 ? SlowSubscriber::Block : SlowSubscriber::DropOldest;
    auto pub = Publisher::create(name, o);
    ASSERT_TRUE(pub) << pub.error().op;
    std::vector<pid_t> kids;
    const std::uint64_t kN = 1500;
    for (std::uint64_t seq = 1; seq <= kN; ++seq) {
      if (seq % 100 == 1 && kids.size() < 8) {
        const unsigned behaviour = static_cast<unsigned>(rng() % 3);
        kids.push_back(spawn([&name, behaviour] {
          auto sub = connect_retry(name);
          if (!sub) return 10;
          std::vector<Sample> held;
          std::uint64_t last = 0;
          for (int n = 0;; ++n) {
            auto s = sub->receive(secs(10));
            if (!s) return s.error().code == Errc::PeerClosed ? 0 : 11;
            if (s->seq() <= last || !check(s->data(), s->seq())) return 12;
            last = s->seq();
            if (behaviour == 1) held.push_back(std::move(*s));
            if (held.size() > 3) held.erase(held.begin());
            if (behaviour == 2 && n == 50) ::pause();
          }
        }));
      }
      if (!kids.empty() && rng() % 150 == 0) {
        (void)os::kill_process(kids[rng() % kids.size()], SIGKILL);
      }
      const std::int64_t t0 = monotonic_ns();
      auto st = publish_one(*pub, seq, Deadline::after(1s));
      // Block with a subscriber that stopped reading: TimedOut (nothing published) until one of
      // the kills takes it away; never longer than the deadline.
      ASSERT_LT(monotonic_ns() - t0, 1'500'000'000);
      if (!st) {
        ASSERT_EQ(st.error().code, Errc::TimedOut) << st.error().op;
        for (pid_t k : kids) (void)os::kill_process(k, SIGKILL);  // unstick it
        --seq;  // nothing was published: the same seq again (the topic's seq did not move)
      }
    }
    for (pid_t k : kids) (void)os::kill_process(k, SIGKILL);
    for (pid_t k : kids) {
      const int rc = join(k);
      EXPECT_TRUE(rc == 0 || rc == 128 + SIGKILL) << "child exit " << rc;
    }
    expect_all_free(*pub, o.samples);
    EXPECT_EQ(pub->stats().protocol_errors, 0u);
  }
}
}  // namespace
}  // namespace mbmq
