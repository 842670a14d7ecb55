// tools/mbmq/fanout.h: `mbmq bench --fanout N,...` (issue #15): one publisher process, N
// subscriber processes, every message to every subscriber; the latency from the start of a
// publish to its LAST receive, and what publishing costs the publisher.
//
// A cell = one mechanism, one subscriber count, one payload size. The parent forks the
// subscribers (subscriber i pinned to CPU (i + 1) % cpus) and the publisher (CPU 0) and only
// watches them; all share a FanoutControl in a memfd (an exec'd side gets it as its fd 3).
// Message k carries k in its first 8 bytes, its send time in the next 8 and words derived from
// k in the rest (write_stream_payload's words): the publisher writes every byte of every message.
//
//   (1) Joining: the publisher sends probe messages (first word kFanoutProbe), one a millisecond,
//       until every subscriber has seen one: a subscription that takes effect late (ZeroMQ's
//       "slow joiner", iceoryx's discovery through RouDi) loses probes, never measured messages.
//   (2) Paced: message k starts (its send time, CLOCK_MONOTONIC) only when every subscriber has
//       acknowledged message k-1 and a further gap has passed, so each message meets empty queues
//       and sleeping subscribers: the latency of one message, not of a queue.
//   (3) A subscriber stamps its receive time as its receive call returns, then checks the message
//       (the sequence number, the send time, sampled words: see fanout.cc), then acknowledges.
//   (4) After the last message the publisher sends the end message (first word kStreamEnd) and
//       waits until every subscriber has exited (a library may drop what is in flight when the
//       sender closes), then exits. A side that fails stores Phase::Failed; every wait gives up.
//   (5) The parent computes, per measured message, max over subscribers (receive - send).
// Usage: FanoutResult r = run_fanout_cell(mech, 8, 64, opt);
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "bench.h"
#include "mbmq/result.h"
#include "stream.h"

namespace mbmq::tool {

constexpr std::uint64_t kFanoutProbe = kStreamEnd - 1;  // first word of a probe message (1)

enum class FanoutPhase : std::uint32_t { Joining = 0, Running = 1, Done = 2, Failed = 3 };

// In a memfd shared by the parent and every side; the arrays follow it (see send_ns/recv_ns).
struct FanoutControl {
  // Written by the parent before the forks; read-only afterwards.
  std::uint64_t size = 0, subscribers = 0;
  std::uint64_t warmup = 0, messages = 0;  // messages 0..warmup-1 are not measured
  std::int64_t gap_ns = 0;                 // (2) the pause after the last acknowledgement
  std::uint64_t total_bytes = 0;           // of the memfd: this block and its arrays
  std::uint64_t cell_id = 0;               // unique per cell in this run (iceoryx's service)
  int control_fd = -1;                     // the memfd, in the parent and its forks
  bool corrupt = false;                    // test hook: subscriber 0 sees a payload byte flipped
  bool traced = false;  // the publisher waits for `go` before its first message (strace)
  // Relaxed everywhere: it only tells waits when to give up; the stats travel through the
  // exit counters below.
  alignas(128) std::atomic<std::uint32_t> phase{0};
  // (1) Subscribers that have seen a probe. Release by each; acquire by the publisher (nothing
  // is published through it but the fact).
  alignas(128) std::atomic<std::uint32_t> joined{0};
  // (2) Acknowledgements of messages 0.., all subscribers: fetch_add release after writing the
  // receive time; the publisher's acquire load pairs with it (the parent reads the times only
  // after the sides exited).
  alignas(128) std::atomic<std::uint64_t> acks{0};
  // Traced runs: the publisher stores 1 when joined and waits; the parent stores 2 once strace
  // is attached. Relaxed: a signal, no data.
  alignas(128) std::atomic<std::uint32_t> go{0};
  std::int32_t publisher_pid = 0;  // the process to trace: written before go = 1
  // (4) Store/fetch_add release after writing its stats or error; the parent and the publisher
  // load-acquire.
  alignas(128) std::atomic<std::uint32_t> publisher_exited{0};
  alignas(128) std::atomic<std::uint32_t> subscribers_exited{0};
  std::atomic<std::uint32_t> error_claimed{0};  // the first side to fail writes `error`
  char error[240] = {};
  // The publisher's counters over the measured messages.
  std::uint64_t measured = 0, syscalls = 0;
  std::int64_t cpu_ns = 0;  // the publisher process, all threads, less the pacing waits
  std::uint64_t total() const noexcept { return warmup + messages; }
};
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

// The arrays after the block: send_ns[k] (the publisher), recv_ns[s][k] (subscriber s).
std::size_t fanout_control_bytes(std::uint64_t subscribers, std::uint64_t total);
std::int64_t* send_times(FanoutControl& ctl);
std::int64_t* recv_times(FanoutControl& ctl, std::size_t subscriber);

// The publisher's pacing and bookkeeping. A mechanism's loop:
//   while (p.next()) { get a buffer of p.size() bytes; p.fill(buffer); publish it; p.sent(); }
//   return p.status();
class FanoutPublisher {
 public:
  explicit FanoutPublisher(FanoutControl& ctl) : ctl_(ctl) {}
  std::size_t size() const noexcept { return ctl_.size; }
  std::size_t subscribers() const noexcept { return ctl_.subscribers; }
  const FanoutControl& control() const noexcept { return ctl_; }
  bool healthy() const noexcept;
  // The current message is a probe (1): a mechanism may drop it (e.g. no chunk free).
  bool probing() const noexcept { return state_ == State::Probe; }
  // Waits as (1), (2) say and starts the next message (its send time is now); false when the
  // run is over (4) or failed: then return status().
  bool next();
  // Writes the current message (size() bytes) at p.
  void fill(std::byte* p);
  // The publish call of the current message has returned.
  void sent();
  // What the loop ends with: an error if the publisher gave up (a subscriber stayed silent).
  Status status() const { return status_; }
  void finish(const Status& s);  // records the stats and `s`; sets publisher_exited
  void external() noexcept { external_ = true; }  // an exec'd program on the block does it

 private:
  enum class State : std::uint8_t { Start, Probe, Message, End, Over };
  bool wait_acks(std::uint64_t n);
  void give_up(const char* why);
  FanoutControl& ctl_;
  State state_ = State::Start;
  std::uint64_t k_ = 0;  // the current message
  std::int64_t t0_ = 0, probe_deadline_ = 0;
  std::uint64_t sys0_ = 0;
  std::int64_t cpu_start_ = 0, pace_ns_ = 0;
  Status status_;
  bool external_ = false;
};

// A subscriber's checks and bookkeeping. A mechanism's loop:
//   for (;;) { take a message (sleeping); switch (s.received(p, n)) { End: return {};
//   Fail: return s.failure(); Ok: release it } }
class FanoutSubscriber {
 public:
  enum class Verdict : std::uint8_t { Ok, End, Fail };
  FanoutSubscriber(FanoutControl& ctl, std::size_t index) : ctl_(ctl), index_(index) {}
  std::size_t size() const noexcept { return ctl_.size; }
  std::size_t index() const noexcept { return index_; }
  const FanoutControl& control() const noexcept { return ctl_; }
  bool healthy() const noexcept;
  // (3) Call as soon as the receive call returns, with the message in place (it may be
  // read-only memory).
  Verdict received(const std::byte* p, std::size_t n);
  // (1) A probe arrived: for a mechanism that reads the first word itself and must not hand a
  // probe to received() (raw-futex: the slot may be rewritten meanwhile).
  void probe();
  void fail(const char* what);
  Status failure() const;
  void finish(const Status& s);  // records `s`; counts this subscriber as exited
  void external() noexcept { external_ = true; }

 private:
  FanoutControl& ctl_;
  const std::size_t index_;
  std::uint64_t next_ = 0;
  bool joined_ = false, external_ = false;
};

// setup() runs in the parent before the forks; publish() in the publisher, subscribe() in each
// subscriber (each first drops what belongs to the others); after_fork() in the parent once all
// are forked (drop its copies, so that a side's exit is seen); teardown() in the parent after
// all have exited.
struct FanoutMechanism {
  std::string name;
  std::string unavailable;                 // non-empty: cannot run here, and why
  std::function<std::string()> available;  // optional, before setup: non-empty says why not
  std::function<Status(std::size_t size, std::size_t subscribers)> setup;
  std::function<Status(FanoutPublisher& p)> publish;
  std::function<Status(FanoutSubscriber& s)> subscribe;
  std::function<void()> after_fork;
  std::function<void()> teardown;
  // Copies of the payload per message by design, for n subscribers (memcpy or kernel copies;
  // the publisher's own writing of the message is not one).
  std::function<std::size_t(std::size_t n)> copies;
  // Every system call of its publisher goes through mbmq's os/ layer (counted per thread, around
  // the publish calls); else strace counts the publisher process, when it can.
  bool os_counted = true;
  std::string note;  // shown under the table: how it is used
};

std::vector<FanoutMechanism> fanout_mechanisms();  // in the table's order
FanoutMechanism iceoryx_fanout_mechanism();        // mech_iceoryx.cc
// mech_topic.cc: mbmq-topic and mbmq-topic-sleep where mbmq/topic.h exists; else none.
std::vector<FanoutMechanism> topic_fanout_mechanisms();
// `mbmq __iceoryx-fanout publisher|subscriber INDEX`: that side, exec'd, on the block at fd 3.
int iceoryx_fanout_main(const std::vector<std::string>& args);

struct FanoutResult {
  std::string mechanism;
  std::size_t subscribers = 0, size = 0, messages = 0, copies = 0;
  std::vector<std::int64_t> lat;  // ns, publish to last receive, per measured message, sorted
  std::optional<double> publisher_syscalls_per_msg;
  std::string syscalls_method;  // "os-layer counters", "strace" or ""
  double publisher_cpu_ns_per_msg = 0;
  std::string error;
};

struct FanoutOptions {
  std::vector<std::size_t> subscribers, sizes;
  std::size_t messages = 0;  // 0: by size (fanout.cc)
  std::int64_t gap_ns = 200'000;
  bool pin = true, strace = true;
};

FanoutResult run_fanout_cell(FanoutMechanism& m, std::size_t subscribers, std::size_t size,
                             const FanoutOptions& opt);
// Publisher system calls per message by strace -f -c attached to the publisher (two runs of
// different lengths, the difference; the pacing's clock_nanosleep and clock_gettime left out).
std::optional<double> strace_publisher(FanoutMechanism& m, std::size_t subscribers,
                                       std::size_t size, const FanoutOptions& opt);
std::size_t default_fanout_messages(std::size_t size);

// Reporting (fanout_report.cc).
void print_fanout_table(const std::vector<FanoutResult>& rs,
                        const std::vector<FanoutMechanism>& mechs, const FanoutOptions& opt);
std::string fanout_json(const std::vector<FanoutResult>& rs, const FanoutOptions& opt);

}  // namespace mbmq::tool
