// examples/stream.cc: two processes, one channel, a stream of one-way messages written and read in
// place (mbmq/stream.h). The child produces 1,000,000 messages of 64 bytes; the parent reads each
// in place, checks its number, and prints the rate. Build: part of the project (build/examples).
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "mbmq/mbmq.h"

using namespace std::chrono_literals;

namespace {

constexpr std::uint64_t kMessages = 1'000'000;
constexpr std::size_t kSize = 64;

// Reserves slots, writes each message in place (its number first), commits them as one batch.
mbmq::Status produce(mbmq::Channel tx) {
  mbmq::Reservation out;  // reused for every batch: no allocation
  for (std::uint64_t seq = 0; seq < kMessages;) {
    // Waits (per the channel's WaitPolicy) while the consumer holds every slot: back-pressure.
    std::size_t n = MBMQ_TRY(tx.reserve(out, kSize, 32, mbmq::Deadline::after(5s)));
    n = static_cast<std::size_t>(std::min<std::uint64_t>(n, kMessages - seq));
    for (std::size_t i = 0; i < n; ++i, ++seq) std::memcpy(out.slot(i).data(), &seq, sizeof seq);
    MBMQ_TRY(out.commit(n));  // the slots not committed go back when `out` is reused or dropped
  }
  return {};
}

// Reads every message in place; the next receive_in_place() gives the batch back to the producer.
mbmq::Status consume(mbmq::Channel rx) {
  mbmq::InPlace in;
  std::uint64_t next = 0;
  const std::int64_t t0 = mbmq::monotonic_ns();
  while (next < kMessages) {
    const std::size_t n = MBMQ_TRY(rx.receive_in_place(in, mbmq::Deadline::after(5s)));
    if (n == 0) {  // another kind of message is next: here only the producer's end can be
      mbmq::Message m = MBMQ_TRY(rx.receive(mbmq::Deadline::after(5s)));
      return mbmq::fail(mbmq::Errc::PeerClosed, m.kind == mbmq::Kind::PeerClosed
                                                    ? "the producer left early"
                                                    : "not a one-way message");
    }
    for (std::size_t i = 0; i < n; ++i, ++next) {
      std::uint64_t seq = 0;
      std::memcpy(&seq, in[i].data(), sizeof seq);
      if (seq != next) return mbmq::fail(mbmq::Errc::Protocol, "a message lost or reordered");
    }
  }
  const double s = static_cast<double>(mbmq::monotonic_ns() - t0) / 1e9;
  std::printf("%llu messages of %zu B in order, %.1f M messages/s\n",
              static_cast<unsigned long long>(next), kSize, static_cast<double>(next) / s / 1e6);
  return {};
}

}  // namespace

int main() {
  mbmq::ChannelOptions opt;
  opt.slot_size = kSize;
  opt.slots_per_side = 448;  // the deepest pool: more messages in flight
  auto ends = mbmq::Channel::pair(opt);
  if (!ends) return std::fprintf(stderr, "%s\n", ends.error().message().c_str()), 1;
  auto& [tx, rx] = *ends;
  pid_t pid = fork();
  if (pid == 0) {
    rx.close();  // after fork, each process drops the end it does not use
    auto r = produce(std::move(tx));
    if (!r) std::fprintf(stderr, "producer: %s\n", r.error().message().c_str());
    _exit(r ? 0 : 1);
  }
  tx.close();
  auto r = consume(std::move(rx));
  if (!r) std::fprintf(stderr, "consumer: %s\n", r.error().message().c_str());
  int status = 0;
  waitpid(pid, &status, 0);
  return r && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
