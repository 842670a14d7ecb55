// tools/mbmq/bench.h: the measuring core of `mbmq bench`: the work of one round trip, the
// mechanisms (each a real implementation in its own file), and one measured cell.
//
// A cell = one mechanism at one payload size: a server process (fork), the client in this one,
// pinned to CPUs 1 and 0 when there are two. One round trip: the client writes the whole payload
// and sends it; the server reads the whole payload (a 64-bit sum) and answers with the 8-byte
// sum; the client verifies it. With --no-touch only the first 8 bytes are written and read.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "mbmq/result.h"

namespace mbmq {
class MsgQueue;
}

namespace mbmq::tool {

// ---- the work of a round trip ------------------------------------------------------------------
struct Work {
  bool touch = true;      // write and read the whole payload (else 8 bytes)
  bool corrupt = false;   // test hook: the server (--stream: the consumer) flips a payload byte
  bool skip_seq = false;  // test hook (--stream): the producer skips one sequence number
};
extern Work g_work;  // set once by main(), before any cell

void write_payload(std::byte* p, std::size_t n, std::uint64_t iter);  // client
std::uint64_t read_payload(std::byte* p, std::size_t n);              // server: the sum
std::uint64_t expected_sum(std::size_t n, std::uint64_t iter);        // client: verify

// ---- server-side accounting
// ----------------------------------------------------------------------
// syscalls: through os/, without the yields of a spinning wait (WaitMode::Spin past its budget,
// os::yields_this_thread()), which are counted in `yields`.
struct ServerStats {
  std::uint64_t syscalls = 0, allocs = 0, rtts = 0, yields = 0;
  std::int64_t cpu_ns = 0;
  int error = 0;
};
// tick() as each request arrives (before it is answered); stop() when the stop request arrives.
struct ServerCounter {
  std::uint64_t n = 0, sys0 = 0, alloc0 = 0, sys1 = 0, alloc1 = 0, yield0 = 0, yield1 = 0;
  std::int64_t cpu0 = 0, cpu1 = 0;
  bool stopped = false;
  std::optional<ServerStats> external;  // counted by a server that runs as its own program
  void tick();
  void stop();
  ServerStats finish(int error);
};

// ---- the mbmq server loop
// How the server of an mbmq row waits for its queue's next message.
enum class QueueWait : std::uint8_t {
  Block,  // wait() / reply_and_wait() with Deadline::never(): the queue's WaitPolicy decides
  Epoll,  // the event-loop way (MsgQueue::fd()): epoll_wait on the fd, then wait(immediate) /
          // reply_and_wait(immediate) until Errc::TimedOut, then epoll_wait again
};
// Answers every request on `q` (the sum of its payload, read in place, 8 bytes back in the same
// buffer) until the stop request (an empty one) or the client's PeerClosed. Every message must
// come from the channel with key `key`. 0 when stopped; else a server error code for ServerStats.
int serve_queue(MsgQueue& q, QueueWait how, std::uint64_t key, ServerCounter& count);

// ---- mechanisms ------------------------------------------------------------------------------
// setup() runs in the parent before the fork; serve() in the server child; after_fork_parent()
// in the client after the fork; client_rtt(iter) does one verified round trip (false: wrong reply
// or a failure); stop() tells the server to exit; teardown() releases everything.
struct Mechanism {
  std::string name;
  std::string copies_by_design;  // payload copies per request by design, with why
  std::string unavailable;       // non-empty: cannot run here, and why
  std::function<Status(std::size_t size)> setup;
  std::function<int(std::size_t size, ServerCounter& count)> serve;
  std::function<Status()> after_fork_parent;
  std::function<bool(std::uint64_t iter)> client_rtt;
  std::function<void()> stop;
  std::function<void()> teardown;
  std::size_t max_size = ~std::size_t{0};  // larger payloads are reported as unsupported
  // Every system call it makes goes through mbmq's os/ layer, which counts them exactly per
  // thread. Otherwise (a third-party library) only strace can count them.
  bool os_counted = true;
};

// The receiving side of --stream's zmq-pushpull and --fanout's zmq-pubsub (mech_zmq.cc): a new
// context and a socket of `type` (ZMQ_PULL, ZMQ_SUB) that waits at most 200 ms per receive and
// does not linger; `attach(sock)` binds or connects it (and subscribes), 0 on success. Then
// messages are received and handed to `take` in place until it returns End or Fail (a failed
// check: Errc::Protocol), or a receive times out and `healthy()` is false (success: the side
// that failed says why). Closes the socket and the context.
enum class Take : std::uint8_t { More, End, Fail };
// From a checker's verdict (Ok, End, Fail: StreamConsumer's, FanoutSubscriber's).
template <class Verdict>
Take take_of(Verdict v) {
  return v == Verdict::End ? Take::End : v == Verdict::Fail ? Take::Fail : Take::More;
}
Status zmq_receive_each(int type, const std::function<int(void* sock)>& attach,
                        const std::function<bool()>& healthy,
                        const std::function<Take(std::byte* p, std::size_t n)>& take);

std::vector<Mechanism> shm_mechanisms();     // raw-spin, raw-ring, raw-futex, mbmq-*
std::vector<Mechanism> kernel_mechanisms();  // pipe, uds, uds-seqpacket, tcp
Mechanism zeromq_mechanism();
Mechanism boost_mq_mechanism();
Mechanism iceoryx_mechanism();
// `mbmq __iceoryx-server SIZE [--no-touch] [--inject-corruption]`: the iceoryx server, exec'd
// (the iceoryx runtime is one per process and does not survive fork); ServerStats on fd 3.
int iceoryx_server_main(const std::vector<std::string>& args);
// A run under strace, started by a run that has RouDi up already: use that one.
void use_running_roudi();
std::vector<Mechanism> all_mechanisms();
// `mbmq bench --channels`: mbmq-spin, -adaptive, -sleep, -fd and uds-epoll, each a server
// holding n channels (n-1 idle, one active) and a client holding their other ends.
std::vector<Mechanism> channel_mechanisms(std::size_t n);
// The fds one channel of that mechanism takes, both ends (measured: make one, count).
std::size_t fds_per_channel(const std::string& mechanism);
// `mbmq bench --async N` (mech_async.cc; built where asio is found): async-1ch (N async_calls
// on one channel), async-Nch (N channels, one async_call each), blocking-Nch (N channels, one
// blocking call each from N threads). One "round trip" of these cells is a batch of N calls.
std::vector<Mechanism> async_mechanisms(std::size_t n);

// ---- a cell ------------------------------------------------------------------------------------
struct Options {
  std::vector<std::size_t> sizes;
  double seconds_per_cell = 1.0;
  std::size_t max_samples = 2'000'000;
  std::uint64_t fixed_rtts = 0;  // > 0: exactly this many measured round trips, 10 warm-up
  bool pin = true;
  // --stream: interleaved rounds (every mechanism once per round, in order); ratios are the
  // median of the per-round ratios, so a baseline's drift between cells does not decide them.
  int rounds = 1;
};

struct CellResult {
  std::string mechanism;
  std::size_t size = 0;
  std::size_t channels = 0;       // --channels: channels the server holds; 0: not such a cell
  std::size_t in_flight = 0;      // --async: calls per batch (lat: batch times); 0: not such a cell
  std::vector<std::int64_t> lat;  // ns per round trip, measured iterations, sorted
  std::optional<double> syscalls_per_rtt, allocs_per_rtt;  // os/ counters, both sides
  // A spinning side's sched_yield()s while it waited past its spin budget (both sides; not in
  // syscalls_per_rtt: made only while idle, never per message).
  std::optional<double> yields_per_rtt;
  double client_syscalls = 0, server_syscalls = 0;
  std::optional<double> strace_syscalls_per_rtt;  // strace -f -c, both processes, every call
  std::optional<double> memcpy_eq;                // copies per request in memcpy equivalents
  double cpu_ns_per_rtt = 0;                      // both processes
  std::string error;
  double pct(double q) const;
  double rtt_per_s() const;
};

// The q-quantile (0..1) of sorted samples, nearest rank; 0 when there are none.
double percentile(const std::vector<std::int64_t>& sorted, double q);

int cpus();
CellResult run_cell(Mechanism& m, std::size_t size, const Options& opt);

// Time of one memcpy of n bytes between two warm buffers, in this process (median of repeats).
double memcpy_ns(std::size_t n);

std::string human_size(std::size_t n);

// ---- processes shared by the multi-process cells (--stream, --fanout) -------------------------
// Forks a child that dies with its parent, is pinned to `cpu` (when `pin` and there are two CPUs
// or more), ignores SIGPIPE, runs `body` and exits 0. The child's pid, or -1 with `error` set.
pid_t fork_pinned(int cpu, bool pin, const std::function<void()>& body, std::string& error);
// os::spawn_program with stdout and stderr on /dev/null (strace, RouDi).
Result<pid_t> spawn_quiet(const std::string& path, const std::vector<std::string>& args);
// Waits until the read end `r` of a pipe sees its writer gone (the child exited) or `deadline`
// (monotonic ns) passes: true when gone.
bool wait_exit(int r, std::int64_t deadline);
// The calls counted in a `strace -c -o FILE` summary, but those of the `excluded` system calls;
// none if the file has no summary.
std::optional<double> strace_calls(const std::string& file,
                                   const std::vector<std::string>& excluded = {});
// "/tmp/mbmq-<what>-<pid>-<n><suffix>", n counting up in this process: a name no other run or
// cell uses (ZeroMQ's ipc:// socket files).
std::string unique_tmp_path(const char* what, const char* suffix);

}  // namespace mbmq::tool
