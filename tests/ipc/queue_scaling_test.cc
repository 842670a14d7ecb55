// MsgQueue's waiting at scale (#13), tested against the design's claims (src/ipc/queue_core.h,
// P4q/P6q of src/shm/layout.h, MsgQueue::fd() in include/mbmq/msg_queue.h):
//   - round robin: a flooding channel cannot starve the others;
//   - the ready bits are hints: a peer that clears, forges or scribbles them delays nobody by more
//     than the full-scan bounds (10 ms while looking, 100 ms while asleep) and breaks nothing;
//   - slots are reused: channels may come and go without end;
//   - fd() is level-triggered and loses no wake-up in a plain epoll loop, and costs producers no
//     system call while the owner spins.
// Delays are reported (printf) as well as asserted, with margins for a noisy 2-CPU machine.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <new>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "ipc/test_access.h"
#include "mbmq/rendezvous.h"
#include "os/process.h"
#include "os/syscall_count.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using detail::TestAccess;
using test::join;
using test::secs;
using test::spawn;

// The payload of every test message: which channel, its number on that channel, when it was sent
// (CLOCK_MONOTONIC, the same clock in every process).
struct Stamp {
  std::uint32_t channel = 0;
  std::uint32_t seq = 0;
  std::int64_t sent_ns = 0;
};

Stamp stamp_of(const Message& m) {
  Stamp s;
  if (m.buffer.data().size() >= sizeof s) std::memcpy(&s, m.buffer.data().data(), sizeof s);
  return s;
}

// Sends a one-way Stamp; retries while the peer has not given buffers back yet (WouldBlock,
// NoBuffers, Busy) until `deadline`.
Status send_stamp(Channel& c, std::uint32_t channel, std::uint32_t seq, Deadline deadline) {
  for (;;) {
    auto b = c.buffer(sizeof(Stamp));
    if (b) {
      Stamp s{channel, seq, monotonic_ns()};
      std::memcpy(b->data().data(), &s, sizeof s);
      Status r = c.send(std::move(*b));
      if (r || r.error().code != Errc::WouldBlock) return r;
    } else if (b.error().code != Errc::NoBuffers) {
      return fail(b.error());
    }
    if (deadline.expired()) return fail(Errc::TimedOut, "send_stamp");
    std::this_thread::yield();
  }
}

ChannelOptions small_channel(std::uint32_t slots = 4) {
  ChannelOptions o;
  o.slots_per_side = slots;
  o.slot_size = 4096;
  return o;
}

// n channels whose server ends the queue adopts with keys base, base + 1, ...; the client ends.
std::vector<Channel> adopt_n(MsgQueue& q, int n, std::uint64_t base, const ChannelOptions& o) {
  std::vector<Channel> clients;
  for (int i = 0; i < n; ++i) {
    auto p = Channel::pair(o);
    if (!p) {
      ADD_FAILURE() << "pair " << i << ": " << p.error().message();
      break;
    }
    Status a = q.adopt(std::move(p->second), base + static_cast<std::uint64_t>(i));
    if (!a) {
      ADD_FAILURE() << "adopt " << i << ": " << a.error().message();
      break;
    }
    clients.push_back(std::move(p->first));
  }
  return clients;
}

// ---------------------------------------------------------------------------------------------
// 1. Fairness: round robin.

// The queue's owner sends one message on each of kQuiet channels itself while a child process
// keeps the flooding channel's ring full of one-way messages (64 slots): the messages it sent are
// then all in the rings before its next wait(), and each must come within one round of the FIFO
// (the quiet channels once each, the flood at most twice), not behind the flood's backlog.
TEST(QueueFairness, EachQuietChannelIsServedWithinOneRoundWhileOneChannelFloods) {
  constexpr int kQuiet = 16, kRounds = 30;
  constexpr std::uint64_t kFloodKey = 1000;
  auto q = MsgQueue::create({WaitMode::Spin, 0ns});
  ASSERT_TRUE(q);
  auto flood = Channel::pair(small_channel(64));
  ASSERT_TRUE(flood);
  ASSERT_TRUE(q->adopt(std::move(flood->second), kFloodKey));
  std::vector<Channel> quiet = adopt_n(*q, kQuiet, 0, small_channel());
  ASSERT_EQ(quiet.size(), static_cast<std::size_t>(kQuiet));
  pid_t pid = spawn([&] {
    for (auto& c : quiet) c.close();
    for (std::uint32_t seq = 0;; ++seq) {
      Status s = send_stamp(flood->first, 1000, seq, secs(30));
      if (!s) return s.error().code == Errc::PeerClosed ? 0 : 1;
    }
  });
  ASSERT_GT(pid, 0);
  flood->first.close();
  // The flood is on (and its channel hot) once 200 of its messages came.
  for (int i = 0; i < 200; ++i) {
    auto m = q->wait(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->key, kFloodKey);
  }
  int worst = 0;
  std::uint64_t flood_during = 0;
  for (int round = 0; round < kRounds; ++round) {
    // Not consuming for 2 ms: the flood's 64 slots fill up, a backlog the quiet messages must
    // not wait behind.
    const std::int64_t pause_until = monotonic_ns() + 2'000'000;
    while (monotonic_ns() < pause_until) std::this_thread::yield();
    for (int i = 0; i < kQuiet; ++i)
      ASSERT_TRUE(send_stamp(quiet[static_cast<std::size_t>(i)], static_cast<std::uint32_t>(i),
                             static_cast<std::uint32_t>(round), secs(5)));
    std::vector<int> at(kQuiet, 0);
    int got = 0, deliveries = 0;
    while (got < kQuiet) {
      auto m = q->wait(secs(10));
      ASSERT_TRUE(m) << m.error().message();
      ++deliveries;
      if (m->key == kFloodKey) {
        ++flood_during;
        continue;
      }
      ASSERT_LT(m->key, static_cast<std::uint64_t>(kQuiet));
      ASSERT_EQ(m->kind, Kind::Message);
      const Stamp s = stamp_of(*m);
      ASSERT_EQ(s.channel, m->key) << "delivered with another channel's key";
      ASSERT_EQ(s.seq, static_cast<std::uint32_t>(round));
      ASSERT_EQ(at[m->key], 0) << "delivered twice";
      at[m->key] = deliveries;
      ++got;
    }
    worst = std::max(worst, deliveries);
  }
  std::printf(
      "fairness: the last quiet message came at delivery %d at worst (%d quiet channels, "
      "bound %d); %llu flood messages interleaved over %d rounds\n",
      worst, kQuiet, kQuiet + 3, static_cast<unsigned long long>(flood_during), kRounds);
  // One FIFO round: the flood (queued before them) once, each quiet channel once, maybe the flood
  // once more. Served after the flood's backlog, the last would come after 64 or more.
  EXPECT_LE(worst, kQuiet + 3) << "a quiet channel waited behind the flood";
  ::kill(pid, SIGKILL);
  EXPECT_EQ(join(pid), 128 + SIGKILL);
}

// The same across processes, with requests: a child keeps the flooding channel's 64 requests
// outstanding (send_request, its own queue collecting the replies), another child sends one
// message on each quiet channel at once and notes, in shared memory, when each send() returned
// (the message is in its ring then; a sender preempted before it reads the clock only makes the
// count smaller). Counted from that time, each quiet message must come within one round of
// deliveries.
TEST(QueueFairness, QuietMessagesOvertakeARequestFloodFromAnotherProcess) {
  constexpr int kQuiet = 12, kRounds = 20;
  constexpr std::uint64_t kFloodKey = 1000;
  auto q = MsgQueue::create({WaitMode::Spin, 0ns});
  ASSERT_TRUE(q);
  auto flood = Channel::pair(small_channel(64));
  ASSERT_TRUE(flood);
  ASSERT_TRUE(q->adopt(std::move(flood->second), kFloodKey));
  std::vector<Channel> quiet = adopt_n(*q, kQuiet, 0, small_channel());
  ASSERT_EQ(quiet.size(), static_cast<std::size_t>(kQuiet));
  pid_t flooder = spawn([&] {
    for (auto& c : quiet) c.close();
    auto mine = MsgQueue::create({WaitMode::Spin, 0ns});
    if (!mine || !flood->first.redirect(*mine, 1)) return 1;
    for (;;) {
      // As many requests as it may have outstanding, then collect the replies that came.
      for (;;) {
        auto b = flood->first.buffer(sizeof(Stamp));
        if (!b) break;
        Status s = flood->first.send_request(std::move(*b));
        if (!s) {
          if (s.error().code == Errc::PeerClosed) return 0;
          break;
        }
      }
      auto m = mine->wait(Deadline::after(10ms));
      if (m && m->kind == Kind::PeerClosed) return 0;
    }
  });
  ASSERT_GT(flooder, 0);
  flood->first.close();
  // pushed[round * kQuiet + i]: when the sender's send() on quiet channel i returned.
  constexpr std::size_t kPushedBytes = sizeof(std::atomic<std::int64_t>) * kRounds * kQuiet;
  void* shared =
      ::mmap(nullptr, kPushedBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(shared, MAP_FAILED);
  auto* pushed = new (shared) std::atomic<std::int64_t>[kRounds * kQuiet] {};
  // Sender of the quiet messages: one round per byte read from the pipe.
  auto go = os::make_pipe();
  ASSERT_TRUE(go);
  pid_t sender = spawn([&] {
    go->second.reset();
    for (int round = 0; round < kRounds; ++round) {
      std::byte b{};
      auto n = os::read_full(go->first.get(), {&b, 1});
      if (!n || *n != 1) return 2;
      for (int i = 0; i < kQuiet; ++i) {
        if (!send_stamp(quiet[static_cast<std::size_t>(i)], static_cast<std::uint32_t>(i),
                        static_cast<std::uint32_t>(round), secs(5)))
          return 3;
        pushed[round * kQuiet + i].store(monotonic_ns(), std::memory_order_release);
      }
    }
    return 0;
  });
  ASSERT_GT(sender, 0);
  go->first.reset();
  for (auto& c : quiet) c.close();
  auto serve = [&](Message& m) {
    if (m.kind == Kind::Request) {
      EXPECT_TRUE(MsgQueue::reply(std::move(m)));
    }
  };
  for (int i = 0; i < 200; ++i) {
    auto m = q->wait(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->key, kFloodKey);
    serve(*m);
  }
  std::size_t worst = 0;
  std::uint64_t flood_requests = 0;
  for (int round = 0; round < kRounds; ++round) {
    std::byte b{1};
    ASSERT_TRUE(os::write_full(go->second.get(), {&b, 1}));
    std::vector<std::int64_t> recv_at;  // every delivery of this round, in order
    std::vector<Stamp> quiet_got;
    std::vector<std::size_t> quiet_index;
    while (quiet_got.size() < static_cast<std::size_t>(kQuiet)) {
      auto m = q->wait(secs(10));
      ASSERT_TRUE(m) << m.error().message();
      recv_at.push_back(monotonic_ns());
      if (m->key == kFloodKey) {
        ASSERT_EQ(m->kind, Kind::Request);
        ++flood_requests;
        serve(*m);
        continue;
      }
      ASSERT_LT(m->key, static_cast<std::uint64_t>(kQuiet));
      ASSERT_EQ(m->kind, Kind::Message);
      const Stamp s = stamp_of(*m);
      ASSERT_EQ(s.channel, m->key);
      ASSERT_EQ(s.seq, static_cast<std::uint32_t>(round));
      quiet_got.push_back(s);
      quiet_index.push_back(recv_at.size() - 1);
    }
    for (std::size_t k = 0; k < quiet_got.size(); ++k) {
      // Deliveries made after this message's send() returned, itself included.
      std::atomic<std::int64_t>& at =
          pushed[round * kQuiet + static_cast<int>(quiet_got[k].channel)];
      const Deadline noted = secs(5);
      while (at.load(std::memory_order_acquire) == 0 && !noted.expired()) std::this_thread::yield();
      std::size_t after = 0;
      for (std::size_t j = 0; j <= quiet_index[k]; ++j)
        if (recv_at[j] > at.load(std::memory_order_acquire)) ++after;
      worst = std::max(worst, after);
    }
  }
  std::printf(
      "fairness (requests, two processes): a quiet message came at most %zu deliveries "
      "after it was sent (%d quiet channels, bound %d); %llu flood requests served\n",
      worst, kQuiet, kQuiet + 4, static_cast<unsigned long long>(flood_requests));
  EXPECT_LE(worst, static_cast<std::size_t>(kQuiet + 4))
      << "a quiet channel waited behind the flood";
  EXPECT_EQ(join(sender), 0);
  ::kill(flooder, SIGKILL);
  EXPECT_EQ(join(flooder), 128 + SIGKILL);
  ::munmap(shared, kPushedBytes);
}

// wait(immediate) until TimedOut: the messages it returned.
std::vector<Message> drain(MsgQueue& q) {
  std::vector<Message> out;
  for (;;) {
    auto m = q.wait(Deadline::immediate());
    if (!m) {
      EXPECT_EQ(m.error().code, Errc::TimedOut) << m.error().message();
      return out;
    }
    out.push_back(std::move(*m));
  }
}

// ---------------------------------------------------------------------------------------------
// 2. A hostile peer on the ready page.

enum class Attack { ClearBits, SetBits, ScribbleWord };

const char* name_of(Attack a) {
  switch (a) {
    case Attack::ClearBits:
      return "clears every ready and summary bit";
    case Attack::SetBits:
      return "sets every ready and summary bit";
    default:
      return "scribbles the futex word";
  }
}

struct HostileResult {
  std::int64_t max_delay_ns = 0;
  std::int64_t p99_delay_ns = 0;
  std::uint64_t full_scans = 0;
  double seconds = 0;
};

// kHonest channels fed by a child process (one-way stamped messages, round robin over the
// channels, random pauses so that the owner often finds nothing and sleeps, never two in a row on
// one channel so that none becomes hot), kIdle channels that send nothing, and a thread of the
// owner's process playing a peer that attacks the ready page all along. Every message must come,
// in order, with its key, before the 2 s deadline; then each channel's PeerClosed, once.
HostileResult run_hostile(WaitPolicy policy, Attack attack) {
  constexpr int kHonest = 8, kIdle = 100, kMessages = 240;
  HostileResult res;
  auto q = MsgQueue::create(policy);
  if (!q) {
    ADD_FAILURE() << q.error().message();
    return res;
  }
  std::vector<Channel> honest = adopt_n(*q, kHonest, 0, small_channel(16));
  std::vector<Channel> idle = adopt_n(*q, kIdle, kHonest, small_channel(2));
  if (honest.size() != kHonest || idle.size() != kIdle) return res;
  // Nothing pending before the attack starts (the redirects' own wake-ups).
  while (q->wait(Deadline::immediate())) {
  }
  std::atomic<bool> stop{false};
  shm::QueueReadyPage& page = TestAccess::ready_page(*q);
  std::thread attacker([&] {
    std::mt19937_64 rng(7);
    while (!stop.load(std::memory_order_relaxed)) {
      switch (attack) {
        case Attack::ClearBits:
          for (auto& w : page.summary) w.store(0, std::memory_order_relaxed);
          for (auto& w : page.ready) w.store(0, std::memory_order_relaxed);
          break;
        case Attack::SetBits:
          for (auto& w : page.ready) w.store(~std::uint64_t{0}, std::memory_order_relaxed);
          for (auto& w : page.summary) w.store(~std::uint64_t{0}, std::memory_order_relaxed);
          break;
        case Attack::ScribbleWord:
          page.word.store(static_cast<std::uint32_t>(rng()), std::memory_order_relaxed);
          break;
      }
      std::this_thread::yield();
    }
  });
  const std::uint64_t scans0 = TestAccess::full_scans(*q);
  const std::int64_t t0 = monotonic_ns();
  pid_t pid = spawn([&] {
    for (auto& c : idle) c.close();
    std::mt19937 rng(11);
    for (std::uint32_t seq = 0; seq < kMessages; ++seq) {
      const std::uint32_t ch = seq % kHonest;
      if (!send_stamp(honest[ch], ch, seq / kHonest, secs(10))) return 1;
      if (rng() % 2 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
    }
    ::usleep(200'000);  // the honest channels end after their last message was taken
    return 0;
  });
  for (auto& c : honest) c.close();
  for (auto& c : idle) c.close();
  std::vector<std::uint32_t> next(kHonest, 0);
  std::vector<int> closed(kHonest + kIdle, 0);
  std::vector<std::int64_t> delays;
  int messages = 0, ends = 0;
  const Deadline overall = secs(20);
  while ((messages < kMessages || ends < kHonest + kIdle) && !overall.expired()) {
    auto m = q->wait(Deadline::after(2s));
    if (!m) {
      ADD_FAILURE() << name_of(attack) << ": " << m.error().message() << " after " << messages
                    << " messages and " << ends << " ends: something was lost or is late";
      break;
    }
    const std::int64_t now = monotonic_ns();
    if (m->key >= static_cast<std::uint64_t>(kHonest + kIdle)) {
      ADD_FAILURE() << "a key no channel has: " << m->key;
      break;
    }
    if (m->kind == Kind::PeerClosed) {
      EXPECT_EQ(m->error, Errc::PeerClosed) << m->why;
      EXPECT_EQ(closed[m->key]++, 0) << "PeerClosed twice on channel " << m->key;
      ++ends;
      continue;
    }
    if (m->kind != Kind::Message || m->key >= kHonest) {
      ADD_FAILURE() << "unexpected kind " << static_cast<int>(m->kind) << " on key " << m->key;
      break;
    }
    const Stamp s = stamp_of(*m);
    EXPECT_EQ(s.channel, m->key) << "delivered with another channel's key";
    EXPECT_EQ(s.seq, next[m->key]) << "lost, duplicated or reordered on channel " << m->key;
    next[m->key] = s.seq + 1;
    EXPECT_EQ(closed[m->key], 0) << "a message after its channel's PeerClosed";
    delays.push_back(now - s.sent_ns);
    ++messages;
  }
  res.seconds = static_cast<double>(monotonic_ns() - t0) / 1e9;
  res.full_scans = TestAccess::full_scans(*q) - scans0;
  stop = true;
  attacker.join();
  EXPECT_EQ(join(pid), 0);
  EXPECT_EQ(messages, kMessages);
  EXPECT_EQ(ends, kHonest + kIdle);
  EXPECT_EQ(q->channel_count(), 0u);
  if (!delays.empty()) {
    std::sort(delays.begin(), delays.end());
    res.max_delay_ns = delays.back();
    res.p99_delay_ns = delays[delays.size() * 99 / 100];
  }
  std::printf(
      "hostile peer that %s, owner %s: %d messages, max delay %.2f ms, p99 %.2f ms; "
      "%llu full scans in %.2f s\n",
      name_of(attack),
      policy.mode == WaitMode::Spin    ? "spinning"
      : policy.mode == WaitMode::Sleep ? "sleeping"
                                       : "adaptive",
      messages, static_cast<double>(res.max_delay_ns) / 1e6,
      static_cast<double>(res.p99_delay_ns) / 1e6, static_cast<unsigned long long>(res.full_scans),
      res.seconds);
  // Design bound: ~10 ms while spinning, ~100 ms (the safety net) while asleep. Asserted with a
  // wide margin for this noisy machine: a lost message shows as 2 s (the wait above) or more.
  EXPECT_LT(res.max_delay_ns, 2'000'000'000) << "a message waited for a deadline: lost wake-up";
  return res;
}

TEST(QueueHostile, ClearedBitsDelayMessagesOnlyUntilAFullScanWhileSpinning) {
  HostileResult r = run_hostile({WaitMode::Spin, 0ns}, Attack::ClearBits);
  EXPECT_GT(r.full_scans, 0u) << "cleared bits were never caught by a full scan";
}

TEST(QueueHostile, ClearedBitsDelayMessagesOnlyUntilAFullScanWhileSleeping) {
  HostileResult r = run_hostile({WaitMode::Sleep, 0ns}, Attack::ClearBits);
  EXPECT_GT(r.full_scans, 0u) << "cleared bits were never caught by a full scan";
}

TEST(QueueHostile, ClearedBitsDelayMessagesOnlyUntilAFullScanAdaptive) {
  HostileResult r = run_hostile({}, Attack::ClearBits);
  EXPECT_GT(r.full_scans, 0u);
}

TEST(QueueHostile, ForgedBitsCostSpuriousPollsOnly) {
  (void)run_hostile({WaitMode::Spin, 0ns}, Attack::SetBits);
  (void)run_hostile({WaitMode::Sleep, 0ns}, Attack::SetBits);
}

TEST(QueueHostile, AScribbledFutexWordLosesNoWakeUp) {
  (void)run_hostile({WaitMode::Sleep, 0ns}, Attack::ScribbleWord);
  (void)run_hostile({}, Attack::ScribbleWord);
}

// A message whose ready bit a hostile peer cleared is found by the full scan after the owner's
// next safety-net sleep (100 ms), whether or not some other channel is the queue's hot slot.
// Deterministic: the bit is cleared by hand while the owner is not waiting.
void cleared_bit_found_after_safety_net(bool with_hot_slot) {
  auto q = MsgQueue::create({WaitMode::Sleep, 0ns});
  ASSERT_TRUE(q);
  std::vector<Channel> clients = adopt_n(*q, 2, 0, small_channel(8));
  (void)drain(*q);
  if (with_hot_slot) {
    // Two messages in a row from channel 0 make it hot (QueueCore::got_from_locked).
    for (std::uint32_t i = 0; i < 2; ++i) ASSERT_TRUE(send_stamp(clients[0], 0, i, secs(5)));
    for (int i = 0; i < 2; ++i) {
      auto m = q->wait(secs(5));
      ASSERT_TRUE(m);
      ASSERT_EQ(m->key, 0u);
    }
  }
  ASSERT_TRUE(send_stamp(clients[1], 1, 0, secs(5)));
  shm::QueueReadyPage& page = TestAccess::ready_page(*q);
  for (auto& w : page.summary) w.store(0, std::memory_order_relaxed);
  for (auto& w : page.ready) w.store(0, std::memory_order_relaxed);
  const std::uint64_t scans0 = TestAccess::full_scans(*q);
  const std::int64_t t0 = monotonic_ns();
  // MBMQ_CLEARED_BIT_WAIT_S: wait longer, to see when it is found at last.
  const char* wait_s = std::getenv("MBMQ_CLEARED_BIT_WAIT_S");
  auto m = q->wait(Deadline::after(std::chrono::seconds(wait_s ? std::atoi(wait_s) : 2)));
  const std::int64_t took = monotonic_ns() - t0;
  std::printf("cleared bit, %s: found after %.1f ms, %llu full scans\n",
              with_hot_slot ? "another channel hot" : "no hot slot",
              static_cast<double>(took) / 1e6,
              static_cast<unsigned long long>(TestAccess::full_scans(*q) - scans0));
  ASSERT_TRUE(m) << m.error().message() << " after " << took / 1'000'000
                 << " ms: the message whose bit was cleared was never found";
  EXPECT_EQ(m->key, 1u);
  EXPECT_LT(took, 1'800'000'000) << "design: found by the full scan after the 1 s safety-net sleep";
}

TEST(QueueHostile, AClearedBitIsFoundAfterTheSafetyNetSleep) {
  cleared_bit_found_after_safety_net(false);
}

// Found a bug (fixed): QueueCore::scan_locked() enqueued the hot slot before it tested
// `fifo_count_ == 0` for the full scan after an empty wake-up / the safety-net sleep, so while any
// channel was hot that full scan never happened (not found within 2 s, 0 full scans). The full
// scan now follows a look that found nothing, hot slot included.
TEST(QueueHostile, AClearedBitIsFoundAfterTheSafetyNetSleepWhileAnotherChannelIsHot) {
  cleared_bit_found_after_safety_net(true);
}

// Without an attack, the bits alone find every message: a sleeping idle queue full-scans only
// after its 1 s safety-net sleeps (~1/s), a spinning one every 10 ms at most (~100/s).
TEST(QueueHostile, AnIdleQueueFullScansOnlyOnItsSafetyNet) {
  auto q = MsgQueue::create({WaitMode::Sleep, 0ns});
  ASSERT_TRUE(q);
  std::vector<Channel> clients = adopt_n(*q, 200, 0, small_channel(2));
  while (q->wait(Deadline::immediate())) {
  }
  struct Case {
    WaitPolicy policy;
    const char* name;
    double max_per_s;
  };
  for (const Case& c : {Case{{WaitMode::Sleep, 0ns}, "sleeping", 1.5}, Case{{}, "adaptive", 1.5},
                        Case{{WaitMode::Spin, 0ns}, "spinning", 110}}) {
    q->set_wait_policy(c.policy);
    const std::uint64_t s0 = TestAccess::full_scans(*q);
    const std::int64_t t0 = monotonic_ns();
    auto m = q->wait(Deadline::after(c.policy.mode == WaitMode::Spin ? 1s : 3500ms));
    const double secs_taken = static_cast<double>(monotonic_ns() - t0) / 1e9;
    ASSERT_FALSE(m);
    EXPECT_EQ(m.error().code, Errc::TimedOut);
    const double per_s = static_cast<double>(TestAccess::full_scans(*q) - s0) / secs_taken;
    std::printf("idle queue of 200 channels, %s: %.1f full scans/s\n", c.name, per_s);
    EXPECT_LE(per_s, c.max_per_s) << c.name;
    if (c.policy.mode != WaitMode::Spin) {
      EXPECT_GE(per_s, 0.5) << c.name << ": the safety net's full scans did not happen";
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Channels come and go.

// The slot of the one channel whose ready bit is set (the queue has not looked since), or -1.
int only_ready_slot(MsgQueue& q) {
  shm::QueueReadyPage& page = TestAccess::ready_page(q);
  int slot = -1;
  for (std::uint32_t w = 0; w < std::size(page.ready); ++w) {
    std::uint64_t r = page.ready[w].load(std::memory_order_relaxed);
    while (r != 0) {
      if (slot != -1) return -2;
      slot = static_cast<int>(w * 64 + static_cast<std::uint32_t>(__builtin_ctzll(r)));
      r &= r - 1;
    }
  }
  return slot;
}

// More channels than kQueueCapacity over the queue's life, at most ~kBatch + kLongLived at once:
// without reuse of slots, redirect() would fail with Busy. Half of each batch ends by its client's
// close (the queue delivers PeerClosed, once), half by the owner's close() of its server end
// (nothing delivered). channel_count() is exact after every step; a new channel's message is
// delivered (and its slot is a low one); the long-lived channels keep working throughout.
TEST(QueueChurn, ChannelsComeAndGoBeyondTheQueueCapacityAndSlotsAreReused) {
  os::raise_fd_limit();
  constexpr int kLongLived = 40, kBatch = 100;
  const int total = static_cast<int>(shm::kQueueCapacity) + 2000;
  auto q = MsgQueue::create({WaitMode::Sleep, 0ns});
  ASSERT_TRUE(q);
  std::vector<Channel> long_lived = adopt_n(*q, kLongLived, 1'000'000, small_channel(2));
  ASSERT_EQ(q->channel_count(), static_cast<std::size_t>(kLongLived));
  while (q->wait(Deadline::immediate())) {
  }
  std::uint64_t next_key = 0;
  std::map<std::uint64_t, int> ends;  // client-closed channel -> PeerClosed seen
  std::set<std::uint64_t> owner_closed;
  int created = 0, max_slot = 0, generation = 0;
  const std::int64_t t0 = monotonic_ns();
  while (created < total) {
    std::vector<Channel> clients, servers;  // servers: the owner keeps the even ones' handles
    std::vector<std::uint64_t> keys;
    for (int i = 0; i < kBatch; ++i) {
      auto p = Channel::pair(small_channel(2));
      ASSERT_TRUE(p) << "pair after " << created << " channels: " << p.error().message();
      const std::uint64_t key = next_key++;
      if (i % 2 == 0) {
        ASSERT_TRUE(p->second.redirect(*q, key)) << "after " << created << " channels";
        servers.push_back(std::move(p->second));
      } else {
        Status a = q->adopt(std::move(p->second), key);
        ASSERT_TRUE(a) << "after " << created << " channels: " << a.error().message();
      }
      clients.push_back(std::move(p->first));
      keys.push_back(key);
      ++created;
    }
    // Nothing pending, then exactly the live channels.
    while (q->wait(Deadline::immediate())) {
    }
    ASSERT_EQ(q->channel_count(), static_cast<std::size_t>(kLongLived + kBatch));
    // A message on the newest channel: its bit names its slot, and it is delivered.
    const std::size_t last = clients.size() - 1;
    ASSERT_TRUE(send_stamp(clients[last], 7, static_cast<std::uint32_t>(generation), secs(5)));
    const int slot = only_ready_slot(*q);
    ASSERT_GE(slot, 0) << "one ready bit expected (-2: several)";
    max_slot = std::max(max_slot, slot);
    ASSERT_LT(slot, 2 * (kLongLived + kBatch)) << "slots are not reused";
    auto m = q->wait(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->key, keys[last]);
    ASSERT_EQ(m->kind, Kind::Message);
    ASSERT_EQ(stamp_of(*m).seq, static_cast<std::uint32_t>(generation));
    m->buffer.reset();
    // A long-lived channel still delivers with its own key.
    const std::size_t ll = static_cast<std::size_t>(generation % kLongLived);
    ASSERT_TRUE(send_stamp(long_lived[ll], static_cast<std::uint32_t>(ll), 0, secs(5)));
    m = q->wait(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->key, 1'000'000 + ll);
    ASSERT_EQ(m->kind, Kind::Message);
    // The batch ends: the odd ones by their clients, the even ones by the owner.
    for (std::size_t i = 0; i < clients.size(); ++i) {
      if (i % 2 == 1) {
        ends.emplace(keys[i], 0);
        clients[i].close();
      }
    }
    for (auto& s : servers) s.close();
    for (std::size_t i = 0; i < clients.size(); i += 2) owner_closed.insert(keys[i]);
    int expected = kBatch / 2;
    while (expected > 0) {
      auto e = q->wait(secs(5));

      ASSERT_TRUE(e) << e.error().message() << " with " << expected << " PeerClosed missing";
      ASSERT_EQ(e->kind, Kind::PeerClosed) << "key " << e->key;
      ASSERT_FALSE(owner_closed.contains(e->key))
          << "a PeerClosed for a channel the owner closed itself";
      auto it = ends.find(e->key);
      ASSERT_NE(it, ends.end()) << "PeerClosed for an unknown key " << e->key;
      ASSERT_EQ(it->second++, 0) << "PeerClosed twice for key " << e->key;
      --expected;
    }
    while (q->wait(Deadline::immediate())) {
      ADD_FAILURE() << "a message after the batch's PeerClosed";
    }
    ASSERT_EQ(q->channel_count(), static_cast<std::size_t>(kLongLived));
    clients.clear();  // the even ones' clients: their server ends are gone already
    ++generation;
  }
  const double secs_taken = static_cast<double>(monotonic_ns() - t0) / 1e9;
  std::printf("churn: %d channels in %d batches in %.2f s; highest slot %d (capacity %u)\n",
              created, generation, secs_taken, max_slot, shm::kQueueCapacity);
  for (const auto& [key, n] : ends) ASSERT_EQ(n, 1) << "key " << key;
  // Nothing late.
  auto m = q->wait(Deadline::after(50ms));
  ASSERT_FALSE(m) << "late message, key " << m->key;
  // The long-lived ones end as the others did.
  for (auto& c : long_lived) c.close();
  for (int i = 0; i < kLongLived; ++i) {
    auto e = q->wait(secs(5));
    ASSERT_TRUE(e) << e.error().message();
    EXPECT_EQ(e->kind, Kind::PeerClosed);
  }
  EXPECT_EQ(q->channel_count(), 0u);
}

// ---------------------------------------------------------------------------------------------
// 4. MsgQueue::fd() in a plain epoll loop.

class Epoll {
 public:
  explicit Epoll(int fd) : ep_(::epoll_create1(EPOLL_CLOEXEC)) {
    epoll_event ev{};
    ev.events = EPOLLIN;  // level-triggered
    ev.data.fd = fd;
    ok_ = ep_ >= 0 && ::epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev) == 0;
  }
  Epoll(const Epoll&) = delete;
  Epoll& operator=(const Epoll&) = delete;
  ~Epoll() {
    if (ep_ >= 0) ::close(ep_);
  }
  bool ok() const { return ok_; }
  // epoll_wait's result (retried on EINTR).
  int wait(int timeout_ms) {
    epoll_event ev{};
    for (;;) {
      int n = ::epoll_wait(ep_, &ev, 1, timeout_ms);
      if (n >= 0 || errno != EINTR) return n;
    }
  }

 private:
  int ep_;
  bool ok_ = false;
};

bool readable_now(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLIN) != 0;
}

TEST(QueueFd, NotReadableWhileNothingWasSentNorAfterAWaitFoundNothing) {
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  const int fd = q->fd();
  ASSERT_GE(fd, 0);
  Epoll ep(fd);
  ASSERT_TRUE(ep.ok());
  EXPECT_EQ(ep.wait(50), 0) << "a fresh queue's fd is readable";
  std::vector<Channel> clients = adopt_n(*q, 4, 0, small_channel());
  // The redirects may make it readable (nothing there: allowed); a wait that finds nothing ends it.
  EXPECT_TRUE(drain(*q).empty());
  EXPECT_EQ(ep.wait(100), 0) << "readable after wait(immediate) returned TimedOut";
  EXPECT_FALSE(readable_now(fd));
  // A longer wait that times out (it slept) leaves it quiet too.
  auto m = q->wait(Deadline::after(20ms));
  ASSERT_FALSE(m);
  EXPECT_EQ(ep.wait(100), 0) << "readable after wait(20 ms) returned TimedOut";
  // And it does become readable for a message.
  ASSERT_TRUE(send_stamp(clients[2], 2, 0, secs(5)));
  EXPECT_EQ(ep.wait(2000), 1);
  auto got = drain(*q);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].key, 2u);
  EXPECT_EQ(ep.wait(50), 0);
}

// An owner in epoll: a message whose ready bit a hostile peer cleared still signals the fd (the
// producer signals whatever the bits say); the wait(immediate) calls after that wake-up find no
// bit, and must scan every channel (a wake-up that found no bit), or the message waits for some
// later event. The owner's loop: on each readiness, wait(immediate) until TimedOut; up to 1 s.
void cleared_bit_found_by_an_epoll_owner(bool with_hot_slot) {
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  Epoll ep(q->fd());
  ASSERT_TRUE(ep.ok());
  std::vector<Channel> clients = adopt_n(*q, 2, 0, small_channel(8));
  (void)drain(*q);
  if (with_hot_slot) {
    for (std::uint32_t i = 0; i < 2; ++i) ASSERT_TRUE(send_stamp(clients[0], 0, i, secs(5)));
    ASSERT_EQ(ep.wait(1000), 1);
    auto got = drain(*q);
    ASSERT_EQ(got.size(), 2u);
  }
  ASSERT_TRUE(send_stamp(clients[1], 1, 0, secs(5)));
  shm::QueueReadyPage& page = TestAccess::ready_page(*q);
  for (auto& w : page.summary) w.store(0, std::memory_order_relaxed);
  for (auto& w : page.ready) w.store(0, std::memory_order_relaxed);
  const std::uint64_t scans0 = TestAccess::full_scans(*q);
  const std::int64_t t0 = monotonic_ns();
  std::vector<Message> got;
  int wakes = 0;
  while (got.empty() && monotonic_ns() - t0 < 1'500'000'000) {
    if (ep.wait(100) != 1) continue;
    ++wakes;
    got = drain(*q);
  }
  const std::int64_t took = monotonic_ns() - t0;
  std::printf(
      "cleared bit, epoll owner, %s: %s after %.1f ms, %d epoll wake-ups, %llu full scans\n",
      with_hot_slot ? "another channel hot" : "no hot slot", got.empty() ? "NOT found" : "found",
      static_cast<double>(took) / 1e6, wakes,
      static_cast<unsigned long long>(TestAccess::full_scans(*q) - scans0));
  ASSERT_EQ(got.size(), 1u) << "the message whose bit was cleared was not found within 1.5 s";
  EXPECT_EQ(got[0].key, 1u);
}

// Found a bug (fixed): the fd path had no full scan: wait(immediate) after the fd's wake-up looked
// with full_if_empty false, and an owner in epoll never took a safety-net sleep, so the message
// was not found within 1 s (one epoll wake-up, 0 full scans), with or without a hot slot. Now the
// look after an fd wake-up that finds nothing full-scans (at most once a millisecond; one held
// back is done by the fd's timer 1 ms later), and the fd has its own 1 s safety-net timer.
TEST(QueueFd, AClearedBitIsFoundAfterTheFdWakeUp) { cleared_bit_found_by_an_epoll_owner(false); }

TEST(QueueFd, AClearedBitIsFoundAfterTheFdWakeUpWhileAnotherChannelIsHot) {
  cleared_bit_found_by_an_epoll_owner(true);
}

// (b) The owner's last wait(immediate) returned TimedOut; a message comes before epoll_wait:
// epoll_wait must return. Once deterministically, then 300 times with a producer thread sending
// at a random moment around the owner's switch from wait() to epoll_wait().
TEST(QueueFd, AMessageBetweenTheLastWaitAndEpollWaitWakesEpollWait) {
  auto q = MsgQueue::create({WaitMode::Spin, 0ns});
  ASSERT_TRUE(q);
  Epoll ep(q->fd());
  ASSERT_TRUE(ep.ok());
  std::vector<Channel> clients = adopt_n(*q, 8, 0, small_channel());
  (void)drain(*q);
  ASSERT_TRUE(send_stamp(clients[5], 5, 0, secs(5)));
  ASSERT_EQ(ep.wait(2000), 1) << "a message sent after TimedOut did not make the fd readable";
  auto got = drain(*q);
  ASSERT_EQ(got.size(), 1u);
  EXPECT_EQ(got[0].key, 5u);

  constexpr int kRounds = 300, kStop = -2;
  std::atomic<int> go{-1};
  std::thread producer([&] {
    std::mt19937 rng(3);
    for (int i = 0; i < kRounds; ++i) {
      for (int g; (g = go.load(std::memory_order_acquire)) != i; std::this_thread::yield())
        if (g == kStop) return;  // the owner failed a round
      const std::int64_t until = monotonic_ns() + static_cast<std::int64_t>(rng() % 60'000);
      while (monotonic_ns() < until) {
      }
      const auto ch = static_cast<std::uint32_t>(rng() % clients.size());
      if (!send_stamp(clients[ch], ch, static_cast<std::uint32_t>(i), secs(5))) return;
    }
  });
  struct Join {  // also after a failed ASSERT (else terminate, the finding lost): stop, join
    std::atomic<int>& go;
    std::thread& t;
    ~Join() {
      go.store(kStop, std::memory_order_release);
      if (t.joinable()) t.join();
    }
  } join{go, producer};
  int epoll_wakes = 0;
  std::int64_t slowest_ns = 0;
  for (int i = 0; i < kRounds; ++i) {
    go.store(i, std::memory_order_release);
    const std::int64_t start = monotonic_ns();
    bool got_it = false;
    while (!got_it) {
      auto m = q->wait(Deadline::immediate());
      if (m) {
        ASSERT_EQ(m->kind, Kind::Message);
        ASSERT_EQ(stamp_of(*m).seq, static_cast<std::uint32_t>(i));
        ASSERT_EQ(stamp_of(*m).channel, m->key);
        got_it = true;
        continue;
      }
      ASSERT_EQ(m.error().code, Errc::TimedOut);
      const int n = ep.wait(2000);
      ASSERT_EQ(n, 1) << "round " << i << ": epoll_wait slept through a message (lost wake-up)";
      ++epoll_wakes;
    }
    slowest_ns = std::max(slowest_ns, monotonic_ns() - start);
  }
  producer.join();
  std::printf("fd race: %d rounds, %d epoll wake-ups, slowest round %.2f ms\n", kRounds,
              epoll_wakes, static_cast<double>(slowest_ns) / 1e6);
  EXPECT_TRUE(drain(*q).empty());
}

// (c) Many messages behind one readiness: one epoll wake-up, then wait(immediate) returns every
// one of them, then TimedOut.
TEST(QueueFd, ManyMessagesBehindOneReadinessAllComeFromWaitImmediate) {
  constexpr int kChannels = 5, kEach = 12;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  Epoll ep(q->fd());
  ASSERT_TRUE(ep.ok());
  std::vector<Channel> clients = adopt_n(*q, kChannels, 0, small_channel(16));
  (void)drain(*q);
  pid_t pid = spawn([&] {
    for (std::uint32_t k = 0; k < kEach; ++k)
      for (std::uint32_t c = 0; c < kChannels; ++c)
        if (!send_stamp(clients[c], c, k, secs(5))) return 1;
    ::pause();
    return 0;
  });
  for (auto& c : clients) c.close();
  ASSERT_EQ(ep.wait(5000), 1);
  // Let the child finish sending (its messages are all there once it pauses).
  std::this_thread::sleep_for(100ms);
  std::vector<std::uint32_t> next(kChannels, 0);
  int n = 0;
  for (auto& m : drain(*q)) {
    ASSERT_EQ(m.kind, Kind::Message);
    ASSERT_LT(m.key, static_cast<std::uint64_t>(kChannels));
    EXPECT_EQ(stamp_of(m).seq, next[m.key]++);
    ++n;
  }
  EXPECT_EQ(n, kChannels * kEach) << "wait(immediate) returned TimedOut with messages left";
  EXPECT_FALSE(readable_now(q->fd()));
  ::kill(pid, SIGKILL);
  EXPECT_EQ(join(pid), 128 + SIGKILL);
}

// (d) Level-triggered: readable until drained, whether or not the owner calls epoll_wait again
// without calling wait(), and while messages remain after each wait().
TEST(QueueFd, StaysReadableUntilAWaitFindsNothing) {
  constexpr int kMessages = 5;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  const int fd = q->fd();
  Epoll ep(fd);
  ASSERT_TRUE(ep.ok());
  std::vector<Channel> clients = adopt_n(*q, 2, 0, small_channel(8));
  (void)drain(*q);
  for (std::uint32_t i = 0; i < kMessages; ++i)
    ASSERT_TRUE(send_stamp(clients[i % 2], i % 2, i / 2, secs(5)));
  ASSERT_EQ(ep.wait(2000), 1);
  for (int k = 0; k < 3; ++k) {
    EXPECT_TRUE(readable_now(fd)) << "poll " << k;
    EXPECT_EQ(ep.wait(0), 1) << "epoll_wait again without wait(): " << k;
  }
  for (int i = 0; i < kMessages; ++i) {
    auto m = q->wait(Deadline::immediate());
    ASSERT_TRUE(m) << "message " << i << ": " << m.error().message();
    if (i < kMessages - 1) {
      EXPECT_TRUE(readable_now(fd)) << "not readable with " << kMessages - 1 - i << " left";
      EXPECT_EQ(ep.wait(0), 1);
    }
  }
  auto m = q->wait(Deadline::immediate());
  ASSERT_FALSE(m);
  EXPECT_EQ(m.error().code, Errc::TimedOut);
  EXPECT_FALSE(readable_now(fd)) << "readable after TimedOut with nothing there";
  EXPECT_EQ(ep.wait(50), 0);
}

// (e) kill -9 of the client process: the fd becomes readable; each channel's PeerClosed comes.
TEST(QueueFd, PeerDeathMakesTheFdReadableAndDeliversPeerClosed) {
  constexpr int kChannels = 3;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  Epoll ep(q->fd());
  ASSERT_TRUE(ep.ok());
  std::vector<Channel> clients = adopt_n(*q, kChannels, 10, small_channel());
  pid_t pid = spawn([&] {
    ::pause();
    return 0;
  });
  for (auto& c : clients) c.close();
  EXPECT_TRUE(drain(*q).empty());
  EXPECT_EQ(ep.wait(100), 0);
  ::kill(pid, SIGKILL);
  EXPECT_EQ(join(pid), 128 + SIGKILL);
  std::set<std::uint64_t> ended;
  const Deadline deadline = secs(5);
  while (ended.size() < kChannels && !deadline.expired()) {
    ASSERT_EQ(ep.wait(5000), 1) << "peer death did not make the fd readable";
    for (auto& m : drain(*q)) {
      EXPECT_EQ(m.kind, Kind::PeerClosed);
      EXPECT_EQ(m.error, Errc::PeerClosed);
      EXPECT_TRUE(ended.insert(m.key).second) << "PeerClosed twice for " << m.key;
    }
  }
  EXPECT_EQ(ended, (std::set<std::uint64_t>{10, 11, 12}));
  EXPECT_EQ(q->channel_count(), 0u);
  EXPECT_EQ(ep.wait(50), 0);
}

// (f) A Listener redirected to the queue: a connecting client makes the fd readable; its
// Kind::Connection, adopted, then serves a call through the same fd loop.
TEST(QueueFd, AConnectingClientMakesTheFdReadable) {
  const std::string name = "test-qfd-" + std::to_string(os::current_pid());
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  Epoll ep(q->fd());
  ASSERT_TRUE(ep.ok());
  auto l = Listener::create(name);
  ASSERT_TRUE(l) << l.error().message();
  ASSERT_TRUE(l->redirect(*q, 77));
  EXPECT_TRUE(drain(*q).empty());
  EXPECT_EQ(ep.wait(50), 0);
  pid_t pid = spawn([&] {
    *l = Listener();
    auto ch = connect(name, secs(5));
    if (!ch) return 1;
    auto b = ch->buffer(8);
    if (!b) return 2;
    std::uint64_t v = 41;
    std::memcpy(b->data().data(), &v, 8);
    if (!ch->call(*b, secs(5))) return 3;
    std::memcpy(&v, b->data().data(), 8);
    return v == 42 ? 0 : 4;
  });
  bool connected = false, served = false;
  const Deadline deadline = secs(10);
  while (!served && !deadline.expired()) {
    ASSERT_EQ(ep.wait(5000), 1) << (connected ? "the call" : "the connection")
                                << " did not make the fd readable";
    for (auto& m : drain(*q)) {
      if (!connected) {
        ASSERT_EQ(m.kind, Kind::Connection);
        ASSERT_EQ(m.key, 77u);
        ASSERT_TRUE(m.channel.valid());
        ASSERT_TRUE(q->adopt(std::move(m.channel), 5));
        connected = true;
      } else if (m.kind == Kind::Request) {
        EXPECT_EQ(m.key, 5u);
        std::uint64_t v = 0;
        std::memcpy(&v, m.buffer.data().data(), 8);
        ++v;
        std::memcpy(m.buffer.data().data(), &v, 8);
        EXPECT_TRUE(MsgQueue::reply(std::move(m)));
        served = true;
      }
    }
  }
  EXPECT_TRUE(served);
  EXPECT_EQ(join(pid), 0);
}

// (g) fd() was called and armed once, but the owner now spins inside wait(): the producers make
// no system call per message (the arm is cleared when a wait() starts). Counted in the producer
// process by the os layer's per-thread counter, after a warm-up: an end's first send takes its
// doorbell from the control socket, and a forked process's first call() starts its peer-death
// watcher and registers the end with it (one-time costs, not per message). Its positive control:
// while the fd is armed and the owner is not in wait(), each message costs the producer a system
// call (the signal), which the counter must see.
TEST(QueueFd, ProducersMakeNoSystemCallsWhileTheOwnerSpinsInWait) {
  constexpr int kControl = 10, kCalls = 2000, kChannels = 4;
  auto q = MsgQueue::create({WaitMode::Spin, 0ns});
  ASSERT_TRUE(q);
  ASSERT_GE(q->fd(), 0);
  ChannelOptions o = small_channel(8);
  o.wait = {WaitMode::Spin, 0ns};
  std::vector<Channel> clients = adopt_n(*q, kChannels, 0, o);
  (void)drain(*q);  // TimedOut: armed
  auto to_child = os::make_pipe();
  auto to_parent = os::make_pipe();
  ASSERT_TRUE(to_child && to_parent);
  auto call_on = [](Channel& c, std::uint64_t v) {
    auto buf = c.buffer(8);
    if (!buf) return false;
    std::memcpy(buf->data().data(), &v, 8);
    if (!c.call(*buf, secs(10))) return false;
    std::memcpy(&v, buf->data().data(), 8);
    return v % 2 == 0;
  };
  // counts: warm-up, control, steady; then the first steady call that made one (or ~0).
  constexpr std::uint64_t kNone = ~std::uint64_t{0};
  // A spinning call() yields the CPU (sched_yield) once it has found nothing for its spin budget
  // (0 here): made only while it waits, never per message, so not counted as the message's
  // (os::work_syscalls_this_thread()).
  pid_t pid = spawn([&] {
    std::byte b{};
    std::uint64_t counts[4] = {0, 0, 0, kNone};
    std::uint64_t s0 = os::work_syscalls_this_thread();
    for (std::uint32_t c = 0; c < kChannels; ++c)
      if (!send_stamp(clients[c], c, 0, secs(5)) || !call_on(clients[c], c)) return 1;
    counts[0] = os::work_syscalls_this_thread() - s0;
    if (!os::read_full(to_child->first.get(), {&b, 1})) return 2;  // the owner armed the fd
    s0 = os::work_syscalls_this_thread();
    for (std::uint32_t i = 0; i < kControl; ++i)
      if (!send_stamp(clients[i % kChannels], i % kChannels, 1 + i / kChannels, secs(5))) return 3;
    counts[1] = os::work_syscalls_this_thread() - s0;
    if (!os::read_full(to_child->first.get(), {&b, 1})) return 4;  // the owner spins in wait()
    s0 = os::work_syscalls_this_thread();
    for (std::uint32_t i = 0; i < kCalls; ++i) {
      if (!call_on(clients[i % kChannels], i)) return 5;
      if (counts[3] == kNone && os::work_syscalls_this_thread() != s0) counts[3] = i;
    }
    counts[2] = os::work_syscalls_this_thread() - s0;
    if (!os::write_full(to_parent->second.get(),
                        {reinterpret_cast<const std::byte*>(counts), sizeof counts}))
      return 6;
    ::pause();
    return 0;
  });
  for (auto& c : clients) c.close();
  auto serve = [&](int n) {
    int control = 0;
    for (int served = 0; served < n;) {
      auto m = q->wait(secs(10));
      if (!m) {
        ADD_FAILURE() << m.error().message() << " after " << served << " calls";
        return control;
      }
      if (m->kind == Kind::Message) {
        ++control;
        continue;
      }
      EXPECT_EQ(m->kind, Kind::Request);
      std::uint64_t v = 0;
      std::memcpy(&v, m->buffer.data().data(), 8);
      v *= 2;
      std::memcpy(m->buffer.data().data(), &v, 8);
      EXPECT_TRUE(MsgQueue::reply(std::move(*m)));
      ++served;
    }
    return control;
  };
  // The warm-up (spinning wait: disarmed while it runs).
  EXPECT_EQ(serve(kChannels), kChannels);
  EXPECT_TRUE(drain(*q).empty());  // armed again
  std::byte b{1};
  ASSERT_TRUE(os::write_full(to_child->second.get(), {&b, 1}));
  // The control messages: the owner stays out of wait() until they are all there (the fd says
  // when the first came).
  Epoll ep(q->fd());
  ASSERT_EQ(ep.wait(5000), 1);
  std::this_thread::sleep_for(200ms);
  // Now into wait(), spinning: its first message (a control one) is taken before the calls start.
  auto m = q->wait(secs(10));
  ASSERT_TRUE(m);
  ASSERT_EQ(m->kind, Kind::Message);
  ASSERT_TRUE(os::write_full(to_child->second.get(), {&b, 1}));
  EXPECT_EQ(1 + serve(kCalls), kControl);
  std::uint64_t counts[4] = {0, 0, 0, 0};
  ASSERT_TRUE(
      os::read_full(to_parent->first.get(), {reinterpret_cast<std::byte*>(counts), sizeof counts}));
  std::printf(
      "producer system calls: %llu to warm up %d channels; %llu for %d messages to an "
      "armed fd; %llu for %d calls to an owner spinning in wait()\n",
      static_cast<unsigned long long>(counts[0]), kChannels,
      static_cast<unsigned long long>(counts[1]), kControl,
      static_cast<unsigned long long>(counts[2]), kCalls);
  EXPECT_GE(counts[1], static_cast<std::uint64_t>(kControl))
      << "the counter does not see the signal: this test could not fail";
  EXPECT_EQ(counts[2], 0u) << "producers made system calls while the owner spun, from call "
                           << counts[3];
  ::kill(pid, SIGKILL);
  EXPECT_EQ(join(pid), 128 + SIGKILL);
}

}  // namespace
}  // namespace mbmq
