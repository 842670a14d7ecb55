// tools/mbmq/stream.cc: the stream's payload, the producer's and consumer's bookkeeping and
// verification, and running one stream cell (see stream.h for the protocol's steps).
#include "stream.h"

#include <algorithm>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <limits>
#include <new>

#include "alloc_count.h"
#include "mbmq/deadline.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/process.h"
#include "os/syscall_count.h"
#include "os/unix_socket.h"

namespace mbmq::tool {

// ---- the payload -------------------------------------------------------------------------------
namespace {
// Word i of message seq is base(seq) + i * kStep: every message differs from every other in
// every word, so a stale slot, a torn write or another message's bytes cannot pass for it.
constexpr std::uint64_t kStep = kStreamStep;
std::uint64_t base_of(std::uint64_t seq) {  // splitmix64's finalizer
  std::uint64_t z = seq + kStep;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The OR of (word ^ expected word) over the payload after word 0: zero iff every byte is right.
std::uint64_t payload_diff(const std::byte* p, std::size_t n, std::uint64_t seq) {
  const std::uint64_t base = base_of(seq);
  const std::size_t words = n / 8;
  std::uint64_t diff = 0;
  for (std::size_t i = 1; i < words; ++i) {
    std::uint64_t w;
    std::memcpy(&w, p + i * 8, 8);
    diff |= w ^ (base + i * kStep);
  }
  if (n % 8 != 0) {
    std::uint64_t want = base + words * kStep, got = 0;
    std::memcpy(&got, p + words * 8, n % 8);
    want &= (std::uint64_t{1} << (8 * (n % 8))) - 1;  // the low bytes (little-endian)
    diff |= got ^ want;
  }
  return diff;
}

// The first byte of p that differs from message seq's payload (after a failed check).
std::size_t first_wrong_byte(const std::byte* p, std::size_t n, std::uint64_t seq) {
  std::vector<std::byte> want(n);
  write_stream_payload(want.data(), n, seq);
  for (std::size_t i = 0; i < n; ++i)
    if (p[i] != want[i]) return i;
  return n;
}

void set_error(StreamSideStats& s, const char* text) {
  if (s.error[0] == '\0') (void)std::snprintf(s.error, sizeof s.error, "%s", text);
}

void read_counters(StreamSideStats& s) {
  s.cpu_ns = os::process_cpu_ns();
  s.allocs = allocs_this_thread();
  // Without a spinning wait's yields (os::yields_this_thread()): those are made only while idle.
  s.syscalls = os::work_syscalls_this_thread();
}

// Stores `to` unless a side has failed already (Failed is final).
void advance_phase(StreamControl& ctl, Phase to) {
  std::uint32_t cur = ctl.phase.load(std::memory_order_relaxed);
  while (cur != static_cast<std::uint32_t>(Phase::Failed) &&
         !ctl.phase.compare_exchange_weak(cur, static_cast<std::uint32_t>(to),
                                          std::memory_order_relaxed)) {
  }
}

Phase phase_of(const StreamControl& ctl) {
  // Relaxed: see StreamControl::phase.
  return static_cast<Phase>(ctl.phase.load(std::memory_order_relaxed));
}

// The counters of the measured period into `out`: end - start.
void store_deltas(StreamSideStats& out, const StreamSideStats& start, const StreamSideStats& end) {
  out.syscalls = end.syscalls - start.syscalls;
  out.allocs = end.allocs - start.allocs;
  out.cpu_ns = end.cpu_ns - start.cpu_ns;
  out.retries = end.retries - start.retries;
  out.msgs = end.msgs - start.msgs;
}
}  // namespace

void write_stream_payload(std::byte* p, std::size_t n, std::uint64_t seq) {
  std::memcpy(p, &seq, 8);
  const std::uint64_t base = base_of(seq);
  const std::size_t words = n / 8;
  for (std::size_t i = 1; i < words; ++i) {
    const std::uint64_t w = base + i * kStep;
    std::memcpy(p + i * 8, &w, 8);
  }
  if (n % 8 != 0) {
    const std::uint64_t w = base + words * kStep;
    std::memcpy(p + words * 8, &w, n % 8);
  }
}

std::uint64_t stream_base(std::uint64_t seq) { return base_of(seq); }

// ---- the producer ------------------------------------------------------------------------------
bool StreamProducer::running() {
  const Phase ph = phase_of(ctl_);
  if (ph == Phase::Warmup) return true;
  if (!started_) {  // (2) the measured period begins (or ends at once if Done came first)
    started_ = true;
    snapshot(at_start_);
  }
  if (ph == Phase::Measuring) return true;
  if (!stopped_) {
    stopped_ = true;
    snapshot(at_end_);
  }
  return false;
}

bool StreamProducer::healthy() const noexcept { return phase_of(ctl_) != Phase::Failed; }

bool StreamProducer::next(std::byte* p) {
  if (!running()) {
    write_stream_payload(p, size_, kStreamEnd);
    return false;
  }
  if (ctl_.skip_seq && seq_ == 100) ++seq_;  // the test hook: a lost message
  write_stream_payload(p, size_, seq_++);
  return true;
}

void StreamProducer::await_consumer() const {
  // Acquire: pairs with the consumer's release in finish() (nothing is read after it, though).
  for (int i = 0; i < 10'000 && ctl_.consumer_exited.load(std::memory_order_acquire) == 0; ++i)
    os::sleep_ns(1'000'000);
}

void StreamProducer::snapshot(StreamSideStats& into) const {
  read_counters(into);
  into.retries = retries_;
  into.msgs = seq_;
}

void StreamProducer::finish(const Status& s) {
  StreamSideStats& out = ctl_.producer;
  if (!external_) {
    if (!started_) snapshot(at_start_), started_ = true;
    if (!stopped_) snapshot(at_end_), stopped_ = true;
    store_deltas(out, at_start_, at_end_);
  }
  if (!s) {
    set_error(out, ("producer: " + s.error().message()).c_str());
    ctl_.phase.store(static_cast<std::uint32_t>(Phase::Failed), std::memory_order_relaxed);
  }
  ctl_.producer_exited.store(1, std::memory_order_release);  // (4) pairs with the parent's acquire
}

// ---- the consumer ------------------------------------------------------------------------------
StreamConsumer::StreamConsumer(StreamControl& ctl)
    : ctl_(ctl),
      size_(ctl.size),
      // The clock costs ~25 ns: every 64 small messages, every message from 4 KiB on.
      clock_every_(ctl.size >= 4096 ? 1 : 64) {}

bool StreamConsumer::healthy() const noexcept { return phase_of(ctl_) != Phase::Failed; }

void StreamConsumer::fail(const char* what) {
  set_error(ctl_.consumer, what);
  ctl_.phase.store(static_cast<std::uint32_t>(Phase::Failed), std::memory_order_relaxed);
}

StreamConsumer::Verdict StreamConsumer::check(std::byte* p, std::size_t n) {
  char why[200];
  if (n != size_) {
    (void)std::snprintf(why, sizeof why,
                        "verification failed: message %" PRIu64 " has %zu bytes, not %zu", seq_, n,
                        size_);
    fail(why);
    return Verdict::Fail;
  }
  if (ctl_.corrupt) p[n / 2] ^= std::byte{0x40};  // what a broken transport would do
  std::uint64_t got;
  std::memcpy(&got, p, 8);
  const bool end = got == kStreamEnd;
  if (!end && got != seq_) {
    (void)std::snprintf(why, sizeof why,
                        "verification failed: message %" PRIu64 " carries sequence number %" PRIu64
                        " (lost, duplicated or reordered messages)",
                        seq_, got);
    fail(why);
    return Verdict::Fail;
  }
  if (payload_diff(p, n, got) != 0) {
    (void)std::snprintf(why, sizeof why,
                        "verification failed: message %" PRIu64
                        ": its payload differs from what its sequence number implies at byte %zu",
                        seq_, first_wrong_byte(p, n, got));
    fail(why);
    return Verdict::Fail;
  }
  if (end) {
    if (phase_of(ctl_) == Phase::Done) return Verdict::End;
    fail("verification failed: the end of the stream came before the consumer asked for it");
    return Verdict::Fail;
  }
  if (++seq_ % clock_every_ == 0 || seq_ == 1) tick();
  return Verdict::Ok;
}

// (1) The warm-up starts at the first message; then kStreamWindows windows of window_ns, each
// closed at the first look at the clock after its time (its count and length both exact).
void StreamConsumer::tick() {
  const std::int64_t now = monotonic_ns();
  if (next_ns_ == 0) {
    next_ns_ = now + ctl_.warmup_ns;
    return;
  }
  if (now < next_ns_) return;
  if (window_start_ns_ == 0) {  // the warm-up is over: the measured period begins
    at_start_.msgs = seq_;
    read_counters(at_start_);
    advance_phase(ctl_, Phase::Measuring);
  } else {
    ctl_.window_msgs[window_] = seq_ - window_seq0_;
    ctl_.window_elapsed_ns[window_] = now - window_start_ns_;
    if (++window_ == kStreamWindows) {
      read_counters(at_end_);
      at_end_.msgs = seq_;
      advance_phase(ctl_, Phase::Done);
      next_ns_ = std::numeric_limits<std::int64_t>::max();
      return;
    }
  }
  window_seq0_ = seq_;
  window_start_ns_ = now;
  next_ns_ = now + ctl_.window_ns;
}

void StreamConsumer::finish(const Status& s) {
  StreamSideStats& out = ctl_.consumer;
  if (!external_) {
    if (window_ == kStreamWindows) store_deltas(out, at_start_, at_end_);
    ctl_.verified = seq_;
  }
  if (!s) fail(("consumer: " + s.error().message()).c_str());
  ctl_.consumer_exited.store(1, std::memory_order_release);  // (4) pairs with the parent's acquire
}

// ---- a cell ------------------------------------------------------------------------------------
double StreamResult::median() const {
  if (window_msgs_per_s.empty()) return 0;
  std::vector<double> v = window_msgs_per_s;
  std::sort(v.begin(), v.end());
  // Even counts (--rounds 2: 10 windows) the mean of the two middle ones, as the ratios' median.
  const std::size_t h = v.size() / 2;
  return v.size() % 2 == 1 ? v[h] : (v[h - 1] + v[h]) / 2;
}
double StreamResult::min() const {
  return window_msgs_per_s.empty() ? 0 : *std::ranges::min_element(window_msgs_per_s);
}
double StreamResult::max() const {
  return window_msgs_per_s.empty() ? 0 : *std::ranges::max_element(window_msgs_per_s);
}

namespace {
// Forks one side, pinned; the child runs `run` on it, records the outcome and exits.
template <class Side, class Fn>
pid_t fork_side(StreamControl& ctl, int cpu, bool pin, const Fn& run, std::string& error) {
  return fork_pinned(
      cpu, pin,
      [&] {
        Side side(ctl);
        const Status s = run(side);
        side.finish(s);
      },
      error);
}
}  // namespace

StreamResult run_stream_cell(StreamMechanism& m, std::size_t size, const Options& opt) {
  StreamResult r;
  r.mechanism = m.name;
  r.size = size;
  if (!m.unavailable.empty()) {
    r.error = "unavailable: " + m.unavailable;
    return r;
  }
  if (m.available) {
    if (std::string why = m.available(); !why.empty()) {
      r.error = "unavailable: " + why;
      return r;
    }
  }
  auto fd = os::make_sealed_memfd("mbmq-stream-ctl", sizeof(StreamControl));
  if (!fd) return r.error = fd.error().message(), r;
  auto map = os::Mapping::map_shared(fd->get(), sizeof(StreamControl), os::Access::ReadWrite);
  if (!map) return r.error = map.error().message(), r;
  auto* ctl = new (map->data()) StreamControl{};
  ctl->size = size;
  const double budget_ns = opt.seconds_per_cell * 1e9;
  ctl->warmup_ns = static_cast<std::int64_t>(budget_ns * 0.2);
  ctl->window_ns = static_cast<std::int64_t>(budget_ns * 0.8 / kStreamWindows);
  ctl->corrupt = g_work.corrupt;
  ctl->skip_seq = g_work.skip_seq;
  ctl->control_fd = fd->get();
  static std::uint64_t cells = 0;
  ctl->cell_id = static_cast<std::uint64_t>(os::current_pid()) << 20 | cells++;
  if (auto s = m.setup(size); !s) return r.error = s.error().message(), r;

  // The consumer first (it may bind what the producer connects to); each holds the write end of
  // its own pipe until it exits, so the parent sees a side end even if it crashes.
  auto cpipe = os::make_pipe();
  auto ppipe = os::make_pipe();
  if (!cpipe || !ppipe) {
    m.teardown();
    return r.error = "pipe", r;
  }
  pid_t cpid = fork_side<StreamConsumer>(
      *ctl, 1, opt.pin,
      [&](StreamConsumer& c) {
        cpipe->first.reset();
        ppipe->first.reset();
        ppipe->second.reset();
        return m.consume(c);
      },
      r.error);
  pid_t ppid = cpid < 0 ? -1
                        : fork_side<StreamProducer>(
                              *ctl, 0, opt.pin,
                              [&](StreamProducer& p) {
                                cpipe->first.reset();
                                cpipe->second.reset();
                                ppipe->first.reset();
                                return m.produce(p);
                              },
                              r.error);
  cpipe->second.reset();
  ppipe->second.reset();
  if (m.after_fork) m.after_fork();

  // (4) The consumer ends when it has verified the end of the stream (or failed); a start-up
  // (iceoryx's connection) may take a few seconds. A consumer still waiting 2 s after a side
  // failed or the producer exited never gets its end: it is killed. The producer then has a
  // grace time to end.
  const std::int64_t run_ns =
      ctl->warmup_ns + static_cast<std::int64_t>(kStreamWindows) * ctl->window_ns;
  const std::int64_t deadline = monotonic_ns() + run_ns + 30'000'000'000;
  std::int64_t given_up_at = 0;
  bool c_done = false;
  while (cpid > 0 && !c_done) {
    const std::int64_t now = monotonic_ns();
    if (now >= deadline || (given_up_at != 0 && now - given_up_at > 2'000'000'000)) break;
    c_done = wait_exit(cpipe->first.get(), std::min(deadline, now + 100'000'000));
    const bool p_gone = ppid < 0 || wait_exit(ppipe->first.get(), 0);
    if (given_up_at == 0 && (p_gone || phase_of(*ctl) == Phase::Failed)) given_up_at = now;
  }
  if (!c_done)
    ctl->phase.store(static_cast<std::uint32_t>(Phase::Failed), std::memory_order_relaxed);
  const bool p_done = ppid > 0 && wait_exit(ppipe->first.get(), monotonic_ns() + 5'000'000'000);
  if (cpid > 0 && !c_done) (void)os::kill_process(cpid, SIGKILL);
  if (ppid > 0 && !p_done) (void)os::kill_process(ppid, SIGKILL);
  if (cpid > 0) (void)os::wait_process(cpid);
  if (ppid > 0) (void)os::wait_process(ppid);
  m.teardown();

  const bool c_ok = ctl->consumer_exited.load(std::memory_order_acquire) != 0;
  const bool p_ok = ctl->producer_exited.load(std::memory_order_acquire) != 0;
  if (r.error.empty() && ctl->consumer.error[0] != '\0') r.error = ctl->consumer.error;
  if (r.error.empty() && ctl->producer.error[0] != '\0') r.error = ctl->producer.error;
  if (r.error.empty() && (!c_done || !c_ok))
    r.error = c_done ? "the consumer died" : "the consumer did not finish (killed)";
  if (r.error.empty() && (!p_done || !p_ok))
    r.error = p_done ? "the producer died" : "the producer did not stop (killed)";
  r.verified = ctl->verified;
  if (!r.error.empty()) return r;

  for (std::size_t i = 0; i < kStreamWindows; ++i)
    if (ctl->window_elapsed_ns[i] > 0)
      r.window_msgs_per_s.push_back(static_cast<double>(ctl->window_msgs[i]) * 1e9 /
                                    static_cast<double>(ctl->window_elapsed_ns[i]));
  const StreamSideStats& c = ctl->consumer;
  const StreamSideStats& p = ctl->producer;
  if (c.msgs == 0 || r.window_msgs_per_s.size() != kStreamWindows) {
    r.error = "the consumer measured no messages";
    return r;
  }
  if (p.msgs == 0) {  // its per-message counters would divide by zero
    r.error =
        "the producer sent nothing while the consumer measured (blocked on a full queue the whole "
        "time): use more --seconds";
    return r;
  }
  const auto cn = static_cast<double>(c.msgs), pn = static_cast<double>(p.msgs);
  if (m.os_counted) {
    r.consumer_syscalls = static_cast<double>(c.syscalls) / cn;
    r.producer_syscalls = static_cast<double>(p.syscalls) / pn;
    r.syscalls_per_msg = r.consumer_syscalls + r.producer_syscalls;
  }
  r.allocs_per_msg = static_cast<double>(c.allocs) / cn + static_cast<double>(p.allocs) / pn;
  r.cpu_ns_per_msg = static_cast<double>(c.cpu_ns) / cn + static_cast<double>(p.cpu_ns) / pn;
  if (m.counts_retries) r.retries_per_msg = static_cast<double>(p.retries) / pn;
  r.round_msgs_per_s = {r.median()};
  return r;
}

StreamResult merge_rounds(const std::vector<StreamResult>& rounds) {
  if (rounds.empty()) return {};
  StreamResult r = rounds.front();
  if (rounds.size() == 1) return r;
  for (const StreamResult& x : rounds)
    if (!x.error.empty()) {
      r = x;  // the first failed round's row: its error is the row's
      return r;
    }
  const auto n = static_cast<double>(rounds.size());
  auto mean = [&](auto field) {
    double sum = 0;
    for (const StreamResult& x : rounds) sum += field(x);
    return sum / n;
  };
  r.window_msgs_per_s.clear();
  r.round_msgs_per_s.clear();
  r.verified = 0;
  for (const StreamResult& x : rounds) {
    r.window_msgs_per_s.insert(r.window_msgs_per_s.end(), x.window_msgs_per_s.begin(),
                               x.window_msgs_per_s.end());
    r.round_msgs_per_s.push_back(x.median());
    r.verified += x.verified;
  }
  r.cpu_ns_per_msg = mean([](const StreamResult& x) { return x.cpu_ns_per_msg; });
  r.producer_syscalls = mean([](const StreamResult& x) { return x.producer_syscalls; });
  r.consumer_syscalls = mean([](const StreamResult& x) { return x.consumer_syscalls; });
  if (r.syscalls_per_msg)
    r.syscalls_per_msg = mean([](const StreamResult& x) { return x.syscalls_per_msg.value_or(0); });
  if (r.allocs_per_msg)
    r.allocs_per_msg = mean([](const StreamResult& x) { return x.allocs_per_msg.value_or(0); });
  if (r.retries_per_msg)
    r.retries_per_msg = mean([](const StreamResult& x) { return x.retries_per_msg.value_or(0); });
  return r;
}

}  // namespace mbmq::tool
