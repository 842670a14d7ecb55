// Soak: N client processes x M calls into one server queue, every call carrying a sequence number
// and a checksum over a payload that changes every call. The server checks each client's
// sequence (nothing lost, duplicated or reordered) and each checksum (nothing corrupted); the
// clients check every reply. This process's fds, mbmq mappings and RSS must stay flat.
//
// Default: 32 clients x 20,000 calls (4,000 in the sanitizer builds). MBMQ_SOAK_CALLS sets the
// calls per client (the `soak` label runs 200,000).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "os/process.h"
#include "peer_util.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::secs;

struct Header {
  std::uint32_t client, seq;
  std::uint64_t checksum;  // over the payload after the header
};
constexpr std::size_t kPayload = 256;

std::uint64_t fill_and_sum(std::byte* p, std::size_t n, std::uint64_t seed) {
  std::uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1, sum = 0;
  for (std::size_t i = 0; i < n; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    p[i] = static_cast<std::byte>(x);
    sum = sum * 131 + static_cast<std::uint64_t>(x & 0xff);
  }
  return sum;
}
std::uint64_t sum_of(const std::byte* p, std::size_t n) {
  std::uint64_t sum = 0;
  for (std::size_t i = 0; i < n; ++i) sum = sum * 131 + static_cast<std::uint64_t>(p[i]);
  return sum;
}

std::uint32_t calls_from_env() {
  const char* v = std::getenv("MBMQ_SOAK_CALLS");
  long n = v != nullptr ? std::atol(v) : 0;
  // 4,000 under a sanitizer: the same paths, at 3x the cost per call (14 s under ASan for 20,000).
  return n > 0 ? static_cast<std::uint32_t>(n) : test::sized<std::uint32_t>(20'000, 4'000);
}

TEST(Soak, ManyClientsManyCallsNothingLostDuplicatedReorderedOrCorrupted) {
  constexpr std::uint32_t kClients = 32;
  const std::uint32_t calls = calls_from_env();
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  std::vector<Channel> clients, servers;
  for (std::uint32_t c = 0; c < kClients; ++c) {
    auto p = Channel::pair();
    ASSERT_TRUE(p);
    clients.push_back(std::move(p->first));
    servers.push_back(std::move(p->second));
  }
  std::vector<pid_t> pids;
  for (std::uint32_t c = 0; c < kClients; ++c) {
    pids.push_back(test::spawn(
        [&, c] {
          for (auto& s : servers) s.close();
          for (std::uint32_t o = 0; o < kClients; ++o)
            if (o != c) clients[o].close();
          Channel& ch = clients[c];
          auto buf = ch.buffer(sizeof(Header) + kPayload);
          if (!buf) return 10;
          for (std::uint32_t seq = 0; seq < calls; ++seq) {
            std::byte* p = buf->data().data();
            Header h{c, seq,
                     fill_and_sum(p + sizeof(Header), kPayload, (std::uint64_t{c} << 32) | seq)};
            std::memcpy(p, &h, sizeof h);
            if (!buf->resize(sizeof(Header) + kPayload)) return 11;
            auto r = ch.call(*buf, secs(30));
            if (!r) return 12;
            // The reply: the same header with the checksum complemented, payload reversed.
            Header back;
            std::memcpy(&back, buf->data().data(), sizeof back);
            if (buf->size() != sizeof(Header) + kPayload || back.client != c || back.seq != seq ||
                back.checksum != ~h.checksum)
              return 13;
          }
          return 0;
        },
        600));
  }
  for (auto& c : clients) c.close();
  for (std::uint32_t c = 0; c < kClients; ++c) ASSERT_TRUE(servers[c].redirect(*q, c));
  // Baseline once everything is set up and a few calls went through.
  std::vector<std::uint32_t> next(kClients, 0);
  std::uint64_t lost_or_reordered = 0, duplicated = 0, corrupted = 0, served = 0, ended = 0;
  std::size_t fds0 = 0, maps0 = 0, rss0 = 0;
  auto serve_one = [&](Message& m) {
    if (m.kind == Kind::PeerClosed) {
      ++ended;
      return;
    }
    ASSERT_EQ(m.kind, Kind::Request);
    std::byte* p = m.buffer.data().data();
    Header h;
    std::memcpy(&h, p, sizeof h);
    if (h.client != m.key || m.buffer.size() != sizeof(Header) + kPayload ||
        sum_of(p + sizeof(Header), kPayload) != h.checksum) {
      ++corrupted;
    } else if (h.seq < next[m.key]) {
      ++duplicated;
    } else if (h.seq > next[m.key]) {
      ++lost_or_reordered;
    }
    next[m.key] = h.seq + 1;
    h.checksum = ~h.checksum;
    std::memcpy(p, &h, sizeof h);
    ++served;
  };
  auto m = q->wait(secs(60));
  while (ended < kClients) {
    ASSERT_TRUE(m) << m.error().message();
    serve_one(*m);
    if (served == std::min<std::uint64_t>(1000, calls)) {
      fds0 = os::open_fd_count();
      maps0 = os::mapping_count("memfd:mbmq-");
      rss0 = os::resident_bytes();
    }
    if (m->kind == Kind::Request) {
      m = q->reply_and_wait(std::move(*m), secs(60));
    } else if (ended < kClients) {
      m = q->wait(secs(60));
    }
  }
  for (pid_t p : pids) EXPECT_EQ(test::join(p), 0);
  EXPECT_EQ(served, std::uint64_t{kClients} * calls);
  EXPECT_EQ(lost_or_reordered, 0u);
  EXPECT_EQ(duplicated, 0u);
  EXPECT_EQ(corrupted, 0u);
  // Flat: the channels are still ours (servers), so fds and mappings match the baseline exactly;
  // RSS within 1 MiB (the allocator may round).
  EXPECT_EQ(os::open_fd_count(), fds0);
  EXPECT_EQ(os::mapping_count("memfd:mbmq-"), maps0);
  EXPECT_LE(os::resident_bytes(), rss0 + (1u << 20));
  std::printf(
      "soak: %u clients x %u calls = %llu calls; lost/reordered %llu, duplicated %llu, "
      "corrupted %llu; RSS %zu -> %zu KiB\n",
      kClients, calls, static_cast<unsigned long long>(served),
      static_cast<unsigned long long>(lost_or_reordered),
      static_cast<unsigned long long>(duplicated), static_cast<unsigned long long>(corrupted),
      rss0 / 1024, os::resident_bytes() / 1024);
}

}  // namespace
}  // namespace mbmq
