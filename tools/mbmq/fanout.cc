// tools/mbmq/fanout.cc: the publisher's pacing, the subscribers' checks, running one fan-out cell
// and counting its publisher's system calls with strace (see fanout.h for the protocol's steps).
#include "fanout.h"

#include <algorithm>
#include <cinttypes>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <new>

#include "mbmq/deadline.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/process.h"
#include "os/syscall_count.h"

namespace mbmq::tool {

namespace {
constexpr std::int64_t kMs = 1'000'000;
constexpr std::int64_t kProbeEvery = kMs;             // (1)
constexpr std::int64_t kJoinPatience = 15'000 * kMs;  // (1) iceoryx's start-up may take seconds
constexpr std::int64_t kAckPatience = 10'000 * kMs;   // (2) a message not acknowledged: lost
constexpr std::int64_t kAckPoll = 20'000;             // (2) 20 us (~70 us with the timer slack)
constexpr std::int64_t kExitPatience = 10'000 * kMs;  // (4)
constexpr std::size_t kFullCheckBytes = 4096;         // up to this size every word is checked
constexpr std::size_t kSamples = 64;                  // above it, this many words (and the last)

std::size_t header_bytes() { return (sizeof(FanoutControl) + 63) / 64 * 64; }

FanoutPhase phase_of(const FanoutControl& ctl) {
  return static_cast<FanoutPhase>(ctl.phase.load(std::memory_order_relaxed));
}

// Records the first error of any side; every wait then gives up.
void record_error(FanoutControl& ctl, const char* text) {
  if (ctl.error_claimed.exchange(1, std::memory_order_relaxed) == 0)
    (void)std::snprintf(ctl.error, sizeof ctl.error, "%s", text);
  ctl.phase.store(static_cast<std::uint32_t>(FanoutPhase::Failed), std::memory_order_relaxed);
}

// The words of message seq (n bytes) that a subscriber checks beside words 0 and 1: every word up
// to kFullCheckBytes; above it kSamples words, at places that move with seq (every word is
// checked over 8192 messages), and the last word. fn(i) for each.
template <class Fn>
void for_checked_words(std::size_t n, std::uint64_t seq, const Fn& fn) {
  const std::size_t words = n / 8;
  if (words <= 2) return;
  if (n <= kFullCheckBytes) {
    for (std::size_t i = 2; i < words; ++i) fn(i);
    return;
  }
  const std::size_t span = words - 2, stride = span / kSamples;
  for (std::size_t j = 0; j < kSamples; ++j) fn(2 + (j * stride + seq * 61) % span);
  fn(words - 1);
}

// The first checked word of message seq (the corruption hook's target).
std::size_t first_checked_word(std::size_t n, std::uint64_t seq) {
  std::size_t first = 0;
  for_checked_words(n, seq, [&](std::size_t i) {
    if (first == 0) first = i;
  });
  return first;
}
}  // namespace

std::size_t fanout_control_bytes(std::uint64_t subscribers, std::uint64_t total) {
  return header_bytes() + static_cast<std::size_t>(total * (subscribers + 1) * 8);
}
std::int64_t* send_times(FanoutControl& ctl) {
  return std::launder(
      reinterpret_cast<std::int64_t*>(reinterpret_cast<std::byte*>(&ctl) + header_bytes()));
}
std::int64_t* recv_times(FanoutControl& ctl, std::size_t subscriber) {
  return send_times(ctl) + (subscriber + 1) * ctl.total();
}

std::size_t default_fanout_messages(std::size_t size) { return size >= (1u << 20) ? 1000 : 2000; }

// ---- the publisher ------------------------------------------------------------------------------
bool FanoutPublisher::healthy() const noexcept { return phase_of(ctl_) != FanoutPhase::Failed; }

void FanoutPublisher::give_up(const char* why) {
  status_ = fail(Errc::TimedOut, why);
  record_error(ctl_, why);
  state_ = State::Over;
}

bool FanoutPublisher::wait_acks(std::uint64_t n) {
  const std::int64_t deadline = monotonic_ns() + kAckPatience;
  // Acquire: pairs with each subscriber's fetch_add (its receive time is written).
  while (ctl_.acks.load(std::memory_order_acquire) < n) {
    if (!healthy()) {  // a subscriber failed: it says why
      state_ = State::Over;
      return false;
    }
    if (monotonic_ns() > deadline) {
      char why[160];
      (void)std::snprintf(why, sizeof why,
                          "publisher: message %" PRIu64
                          " was not received by every subscriber within 10 s (lost?)",
                          k_);
      give_up(why);
      return false;
    }
    os::sleep_ns(kAckPoll);
  }
  return true;
}

bool FanoutPublisher::next() {
  const std::uint64_t subs = ctl_.subscribers;
  switch (state_) {
    case State::Start:
      state_ = State::Probe;
      probe_deadline_ = monotonic_ns() + kJoinPatience;
      t0_ = monotonic_ns();
      return true;
    case State::Probe: {
      if (!healthy()) return (state_ = State::Over), false;
      // Acquire: pairs with the subscribers' release (only the count matters).
      if (ctl_.joined.load(std::memory_order_acquire) < subs) {
        if (monotonic_ns() > probe_deadline_) {
          give_up("publisher: the subscribers did not all join within 15 s");
          return false;
        }
        os::sleep_ns(kProbeEvery);
        t0_ = monotonic_ns();
        return true;
      }
      if (ctl_.traced) {  // wait for the parent to attach strace to this process
        ctl_.publisher_pid = os::current_pid();
        ctl_.go.store(1, std::memory_order_release);  // pairs with the parent's acquire (pid)
        const std::int64_t deadline = monotonic_ns() + kJoinPatience;
        while (ctl_.go.load(std::memory_order_relaxed) != 2) {
          if (!healthy() || monotonic_ns() > deadline) {
            give_up("publisher: strace did not attach");
            return false;
          }
          os::sleep_ns(kMs);
        }
      }
      ctl_.phase.store(static_cast<std::uint32_t>(FanoutPhase::Running), std::memory_order_relaxed);
      state_ = State::Message;
      k_ = 0;
      break;
    }
    case State::Message: {
      // (2) Message k_ is out: wait for every acknowledgement, then the gap. The thread's CPU
      // time in here is pacing, not publishing: subtracted from the measured CPU time.
      const bool measured = k_ >= ctl_.warmup;
      const std::int64_t pace0 = measured ? os::thread_cpu_ns() : 0;
      if (!wait_acks((k_ + 1) * subs)) return false;
      os::sleep_ns(ctl_.gap_ns);
      if (measured) pace_ns_ += os::thread_cpu_ns() - pace0;
      if (++k_ == ctl_.total()) {
        ctl_.cpu_ns = os::process_cpu_ns() - cpu_start_ - pace_ns_;
        state_ = State::End;
        t0_ = monotonic_ns();
        return true;
      }
      break;
    }
    case State::End: {
      // (4) Keep the publisher open until every subscriber has seen the end.
      const std::int64_t deadline = monotonic_ns() + kExitPatience;
      // Acquire: pairs with the subscribers' release in finish().
      while (ctl_.subscribers_exited.load(std::memory_order_acquire) < subs && healthy() &&
             monotonic_ns() < deadline)
        os::sleep_ns(kMs);
      state_ = State::Over;
      return false;
    }
    case State::Over:
      return false;
  }
  // State::Message: start message k_.
  if (k_ == ctl_.warmup) {
    cpu_start_ = os::process_cpu_ns();
    pace_ns_ = 0;
  }
  t0_ = monotonic_ns();
  send_times(ctl_)[k_] = t0_;
  sys0_ = os::work_syscalls_this_thread();  // yields: waiting, not work
  return true;
}

void FanoutPublisher::fill(std::byte* p) {
  const std::uint64_t seq = state_ == State::Probe ? kFanoutProbe
                            : state_ == State::End ? kStreamEnd
                                                   : k_;
  write_stream_payload(p, ctl_.size, seq);
  std::memcpy(p + 8, &t0_, 8);  // word 1: the send time
}

void FanoutPublisher::sent() {
  if (state_ != State::Message || k_ < ctl_.warmup) return;
  ctl_.syscalls += os::work_syscalls_this_thread() - sys0_;
  ++ctl_.measured;
}

void FanoutPublisher::finish(const Status& s) {
  if (!s) {
    record_error(ctl_, ("publisher: " + s.error().message()).c_str());
  }
  if (external_ && s) return;  // the exec'd program has finished on the block
  if (s && state_ != State::Over && healthy())
    record_error(ctl_, "publisher: its loop ended before the run did");
  if (s && phase_of(ctl_) == FanoutPhase::Running)
    ctl_.phase.store(static_cast<std::uint32_t>(FanoutPhase::Done), std::memory_order_relaxed);
  ctl_.publisher_exited.store(1, std::memory_order_release);  // pairs with the parent's acquire
}

// ---- a subscriber -------------------------------------------------------------------------------
bool FanoutSubscriber::healthy() const noexcept { return phase_of(ctl_) != FanoutPhase::Failed; }

void FanoutSubscriber::fail(const char* what) {
  char why[240];
  (void)std::snprintf(why, sizeof why, "subscriber %zu: %s", index_, what);
  record_error(ctl_, why);
}

void FanoutSubscriber::probe() {
  if (joined_) return;
  joined_ = true;
  ctl_.joined.fetch_add(1, std::memory_order_release);  // (1) pairs with the publisher's acquire
}

Status FanoutSubscriber::failure() const {
  return mbmq::fail(Errc::Protocol, "fanout verification");
}

FanoutSubscriber::Verdict FanoutSubscriber::received(const std::byte* p, std::size_t n) {
  const std::int64_t now = monotonic_ns();  // (3) first
  char why[200];
  if (n != ctl_.size) {
    (void)std::snprintf(why, sizeof why,
                        "verification failed: message %" PRIu64 " has %zu bytes, not %zu", next_, n,
                        static_cast<std::size_t>(ctl_.size));
    fail(why);
    return Verdict::Fail;
  }
  std::uint64_t seq;
  std::memcpy(&seq, p, 8);
  if (seq == kFanoutProbe) {
    probe();
    return Verdict::Ok;
  }
  if (seq == kStreamEnd) {
    if (next_ == ctl_.total()) return Verdict::End;
    fail("verification failed: the end message came early (messages lost)");
    return Verdict::Fail;
  }
  if (seq != next_) {
    (void)std::snprintf(why, sizeof why,
                        "verification failed: message %" PRIu64 " carries sequence number %" PRIu64
                        " (lost, duplicated or reordered messages)",
                        next_, seq);
    fail(why);
    return Verdict::Fail;
  }
  recv_times(ctl_, index_)[seq] = now;
  // The corruption hook: subscriber 0 reads byte 3 of the first checked word flipped, as if a
  // broken transport had flipped it (the message itself may be read-only).
  const std::size_t flipped = ctl_.corrupt && index_ == 0 ? first_checked_word(n, seq) : 0;
  std::int64_t sent_at;
  std::memcpy(&sent_at, p + 8, 8);
  const std::uint64_t base = stream_base(seq);
  std::uint64_t diff = static_cast<std::uint64_t>(sent_at ^ send_times(ctl_)[seq]);
  for_checked_words(n, seq, [&](std::size_t i) {
    std::uint64_t w;
    std::memcpy(&w, p + i * 8, 8);
    if (i == flipped) w ^= std::uint64_t{0x40} << 24;
    diff |= w ^ (base + i * kStreamStep);
  });
  if (diff != 0) {
    (void)std::snprintf(why, sizeof why,
                        "verification failed: message %" PRIu64
                        ": its payload differs from what its sequence number implies",
                        seq);
    fail(why);
    return Verdict::Fail;
  }
  ++next_;
  ctl_.acks.fetch_add(1, std::memory_order_release);  // (2) pairs with the publisher's acquire
  return Verdict::Ok;
}

void FanoutSubscriber::finish(const Status& s) {
  if (!s && ctl_.error_claimed.load(std::memory_order_relaxed) == 0)
    fail(s.error().message().c_str());
  if (external_ && s) return;  // the exec'd program has counted itself
  ctl_.subscribers_exited.fetch_add(1, std::memory_order_release);  // (4) pairs with publisher
}

// ---- a cell -------------------------------------------------------------------------------------
namespace {

struct Side {
  pid_t pid = -1;
  os::UniqueFd exit_fd;  // EOF when the side has exited
  bool done = false;
};

// Forks one side with a pipe whose write end only it holds.
Side fork_side(int cpu, bool pin, const std::function<void()>& body, std::string& error) {
  Side side;
  auto pipe = os::make_pipe();
  if (!pipe) {
    error = pipe.error().message();
    return side;
  }
  side.pid = fork_pinned(
      cpu, pin,
      [&] {
        pipe->first.reset();
        body();
      },
      error);
  side.exit_fd = std::move(pipe->first);
  return side;
}

// Runs the cell; `attach(pid)`, if given, is called once the publisher waits for `go` (traced).
FanoutResult run_cell(FanoutMechanism& m, std::size_t subscribers, std::size_t size,
                      std::size_t messages, const FanoutOptions& opt,
                      const std::function<bool(pid_t)>& attach) {
  FanoutResult r;
  r.mechanism = m.name;
  r.subscribers = subscribers;
  r.size = size;
  r.copies = m.copies ? m.copies(subscribers) : 0;
  if (!m.unavailable.empty()) return r.error = "unavailable: " + m.unavailable, r;
  if (m.available) {
    if (std::string why = m.available(); !why.empty()) return r.error = "unavailable: " + why, r;
  }
  const std::size_t warmup = std::max<std::size_t>(10, messages / 20);
  const std::size_t bytes = fanout_control_bytes(subscribers, warmup + messages);
  auto fd = os::make_sealed_memfd("mbmq-fanout-ctl", bytes);
  if (!fd) return r.error = fd.error().message(), r;
  auto map = os::Mapping::map_shared(fd->get(), bytes, os::Access::ReadWrite);
  if (!map) return r.error = map.error().message(), r;
  auto* ctl = new (map->data()) FanoutControl{};
  ctl->size = size;
  ctl->subscribers = subscribers;
  ctl->warmup = warmup;
  ctl->messages = messages;
  ctl->gap_ns = opt.gap_ns;
  ctl->total_bytes = bytes;
  ctl->control_fd = fd->get();
  ctl->corrupt = g_work.corrupt;
  ctl->traced = static_cast<bool>(attach);
  static std::uint64_t cells = 0;
  ctl->cell_id = static_cast<std::uint64_t>(os::current_pid()) << 20 | cells++;
  if (auto s = m.setup(size, subscribers); !s) return r.error = s.error().message(), r;

  std::vector<Side> sides;  // the subscribers, then the publisher
  for (std::size_t i = 0; i < subscribers && r.error.empty(); ++i) {
    const int cpu = static_cast<int>((i + 1) % static_cast<std::size_t>(std::max(cpus(), 1)));
    sides.push_back(fork_side(
        cpu, opt.pin,
        [&] {
          FanoutSubscriber s(*ctl, i);
          s.finish(m.subscribe(s));
        },
        r.error));
  }
  if (r.error.empty())
    sides.push_back(fork_side(
        0, opt.pin,
        [&] {
          FanoutPublisher p(*ctl);
          p.finish(m.publish(p));
        },
        r.error));
  if (m.after_fork) m.after_fork();
  if (!r.error.empty()) record_error(*ctl, r.error.c_str());

  const std::int64_t start = monotonic_ns();
  if (attach && r.error.empty()) {
    // Acquire: pairs with the publisher's release (publisher_pid written).
    while (ctl->go.load(std::memory_order_acquire) != 1 && phase_of(*ctl) != FanoutPhase::Failed &&
           monotonic_ns() - start < kJoinPatience + 5000 * kMs)
      os::sleep_ns(kMs);
    if (ctl->go.load(std::memory_order_acquire) == 1 && attach(ctl->publisher_pid))
      ctl->go.store(2, std::memory_order_relaxed);
    else
      record_error(*ctl, "strace could not attach to the publisher");
  }
  // (4) Every side ends by itself; a hang guard, and 3 s of grace once a side failed or the
  // publisher exited.
  const std::int64_t deadline =
      start + kJoinPatience + static_cast<std::int64_t>(warmup + messages) * 20 * kMs;
  std::int64_t given_up_at = 0;
  for (;;) {
    std::size_t left = 0;
    for (auto& s : sides)
      if (s.pid > 0 && !s.done && !(s.done = wait_exit(s.exit_fd.get(), 0))) ++left;
    const std::int64_t now = monotonic_ns();
    if (left == 0 || now > deadline || (given_up_at != 0 && now - given_up_at > 3000 * kMs)) break;
    const bool pub_gone = sides.back().done || sides.back().pid < 0;
    if (given_up_at == 0 && (pub_gone || phase_of(*ctl) == FanoutPhase::Failed)) given_up_at = now;
    for (auto& s : sides)
      if (s.pid > 0 && !s.done) {
        s.done = wait_exit(s.exit_fd.get(), now + 50 * kMs);
        break;
      }
  }
  bool killed = false;
  for (auto& s : sides) {
    if (s.pid <= 0) continue;
    if (!s.done) (void)os::kill_process(s.pid, SIGKILL), killed = true;
    (void)os::wait_process(s.pid);
  }
  m.teardown();

  if (r.error.empty() && ctl->error[0] != '\0') r.error = ctl->error;
  if (r.error.empty() && killed) r.error = "a side did not finish (killed)";
  if (r.error.empty() && ctl->publisher_exited.load(std::memory_order_acquire) == 0)
    r.error = "the publisher died";
  if (r.error.empty() && ctl->subscribers_exited.load(std::memory_order_acquire) != subscribers)
    r.error = "a subscriber died";
  if (!r.error.empty()) return r;
  const std::int64_t* sent = send_times(*ctl);
  r.lat.reserve(messages);
  for (std::size_t k = warmup; k < warmup + messages; ++k) {
    std::int64_t last = 0;
    for (std::size_t i = 0; i < subscribers; ++i) last = std::max(last, recv_times(*ctl, i)[k]);
    r.lat.push_back(last - sent[k]);
  }
  std::sort(r.lat.begin(), r.lat.end());
  r.messages = ctl->measured;
  if (r.messages != messages) return r.error = "the publisher did not count every message", r;
  const auto n = static_cast<double>(r.messages);
  r.publisher_cpu_ns_per_msg = static_cast<double>(ctl->cpu_ns) / n;
  if (m.os_counted) {
    r.publisher_syscalls_per_msg = static_cast<double>(ctl->syscalls) / n;
    r.syscalls_method = "os-layer counters";
  }
  return r;
}

// Whether strace has attached to pid (its TracerPid in /proc).
bool traced_now(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(f, line);)
    if (line.rfind("TracerPid:", 0) == 0) return std::strtol(line.c_str() + 10, nullptr, 10) != 0;
  return false;
}

// The publisher's system calls over a traced run of `messages` messages (every thread).
std::optional<double> traced_calls(FanoutMechanism& m, std::size_t subscribers, std::size_t size,
                                   std::size_t messages, const FanoutOptions& opt) {
  const std::string out = unique_tmp_path("fanout-strace", ".txt");
  pid_t tracer = -1;
  auto attach = [&](pid_t pid) {
    auto t =
        spawn_quiet("/usr/bin/strace", {"-f", "-c", "-q", "-o", out, "-p", std::to_string(pid)});
    if (!t) return false;
    tracer = *t;
    for (int i = 0; i < 500 && !traced_now(pid); ++i) os::sleep_ns(10 * kMs);
    os::sleep_ns(200 * kMs);  // -f: its other threads are attached right after
    return traced_now(pid);
  };
  FanoutResult r = run_cell(m, subscribers, size, messages, opt, attach);
  if (tracer > 0) (void)os::wait_process(tracer);  // it ends with the publisher
  auto calls =
      r.error.empty() ? strace_calls(out, {"clock_nanosleep", "clock_gettime"}) : std::nullopt;
  std::error_code ec;
  std::filesystem::remove(out, ec);
  return calls;
}

}  // namespace

FanoutResult run_fanout_cell(FanoutMechanism& m, std::size_t subscribers, std::size_t size,
                             const FanoutOptions& opt) {
  const std::size_t messages = opt.messages != 0 ? opt.messages : default_fanout_messages(size);
  return run_cell(m, subscribers, size, messages, opt, {});
}

std::optional<double> strace_publisher(FanoutMechanism& m, std::size_t subscribers,
                                       std::size_t size, const FanoutOptions& opt) {
  if (!std::filesystem::exists("/usr/bin/strace")) return std::nullopt;
  constexpr std::size_t kShort = 10, kLong = 60;
  auto a = traced_calls(m, subscribers, size, kShort, opt);
  auto b = traced_calls(m, subscribers, size, kLong, opt);
  if (!a || !b || *b < *a) return std::nullopt;
  return (*b - *a) / static_cast<double>(kLong - kShort);
}

}  // namespace mbmq::tool
