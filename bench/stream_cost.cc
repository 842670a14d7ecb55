// stream_cost: what mbmq's one-way stream path costs per message in instructions' time, with no
// cross-core transfer in it (issue #14; by hand: `build/bench/stream_cost [batch] [messages]`).
//
// `mbmq bench --stream` compares two processes on two CPUs, where the rate is set by how the
// cache lines of the payloads and indices move between the cores, and that swings several-fold
// from one minute of this VM to the next. This program takes that out: one thread on one CPU
// writes a batch of 64 B messages (the sequence number, then the rest of the line), sends it and
// receives it on the other end of the same channel, reading every message, as the stream's
// producer and consumer do; beside it the same work on a plain ring of 4,096 64 B entries in
// private memory (what raw-spsc does, minus its atomics). The difference is mbmq's own work per
// message (buffers(), send_batch(), receive_batch() and the slots' return), both sides
// together: the part of a message's time that does not shrink when the cores are close.
// Prints the median and lowest of 7 repetitions of each, interleaved.
#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "mbmq/mbmq.h"

namespace {

using mbmq::Buffer;
using mbmq::Channel;
using mbmq::Deadline;
using mbmq::Message;

constexpr std::size_t kSize = 64;
constexpr std::size_t kRingEntries = 4096;
constexpr int kReps = 7;

// The producer's writes of message `seq` into `p`: its number, then the rest of the line.
inline void write_message(std::byte* p, std::uint64_t seq) {
  std::memcpy(p, &seq, sizeof seq);
  std::memset(p + sizeof seq, static_cast<int>(seq & 0xff), kSize - sizeof seq);
}

// The consumer's reads: the number (checked) and the last byte (summed, so it is read).
inline bool read_message(const std::byte* p, std::uint64_t want, std::uint64_t* sum) {
  std::uint64_t seq = 0;
  std::memcpy(&seq, p, sizeof seq);
  *sum += std::to_integer<std::uint64_t>(p[kSize - 1]);
  return seq == want;
}

// ns per message of `n` messages through a Channel::pair, in batches of up to `batch`; -1 and a
// message on a failure.
double mbmq_once(Channel& tx, Channel& rx, std::size_t batch, std::uint64_t n, std::uint64_t* sum) {
  std::vector<Buffer> bufs(batch);
  std::vector<Message> msgs(batch);
  std::uint64_t sent = 0, got = 0;
  const std::int64_t t0 = mbmq::monotonic_ns();
  while (got < n) {
    auto k = tx.buffers(kSize, bufs, Deadline::immediate());
    if (!k) {
      (void)std::fprintf(stderr, "buffers: %s\n", k.error().message().c_str());
      return -1;
    }
    for (std::size_t i = 0; i < *k; ++i) write_message(bufs[i].data().data(), sent++);
    auto s = tx.send_batch({bufs.data(), *k});
    if (!s || *s != *k) {
      (void)std::fprintf(stderr, "send_batch: %s\n", s ? "a prefix" : s.error().message().c_str());
      return -1;
    }
    while (got < sent) {
      auto r = rx.receive_batch(msgs, Deadline::immediate());
      if (!r) {
        (void)std::fprintf(stderr, "receive_batch: %s\n", r.error().message().c_str());
        return -1;
      }
      for (std::size_t i = 0; i < *r; ++i)
        if (msgs[i].kind != mbmq::Kind::Message ||
            !read_message(msgs[i].buffer.data().data(), got++, sum)) {
          (void)std::fprintf(stderr, "message %llu: wrong kind or number\n",
                             static_cast<unsigned long long>(got - 1));
          return -1;
        }
    }
  }
  return static_cast<double>(mbmq::monotonic_ns() - t0) / static_cast<double>(n);
}

// The same through the stream's own path (mbmq/stream.h): Channel::reserve(), commit(),
// receive_in_place().
double inplace_once(Channel& tx, Channel& rx, std::size_t batch, std::uint64_t n,
                    std::uint64_t* sum) {
  mbmq::Reservation out;
  mbmq::InPlace in;
  std::uint64_t sent = 0, got = 0;
  const std::int64_t t0 = mbmq::monotonic_ns();
  while (got < n) {
    auto k = tx.reserve(out, kSize, batch, Deadline::immediate());
    if (!k) {
      (void)std::fprintf(stderr, "reserve: %s\n", k.error().message().c_str());
      return -1;
    }
    for (std::size_t i = 0; i < *k; ++i) write_message(out.slot(i).data(), sent++);
    auto s = out.commit(*k);
    if (!s || *s != *k) {
      (void)std::fprintf(stderr, "commit: %s\n", s ? "a prefix" : s.error().message().c_str());
      return -1;
    }
    while (got < sent) {
      auto r = rx.receive_in_place(in, Deadline::immediate());
      if (!r || *r == 0) {
        (void)std::fprintf(stderr, "receive_in_place: %s\n",
                           r ? "another kind of message" : r.error().message().c_str());
        return -1;
      }
      for (std::size_t i = 0; i < *r; ++i)
        if (in[i].size() != kSize || !read_message(in[i].data(), got++, sum)) {
          (void)std::fprintf(stderr, "message %llu: wrong size or number\n",
                             static_cast<unsigned long long>(got - 1));
          return -1;
        }
    }
  }
  return static_cast<double>(mbmq::monotonic_ns() - t0) / static_cast<double>(n);
}

// The same work on a plain ring in private memory.
double ring_once(std::vector<std::byte>& ring, std::size_t batch, std::uint64_t n,
                 std::uint64_t* sum) {
  std::uint64_t head = 0, tail = 0;
  const std::int64_t t0 = mbmq::monotonic_ns();
  while (head < n) {
    for (std::size_t i = 0; i < batch; ++i, ++tail)
      write_message(ring.data() + (tail % kRingEntries) * kSize, tail);
    for (; head < tail; ++head)
      if (!read_message(ring.data() + (head % kRingEntries) * kSize, head, sum)) return -1;
  }
  return static_cast<double>(mbmq::monotonic_ns() - t0) / static_cast<double>(n);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const std::size_t batch = argc > 1 ? std::strtoul(argv[1], nullptr, 10) : 32;
  const std::uint64_t n = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 2'000'000;
  if (batch < 1 || batch > 64 || n < batch) {
    (void)std::fprintf(stderr,
                       "usage: stream_cost [batch 1..64 (32)] [messages >= batch (2000000)]\n");
    return 2;
  }
  mbmq::ChannelOptions opt;  // as mbmq-stream's at 64 B
  opt.slot_size = kSize;
  opt.slots_per_side = 448;
  opt.wait.mode = mbmq::WaitMode::Spin;
  auto pair = Channel::pair(opt);
  if (!pair) {
    (void)std::fprintf(stderr, "Channel::pair: %s\n", pair.error().message().c_str());
    return 1;
  }
  auto& [tx, rx] = *pair;
  std::vector<std::byte> ring(kRingEntries * kSize);
  std::vector<double> mb, ip, rg;
  std::uint64_t sum = 0;
  for (int rep = 0; rep < kReps; ++rep) {  // interleaved: a slow moment weighs on both
    const double m = mbmq_once(tx, rx, batch, n, &sum);
    const double p = inplace_once(tx, rx, batch, n, &sum);
    const double r = ring_once(ring, batch, n, &sum);
    if (m < 0 || p < 0 || r < 0) return 1;
    mb.push_back(m);
    ip.push_back(p);
    rg.push_back(r);
  }
  (void)std::printf(
      "stream_cost: one thread, %zu B messages in batches of %zu, %llu messages x %d "
      "repetitions (checksum %llu)\n",
      kSize, batch, static_cast<unsigned long long>(n), kReps,
      static_cast<unsigned long long>(sum & 0xffff));
  (void)std::printf("  mbmq Channel::pair   %6.1f ns/msg median, %6.1f lowest\n", median(mb),
                    *std::min_element(mb.begin(), mb.end()));
  (void)std::printf("  mbmq reserve/in-place %5.1f ns/msg median, %6.1f lowest\n", median(ip),
                    *std::min_element(ip.begin(), ip.end()));
  (void)std::printf("  plain ring           %6.1f ns/msg median, %6.1f lowest\n", median(rg),
                    *std::min_element(rg.begin(), rg.end()));
  (void)std::printf("  mbmq's own work      %6.1f ns/msg (both sides, the medians' difference)\n",
                    median(mb) - median(rg));
  (void)std::printf("  ... reserve/in-place %6.1f ns/msg\n", median(ip) - median(rg));
  return 0;
}
