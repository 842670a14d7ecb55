// The peer budget: everything one hostile peer can make us hold, pushed to its bound while an
// honest client is served beside it. Each test prints one "budget:" line (row | bound | measured)
// that scripts/reliability.sh collects into docs/RELIABILITY.md, and asserts the bound.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "ipc/endpoint.h"
#include "ipc/test_access.h"
#include "os/file.h"
#include "os/memfd.h"
#include "os/process.h"
#include "os/unix_socket.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::secs;

// An honest client and server in this process, calling on a thread for as long as the budget
// test runs; every reply is checked.
class Honest {
 public:
  Honest() {
    auto ends = Channel::pair();
    EXPECT_TRUE(ends);
    client_ = std::move(ends->first);
    server_ = std::move(ends->second);
    server_thread_ = std::thread([this] {
      while (!stop_server_.load()) {
        auto m = server_.receive(Deadline::after(std::chrono::milliseconds(50)));
        if (!m) continue;
        if (m->kind == Kind::PeerClosed) return;
        auto d = m->buffer.data();
        d[0] = static_cast<std::byte>(static_cast<unsigned>(d[0]) + 1);
        (void)MsgQueue::reply(std::move(*m));
      }
    });
    client_thread_ = std::thread([this] {
      auto b = client_.buffer(64);
      if (!b) {
        failed_ = true;
        return;
      }
      for (unsigned i = 0; !stop_.load(); ++i) {
        b->data()[0] = static_cast<std::byte>(i & 0x7f);
        if (!client_.call(*b, secs(10)) || b->data()[0] != static_cast<std::byte>((i & 0x7f) + 1)) {
          failed_ = true;
          return;
        }
        ++calls_;
      }
    });
  }
  // Stops, and says whether every honest call succeeded (and there were some).
  bool finish() {
    // Some honest calls happen while the attack is at its bound.
    for (int i = 0; i < 200 && calls_.load() < 100 && !failed_.load(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    stop_ = true;  // the client first: the server answers its last call
    client_thread_.join();
    stop_server_ = true;
    server_thread_.join();
    return !failed_.load() && calls_.load() > 0;
  }
  std::uint64_t calls() const { return calls_.load(); }

 private:
  Channel client_, server_;
  std::atomic<bool> stop_{false}, stop_server_{false}, failed_{false};
  std::atomic<std::uint64_t> calls_{0};
  std::thread server_thread_, client_thread_;
};

void report(const char* row, const char* bound, const std::string& measured, std::uint64_t honest) {
  std::printf("budget: %s | %s | %s; honest calls served meanwhile: %llu, all verified\n", row,
              bound, measured.c_str(), static_cast<unsigned long long>(honest));
  std::fflush(stdout);
}

// The attacker plays side 1 of a pair made in this process: it writes its own ring (dir[1]) and
// sends on its own control socket.
struct Attacker {
  explicit Attacker(ChannelOptions opt = {}) {
    auto ends = Channel::pair(opt);
    EXPECT_TRUE(ends);
    victim = std::move(ends->first);
    attacker = std::move(ends->second);
    ctl = detail::TestAccess::control_fd(attacker);
    auto seg = detail::TestAccess::segment(attacker);
    ring = reinterpret_cast<shm::Direction*>(seg.data() + shm::kDirOffset + sizeof(shm::Direction));
  }
  void publish(const shm::Desc& d) {
    shm::RingEntry& e = ring->ring[tail % shm::kRingCapacity];
    e.store(d);
    e.seq.store(++tail, std::memory_order_release);
    ring->tail.store(tail, std::memory_order_release);
  }
  bool send_extent(std::uint32_t id, std::uint32_t gen, int fd) {
    shm::CtlMsg m{static_cast<std::uint32_t>(shm::CtlType::Extent), id, gen, 0};
    return static_cast<bool>(
        os::send_msg(ctl, {reinterpret_cast<const std::byte*>(&m), sizeof m}, {&fd, 1}));
  }
  Channel victim, attacker;
  int ctl = -1;
  shm::Direction* ring = nullptr;
  std::uint32_t tail = 0;
};

TEST(PeerBudget, HandleFdsParkedAheadOfTheirMessagesAreBounded) {
  Honest honest;
  Attacker a;
  // Pipes only: the fds the library opens lazily (a queue's safety timerfd, the peer watcher's
  // epoll, when the honest pair first sleeps on a loaded machine) are not the peer's doing.
  const char* kPipes = "pipe:";
  const std::size_t fds0 = os::open_fd_count(kPipes);
  std::vector<os::UniqueFd> ours;  // our ends of the pipes (the victim holds its own copies)
  // A handles packet of 8 fds for buffer (id, gen).
  auto packet = [&](std::uint32_t id, std::uint32_t gen) {
    struct {
      shm::CtlMsg h;
      shm::HandleMeta meta[shm::kMaxHandles];
    } pkt{};
    pkt.h = shm::CtlMsg{static_cast<std::uint32_t>(shm::CtlType::Handles), id, gen, 8};
    std::vector<int> raw;
    for (auto& m : pkt.meta) {
      m.kind = static_cast<std::uint32_t>(shm::WireHandle::Fd);
      auto pipe = os::make_pipe();
      if (!pipe) return false;
      raw.push_back(pipe->first.get());
      ours.push_back(std::move(pipe->first));
      ours.push_back(std::move(pipe->second));
    }
    return static_cast<bool>(
        os::send_msg(a.ctl, {reinterpret_cast<const std::byte*>(&pkt), sizeof pkt}, raw));
  };
  // 15 packets for messages never sent (120 fds), then one for a real request of slot 16 (side 1
  // owns slots [16, 32) with the default 16 per side): the victim reads all 16 to find it, and
  // keeps the 15 it cannot place yet: 120 fds, within the budget.
  for (std::uint32_t p = 0; p < 15; ++p) ASSERT_TRUE(packet(20, 1000 + p));
  ASSERT_TRUE(packet(16, 1));
  a.publish(shm::Desc{16, 16, 1, static_cast<std::uint16_t>(1 | shm::kDescHasHandles), 0});
  auto m = a.victim.receive(secs(5));
  ASSERT_TRUE(m);
  ASSERT_EQ(m->kind, Kind::Request) << m->why;
  EXPECT_EQ(m->buffer.handle_count(), 8u);
  m->buffer.reset();
  const std::size_t parked = os::open_fd_count(kPipes) - fds0 - ours.size();
  EXPECT_EQ(parked, 120u);
  // Two more junk packets and a request needing its own: 120 + 16 parked would pass the budget.
  ASSERT_TRUE(packet(21, 2000));
  ASSERT_TRUE(packet(21, 2001));
  ASSERT_TRUE(packet(17, 1));
  a.publish(shm::Desc{17, 16, 1, static_cast<std::uint16_t>(1 | shm::kDescHasHandles), 0});
  auto end = a.victim.receive(secs(5));
  ASSERT_TRUE(end);
  EXPECT_EQ(end->kind, Kind::PeerClosed);
  EXPECT_EQ(end->error, Errc::Protocol);
  EXPECT_NE(std::strstr(end->why, "handles"), nullptr) << end->why;
  const std::size_t after = os::open_fd_count(kPipes) - fds0 - ours.size();
  EXPECT_LE(parked, detail::kMaxStashedHandleFds);
  EXPECT_EQ(after, 0u) << "a channel closed for a protocol error keeps nothing the peer parked";
  ASSERT_TRUE(honest.finish());
  report("fds: handle fds a peer parks ahead of their messages",
         "kMaxStashedHandleFds = 128 per channel (then Protocol; released at once)",
         std::to_string(parked) + " held at 15 packets ahead; closed at the 17th; " +
             std::to_string(after) + " held after the close",
         honest.calls());
}

TEST(PeerBudget, PeerExtentsMappedArePerChannelBounded) {
  Honest honest;
  ChannelOptions opt;
  opt.slots_per_side = 1;
  Attacker a(opt);
  // Only the peer's memfds: the allocator (ASan's above all) maps on its own meanwhile, and the
  // library opens fds lazily (a queue's safety timerfd, the peer watcher's epoll, when the honest
  // pair first sleeps on a loaded machine: CI saw 67 counting every fd).
  const char* kName = "memfd:budget-extent";
  const std::size_t fds0 = os::open_fd_count(kName);
  const std::size_t maps0 = os::mapping_count(kName);
  // Every extent id the protocol has, each a 64 KiB memfd, each a request the victim holds.
  std::vector<Message> held;
  std::size_t peak_fds = 0, peak_maps = 0;
  for (std::uint32_t e = 0; e <= shm::kMaxExtents; ++e) {
    auto fd = os::make_sealed_memfd("budget-extent", 65536);
    ASSERT_TRUE(fd);
    ASSERT_TRUE(a.send_extent(e, 1, fd->get()));
    a.publish(shm::Desc{shm::kExtentBit | e, 16, 1, 1, 0});
    auto m = a.victim.receive(secs(5));
    ASSERT_TRUE(m);
    peak_fds = std::max(peak_fds, os::open_fd_count(kName) - fds0);
    peak_maps = std::max(peak_maps, os::mapping_count(kName) - maps0);
    if (e < shm::kMaxExtents) {
      ASSERT_EQ(m->kind, Kind::Request) << e;
      held.push_back(std::move(*m));
    } else {  // id 64 does not exist
      EXPECT_EQ(m->kind, Kind::PeerClosed);
      EXPECT_EQ(m->error, Errc::Protocol);
    }
  }
  EXPECT_LE(peak_fds, shm::kMaxExtents + 1);  // + the attacker's own memfd of the moment
  EXPECT_LE(peak_maps, shm::kMaxExtents);
  held.clear();
  ASSERT_TRUE(honest.finish());
  report("fds + mappings: a peer's extents", "kMaxExtents = 64 of each per channel",
         "peak " + std::to_string(peak_fds) + " fds, " + std::to_string(peak_maps) +
             " mappings for 65 extents sent",
         honest.calls());
}

TEST(PeerBudget, SparseHugeExtentsCostOnlyTheirPayloads) {
  Honest honest;
  ChannelOptions opt;
  opt.slots_per_side = 1;
  Attacker a(opt);
  // 64 sparse 1 GiB memfds, 16-byte payloads: the receiver maps all of them.
  std::vector<os::UniqueFd> files;
  std::vector<Message> held;
  const auto t0 = monotonic_ns();
  for (std::uint32_t e = 0; e < shm::kMaxExtents; ++e) {
    auto fd = os::make_sealed_memfd("budget-sparse", std::size_t{1} << 30);
    ASSERT_TRUE(fd);
    ASSERT_TRUE(a.send_extent(e, 1, fd->get()));
    a.publish(shm::Desc{shm::kExtentBit | e, 16, 1, 1, 0});
    auto m = a.victim.receive(secs(5));
    ASSERT_TRUE(m);
    ASSERT_EQ(m->kind, Kind::Request);
    volatile std::byte sink = m->buffer.data()[15];  // the application reads the payload
    (void)sink;
    held.push_back(std::move(*m));
    files.push_back(std::move(*fd));
  }
  const double ms = static_cast<double>(monotonic_ns() - t0) / 1e6;
  std::uint64_t bytes = 0;
  for (auto& f : files) {
    struct stat st {};
    ASSERT_EQ(::fstat(f.get(), &st), 0);
    bytes += static_cast<std::uint64_t>(st.st_blocks) * 512;
  }
  EXPECT_LE(bytes, 64u * 64 * 1024) << "the victim populated beyond the payloads";
  held.clear();
  ASSERT_TRUE(honest.finish());
  char buf[160];
  std::snprintf(buf, sizeof buf, "%llu KiB allocated for 64 GiB of sparse extents, %.0f ms",
                static_cast<unsigned long long>(bytes / 1024), ms);
  report("shmem pages: a peer's extents", "the payload bytes it sends (never the file size)", buf,
         honest.calls());
}

TEST(PeerBudget, APeerThatNeverReadsItsControlSocketIsClosedNotWaitedFor) {
  Honest honest;
  ChannelOptions opt;
  opt.slots_per_side = 4;
  Attacker a(opt);
  // The attacker takes every descriptor the victim sends and gives the buffer back (P7r),
  // so the victim can send on, but never reads its control socket. Each one-way message carries
  // a handle: one control packet per message.
  auto* out = reinterpret_cast<shm::Direction*>(detail::TestAccess::segment(a.attacker).data() +
                                                shm::kDirOffset);
  std::uint32_t head = 0;
  auto devnull = os::open_read("/dev/null");
  ASSERT_TRUE(devnull);
  int sent = 0;
  Status last;
  std::int64_t slowest = 0;
  for (int i = 0; i < 5000; ++i) {
    auto b = a.victim.buffer(64);
    if (!b) {
      last = fail(b.error());
      break;
    }
    auto dup = os::dup_fd(devnull->get());
    ASSERT_TRUE(dup);
    if (!b->attach_fd(dup->release())) break;
    const auto t = monotonic_ns();
    last = a.victim.send(std::move(*b));
    slowest = std::max(slowest, monotonic_ns() - t);
    if (!last) break;
    ++sent;
    // The attacker consumes the descriptor and returns the buffer.
    shm::RingEntry& e = out->ring[head % shm::kRingCapacity];
    ASSERT_EQ(e.seq.load(std::memory_order_acquire), head + 1);
    const shm::Desc d = e.load();
    out->head.store(++head, std::memory_order_release);
    // Given back (P7r): side 0's slot.
    out->returned[d.buffer / 64].fetch_or(std::uint64_t{1} << (d.buffer % 64));
  }
  ASSERT_FALSE(last);
  EXPECT_EQ(last.error().code, Errc::Protocol) << last.error().message();
  EXPECT_GT(sent, 500) << "an honest peer may leave 512 packets unread";
  EXPECT_LT(sent, 5000);
  EXPECT_LT(slowest, 1'000'000'000) << "a send blocked";
  ASSERT_TRUE(honest.finish());
  char buf[160];
  std::snprintf(buf, sizeof buf,
                "closed with Protocol after %d unread packets; slowest send %.2f ms", sent,
                static_cast<double>(slowest) / 1e6);
  report("control messages a peer leaves unread",
         "the socket's send buffer (~555 packets); then Protocol, never a blocked send", buf,
         honest.calls());
}

TEST(PeerBudget, ASlowPeerGetsBackPressureNotAClosedChannel) {
  // A small control socket, so that an honest peer that is merely slow fills it: sends and
  // replies must then say WouldBlock and keep their buffers, and go through once the peer reads.
  auto ends = Channel::pair();
  ASSERT_TRUE(ends);
  auto& [fast, slow] = *ends;
  ASSERT_TRUE(os::set_send_buffer(detail::TestAccess::control_fd(fast), 2048));
  auto devnull = os::open_read("/dev/null");
  ASSERT_TRUE(devnull);
  auto with_handle = [&](Buffer& b) {
    auto dup = os::dup_fd(devnull->get());
    return dup && b.attach_fd(dup->release());
  };
  // One-way messages with a handle each, the slow peer not reading yet.
  int sent = 0;
  Buffer kept;
  for (; sent < 16; ++sent) {
    auto b = fast.buffer(64);
    ASSERT_TRUE(b);
    ASSERT_TRUE(with_handle(*b));
    auto r = fast.send(std::move(*b));
    if (!r) {
      ASSERT_EQ(r.error().code, Errc::WouldBlock) << r.error().message();
      kept = std::move(*b);
      break;
    }
  }
  ASSERT_LT(sent, 16) << "the small socket never filled";
  ASSERT_TRUE(kept.valid());
  EXPECT_EQ(kept.handle_count(), 1u);
  // The slow peer catches up; the kept message goes through, nothing was lost.
  for (int i = 0; i < sent; ++i) {
    auto m = slow.receive(secs(5));
    ASSERT_TRUE(m);
    ASSERT_EQ(m->kind, Kind::Message);
    EXPECT_EQ(m->buffer.handle_count(), 1u);
  }
  ASSERT_TRUE(fast.send(std::move(kept)));
  auto last = slow.receive(secs(5));
  ASSERT_TRUE(last);
  EXPECT_EQ(last->kind, Kind::Message);
  EXPECT_EQ(last->buffer.handle_count(), 1u);
  last->buffer.reset();
  // Replies: the slow peer sends requests and does not collect the answers for a while.
  std::vector<Message> requests;
  for (int i = 0; i < 12; ++i) {
    auto b = slow.buffer(64);
    ASSERT_TRUE(b);
    b->data()[0] = static_cast<std::byte>(i);
    ASSERT_TRUE(slow.send_request(std::move(*b)));
    auto m = fast.receive(secs(5));
    ASSERT_TRUE(m);
    ASSERT_EQ(m->kind, Kind::Request);
    requests.push_back(std::move(*m));
  }
  int answered = 0, retried = 0;
  while (answered < 12) {
    Message& m = requests[static_cast<std::size_t>(answered)];
    if (m.buffer.handle_count() == 0) {
      ASSERT_TRUE(with_handle(m.buffer));
    }
    auto r = MsgQueue::reply(std::move(m));
    if (r) {
      ++answered;
      continue;
    }
    ASSERT_EQ(r.error().code, Errc::WouldBlock) << r.error().message();
    ASSERT_TRUE(m.buffer.valid()) << "a reply that could not go was dropped";
    ++retried;
    // The slow peer collects what was answered so far; then the retry goes through.
    for (;;) {
      auto got = slow.receive(Deadline::immediate());
      if (!got) break;
      ASSERT_EQ(got->kind, Kind::Reply);
      EXPECT_EQ(got->buffer.handle_count(), 1u);
    }
    ASSERT_LT(retried, 100);
  }
  EXPECT_GT(retried, 0) << "the replies never met a full socket";
  for (;;) {
    auto got = slow.receive(Deadline::after(std::chrono::milliseconds(100)));
    if (!got) break;
    ASSERT_EQ(got->kind, Kind::Reply);
  }
  // Still open both ways.
  auto b = slow.buffer(64);
  ASSERT_TRUE(b);
  ASSERT_TRUE(slow.send(std::move(*b)));
  auto m = fast.receive(secs(5));
  ASSERT_TRUE(m);
  EXPECT_EQ(m->kind, Kind::Message);
  std::printf("back-pressure: %d one-way messages filled the small socket; %d replies retried\n",
              sent, retried);
}

TEST(PeerBudget, ThreadsDoNotGrowWithChannels) {
  auto threads = [] {
    std::size_t n = 0;
    for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task"))
      ++n;
    return n;
  };
  Honest honest;
  const std::size_t t0 = threads();
  std::vector<std::pair<Channel, Channel>> many;
  for (int i = 0; i < 200; ++i) {
    auto ends = Channel::pair();
    ASSERT_TRUE(ends);
    many.push_back(std::move(*ends));
  }
  const std::size_t t1 = threads();
  EXPECT_EQ(t1, t0);
  ASSERT_TRUE(honest.finish());
  report("threads", "1 watcher thread per process, whatever the channels",
         std::to_string(t1 - t0) + " more threads with 200 more channels", honest.calls());
}

}  // namespace
}  // namespace mbmq
