// The error-path walk: every operation of a channel end, with each system call it makes failing
// at each of its occurrences in turn (os::arm_failure(f, after = k, times = 1) for k = 0, 1, ...
// until the operation completes without reaching the k-th call), and the same invariants checked
// after every step:
//   - no crash, no hang (every wait has a deadline; a watchdog ends a hung walk);
//   - the buffer involved is invalid, or valid with every byte of it mapped, readable and
//     writable (a valid buffer over unmapped memory is Bug 4);
//   - the channel is still usable (a fresh call succeeds) or closed with a clear error, and only
//     after a failed operation;
//   - once the channel and buffers are gone, this process's fds and mappings of mbmq memfds are
//     back at their baseline.
// The peer is a forked child (created before the fault is armed): the faults hit this side only,
// so the k-th occurrence is this side's own k-th call.
//
// Also here, being fault-injection tests: Bug 4 (a failed seal) on its own, and Bug 14 (the
// documented server loop survives a reply that fails for one caller).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "os/fault.h"
#include "os/file.h"
#include "os/futex.h"
#include "os/mapping.h"
#include "os/process.h"
#include "os/unix_socket.h"
#include "test_util.h"

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using os::Fault;
using test::secs;
using test::Watchdog;

constexpr std::size_t kBig = 1 << 20;  // an extent, above trust()'s copy_threshold (64 KiB)

struct Disarm {
  ~Disarm() { os::disarm_failures(); }
};

// Whether [p, p + n) is mapped readable and writable, from /proc/self/maps: a buffer over
// unmapped memory is reported instead of crashing the test when it is touched.
bool mapped_rw(const void* p, std::size_t n) {
  struct Range {
    std::uintptr_t lo, hi;
  };
  std::vector<Range> rw;
  std::ifstream maps("/proc/self/maps");
  for (std::string line; std::getline(maps, line);) {
    std::istringstream in(line);
    std::string range, perms;
    in >> range >> perms;
    const std::size_t dash = range.find('-');
    if (dash == std::string::npos || perms.size() < 2 || perms[0] != 'r' || perms[1] != 'w')
      continue;
    rw.push_back({std::stoull(range.substr(0, dash), nullptr, 16),
                  std::stoull(range.substr(dash + 1), nullptr, 16)});
  }
  std::sort(rw.begin(), rw.end(), [](Range a, Range b) { return a.lo < b.lo; });
  std::uintptr_t at = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t end = at + n;
  for (const Range& r : rw)
    if (r.lo <= at && r.hi > at) at = r.hi;
  return at >= end;
}

// The buffer invariant: invalid, or valid with every byte mapped, readable and writable.
void expect_sound(Buffer& b, const std::string& where) {
  if (!b.valid()) return;
  ASSERT_LE(b.size(), b.capacity()) << where;
  ASSERT_TRUE(mapped_rw(b.data().data(), b.capacity()))
      << where << ": a valid buffer over memory that is not mapped read-write (Bug 4)";
  // Every byte read and written back unchanged (the buffer may still be sent).
  volatile std::byte* p = b.data().data();
  for (std::size_t i = 0; i < b.capacity(); ++i) p[i] = p[i];
}

// ---- the probe: did the operation reach the armed occurrence? ---------------------------------

// One cheap call of each faultable wrapper, on resources made before any baseline.
class Probe {
 public:
  Probe() {
    auto m = os::make_memfd("walk-probe", 4096);
    if (m) memfd_ = std::move(*m);
    auto s = os::seqpacket_pair();
    if (s) {
      a_ = std::move(s->first);
      b_ = std::move(s->second);
    }
  }
  bool ok() const { return memfd_ && a_ && b_; }
  // True if this call of f's wrapper failed by injection.
  bool fires(Fault f) {
    switch (f) {
      case Fault::MemfdCreate:
      case Fault::Ftruncate:
        return !os::make_memfd("walk-probe", 4096);
      case Fault::Mmap:
        return !os::Mapping::map_shared(memfd_.get(), 4096, os::Access::ReadOnly);
      case Fault::SendMsg: {
        const std::byte one{1};
        return !os::send_msg(a_.get(), {&one, 1}, {});
      }
      case Fault::RecvMsg: {
        std::byte buf[8];
        auto r = os::recv_msg(b_.get(), buf, {}, os::Blocking::No);
        return !r && r.error().code == Errc::System;  // else WouldBlock, or a probe byte
      }
      case Fault::FutexWait:
        return !os::futex_wait(&word_, word_.load() + 1, 0);  // else: the value differs
      case Fault::FutexWake:
        return !os::futex_wake(&word_, 1);
      default:
        return false;
    }
  }
  // With f armed to fail once at occurrence k: whether the operation just run reached it. If it
  // made c <= k calls, probe number k - c (of at most k + 1) fails; if none does, it did.
  bool reached(Fault f, std::uint32_t k) {
    for (std::uint32_t i = 0; i <= k; ++i)
      if (fires(f)) return false;
    return true;
  }
  void drain() {  // unarmed: what the SendMsg probes queued
    std::byte buf[8];
    while (os::recv_msg(b_.get(), buf, {}, os::Blocking::No)) {
    }
  }

 private:
  os::UniqueFd memfd_, a_, b_;
  std::atomic<std::uint32_t> word_{0};
};

// ---- the peers (forked children) ----------------------------------------------------------------

// Answers requests with the pattern of seq 2 over the request's bytes (which must be seq 1's),
// takes and closes handles, drops one-way messages; exits 0 when the channel ends. Short receive
// deadlines: a wake-up lost to an injected futex_wake failure costs 50 ms, not the test.
int serve(Channel& c) {
  const Deadline give_up = secs(25);
  while (!give_up.expired()) {
    auto m = c.receive(Deadline::after(50ms));
    if (!m) {
      if (m.error().code == Errc::TimedOut) continue;
      return 0;  // the channel ended (closed for an error on the other side)
    }
    if (m->kind == Kind::PeerClosed) return 0;
    for (std::size_t i = 0; i < m->buffer.handle_count(); ++i) {
      if (m->buffer.handle_kind(i) != HandleKind::Fd) continue;
      auto fd = m->buffer.take_fd(i);
      if (!fd) return 8;
      os::UniqueFd close_it(*fd);
    }
    if (!test::check(m->buffer.data(), 1)) return 5;  // the bytes that were sent arrived
    if (m->kind == Kind::Request) {
      test::fill(m->buffer.data(), 2);
      (void)MsgQueue::reply(std::move(*m));
    }
  }
  return 7;
}

// The caller of the reply walk: call 1 is answered under the fault (an answer, NoReply, or a
// lost wake-up: TimedOut), call 2 without. Exit 0, or 2 if the channel was closed (then the
// other side must have reported an error), 1x on anything else.
int call_twice(Channel& c) {
  auto b = c.buffer(kBig);
  if (!b) return 10;
  test::fill(b->data(), 1);
  auto r1 = c.call(*b, Deadline::after(1s));
  if (r1) {
    if (!test::check(b->data(), 2)) return 11;
  } else if (r1.error().code == Errc::PeerClosed || r1.error().code == Errc::Protocol) {
    return 2;
  } else if (r1.error().code != Errc::NoReply && r1.error().code != Errc::TimedOut) {
    return 12;
  }
  auto b2 = c.buffer(kBig);
  if (!b2) return 13;
  test::fill(b2->data(), 1);
  auto r2 = c.call(*b2, secs(10));
  if (!r2) return r2.error().code == Errc::PeerClosed || r2.error().code == Errc::Protocol ? 2 : 14;
  if (!test::check(b2->data(), 2)) return 15;
  auto end = c.receive(secs(20));  // until the other side closes
  return end && end->kind == Kind::PeerClosed ? 0 : 16;
}

// A fresh call on `c` succeeds with its answer, or the channel is closed with a clear error,
// which is acceptable only after a failed operation.
void expect_usable_or_closed(Channel& c, bool op_failed, const std::string& where) {
  auto b = c.buffer(kBig);
  Status r = b ? Status{} : Status{fail(b.error())};
  if (b) {
    test::fill(b->data(), 1);
    r = c.call(*b, secs(5));
  }
  if (r) {
    EXPECT_TRUE(test::check(b->data(), 2)) << where << ": a fresh call got a wrong answer";
    return;
  }
  const Errc code = r.error().code;
  EXPECT_TRUE(op_failed) << where << ": the operation succeeded, then the channel failed: "
                         << r.error().message();
  EXPECT_TRUE(code == Errc::PeerClosed || code == Errc::Protocol)
      << where << ": neither usable nor closed: " << r.error().message();
  EXPECT_FALSE(r.error().message().empty());
}

// ---- the operations -----------------------------------------------------------------------------

struct Fix {
  Channel ours;   // this side's end
  Channel moved;  // send_over: the end received
  pid_t child = -1;
  Buffer buf;   // the buffer involved
  Message msg;  // reply: the request being answered
  std::optional<MsgQueue> queue;
  os::UniqueFd s0, s1;
  Status result;
};

struct Op {
  const char* name;
  ChannelOptions opt;
  bool peer_calls = false;            // the child calls (we answer) instead of serving
  std::function<void(Fix&)> prepare;  // unarmed
  std::function<void(Fix&)> run;      // armed: sets f.result
  std::function<void(Fix&, const std::string&)> after;  // unarmed: invariants, usability
};

// Untrusted ends here take the sealed path above the slot size (64 KiB): it has the most calls
// that can fail (the default copies payloads up to 64 MiB).
ChannelOptions trust(Trust client, Trust server) {
  ChannelOptions o;
  o.trust = {client, server};
  o.copy_threshold = 64 * 1024;
  return o;
}

void prepare_big(Fix& f) {
  auto b = f.ours.buffer(kBig);
  ASSERT_TRUE(b) << b.error().message();
  test::fill(b->data(), 1);
  f.buf = std::move(*b);
}

// After a call: its answer if it succeeded; the buffer sound; if still valid and the channel
// open, the buffer can be sent again (valid means usable); then a fresh call.
void after_call(Fix& f, const std::string& where) {
  if (f.result) {
    EXPECT_TRUE(test::check(f.buf.data(), 2)) << where << ": wrong answer";
  }
  expect_sound(f.buf, where);
  if (::testing::Test::HasFatalFailure()) return;  // not over unmapped memory
  if (f.buf.valid() && f.ours.valid()) {
    test::fill(f.buf.data(), 1);
    if (Status again = f.ours.call(f.buf, secs(5)); !again) {
      const Errc code = again.error().code;
      EXPECT_TRUE(!f.result && (code == Errc::PeerClosed || code == Errc::Protocol))
          << where << ": the buffer left valid cannot be used: " << again.error().message();
    }
  }
  expect_usable_or_closed(f.ours, !f.result, where);
}

// After a send: the buffer sound; if it is still ours, it can be sent now; then a fresh call.
void after_send(Fix& f, const std::string& where) {
  expect_sound(f.buf, where);
  if (::testing::Test::HasFatalFailure()) return;
  if (f.buf.valid() && f.ours.valid()) {
    Status again = f.ours.send(std::move(f.buf));
    EXPECT_TRUE(again || !f.result) << where << ": " << again.error().message();
  }
  expect_usable_or_closed(f.ours, !f.result, where);
}

std::vector<Op> operations() {
  std::vector<Op> ops;
  auto alloc = [](std::size_t n) {
    return [n](Fix& f) {
      auto b = f.ours.buffer(n);
      f.result = b ? Status{} : Status{fail(b.error())};
      if (b) f.buf = std::move(*b);
    };
  };
  auto after_alloc = [](Fix& f, const std::string& where) {
    expect_sound(f.buf, where);
    f.buf.reset();
    expect_usable_or_closed(f.ours, !f.result, where);
  };
  ops.push_back({"buffer(slot)", {}, false, nullptr, alloc(1000), after_alloc});
  ops.push_back({"buffer(extent)", {}, false, nullptr, alloc(kBig), after_alloc});

  auto call = [](Fix& f) { f.result = f.ours.call(f.buf, secs(3)); };
  ops.push_back({"call(extent, cooperative)", {}, false, prepare_big, call, after_call});
  // The server end is untrusted: we seal the request (P3c); its answer comes back in a
  // replacement memfd (P7b).
  ops.push_back({"call(extent, sealed for an untrusted server)",
                 trust(Trust::Cooperative, Trust::Untrusted), false, prepare_big, call,
                 after_call});
  // Our end is untrusted: the answer above copy_threshold must come back sealed (P5b, P7b).
  ops.push_back({"call(extent, untrusted caller)", trust(Trust::Untrusted, Trust::Cooperative),
                 false, prepare_big, call, after_call});

  auto send = [](Fix& f) { f.result = f.ours.send(std::move(f.buf)); };
  ops.push_back({"send(extent)", {}, false, prepare_big, send, after_send});
  ops.push_back({"send(extent, sealed for an untrusted server)",
                 trust(Trust::Cooperative, Trust::Untrusted), false, prepare_big, send,
                 after_send});

  // Buffer::attach_fd: the handle travels on the control socket (P3b).
  auto with_fd = [](std::size_t n) {
    return [n](Fix& f) {
      auto b = f.ours.buffer(n);
      ASSERT_TRUE(b) << b.error().message();
      test::fill(b->data(), 1);
      auto fd = os::make_memfd("walk-handle", 4096);
      ASSERT_TRUE(fd);
      ASSERT_TRUE(b->attach_fd(fd->release()));
      f.buf = std::move(*b);
    };
  };
  ops.push_back({"attach_fd + send(slot)", {}, false, with_fd(1000), send, after_send});
  ops.push_back({"attach_fd + send(extent)", {}, false, with_fd(kBig), send, after_send});

  // Replies with a replacement (P7b): the child calls with a 1 MiB extent; we answer in place.
  auto take_request = [](Fix& f) {
    auto m = f.ours.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Request);
    ASSERT_TRUE(test::check(m->buffer.data(), 1));
    test::fill(m->buffer.data(), 2);
    f.msg = std::move(*m);
  };
  auto reply = [](Fix& f) { f.result = MsgQueue::reply(std::move(f.msg)); };
  auto after_reply = [](Fix& f, const std::string& where) {
    expect_sound(f.msg.buffer, where);
    // The child's second call, answered without a fault.
    auto m = f.ours.receive(secs(5));
    if (m && m->kind == Kind::Request) {
      test::fill(m->buffer.data(), 2);
      EXPECT_TRUE(MsgQueue::reply(std::move(*m))) << where;
    } else {
      EXPECT_FALSE(f.result) << where << ": the reply succeeded, then the channel failed";
    }
  };
  // An untrusted caller gets an answer above copy_threshold in a sealed replacement memfd.
  ops.push_back({"reply(replacement for an untrusted caller)",
                 trust(Trust::Untrusted, Trust::Cooperative), true, take_request, reply,
                 after_reply});
  // A sealed request cannot take the answer in place: it goes back in a replacement memfd.
  ops.push_back({"reply(replacement of a sealed request)",
                 trust(Trust::Cooperative, Trust::Untrusted), true, take_request, reply,
                 after_reply});

  // redirect: the doorbell page travels on the control socket (P4).
  ops.push_back({"redirect",
                 {},
                 false,
                 [](Fix& f) {
                   auto q = MsgQueue::create();
                   ASSERT_TRUE(q);
                   f.queue = std::move(*q);
                 },
                 [](Fix& f) { f.result = f.ours.redirect(*f.queue, 4); },
                 [](Fix& f, const std::string& where) {
                   if (!f.result) {  // not redirected: calls work as before
                     expect_usable_or_closed(f.ours, true, where);
                     return;
                   }
                   auto b = f.ours.buffer(kBig);
                   ASSERT_TRUE(b) << where;
                   test::fill(b->data(), 1);
                   ASSERT_TRUE(f.ours.send_request(std::move(*b))) << where;
                   for (;;) {
                     auto m = f.queue->wait(secs(5));
                     ASSERT_TRUE(m) << where << ": no reply on the queue: " << m.error().message();
                     if (m->kind != Kind::Reply) continue;
                     EXPECT_TRUE(test::check(m->buffer.data(), 2)) << where;
                     break;
                   }
                 }});

  // send_over / receive_from, within this process.
  ops.push_back({"send_over + receive_from",
                 {},
                 false,
                 [](Fix& f) {
                   auto s = os::seqpacket_pair();
                   ASSERT_TRUE(s);
                   f.s0 = std::move(s->first);
                   f.s1 = std::move(s->second);
                 },
                 [](Fix& f) {
                   f.result = f.ours.send_over(f.s0.get());
                   if (!f.result) return;
                   auto r = Channel::receive_from(f.s1.get(), secs(2));
                   f.result = r ? Status{} : Status{fail(r.error())};
                   if (r) f.moved = std::move(*r);
                 },
                 [](Fix& f, const std::string& where) {
                   if (f.ours.valid()) {  // not sent: still ours
                     expect_usable_or_closed(f.ours, !f.result, where);
                     return;
                   }
                   if (!f.moved.valid()) {  // sent, not received: still on the socket?
                     auto r = Channel::receive_from(f.s1.get(), Deadline::after(100ms));
                     if (!r) {  // lost with a clear error: the peer sees the channel end
                       ASSERT_FALSE(f.result) << where << ": received, then lost";
                       EXPECT_FALSE(f.result.error().message().empty()) << where;
                       return;
                     }
                     f.moved = std::move(*r);
                   }
                   expect_usable_or_closed(f.moved, !f.result, where);
                 }});
  return ops;
}

constexpr Fault kFaults[] = {Fault::MemfdCreate, Fault::Ftruncate, Fault::Mmap,     Fault::SendMsg,
                             Fault::RecvMsg,     Fault::FutexWait, Fault::FutexWake};

struct Counts {
  std::size_t fds, maps;
  bool operator==(const Counts&) const = default;
};
Counts counts() { return {os::open_fd_count(), os::mapping_count("memfd:mbmq-")}; }
// The counts once they equal `want`, or after 2 s (the watcher thread may drop the last
// reference to a closed end a moment later).
Counts settled(const Counts& want) {
  Counts c = counts();
  for (int i = 0; i < 2000 && !(c == want); ++i) {
    std::this_thread::sleep_for(1ms);
    c = counts();
  }
  return c;
}

// One step of the walk: `op` with `fault` failing at its k-th occurrence. Returns whether the
// operation reached it (the walk stops at the first k it does not reach).
bool step(const Op& op, Fault fault, std::uint32_t k, Probe& probe, std::string* outcome) {
  const std::string where = std::string(op.name) + ", " + os::fault_name(fault) +
                            " failing at call " + std::to_string(k + 1);
  SCOPED_TRACE(where);
  const Counts before = counts();
  bool reached = false;
  {
    Fix f;
    {
      auto ends = Channel::pair(op.opt);
      if (!ends) {
        ADD_FAILURE() << ends.error().message();
        return false;
      }
      f.ours = std::move(op.peer_calls ? ends->second : ends->first);
      Channel& theirs = op.peer_calls ? ends->first : ends->second;
      f.child = test::spawn(
          [&] {
            f.ours = Channel();
            return op.peer_calls ? call_twice(theirs) : serve(theirs);
          },
          40);
    }  // our copy of the child's end is closed here
    if (f.child <= 0) {
      ADD_FAILURE() << "fork failed";
      return false;
    }
    if (op.prepare) op.prepare(f);
    if (!::testing::Test::HasFatalFailure()) {
      {
        Disarm disarm;
        os::arm_failure(fault, k, 1, 0);
        op.run(f);
        reached = probe.reached(fault, k);
      }
      probe.drain();
      *outcome = f.result ? "ok" : f.result.error().message();
      op.after(f, where);
    }
    f.ours = Channel();
    f.moved = Channel();
    f.queue.reset();
    const int rc = test::join(f.child);
    EXPECT_TRUE(rc == 0 || (rc == 2 && !f.result)) << "the peer exited with " << rc;
  }
  const Counts now = settled(before);
  EXPECT_EQ(now.fds, before.fds) << "fds leaked";
  EXPECT_EQ(now.maps, before.maps) << "mappings of mbmq memfds leaked";
  return reached;
}

TEST(ErrorWalk, EveryOperationSurvivesEachOfItsSystemCallsFailingAtEachOccurrence) {
  // Bug 4 and the error paths of e39bc80: see the file comment for the invariants.
  Watchdog dog("the error-path walk", 270s);
  Probe probe;
  ASSERT_TRUE(probe.ok());
  {
    auto warm = Channel::pair();  // the watcher thread exists before any baseline
    ASSERT_TRUE(warm);
  }
  // MBMQ_WALK_OPS=text: only the operations whose name contains it (to reproduce one).
  const char* only = std::getenv("MBMQ_WALK_OPS");
  int steps = 0;
  for (const Op& op : operations()) {
    if (only != nullptr && std::strstr(op.name, only) == nullptr) continue;
    std::string line;
    for (Fault fault : kFaults) {
      std::uint32_t k = 0;
      std::string outcomes;
      for (;; ++k) {
        std::string outcome;
        const bool reached = step(op, fault, k, probe, &outcome);
        ++steps;
        if (::testing::Test::HasFatalFailure()) return;
        if (!reached) break;
        outcomes += (outcomes.empty() ? "" : "; ") + outcome;
        ASSERT_LT(k, 64u) << op.name << ": " << os::fault_name(fault) << " reached 64 times";
      }
      if (k > 0)
        line += "\n    " + std::string(os::fault_name(fault)) + " x" + std::to_string(k) + ": " +
                outcomes;
    }
    std::printf("walk: %s%s\n", op.name, line.empty() ? ": no faultable call" : line.c_str());
  }
  std::printf("walk: %d steps\n", steps);
}

// ---- Bug 4 on its own ---------------------------------------------------------------------------

TEST(ErrorWalk, AFailedSealLeavesTheBufferValidAndUsableOrInvalidNeverOverUnmappedMemory) {
  // Bug 4: sealing an extent for an untrusted receiver (P3c) unmaps it first; when the mapping
  // after the seal failed, the buffer stayed valid over the unmapped range (a use after unmap).
  // Now it is mapped again (copy-on-write, sealed) or, if that fails too, given up.
  Watchdog dog("the seal failures", 60s);
  for (const std::uint32_t times : {1u, 2u, 0u}) {  // the first mmap(s) after the unmap fail
    SCOPED_TRACE("mmap failing " + std::to_string(times) + " time(s)");
    auto ends = Channel::pair(trust(Trust::Cooperative, Trust::Untrusted));
    ASSERT_TRUE(ends);
    auto& [client, server] = *ends;
    const pid_t child = test::spawn(
        [&] {
          client = Channel();
          return serve(server);
        },
        40);
    ASSERT_GT(child, 0);
    server = Channel();
    auto b = client.buffer(kBig);
    ASSERT_TRUE(b);
    test::fill(b->data(), 1);
    Status r;
    {
      Disarm disarm;
      os::arm_failure(Fault::Mmap, 0, times, 0);
      r = client.call(*b, secs(3));
    }
    ASSERT_FALSE(r) << "the seal's mapping was to fail";
    EXPECT_EQ(r.error().code, Errc::System) << r.error().message();
    if (b->valid()) {
      ASSERT_TRUE(mapped_rw(b->data().data(), b->capacity()))
          << "a valid buffer over unmapped memory";
      EXPECT_TRUE(test::check(b->data(), 1)) << "the bytes written before the call are gone";
      test::fill(b->data(), 1);  // writable
      auto again = client.call(*b, secs(5));
      ASSERT_TRUE(again) << "the buffer left valid is not usable: " << again.error().message();
      EXPECT_TRUE(test::check(b->data(), 2));
    }
    std::printf("seal: mmap failing %u time(s): %s, buffer %s\n", times,
                r.error().message().c_str(), b->valid() ? "valid and usable" : "given up");
    auto fresh = client.buffer(kBig);
    ASSERT_TRUE(fresh);
    test::fill(fresh->data(), 1);
    EXPECT_TRUE(client.call(*fresh, secs(5)));
    client = Channel();
    EXPECT_EQ(test::join(child), 0);
  }
}

// ---- Bug 14: the server loop ------------------------------------------------------------------

class ServerLoop : public ::testing::TestWithParam<bool> {};  // true: the request is sealed

TEST_P(ServerLoop, AReplyThatCannotBeMadeEndsThatCallWithNoReplyAndTheLoopServesTheNextClient) {
  // Bug 14: reply_and_wait() returned the System error of one caller's failed replacement answer
  // (memfd_create: EMFILE), so the documented loop `msg = MBMQ_TRY(q.reply_and_wait(...))`
  // ended, and every other client waited for a server that had stopped.
  Watchdog dog("the server loop", 60s);
  const bool sealed_request = GetParam();
  // Either the caller is untrusted (its answer above copy_threshold must travel sealed) or the
  // server is (the caller sealed its request, which cannot take the answer in place): either way
  // the answer goes back in a replacement memfd (P7b).
  const ChannelOptions opt = sealed_request ? trust(Trust::Cooperative, Trust::Untrusted)
                                            : trust(Trust::Untrusted, Trust::Cooperative);
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  auto p1 = Channel::pair(opt);
  auto p2 = Channel::pair(opt);
  ASSERT_TRUE(p1 && p2);
  Channel& c1 = p1->first;
  Channel& c2 = p2->first;
  ASSERT_TRUE(q->adopt(std::move(p1->second), 1));
  ASSERT_TRUE(q->adopt(std::move(p2->second), 2));
  // Both buffers first: their memfds must not meet the armed fault.
  auto b1 = c1.buffer(kBig);
  auto b2 = c2.buffer(kBig);
  ASSERT_TRUE(b1 && b2);
  test::fill(b1->data(), 1);
  test::fill(b2->data(), 1);
  std::atomic<int> served{0};
  Status loop_status;
  std::thread server([&] {
    // The loop of mbmq/msg_queue.h, as an application writes it.
    auto loop = [&]() -> Status {
      Message msg = MBMQ_TRY(q->wait(secs(10)));
      for (int closed = 0;;) {
        if (msg.kind == Kind::Request) {
          test::fill(msg.buffer.data(), 2);
          ++served;
        } else if (msg.kind == Kind::PeerClosed && ++closed == 2) {
          return {};
        }
        msg = MBMQ_TRY(q->reply_and_wait(std::move(msg), secs(10)));
      }
    };
    loop_status = loop();
  });
  struct Join {  // also after a failed ASSERT: closing the clients ends the loop
    std::thread& t;
    Channel& a;
    Channel& b;
    ~Join() {
      a.close();
      b.close();
      if (t.joinable()) t.join();
    }
  } join{server, c1, c2};
  // A sealed request: one round trip first. A sealed call prepares the fresh pages of the next
  // one while it waits (BufferTable::wants_spare), with a memfd_create of its own; from then on it
  // has its spare. (An untrusted caller's request is not sealed: no spare.)
  if (sealed_request) {
    ASSERT_TRUE(c1.call(*b1, secs(5)));
    ASSERT_TRUE(b1->resize(kBig));
    test::fill(b1->data(), 1);
  }
  Status r1;
  {
    Disarm disarm;
    // The next memfd_create in this process is the server's replacement answer to c1.
    os::arm_failure(Fault::MemfdCreate, 0, 1, EMFILE);
    r1 = c1.call(*b1, secs(5));
  }
  ASSERT_FALSE(r1) << "the answer could not be made";
  EXPECT_EQ(r1.error().code, Errc::NoReply) << r1.error().message();
  auto r2 = c2.call(*b2, secs(5));
  ASSERT_TRUE(r2) << "the server loop stopped after one caller's failed reply: "
                  << r2.error().message();
  EXPECT_TRUE(test::check(b2->data(), 2));
  // The first caller's channel goes on too.
  ASSERT_TRUE(b1->valid());
  test::fill(b1->data(), 1);
  auto again = c1.call(*b1, secs(5));
  ASSERT_TRUE(again) << again.error().message();
  EXPECT_TRUE(test::check(b1->data(), 2));
  c1.close();
  c2.close();
  server.join();
  EXPECT_TRUE(loop_status) << "the loop ended: " << loop_status.error().message();
  EXPECT_EQ(served.load(), sealed_request ? 4 : 3);  // c1 (NoReply), c2, c1 again; the warm-up
}

std::string loop_name(const ::testing::TestParamInfo<bool>& p) {
  return p.param ? "SealedRequest" : "UntrustedCaller";
}
INSTANTIATE_TEST_SUITE_P(ErrorWalk, ServerLoop, ::testing::Values(false, true), loop_name);

}  // namespace
}  // namespace mbmq
