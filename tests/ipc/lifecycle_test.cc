// Lifecycle and threading regressions of the endpoint hardening (e39bc80): closing an end while
// another thread is inside it, call() deadlines with messages parked for receive() and with a
// second caller on the same end, a moved end keeping its peer's queue doorbell and not its wait
// policy, a queue redirected before fork(), and a queue assigned over another. Each test names the
// bug it guards ("Bug N", the numbering of the hardening issue #11).
//
// Threads and in-process pairs wherever possible, so ThreadSanitizer sees the same code (label
// `threads`). A test that could hang runs under a Watchdog: a hang is reported as a failure of
// that test, not as a ctest timeout. Timing assertions are deadlines with a generous margin
// (kMargin) on a noisy 2-core VM; "does not spin" is asserted as thread CPU time under a quarter
// of the wall time (a sleeping wait uses microseconds; a spinning one, even on a loaded VM where
// it gets only part of a core, far more), never as a speed.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "ipc/test_access.h"
#include "os/process.h"
#include "os/unix_socket.h"
#include "test_util.h"

#if defined(__SANITIZE_THREAD__)
// Bug 11's child must start its own watcher thread after a fork() of this (threaded) process:
// that is the behaviour under test. TSan's default would kill such a child.
extern "C" const char* __tsan_default_options() { return "die_after_fork=0"; }
#endif

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::secs;
using test::Watchdog;

constexpr std::int64_t kMs = 1'000'000;
// Added to every deadline assertion: scheduling noise on 2 shared cores (and sanitizers).
constexpr std::int64_t kMargin = 500 * kMs;

// Wall and thread-CPU time of one blocking operation on the calling thread.
struct Timed {
  std::int64_t wall = 0, cpu = 0;
};
template <class Fn>
Timed timed(Fn&& fn) {
  const std::int64_t w0 = monotonic_ns(), c0 = os::thread_cpu_ns();
  fn();
  return {monotonic_ns() - w0, os::thread_cpu_ns() - c0};
}
double ms(std::int64_t ns) { return static_cast<double>(ns) / 1e6; }

// Runs `fn` at scope exit, also when an ASSERT returns early: stops and joins helper threads.
template <class Fn>
class AtExit {
 public:
  explicit AtExit(Fn fn) : fn_(std::move(fn)) {}
  AtExit(const AtExit&) = delete;
  AtExit& operator=(const AtExit&) = delete;
  ~AtExit() { fn_(); }

 private:
  Fn fn_;
};

ChannelOptions sleeping() {
  ChannelOptions o;
  o.wait.mode = WaitMode::Sleep;
  return o;
}

// ---- Bug 5: closing an end while another thread is inside it -------------------------------

constexpr int kCloseRounds = 200;

TEST(Lifecycle, CloseWhileAnotherThreadIsInReceiveEndsThatReceivePromptlyWithAnError) {
  // Bug 5: close() used to drop the end under the receiving thread (use after free, or a race on
  // the handle); now the receiver wakes and returns Errc::InvalidArgument ("closed").
  Watchdog dog("receive() racing close()", 90s);
  std::mt19937 rng(5);
  const WaitMode modes[] = {WaitMode::Sleep, WaitMode::Adaptive, WaitMode::Spin};
  for (int round = 0; round < kCloseRounds; ++round) {
    SCOPED_TRACE(round);
    ChannelOptions opt;
    opt.wait.mode = modes[round % 3];
    auto ends = Channel::pair(opt);
    ASSERT_TRUE(ends) << ends.error().message();
    auto& [client, server] = *ends;
    Result<Message> got = fail(Errc::Busy, "not returned");
    std::atomic<std::int64_t> returned_at{0};
    std::thread receiver([&] {
      got = server.receive(secs(10));
      returned_at.store(monotonic_ns());
    });
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
    const std::int64_t closed_at = monotonic_ns();
    server.close();
    receiver.join();
    EXPECT_FALSE(server.valid());
    ASSERT_FALSE(got) << "receive() on a closed end returned a message of kind "
                      << static_cast<int>(got->kind);
    EXPECT_EQ(got.error().code, Errc::InvalidArgument) << got.error().message();
    EXPECT_LT(returned_at.load() - closed_at, kMargin) << "receive() noticed the close late";
  }
}

TEST(Lifecycle, CloseBetweenTheReceivesOfALoopingThreadEndsTheLoopWithAnError) {
  // Bug 5, between calls: the loop's next receive() finds the end closed.
  Watchdog dog("a receive() loop racing close()", 90s);
  std::mt19937 rng(55);
  for (int round = 0; round < kCloseRounds; ++round) {
    SCOPED_TRACE(round);
    auto ends = Channel::pair();
    ASSERT_TRUE(ends) << ends.error().message();
    auto& [client, server] = *ends;
    std::atomic<bool> started{false};
    Errc last = Errc::TimedOut;
    int messages = 0;
    std::atomic<std::int64_t> returned_at{0};
    std::thread receiver([&] {
      for (;;) {
        started.store(true);
        auto m = server.receive(Deadline::after(std::chrono::microseconds(200)));
        if (m) {
          ++messages;
          continue;
        }
        if (m.error().code != Errc::TimedOut) {
          last = m.error().code;
          break;
        }
      }
      returned_at.store(monotonic_ns());
    });
    while (!started.load()) std::this_thread::yield();
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
    const std::int64_t closed_at = monotonic_ns();
    server.close();
    receiver.join();
    EXPECT_EQ(messages, 0);
    EXPECT_EQ(last, Errc::InvalidArgument);
    EXPECT_LT(returned_at.load() - closed_at, kMargin);
  }
}

TEST(Lifecycle, CloseWhileAnotherThreadIsInCallEndsThatCallPromptlyAndLeavesItsBufferUsable) {
  // Bug 5, the same for call(): the peer never answers; the caller's own end is closed under it.
  Watchdog dog("call() racing close()", 90s);
  std::mt19937 rng(555);
  for (int round = 0; round < kCloseRounds; ++round) {
    SCOPED_TRACE(round);
    ChannelOptions opt;
    opt.wait.mode = round % 2 == 0 ? WaitMode::Sleep : WaitMode::Adaptive;
    auto ends = Channel::pair(opt);
    ASSERT_TRUE(ends) << ends.error().message();
    auto& [client, server] = *ends;
    auto b = client.buffer(256);
    ASSERT_TRUE(b);
    test::fill(b->data(), 1);
    Status r;
    std::atomic<std::int64_t> returned_at{0};
    std::thread caller([&] {
      r = client.call(*b, secs(10));
      returned_at.store(monotonic_ns());
    });
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
    const std::int64_t closed_at = monotonic_ns();
    client.close();
    caller.join();
    ASSERT_FALSE(r) << "call() on a closed end succeeded";
    EXPECT_EQ(r.error().code, Errc::InvalidArgument) << r.error().message();
    EXPECT_LT(returned_at.load() - closed_at, kMargin);
    // Sent or not, the buffer is the caller's again (or was never given up): its bytes are there.
    if (b->valid()) {
      ASSERT_EQ(b->size(), 256u);
      std::memset(b->data().data(), 0x5a, b->size());
    }
  }
}

// ---- Bug 7: call() deadline while a peer message is parked for receive() -------------------

class ParkedMessage : public ::testing::TestWithParam<bool> {};  // true: the peer sends a request

TEST_P(ParkedMessage, CallEndsAtItsDeadlineWithoutSpinningAndTheParkedMessageIsKept) {
  // Bug 7: call() set the peer's message aside for receive() and then counted it as "inbound
  // ready" forever: it spun a core and never reached its deadline.
  const bool request = GetParam();
  auto ends = Channel::pair(sleeping());
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  auto first = server.buffer(64);
  ASSERT_TRUE(first);
  test::fill(first->data(), 7);
  ASSERT_TRUE(request ? server.send_request(std::move(*first)) : server.send(std::move(*first)));
  auto b = client.buffer(64);
  ASSERT_TRUE(b);
  Status r;
  Timed t;
  {
    Watchdog dog("call() with a message parked", 10s);
    t = timed([&] { r = client.call(*b, Deadline::after(200ms)); });
  }
  ASSERT_FALSE(r) << "nobody answers this call";
  EXPECT_EQ(r.error().code, Errc::TimedOut) << r.error().message();
  EXPECT_LT(t.wall, 200 * kMs + kMargin) << "the call overran its deadline";
  EXPECT_LT(t.cpu, t.wall / 4) << "the call spun a core while waiting: " << ms(t.cpu)
                               << " ms CPU in " << ms(t.wall) << " ms";
  // The message the call set aside is delivered, intact, by receive().
  auto m = client.receive(secs(2));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, request ? Kind::Request : Kind::Message);
  EXPECT_TRUE(test::check(m->buffer.data(), 7));
}

std::string parked_name(const ::testing::TestParamInfo<bool>& p) {
  return p.param ? "Request" : "OneWay";
}
INSTANTIATE_TEST_SUITE_P(Lifecycle, ParkedMessage, ::testing::Values(false, true), parked_name);

// ---- Bug 8: a second call() on an end whose first call waits for a slow reply ---------------

TEST(Lifecycle, ASecondCallTimesOutAtItsOwnDeadlineWithoutSpinningAndKeepsItsBuffer) {
  // Bug 8: the second caller spun on the end's lock until the first call finished, past its own
  // deadline, and then sent (and gave up) its buffer.
  Watchdog dog("two calls on one end", 30s);
  auto ends = Channel::pair(sleeping());
  ASSERT_TRUE(ends);
  auto& [client, server] = *ends;
  std::atomic<bool> first_taken{false};
  std::thread srv([&] {
    for (int served = 0; served < 2;) {
      auto m = server.receive(secs(10));
      if (!m || m->kind == Kind::PeerClosed) return;
      if (m->kind != Kind::Request) continue;
      if (served == 0) {
        first_taken.store(true);
        std::this_thread::sleep_for(1500ms);  // a slow answer
      }
      m->buffer.data()[0] = std::byte{0xee};
      (void)MsgQueue::reply(std::move(*m));
      ++served;
    }
  });
  auto a = client.buffer(64);
  auto b = client.buffer(64);
  ASSERT_TRUE(a && b);
  test::fill(b->data(), 8);
  std::atomic<bool> first_done{false};
  Status ra;
  std::thread first([&] {
    ra = client.call(*a, secs(10));
    first_done.store(true);
  });
  AtExit join([&] {  // also after a failed ASSERT: closing the end ends both threads' waits
    first.join();
    client.close();
    srv.join();
  });
  while (!first_taken.load()) std::this_thread::sleep_for(1ms);
  Status rb;
  const Timed t = timed([&] { rb = client.call(*b, Deadline::after(200ms)); });
  const bool first_was_done = first_done.load();
  ASSERT_FALSE(rb);
  EXPECT_EQ(rb.error().code, Errc::TimedOut) << rb.error().message();
  EXPECT_FALSE(first_was_done) << "the second call returned only after the first had finished";
  EXPECT_LT(t.wall, 200 * kMs + kMargin) << "the second call overran its deadline";
  EXPECT_LT(t.cpu, t.wall / 4) << "the second call spun a core while waiting: " << ms(t.cpu)
                               << " ms CPU in " << ms(t.wall) << " ms";
  // It was never sent: still the caller's, bytes unchanged, and usable once the end is free.
  ASSERT_TRUE(b->valid()) << "the second call gave up a buffer it never sent";
  EXPECT_TRUE(test::check(b->data(), 8));
  while (!first_done.load()) std::this_thread::sleep_for(1ms);
  EXPECT_TRUE(ra) << ra.error().message();
  auto again = client.call(*b, secs(5));
  EXPECT_TRUE(again) << again.error().message();
  if (again) {
    EXPECT_EQ(b->data()[0], std::byte{0xee});
  }
}

// ---- Bug 10 / Bug 19: what travels with a moved end -----------------------------------------

enum class Move { SendOver, Attach };

// Moves `end` within this process the way another process would get it.
Result<Channel> move_end(Channel& end, Move how) {
  if (how == Move::SendOver) {
    auto sock = MBMQ_TRY(os::seqpacket_pair());
    MBMQ_TRY(end.send_over(sock.first.get()));
    return Channel::receive_from(sock.second.get(), secs(5));
  }
  auto carrier = MBMQ_TRY(Channel::pair());
  Buffer b = MBMQ_TRY(carrier.first.buffer(64));
  MBMQ_TRY(b.attach(std::move(end)));
  MBMQ_TRY(carrier.first.send(std::move(b)));
  Message m = MBMQ_TRY(carrier.second.receive(secs(5)));
  if (m.kind != Kind::Message) return fail(Errc::Protocol, "move_end: not a message");
  return m.buffer.take_channel(0);
}

class MovedEnd : public ::testing::TestWithParam<Move> {};

std::string move_name(const ::testing::TestParamInfo<Move>& p) {
  return p.param == Move::SendOver ? "SendOver" : "Attach";
}

TEST_P(MovedEnd, KeepsItsPeersQueueDoorbellSoASleepingQueueWakesAtOnce) {
  // Bug 10: the end had taken its peer's doorbell page off the control socket; a moved copy
  // without it woke the channel's own futex word, which a queue does not sleep on: the message
  // was seen only at the queue's next deadline (here 2 s).
  Watchdog dog("moved end and queue", 60s);
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [a, b] = *ends;
  WaitPolicy sleep_policy;
  sleep_policy.mode = WaitMode::Sleep;
  auto q = MsgQueue::create(sleep_policy);
  ASSERT_TRUE(q);
  ASSERT_TRUE(a.redirect(*q, 10));  // sends A's doorbell page to B
  std::atomic<bool> stop{false};
  std::atomic<int> served{0};
  std::thread server([&] {
    while (!stop.load()) {
      auto m = q->wait(Deadline::after(2s));
      if (!m) continue;  // TimedOut: look at `stop`, wait again
      if (m->kind == Kind::Request) {
        m->buffer.data()[0] = std::byte{0x10};
        // Counted before the reply goes out: the caller, woken by it, reads the count at once
        // (counted after, a loaded machine could run that check first: 1 vs 2).
        ++served;
        if (!MsgQueue::reply(std::move(*m))) --served;
      }
    }
  });
  Channel moved;
  AtExit join([&] {
    stop.store(true);
    b.close();
    moved.close();  // A's peer is gone: the waiter gets Kind::PeerClosed and looks at `stop`
    server.join();
  });
  // B calls A while A's waiter sleeps: B takes the doorbell off its control socket to wake it.
  bool drained = false;
  for (int attempt = 0; attempt < 20 && !drained; ++attempt) {
    std::this_thread::sleep_for(50ms);  // the waiter is asleep (WaitMode::Sleep)
    auto buf = b.buffer(64);
    ASSERT_TRUE(buf);
    auto r = b.call(*buf, secs(5));
    ASSERT_TRUE(r) << r.error().message();
    auto readable = os::wait_readable(detail::TestAccess::control_fd(b), 0);
    ASSERT_TRUE(readable);
    drained = !*readable;
  }
  ASSERT_TRUE(drained) << "B never took A's doorbell off its control socket (the test's premise)";
  auto got = move_end(b, GetParam());
  ASSERT_TRUE(got) << got.error().message();
  moved = std::move(*got);
  std::this_thread::sleep_for(100ms);  // the waiter is asleep again, until its 2 s deadline
  auto buf = moved.buffer(64);
  ASSERT_TRUE(buf);
  Status r;
  const Timed t = timed([&] { r = moved.call(*buf, secs(5)); });
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(buf->data()[0], std::byte{0x10});
  EXPECT_LT(t.wall, kMargin) << "the queue was not woken by the moved end: the call took "
                             << ms(t.wall) << " ms (the queue's own 2 s deadline)";
  EXPECT_GE(served.load(), 2);
}

TEST_P(MovedEnd, DoesNotBringItsSendersWaitPolicy) {
  // Bug 19: the wait policy travelled with the end: an end sent with WaitMode::Spin made its
  // receiver's idle receive() burn a core. Now it is the receiving process's choice (default).
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [a, b] = *ends;
  WaitPolicy spin;
  spin.mode = WaitMode::Spin;
  b.set_wait_policy(spin);
  auto moved = move_end(b, GetParam());
  ASSERT_TRUE(moved) << moved.error().message();
  Result<Message> m = fail(Errc::Busy, "not returned");
  Timed t;
  {
    Watchdog dog("receive() on a moved end", 10s);
    t = timed([&] { m = moved->receive(Deadline::after(300ms)); });
  }
  ASSERT_FALSE(m) << "nothing was sent on this channel";
  EXPECT_EQ(m.error().code, Errc::TimedOut) << m.error().message();
  EXPECT_LT(t.wall, 300 * kMs + kMargin);
  EXPECT_LT(t.cpu, t.wall / 4) << "the received end spun (the sender's Spin policy): " << ms(t.cpu)
                               << " ms CPU in " << ms(t.wall) << " ms";
  // The channel itself works after the move.
  std::thread srv([&] {
    auto r = a.receive(secs(5));
    if (r && r->kind == Kind::Request) (void)MsgQueue::reply(std::move(*r));
  });
  AtExit join([&] {
    moved->close();  // the server's receive ends (PeerClosed) if the call never came
    srv.join();
  });
  auto buf = moved->buffer(16);
  ASSERT_TRUE(buf);
  auto r = moved->call(*buf, secs(5));
  EXPECT_TRUE(r) << r.error().message();
}

INSTANTIATE_TEST_SUITE_P(Lifecycle, MovedEnd, ::testing::Values(Move::SendOver, Move::Attach),
                         move_name);

// ---- Bug 11: a queue redirected before fork() ------------------------------------------------

TEST(Lifecycle, AQueueRedirectedBeforeForkSeesThePeerCloseInTheChild) {
  // Bug 11: the child inherited the redirected end, but only the parent's watcher thread knew
  // its control socket: the child's queue never learnt of the peer's death and waited forever.
  // Forked before this test starts any thread of its own (the library's watcher exists).
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [a, b] = *ends;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(a.redirect(*q, 11));
  const pid_t child = test::spawn(
      [&] {
        b = Channel();  // the parent holds the peer end; our copy goes
        const Deadline give_up = secs(5);
        while (!give_up.expired()) {
          auto m = q->wait(give_up);
          if (!m) return m.error().code == Errc::TimedOut ? 2 : 3;
          if (m->kind == Kind::PeerClosed) return m->key == 11 ? 0 : 4;
        }
        return 2;
      },
      30);
  ASSERT_GT(child, 0);
  const std::int64_t t0 = monotonic_ns();
  std::this_thread::sleep_for(100ms);  // the child is waiting on the queue
  b = Channel();                       // the parent lets go of the peer end
  const int rc = test::join(child);
  EXPECT_EQ(rc, 0) << (rc == 2 ? "the child's queue never saw the peer close (5 s)"
                               : "child exit code " + std::to_string(rc));
  EXPECT_LT(monotonic_ns() - t0, 100 * kMs + 2000 * kMs + kMargin);
}

// ---- Bug 12: assigning over a queue ----------------------------------------------------------

TEST(Lifecycle, AssigningOverAQueueClosesItsChannelsSoTheirPeersSeePeerClosedAndNothingLeaks) {
  // Bug 12: the defaulted move-assignment dropped the old queue without closing its channels;
  // they and the queue kept each other alive (a reference cycle): the peers' calls waited for a
  // queue that no longer existed, and the fds leaked.
  Watchdog dog("calls to a replaced queue", 60s);
  {
    auto warm = Channel::pair();  // the watcher thread exists before the baseline
    ASSERT_TRUE(warm);
  }
  std::this_thread::sleep_for(20ms);
  const std::size_t fds0 = os::open_fd_count(), maps0 = os::mapping_count("memfd:mbmq-");
  {
    auto q1 = MsgQueue::create();
    auto q2 = MsgQueue::create();
    ASSERT_TRUE(q1 && q2);
    std::vector<Channel> clients;
    Channel kept;  // one redirected end whose handle the test keeps; the others are adopted
    for (std::uint64_t i = 0; i < 3; ++i) {
      auto ends = Channel::pair();
      ASSERT_TRUE(ends);
      if (i == 0) {
        ASSERT_TRUE(ends->second.redirect(*q1, i));
        kept = std::move(ends->second);
      } else {
        ASSERT_TRUE(q1->adopt(std::move(ends->second), i));
      }
      clients.push_back(std::move(ends->first));
    }
    ASSERT_EQ(q1->channel_count(), 3u);
    std::vector<Buffer> bufs;
    for (auto& c : clients) {
      auto b = c.buffer(64);
      ASSERT_TRUE(b);
      bufs.push_back(std::move(*b));
    }
    *q1 = std::move(*q2);
    EXPECT_EQ(q1->channel_count(), 0u);
    EXPECT_FALSE(kept.valid()) << "a channel redirected to the replaced queue is still open";
    for (std::size_t i = 0; i < clients.size(); ++i) {
      SCOPED_TRACE(i);
      Status r;
      const Timed t = timed([&] { r = clients[i].call(bufs[i], Deadline::after(2s)); });
      ASSERT_FALSE(r);
      EXPECT_EQ(r.error().code, Errc::PeerClosed) << r.error().message();
      EXPECT_LT(t.wall, kMargin) << "the call waited for a queue that is gone";
    }
  }
  std::size_t fds = os::open_fd_count(), maps = os::mapping_count("memfd:mbmq-");
  for (int i = 0; i < 2000 && (fds != fds0 || maps != maps0); ++i) {
    std::this_thread::sleep_for(1ms);  // the watcher may hold the last reference for a moment
    fds = os::open_fd_count();
    maps = os::mapping_count("memfd:mbmq-");
  }
  EXPECT_EQ(fds, fds0) << "fds leaked";
  EXPECT_EQ(maps, maps0) << "mappings of mbmq memfds leaked";
}

}  // namespace
}  // namespace mbmq
