// tools/mbmq/stream.h: `mbmq bench --stream` (issue #14): one-way messages from a producer process
// to a consumer process, every message verified, throughput measured on the consumer's side.
//
// A cell = one mechanism at one payload size. The parent forks a producer (pinned to CPU 0) and a
// consumer (CPU 1) and only watches them; the two share a StreamControl in a memfd. Message `seq`
// (0, 1, 2, ...) carries seq in its first 8 bytes and words derived from seq in the rest (for
// 8 bytes the payload IS seq). The consumer reads every byte of every message and checks that
// the sequence numbers are consecutive (no loss, duplication or reordering) and that every word
// is the one seq implies; a mismatch fails the cell with the message's number and what was wrong.
//
//   (1) The consumer takes messages for a warm-up time, then times kStreamWindows windows
//       (messages verified per second in each), snapshotting its counters around them.
//   (2) It stores Phase::Measuring at the first window and Phase::Done after the last; the
//       producer snapshots its own counters when it sees each.
//   (3) Seeing Done, the producer sends the end-of-stream message (first word kStreamEnd, same
//       size) and stops; the consumer keeps verifying until it arrives, then stops.
//   (4) Each side writes its stats into the control block and sets its `exited` flag; the parent
//       waits for both (a side that fails stores Phase::Failed, so the other stops; one that
//       hangs is killed after a grace time and the cell fails saying so).
// Usage: StreamResult r = run_stream_cell(mech, 4096, opt);
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "bench.h"
#include "mbmq/result.h"

namespace mbmq::tool {

constexpr std::size_t kStreamWindows = 5;
constexpr std::uint64_t kStreamEnd = ~std::uint64_t{0};  // first word of the end-of-stream message

// Message seq's payload (n >= 8 bytes): word 0 is seq, word i the value seq and i imply, the tail
// the low bytes of the next word. Writes every byte. The end marker is the same with seq =
// kStreamEnd.
void write_stream_payload(std::byte* p, std::size_t n, std::uint64_t seq);
// Word i >= 1 of message seq's payload is stream_base(seq) + i * kStreamStep (sampled checks).
constexpr std::uint64_t kStreamStep = 0x9E3779B97F4A7C15ull;
std::uint64_t stream_base(std::uint64_t seq);

enum class Phase : std::uint32_t { Warmup = 0, Measuring = 1, Done = 2, Failed = 3 };

// One side's counters over the measured period, and its error (text; empty: none).
struct StreamSideStats {
  std::uint64_t msgs = 0, syscalls = 0, allocs = 0, retries = 0;
  std::int64_t cpu_ns = 0;
  char error[240] = {};
};

// In a memfd shared by the parent and both sides (and an exec'd side, as its fd 3).
struct StreamControl {
  // Written by the parent before the forks; read-only afterwards.
  std::uint64_t size = 0;
  std::int64_t warmup_ns = 0, window_ns = 0;
  bool corrupt = false;       // test hook: the consumer flips a payload byte of every message
  bool skip_seq = false;      // test hook: the producer skips one sequence number
  int control_fd = -1;        // the memfd holding this block, in the parent and its forks
  std::uint64_t cell_id = 0;  // unique per cell in this run (names, e.g. iceoryx's service)
  // (2) The consumer stores Measuring and Done; either side Failed. Relaxed everywhere: it only
  // tells the producer when to snapshot and stop; no data is published through it (the stats
  // travel through the `exited` flags below).
  alignas(128) std::atomic<std::uint32_t> phase{0};
  // (4) Each side: store-release after writing its stats; the parent: load-acquire, then reads.
  alignas(128) std::atomic<std::uint32_t> producer_exited{0};
  StreamSideStats producer;
  alignas(128) std::atomic<std::uint32_t> consumer_exited{0};
  StreamSideStats consumer;
  std::array<std::uint64_t, kStreamWindows> window_msgs{};
  std::array<std::int64_t, kStreamWindows> window_elapsed_ns{};
  std::uint64_t verified = 0;  // every message the consumer verified, warm-up and drain included
};
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);

// The producer's bookkeeping. A mechanism's loop: for (;;) { get room; const bool more =
// p.next(room); send it; if (!more) return {}; }
class StreamProducer {
 public:
  explicit StreamProducer(StreamControl& ctl) : ctl_(ctl), size_(ctl.size) {}
  std::size_t size() const noexcept { return size_; }
  const StreamControl& control() const noexcept { return ctl_; }
  // True while no side has failed: for loops that wait (a full ring, no buffer) to give up on.
  bool healthy() const noexcept;
  // Writes the next message into p (size() bytes): the next sequence number's payload, true; or,
  // once running() is false, the end-of-stream message, false (send it, then stop).
  bool next(std::byte* p);
  // Waits until the consumer has ended (seen the end message, or failed), 10 s at most: for a
  // mechanism that may drop what is in flight when the sender closes (ZeroMQ).
  void await_consumer() const;
  // A retry of the mechanism (no room, no buffer): reported per message where counted.
  void retry() noexcept { ++retries_; }
  // (4) Records `s` (an error stops the consumer too) and the counters; sets producer_exited.
  void finish(const Status& s);
  // The stats were written by an exec'd program on the same block.
  void external() noexcept { external_ = true; }

 private:
  // (2) False once the consumer has its windows or a side failed. Snapshots the counters as the
  // measured period begins and ends. One relaxed load of a line written twice per cell.
  bool running();
  void snapshot(StreamSideStats& into) const;
  StreamControl& ctl_;
  const std::size_t size_;
  std::uint64_t seq_ = 0, retries_ = 0;
  bool started_ = false, stopped_ = false, external_ = false;
  std::uint64_t seq0_ = 0;
  StreamSideStats at_start_, at_end_;
};

// The consumer's bookkeeping and verification. A mechanism's loop:
//   for (;;) { take a message; switch (c.check(p, n)) { End: return {}; Fail: return error;
//   Ok: release it } }
class StreamConsumer {
 public:
  enum class Verdict : std::uint8_t { Ok, End, Fail };
  explicit StreamConsumer(StreamControl& ctl);
  std::size_t size() const noexcept { return size_; }
  const StreamControl& control() const noexcept { return ctl_; }
  bool healthy() const noexcept;
  // Reads all n bytes at p (in place; the corruption hook writes one). Ok: the expected message,
  // counted (and the windows advanced); End: the end-of-stream message; Fail: the error is
  // recorded (what was expected, what came) and the phase is Failed.
  Verdict check(std::byte* p, std::size_t n);
  // Records an error of the mechanism (a failed receive) unless one is recorded already.
  void fail(const char* what);
  // (4) Records `s` and the counters; sets consumer_exited.
  void finish(const Status& s);
  void external() noexcept { external_ = true; }

 private:
  void tick();
  StreamControl& ctl_;
  const std::size_t size_;
  const std::uint64_t clock_every_;  // look at the clock every this many messages
  std::uint64_t seq_ = 0;
  std::size_t window_ = 0;  // windows completed
  std::int64_t next_ns_ = 0, window_start_ns_ = 0;
  std::uint64_t window_seq0_ = 0, measured_seq0_ = 0;
  bool external_ = false;
  StreamSideStats at_start_, at_end_;
};

// setup() runs in the parent before the forks; produce() in the producer child, consume() in the
// consumer child (each first drops what belongs to the other side); after_fork() in the parent
// once both are forked (drop its copies of fds and ends, so that a side's exit is seen); teardown()
// in the parent after both have exited (names, files).
struct StreamMechanism {
  std::string name;
  std::string unavailable;                 // non-empty: cannot run here, and why
  std::function<std::string()> available;  // optional, before setup: non-empty says why not
  std::function<Status(std::size_t size)> setup;
  std::function<Status(StreamProducer& p)> produce;
  std::function<Status(StreamConsumer& c)> consume;
  std::function<void()> after_fork;
  std::function<void()> teardown;
  // Its system calls all go through mbmq's os/ layer (counted per thread); else null.
  bool os_counted = true;
  bool counts_retries = false;  // retries_per_msg is reported (mbmq-stream)
  std::string note;             // shown under the table (queue depths, limits)
};

std::vector<StreamMechanism> stream_mechanisms();  // in the table's order
StreamMechanism boost_mq_stream_mechanism();       // mech_boost.cc
StreamMechanism iceoryx_stream_mechanism();        // mech_iceoryx.cc
// `mbmq __iceoryx-stream producer|consumer`: that side, exec'd, on the StreamControl at fd 3.
int iceoryx_stream_main(const std::vector<std::string>& args);

struct StreamResult {
  std::string mechanism;
  std::size_t size = 0;
  std::vector<double> window_msgs_per_s;  // one per window, in order (every round's)
  std::vector<double> round_msgs_per_s;   // each round's median window, in order
  std::uint64_t verified = 0;
  std::optional<double> syscalls_per_msg, allocs_per_msg, retries_per_msg;
  double producer_syscalls = 0, consumer_syscalls = 0;  // per message, when os_counted
  double cpu_ns_per_msg = 0;                            // both processes
  std::string error;
  double median() const;  // msgs/s: the median window
  double min() const;
  double max() const;
  double mb_per_s() const { return median() * static_cast<double>(size) / 1e6; }
};

StreamResult run_stream_cell(StreamMechanism& m, std::size_t size, const Options& opt);
// One mechanism and size over several rounds (in order): the windows of every round, each
// round's median, per-message counters averaged over the rounds; the first error, if any.
StreamResult merge_rounds(const std::vector<StreamResult>& rounds);

// Reporting (stream_report.cc): the table with the ratios mbmq-stream / raw-spsc and / uds.
void print_stream_table(const std::vector<StreamResult>& rs,
                        const std::vector<StreamMechanism>& mechs, const Options& opt);
std::string stream_json(const std::vector<StreamResult>& rs, const Options& opt);

}  // namespace mbmq::tool
