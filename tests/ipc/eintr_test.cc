// Deadlines under stress: every wait that takes a deadline ends at that deadline even when the
// process gets a signal every millisecond (a profiler, an interval timer), with a handler
// installed without SA_RESTART, so that blocking system calls keep failing with EINTR. A wait that
// retried EINTR with its original timeout never ended; each case runs in a forked child that the
// parent kills if it hangs, and reports what it saw.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>

#include "mbmq/file.h"
#include "mbmq/mbmq.h"
#include "os/file.h"
#include "os/process.h"
#include "os/tcp.h"
#include "os/unix_socket.h"

namespace mbmq {
namespace {

using std::chrono::milliseconds;

constexpr milliseconds kDeadline{200};
// Far beyond any honest lateness on a loaded 2-core VM under ASan, far short of "forever". The
// timing asserted is only "not early, not hung": the margin is not a latency target.
constexpr milliseconds kLateness{1500};
// How long the parent waits for a child before it calls the child hung and kills it.
constexpr milliseconds kHung{10'000};

struct Outcome {
  bool hung = false;
  bool ok = false;           // the operation succeeded
  Errc code = Errc::System;  // else its error
  int sys_errno = 0;
  std::int64_t elapsed_ns = 0;  // from just before the operation made its deadline
  std::uint64_t signals = 0;    // handled while it ran
};

// Runs op() in a child that gets SIGALRM every millisecond while op runs. op makes its deadline
// itself, after the signals started. The parent gets no signals: its own wait is the old one's
// best case. `in_parent`, if given, runs in the parent while the child works.
Outcome under_signals(const std::function<Status()>& setup_and_run,
                      const std::function<void()>& in_parent = {}) {
  Outcome out;
  auto pipe = os::make_pipe();
  EXPECT_TRUE(pipe);
  if (!pipe) return out;
  auto pid = os::fork_process();
  EXPECT_TRUE(pid);
  if (!pid) return out;
  if (*pid == 0) {
    os::die_with_parent();
    pipe->first.reset();
    Outcome o;
    if (!os::start_interval_signal(std::chrono::microseconds(1000), SIGALRM)) os::exit_now(3);
    const std::int64_t t0 = monotonic_ns();
    Status st = setup_and_run();
    o.elapsed_ns = monotonic_ns() - t0;
    o.signals = os::interval_signal_count();
    os::stop_interval_signal();
    o.ok = static_cast<bool>(st);
    if (!st) {
      o.code = st.error().code;
      o.sys_errno = st.error().sys_errno;
    }
    const bool written =
        static_cast<bool>(os::write_full(pipe->second.get(), std::as_bytes(std::span(&o, 1))));
    os::exit_now(written ? 0 : 4);
  }
  pipe->second.reset();
  if (in_parent) in_parent();
  auto ready = os::wait_readable(
      pipe->first.get(), std::chrono::duration_cast<std::chrono::nanoseconds>(kHung).count());
  if (!ready || !*ready) {
    (void)os::kill_process(*pid, SIGKILL);
    (void)os::wait_process(*pid);
    out.hung = true;
    return out;
  }
  auto got = os::read_full(pipe->first.get(), std::as_writable_bytes(std::span(&out, 1)));
  auto status = os::wait_process(*pid);
  EXPECT_TRUE(got && *got == sizeof out) << "the child reported nothing";
  EXPECT_TRUE(status && WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
  return out;
}

// The operation ended with TimedOut, at its deadline or a little after, not before and not never,
// and signals really did arrive meanwhile.
void expect_timed_out_at_deadline(const Outcome& o) {
  ASSERT_FALSE(o.hung) << "still waiting " << kHung.count()
                       << " ms later: EINTR restarted the full timeout";
  ASSERT_FALSE(o.ok) << "succeeded; expected Errc::TimedOut";
  EXPECT_EQ(o.code, Errc::TimedOut) << errc_name(o.code) << " errno " << o.sys_errno;
  EXPECT_GE(o.elapsed_ns, std::chrono::nanoseconds(kDeadline).count()) << "returned early";
  EXPECT_LE(o.elapsed_ns, std::chrono::nanoseconds(kDeadline + kLateness).count());
  // ~200 expected at 1 ms; a loaded VM delivers fewer, but never almost none.
  EXPECT_GE(o.signals, 20u) << "the test did not deliver the signals it is about";
}

Deadline deadline() { return Deadline::after(kDeadline); }

TEST(DeadlinesUnderSignals, WaitReadableOnASilentSocketTimesOut) {
  Outcome o = under_signals([]() -> Status {
    auto s = MBMQ_TRY(os::seqpacket_pair());
    bool ready = MBMQ_TRY(os::wait_readable(
        s.first.get(), std::chrono::duration_cast<std::chrono::nanoseconds>(kDeadline).count()));
    if (ready) return fail(Errc::Protocol, "readable, yet nobody wrote");
    return fail(Errc::TimedOut, "wait_readable");
  });
  expect_timed_out_at_deadline(o);
}

TEST(DeadlinesUnderSignals, ConnectToAListenerThatNeverAnswersTimesOut) {
  // A raw listening socket under the rendezvous name: connect() gets in (the backlog holds it)
  // and sends its hello, but nobody accepts, so no verdict ever comes.
  Outcome o = under_signals([]() -> Status {
    const std::string name = "eintr-test-" + std::to_string(os::current_pid());
    auto raw = MBMQ_TRY(os::listen_abstract("mbmq:" + name, 8));
    auto ch = connect(name, deadline());
    if (ch) return fail(Errc::Protocol, "connected to a listener that never answered");
    return fail(ch.error());
  });
  expect_timed_out_at_deadline(o);
}

TEST(DeadlinesUnderSignals, ReceiveFromASilentSocketTimesOut) {
  Outcome o = under_signals([]() -> Status {
    auto s = MBMQ_TRY(os::seqpacket_pair());
    auto ch = Channel::receive_from(s.first.get(), deadline());
    if (ch) return fail(Errc::Protocol, "received a channel nobody sent");
    return fail(ch.error());
  });
  expect_timed_out_at_deadline(o);
}

// A non-blocking stream socket whose reader never reads: the egress fills it, then waits for
// room until the deadline.
Status egress_to_stuck_reader(bool splice) {
  const std::size_t size = std::size_t{16} << 20;  // far more than a socket buffer holds
  auto file = MBMQ_TRY(os::make_memfd("eintr-test", size));
  auto s = MBMQ_TRY(os::stream_pair());
  MBMQ_TRY(os::set_nonblocking(s.first.get(), true));
  EgressOptions opt;
  opt.deadline = deadline();
  opt.use_splice = splice;
  auto r = send_file(s.first.get(), file.get(), 0, size, opt);
  if (r) return fail(Errc::Protocol, "sent everything to a reader that never reads");
  return fail(r.error());
}

TEST(DeadlinesUnderSignals, SendFileToAReaderThatNeverReadsTimesOut) {
  expect_timed_out_at_deadline(under_signals([] { return egress_to_stuck_reader(false); }));
}

TEST(DeadlinesUnderSignals, SendFileBySpliceToAReaderThatNeverReadsTimesOut) {
  expect_timed_out_at_deadline(under_signals([] { return egress_to_stuck_reader(true); }));
}

TEST(DeadlinesUnderSignals, SendBufferToAReaderThatNeverReadsTimesOut) {
  Outcome o = under_signals([]() -> Status {
    auto p = MBMQ_TRY(Channel::pair());
    Buffer b = MBMQ_TRY(p.first.buffer(std::size_t{8} << 20));  // a memfd extent: sendfile
    auto s = MBMQ_TRY(os::stream_pair());
    MBMQ_TRY(os::set_nonblocking(s.first.get(), true));
    EgressOptions opt;
    opt.deadline = deadline();
    auto r = send_buffer(s.first.get(), b, opt);
    if (r) return fail(Errc::Protocol, "sent everything to a reader that never reads");
    return fail(r.error());
  });
  expect_timed_out_at_deadline(o);
}

// call() and receive() sleep on a futex, which reports EINTR as a wake-up; they loop against
// their own deadline (os/futex.h). These guard that contract.
TEST(DeadlinesUnderSignals, CallToAPeerThatNeverRepliesTimesOut) {
  Outcome o = under_signals([]() -> Status {
    auto p = MBMQ_TRY(Channel::pair());
    Buffer b = MBMQ_TRY(p.first.buffer(64));
    return p.first.call(b, deadline());
  });
  expect_timed_out_at_deadline(o);
}

TEST(DeadlinesUnderSignals, ReceiveFromAPeerThatNeverSendsTimesOut) {
  Outcome o = under_signals([]() -> Status {
    auto p = MBMQ_TRY(Channel::pair());
    auto m = p.second.receive(deadline());
    if (m) return fail(Errc::Protocol, "received a message nobody sent");
    return fail(m.error());
  });
  expect_timed_out_at_deadline(o);
}

// A blocking TCP connect() that signals interrupt must still connect: the kernel keeps trying
// after EINTR. The listener's queue is full (backlog 0 holds one connection), so the kernel drops
// the child's SYN and the child's connect() waits for the retransmission (~1 s later); the
// parent makes room meanwhile.
TEST(SignalsDuringConnect, ATcpConnectInterruptedBySignalsStillConnects) {
  std::uint16_t port = 0;
  auto listener = os::tcp_listen("127.0.0.1", 0, 0, &port);
  ASSERT_TRUE(listener) << listener.error().message();
  auto filler = os::tcp_connect("127.0.0.1", port);
  ASSERT_TRUE(filler) << filler.error().message();
  Outcome o = under_signals(
      [port]() -> Status {
        auto s = os::tcp_connect("127.0.0.1", port);
        if (!s) return fail(s.error());
        return {};
      },
      [l = listener->get()] {
        std::this_thread::sleep_for(milliseconds(300));
        auto a = os::tcp_accept(l);  // the filler: room for the child's connection
        EXPECT_TRUE(a);
        // The child's, once its SYN comes again (not at all if its connect() gave up).
        auto ready = os::wait_readable(l, std::int64_t{5'000'000'000});
        if (ready && *ready) {
          EXPECT_TRUE(os::tcp_accept(l));
        }
      });
  ASSERT_FALSE(o.hung);
  EXPECT_TRUE(o.ok) << errc_name(o.code) << " errno " << o.sys_errno;
  EXPECT_GE(o.signals, 20u);
}

}  // namespace
}  // namespace mbmq
