// Regression tests for the endpoint hardening of e39bc80: one test per bug it fixed (numbered as in
// its review list), each playing the hostile or unlucky peer that exposed the bug. The peer is
// played in this process through the raw segment and control socket of the other end of a pair
// (ipc/test_access.h); tests whose bug crashed the victim run it in a forked child, so the crash
// is reported as this test's failure instead of ending the test binary.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "hostile_peer.h"
#include "ipc/endpoint.h"
#include "ipc/test_access.h"
#include "os/file.h"
#include "os/futex.h"
#include "os/memfd.h"
#include "os/process.h"
#include "os/unix_socket.h"
#include "shm/layout.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::secs;
using test::spawn;

// In a forked child (no GoogleTest there): says which check failed, on stderr, and exits with 1.
#define MBMQ_CHILD_CHECK(cond)                                                            \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "%s:%d: child check failed: %s\n", __FILE__, __LINE__, #cond); \
      return 1;                                                                           \
    }                                                                                     \
  } while (0)

using test::bytes_of;
using test::dir;
using test::raw_push;

// A peer consuming its inbound ring by hand (P5); false if the entry at *head is not ready.
bool raw_pop(shm::Direction& d, std::uint32_t* head, shm::Desc* out) {
  shm::RingEntry& e = d.ring[*head % shm::kRingCapacity];
  if (e.seq.load(std::memory_order_acquire) != *head + 1) return false;
  *out = e.load();
  ++*head;
  d.head.store(*head, std::memory_order_release);
  return true;
}

// A peer waking the consumer of d that sleeps on its own doorbell word (P4).
void raw_wake(shm::Direction& d) {
  d.doorbell.fetch_add(1, std::memory_order_release);
  (void)os::futex_wake(&d.doorbell, INT_MAX);
}

std::uint16_t kind_bits(shm::DescKind k, std::uint16_t flags = 0) {
  return static_cast<std::uint16_t>(static_cast<std::uint16_t>(k) | flags);
}

bool contains(const char* why, const char* part) { return std::strstr(why, part) != nullptr; }

// A numbered message: seq in its first 8 bytes, the pattern of seq after them. Answers carry
// seq + kAnswered, so a reply can never pass for its own request.
constexpr std::uint64_t kAnswered = 1u << 20;
void write_numbered(std::span<std::byte> d, std::uint64_t seq) {
  std::memcpy(d.data(), &seq, sizeof seq);
  test::fill(d.subspan(sizeof seq), seq);
}
bool read_numbered(std::span<const std::byte> d, std::uint64_t* seq) {
  if (d.size() < sizeof *seq) return false;
  std::memcpy(seq, d.data(), sizeof *seq);
  return test::check(d.subspan(sizeof *seq), *seq);
}

// Answers numbered requests on `server` (seq -> seq + kAnswered, in place) until the channel
// ends or nothing comes for 10 s; counts what was wrong in *bad.
void serve_numbered(Channel& server, std::atomic<int>* bad) {
  for (;;) {
    auto m = server.receive(secs(10));
    if (!m || m->kind != Kind::Request) return;
    std::uint64_t seq = 0;
    if (!read_numbered(m->buffer.data(), &seq)) ++*bad;
    write_numbered(m->buffer.data(), seq + kAnswered);
    if (!MsgQueue::reply(std::move(*m))) ++*bad;
  }
}

// serve_numbered() on a thread. The destructor closes `client` (which ends the loop) and joins,
// also when an assertion returns early.
class NumberedServer {
 public:
  NumberedServer(Channel& client, Channel& server)
      : client_(client), thread_([this, &server] { serve_numbered(server, &bad_); }) {}
  NumberedServer(const NumberedServer&) = delete;
  NumberedServer& operator=(const NumberedServer&) = delete;
  ~NumberedServer() {
    client_.close();
    thread_.join();
  }
  int bad() const { return bad_.load(); }

 private:
  Channel& client_;
  std::atomic<int> bad_{0};
  std::thread thread_;
};

// ---- Bug 1 -------------------------------------------------------------------------------------

// Bug 1: a peer's queue doorbell (CtlMsg::Doorbell, P4) was mapped without checking its seals.
// A peer that sends a page it can shrink, and truncates it once we have mapped it, turned our
// next wake-up (an atomic add on the page) into SIGBUS. Now only a page sealed against shrinking
// is taken; anything else closes the channel with Errc::Protocol. The victim runs in a child: a
// SIGBUS there fails this test (exit status 128 + SIGBUS) instead of killing the test binary.
TEST(Hardening, ATruncatableDoorbellPageClosesTheChannelInsteadOfRaisingSigbus) {
  pid_t pid = spawn(
      [] {
        auto p = Channel::pair();
        MBMQ_CHILD_CHECK(p);
        auto& [us, peer] = *p;  // we are side 0: we produce dir[0], whose consumer is the peer
        // The peer redirects "its queue": a page of its own, not sealed at all.
        auto page = os::make_memfd("hostile-doorbell", shm::kQueuePageSize);
        MBMQ_CHILD_CHECK(page);
        const int fd = page->get();
        auto wait = os::make_sealed_memfd("wait", shm::kQueuePageSize);
        auto sig = os::stream_pair();
        MBMQ_CHILD_CHECK(wait && sig);
        const int fds[3] = {fd, wait->get(), sig->second.get()};
        const shm::CtlMsg m{static_cast<std::uint32_t>(shm::CtlType::Doorbell), 0, 1, 0};
        MBMQ_CHILD_CHECK(os::send_msg(detail::TestAccess::control_fd(peer), bytes_of(m), fds));
        shm::Direction& to_peer = dir(peer, 0);
        to_peer.doorbell_gen.store(1, std::memory_order_release);
        to_peer.consumer_sleeping.store(1);
        // First wake-up: the page is a whole page now (before the fix it was mapped here).
        auto b = us.buffer(64);
        MBMQ_CHILD_CHECK(b);
        (void)us.send(std::move(*b));
        // The peer shrinks it to nothing: touching the mapping now would be SIGBUS.
        MBMQ_CHILD_CHECK(::ftruncate(fd, 0) == 0);
        auto b2 = us.buffer(64);
        if (b2) {
          auto second = us.send(std::move(*b2));  // the next wake-up, if the channel were open
          MBMQ_CHILD_CHECK(!second && second.error().code == Errc::Protocol);
        }
        auto end = us.receive(secs(5));
        MBMQ_CHILD_CHECK(end);
        MBMQ_CHILD_CHECK(end->kind == Kind::PeerClosed);
        MBMQ_CHILD_CHECK(end->error == Errc::Protocol);
        if (!contains(end->why, "doorbell")) std::fprintf(stderr, "why: %s\n", end->why);
        MBMQ_CHILD_CHECK(contains(end->why, "doorbell"));
        return 0;
      },
      20);
  EXPECT_EQ(join(pid), 0) << "128 + " << SIGBUS << " is SIGBUS";
}

// ---- Bug 3 -------------------------------------------------------------------------------------

// Bug 3: a replacement reply (P7b) was installed on our extent (our mapping of it replaced, so
// unmapped) before the rest of the reply descriptor was checked. A replier that sent a valid
// replacement memfd and then a Reply | kDescReplaced with an invalid status, or announcing
// handles it never sent, made the call fail with Protocol while handing the caller back a
// "valid" buffer over unmapped memory. Now every check comes first: the buffer keeps its old
// bytes (or is invalid). Every byte is read; a dangling mapping crashes the child (SIGSEGV, or
// an ASan report), which fails this test.
TEST(Hardening, ARejectedReplacementReplyLeavesTheCallersBufferReadable) {
  enum class Lie { Status, Handles };
  for (Lie lie : {Lie::Status, Lie::Handles}) {
    SCOPED_TRACE(lie == Lie::Status ? "status 7" : "handles announced, never sent");
    pid_t pid = spawn(
        [lie] {
          auto p = Channel::pair();
          MBMQ_CHILD_CHECK(p);
          auto& [us, peer] = *p;  // we call on side 0; the peer replies by hand on dir[1]
          constexpr std::size_t kSize = 256 * 1024;  // above slot_size: an extent of ours
          auto b = us.buffer(kSize);
          MBMQ_CHILD_CHECK(b);
          test::fill(b->data(), 11);
          Status result;
          std::thread caller([&] { result = us.call(*b, secs(5)); });
          // The hostile replier, by hand. On a failure here the caller still returns, at its
          // deadline.
          auto reply_with_a_lie = [&]() -> int {
            // The request, taken off dir[0].
            shm::Direction& requests = dir(peer, 0);
            std::uint32_t head = 0;
            shm::Desc req{};
            const Deadline give_up = secs(5);
            while (!raw_pop(requests, &head, &req) && !give_up.expired())
              std::this_thread::sleep_for(std::chrono::milliseconds(1));
            MBMQ_CHILD_CHECK((req.buffer & shm::kExtentBit) != 0);
            // (P7b) A well-formed replacement: a memfd sealed against shrinking, other bytes.
            auto rep = os::make_sealed_memfd("hostile-reply", kSize);
            MBMQ_CHILD_CHECK(rep);
            std::vector<std::byte> answer(kSize);
            test::fill(answer, 12);
            MBMQ_CHILD_CHECK(os::pwrite_full(rep->get(), answer, 0));
            const shm::CtlMsg m{static_cast<std::uint32_t>(shm::CtlType::Extent),
                                req.buffer & ~shm::kExtentBit, req.gen, shm::kExtentReplace};
            const int rfd = rep->get();
            MBMQ_CHILD_CHECK(
                os::send_msg(detail::TestAccess::control_fd(peer), bytes_of(m), {&rfd, 1}));
            // ... then a descriptor that breaks one rule checked after the replacement.
            const auto flags = static_cast<std::uint16_t>(
                shm::kDescReplaced | (lie == Lie::Handles ? shm::kDescHasHandles : 0));
            const std::uint16_t status = lie == Lie::Status ? 7 : 0;
            std::uint32_t tail = 0;
            shm::Direction& replies = dir(peer, 1);
            raw_push(replies, &tail,
                     shm::Desc{req.buffer, req.size, req.gen,
                               kind_bits(shm::DescKind::Reply, flags), status});
            raw_wake(replies);
            return 0;
          };
          const int played = reply_with_a_lie();
          caller.join();
          if (played != 0) return played;
          if (result) std::fprintf(stderr, "the call succeeded\n");
          MBMQ_CHILD_CHECK(!result && result.error().code == Errc::Protocol);
          if (b->valid()) {
            // Every byte: a buffer over an unmapped range faults here.
            MBMQ_CHILD_CHECK(b->size() == kSize);
            MBMQ_CHILD_CHECK(test::check(b->data(), 11));
          }
          return 0;
        },
        20);
    EXPECT_EQ(join(pid), 0) << "128 + " << SIGSEGV << " is SIGSEGV";
  }
}

// ---- Bug 6 -------------------------------------------------------------------------------------

// Bug 6: control messages were sent with a blocking sendmsg() under the endpoint's lock. A peer
// that never reads its control socket let it fill, and our next send froze, holding the lock,
// forever. Now sends never block: the full socket closes the channel with Errc::Protocol.
//
// The construction: we send one-way messages from pool slots, each with one handle attached (a
// /dev/null fd), so each adds one Handles packet to the peer's control socket (P3b). The peer,
// played by hand, takes every descriptor off dir[0] and gives the slot back in dir[0]'s
// `returned` word (P7r), exactly as its receive() and release would, except that it never reads
// the control socket (its receive() would, to find the handles). So we never run out of buffers
// (alloc() harvests the returns), and the packets pile up: the socket holds about 555 of them.
// The loop runs on a thread with a watchdog: a send that blocks fails the test, and closing the
// peer's end then releases it.
TEST(Hardening, APeerThatNeverReadsItsControlSocketGetsProtocolNotAFrozenSender) {
  auto p = Channel::pair();
  ASSERT_TRUE(p);
  auto& [us, peer] = *p;
  auto devnull = os::open_read("/dev/null");
  ASSERT_TRUE(devnull);
  shm::Direction& to_peer = dir(peer, 0);
  constexpr int kSends = 5000;  // far beyond what the socket holds
  std::atomic<bool> done{false};
  std::atomic<int> sent{0};
  std::atomic<std::int64_t> slowest_ns{0};
  Status last;
  std::thread sender([&] {
    std::uint32_t head = 0;
    for (int i = 0; i < kSends; ++i) {
      auto b = us.buffer(64);
      if (!b) {
        last = fail(b.error());
        break;
      }
      auto fd = os::dup_fd(devnull->get());
      if (!fd || !b->attach_fd(fd->release())) {
        last = fail(Errc::System, "test: attach_fd");
        break;
      }
      const std::int64_t t0 = monotonic_ns();
      Status s = us.send(std::move(*b));
      slowest_ns = std::max(slowest_ns.load(), monotonic_ns() - t0);
      if (!s) {
        last = s;
        break;
      }
      ++sent;
      shm::Desc d{};
      // (P7r) Side 0's slot k comes back as bit k of `returned`, in the direction it came on.
      while (raw_pop(to_peer, &head, &d))
        to_peer.returned[d.buffer / 64].fetch_or(std::uint64_t{1} << (d.buffer % 64),
                                                 std::memory_order_seq_cst);
    }
    done = true;
  });
  const Deadline watchdog = secs(10);
  while (!done.load() && !watchdog.expired())
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  if (!done.load()) {
    ADD_FAILURE() << "a send blocked (after " << sent.load()
                  << " sends): the peer does not read its control socket";
    peer.close();  // frees the socket's queue: the blocked sendmsg() returns
    const Deadline grace = secs(5);
    while (!done.load() && !grace.expired())
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (!done.load()) {
      std::fprintf(stderr, "the sender is still blocked after the peer closed\n");
      std::abort();
    }
  }
  sender.join();
  ASSERT_FALSE(last) << "all " << kSends << " sends succeeded into a socket nobody reads";
  EXPECT_EQ(last.error().code, Errc::Protocol) << last.error().message();
  // Closed for flooding, not sooner: the socket took its hundreds of packets (about 555) first;
  // 256 was the ring's capacity before layout v9 (now 1024: the peer here empties it anyway).
  EXPECT_GT(sent.load(), 256) << "sends before the close";
  EXPECT_LT(slowest_ns.load(), 1'000'000'000) << "a send waited (a hang bound, not a speed test)";
  auto end = us.receive(secs(2));
  ASSERT_TRUE(end) << end.error().message();
  EXPECT_EQ(end->kind, Kind::PeerClosed);
  EXPECT_EQ(end->error, Errc::Protocol);
  EXPECT_TRUE(contains(end->why, "control socket full")) << end->why;
  // Other channels of this process are untouched.
  auto other = Channel::pair();
  ASSERT_TRUE(other);
  NumberedServer server(other->first, other->second);
  auto b = other->first.buffer(64);
  ASSERT_TRUE(b);
  write_numbered(b->data(), 5);
  auto r = other->first.call(*b, secs(5));
  ASSERT_TRUE(r) << r.error().message();
  std::uint64_t seq = 0;
  EXPECT_TRUE(read_numbered(b->data(), &seq) && seq == 5 + kAnswered);
  EXPECT_EQ(server.bad(), 0);
}

// ---- Bug 13 ------------------------------------------------------------------------------------

// Bug 13: a reply pushed into a full ring was dropped (WouldBlock, the caller never answered).
// Every descriptor naming a buffer fits in the ring by construction: at most 2 * (slots +
// extents) = 1,024 with the most slots per side (448, layout v9; 256 with 64 before), the ring's
// capacity. But freeing an extent the peer has seen pushed a ReleaseExtent beside them, unbounded
// by that reserve. Here, with 448 slots per side: (1) the server lends its 64 extents one-way and
// the client gives them back (three rounds); (2) the server frees them (its alloc() reaps the
// returns); before the fix each free added a ReleaseExtent the client, busy elsewhere, had not
// read yet; (3) the server lends all 512 of its buffers one-way again, unread; (4) the client
// fires a request from each of its 512 buffers (448 slots, 64 extents) through its queue; (5) the
// server answers every one; (6) every answer arrives, intact. 512 lent + 512 replies fill the
// 1,024 entries exactly: one release more and a reply had no room.
TEST(Hardening, EveryReplyFindsRoomInTheRingAfterExtentsWereFreedRepeatedly) {
  ChannelOptions o;
  o.slots_per_side = shm::kMaxSlotsPerSide;
  o.slot_size = 4096;
  constexpr std::size_t kExtentBytes = 8192;  // above slot_size: an extent
  constexpr int kSlots = static_cast<int>(shm::kMaxSlotsPerSide);
  constexpr int kExtents = static_cast<int>(shm::kMaxExtents);
  static_assert(2 * (kSlots + kExtents) == static_cast<int>(shm::kRingCapacity));
  auto p = Channel::pair(o);
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  auto q = MsgQueue::create();
  ASSERT_TRUE(q);
  ASSERT_TRUE(client.redirect(*q, 1));
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    // (1) and (2): each alloc after the first round reaps the returns, freeing the extents.
    for (int e = 0; e < kExtents; ++e) {
      auto b = server.buffer(kExtentBytes);
      ASSERT_TRUE(b) << e << ": " << b.error().message();
      ASSERT_TRUE(server.send(std::move(*b))) << e;
    }
    for (int e = 0; e < kExtents; ++e) {
      auto m = q->wait(secs(5));
      ASSERT_TRUE(m) << m.error().message();
      ASSERT_EQ(m->kind, Kind::Message);
      m->buffer.reset();  // given back (Return)
    }
  }
  // (3) All 512 server buffers lent again; the client reads none of them yet.
  for (int i = 0; i < kExtents + kSlots; ++i) {
    auto b = server.buffer(i < kExtents ? kExtentBytes : 64);
    ASSERT_TRUE(b) << i << ": " << b.error().message();
    ASSERT_TRUE(server.send(std::move(*b))) << i;
  }
  // (4) The client's 512 requests.
  for (int i = 0; i < kSlots + kExtents; ++i) {
    auto b = client.buffer(i < kSlots ? 64 : kExtentBytes);
    ASSERT_TRUE(b) << i << ": " << b.error().message();
    write_numbered(b->data(), static_cast<std::uint64_t>(i));
    ASSERT_TRUE(client.send_request(std::move(*b))) << i;
  }
  // (5) Every one answered: a reply without room in the ring fails here.
  for (int i = 0; i < kSlots + kExtents; ++i) {
    auto m = server.receive(secs(5));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Request) << m->why;
    std::uint64_t seq = 0;
    ASSERT_TRUE(read_numbered(m->buffer.data(), &seq));
    write_numbered(m->buffer.data(), seq + kAnswered);
    auto r = MsgQueue::reply(std::move(*m));
    ASSERT_TRUE(r) << "reply " << i << ": " << r.error().message();
  }
  // (6) Every answer arrives, each once, intact.
  std::set<std::uint64_t> answered;
  int lent_back = 0;
  while (answered.size() < static_cast<std::size_t>(kSlots + kExtents)) {
    auto m = q->wait(secs(5));
    ASSERT_TRUE(m) << m.error().message() << " with " << answered.size() << " replies";
    ASSERT_NE(m->kind, Kind::PeerClosed) << m->why;
    if (m->kind == Kind::Message) {
      ++lent_back;
      continue;  // the server's buffer goes back as m is dropped
    }
    ASSERT_EQ(m->kind, Kind::Reply);
    ASSERT_NE(m->error, Errc::NoReply) << "an answer came back as NoReply";
    std::uint64_t seq = 0;
    ASSERT_TRUE(read_numbered(m->buffer.data(), &seq));
    ASSERT_GE(seq, kAnswered);
    ASSERT_LT(seq - kAnswered, static_cast<std::uint64_t>(kSlots + kExtents));
    ASSERT_TRUE(answered.insert(seq).second) << "answer " << seq - kAnswered << " twice";
  }
  EXPECT_EQ(lent_back, kSlots + kExtents);
}

// ---- Bug 15 ------------------------------------------------------------------------------------

// Bug 15: a peer's extent was mapped with MAP_POPULATE over its whole file. A 16-byte request
// naming a sparse 1 GiB memfd made the receiver allocate (and zero) 1 GiB of shared memory,
// charged to the receiver. Now only the payload's pages are faulted in.
TEST(Hardening, ASmallPayloadInAHugeSparseExtentCostsOnlyItsPages) {
  auto p = Channel::pair();
  ASSERT_TRUE(p);
  auto& [forger, victim] = *p;
  constexpr std::size_t kFile = std::size_t{1} << 30;
  auto sparse = os::make_sealed_memfd("sparse-extent", kFile);
  ASSERT_TRUE(sparse);
  const std::size_t rss0 = os::resident_bytes();
  ASSERT_TRUE(detail::TestAccess::forge_extent_request(forger, sparse->get(), 1, 16, 0));
  const std::int64_t t0 = monotonic_ns();
  auto m = victim.receive(secs(10));
  const std::int64_t took = monotonic_ns() - t0;
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Request) << m->why;
  ASSERT_EQ(m->buffer.size(), 16u);
  for (std::byte x : m->buffer.data()) EXPECT_EQ(x, std::byte{0});
  struct stat st {};
  ASSERT_EQ(::fstat(sparse->get(), &st), 0);
  const std::uint64_t allocated = static_cast<std::uint64_t>(st.st_blocks) * 512;
  EXPECT_LT(allocated, 16u << 20) << "bytes of the sparse extent the receiver made real";
  const std::size_t rss = os::resident_bytes();
  EXPECT_LT(rss > rss0 ? rss - rss0 : 0, std::size_t{16} << 20) << "resident growth";
  EXPECT_LT(took, 2'000'000'000) << "receive() of 16 bytes took " << took << " ns (a bound)";
}

// ---- Bug 16 ------------------------------------------------------------------------------------

// Bug 16: Handles packets (P3b) a peer sent ahead of any descriptor were all kept: 160 packets
// of 8 fds, 1280 fds per channel, enough to exhaust a process's fd table; and the control socket
// was drained in full, not as far as a descriptor needed. Now the stash holds at most
// kMaxStashedHandleFds; past it the channel closes with Protocol, and what was parked goes.
// Here the peer parks 40 packets of 8 fds (320) for a buffer no descriptor names, then sends one
// real message with a handle: finding its packet means reading past the junk.
TEST(Hardening, HandlesParkedAheadOfTheirMessagesNeverExceedTheStashBudget) {
  { auto warm = Channel::pair(); }  // the peer watcher's own fds exist from here on
  const std::size_t fds0 = os::open_fd_count();
  {
    auto p = Channel::pair();
    ASSERT_TRUE(p);
    auto& [us, peer] = *p;
    auto devnull = os::open_read("/dev/null");
    ASSERT_TRUE(devnull);
    const std::size_t base = os::open_fd_count();
    struct {
      shm::CtlMsg h;
      shm::HandleMeta meta[shm::kMaxHandles];
    } pkt{};
    // Slot 16 is the peer's first (side 1, 16 slots per side); generation 0xdead is never used.
    pkt.h = shm::CtlMsg{static_cast<std::uint32_t>(shm::CtlType::Handles), 16, 0xdead,
                        shm::kMaxHandles};
    std::vector<int> fds;
    for (auto& meta : pkt.meta) {
      meta.kind = static_cast<std::uint32_t>(shm::WireHandle::Fd);
      fds.push_back(devnull->get());
    }
    for (int k = 0; k < 40; ++k)
      ASSERT_TRUE(os::send_msg(detail::TestAccess::control_fd(peer),
                               {reinterpret_cast<const std::byte*>(&pkt), sizeof pkt}, fds))
          << k;
    // The legitimate message, with its own handle, behind the junk.
    auto b = peer.buffer(64);
    ASSERT_TRUE(b);
    auto fd = os::dup_fd(devnull->get());
    ASSERT_TRUE(fd);
    ASSERT_TRUE(b->attach_fd(fd->release()));
    ASSERT_TRUE(peer.send(std::move(*b)));
    auto m = us.receive(secs(5));
    const std::size_t held = os::open_fd_count();
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(m->kind, Kind::PeerClosed) << "320 parked fds were accepted";
    EXPECT_EQ(m->error, Errc::Protocol);
    EXPECT_TRUE(contains(m->why, "handles")) << m->why;
    EXPECT_LE(held, base + detail::kMaxStashedHandleFds + shm::kMaxHandles)
        << "fds held after reading the junk";
  }
  // The peer watcher may hold the last reference for a moment (it wakes for the hang-up): the
  // end is then freed on its thread when the callback returns (ipc/peer_watch.cc).
  const Deadline settle = secs(2);
  while (os::open_fd_count() != fds0 && !settle.expired())
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_EQ(os::open_fd_count(), fds0) << "fds left after the channel is gone";
}

// ---- Bug 20 ------------------------------------------------------------------------------------

// Moves end c through Channel::send_over / receive_from, rewriting on the way the next extent
// generation it carries (HandleMeta::next_extent_gen): what a process would receive from one that
// had used 2^32 - 16 extent generations (or one that sends 0).
Result<Channel> move_with_extent_gen(Channel& c, std::uint32_t gen) {
  auto a = MBMQ_TRY(os::seqpacket_pair());
  auto b = MBMQ_TRY(os::seqpacket_pair());
  MBMQ_TRY(c.send_over(a.first.get()));
  // transfer.cc's TransferMsg: magic (8 bytes), version (4), reserved (4), then the HandleMeta.
  constexpr std::size_t kMetaAt = 16;
  std::byte msg[48]{};
  std::array<os::UniqueFd, 3> fds;
  auto r = MBMQ_TRY(os::recv_msg(a.second.get(), msg, fds, os::Blocking::No));
  if (r.bytes != sizeof msg) return fail(Errc::Protocol, "test: transfer message size");
  std::memcpy(msg + kMetaAt + offsetof(shm::HandleMeta, next_extent_gen), &gen, sizeof gen);
  std::vector<int> raw;
  for (std::size_t k = 0; k < r.nfds; ++k) raw.push_back(fds[k].get());
  MBMQ_TRY(os::send_msg(b.first.get(), msg, raw));
  return Channel::receive_from(b.second.get(), secs(5));
}

// `rounds` calls from an end imported with next_extent_gen = first_gen, each with a fresh extent
// (a new generation of the same extent id, since the previous one was freed); every answer
// checked.
void extent_round_trips_from(std::uint32_t first_gen, int rounds) {
  ChannelOptions o;
  o.slot_size = 4096;
  auto p = Channel::pair(o);
  ASSERT_TRUE(p);
  auto client = move_with_extent_gen(p->first, first_gen);
  ASSERT_TRUE(client) << client.error().message();
  NumberedServer server(*client, p->second);
  for (int i = 0; i < rounds; ++i) {
    auto b = client->buffer(3 * 4096);
    ASSERT_TRUE(b) << i << ": " << b.error().message();
    write_numbered(b->data(), static_cast<std::uint64_t>(i));
    auto r = client->call(*b, secs(5));
    ASSERT_TRUE(r) << "round " << i << ": " << r.error().message();
    std::uint64_t seq = 0;
    ASSERT_TRUE(read_numbered(b->data(), &seq)) << i;
    ASSERT_EQ(seq, static_cast<std::uint64_t>(i) + kAnswered);
  }
  EXPECT_EQ(server.bad(), 0);
}

// Bug 20: extent generations wrapped from 2^32 - 1 to 0, and 0 means "the peer has never seen
// this extent's fd" (OwnExtent::sent_gen): the extent was then sent without its memfd and the
// peer closed the channel ("extent descriptor without its memfd"). The same for an end imported
// with next_extent_gen 0. Now 0 is skipped.
TEST(Hardening, ExtentGenerationsWrapAroundWithoutLosingAMessage) {
  {
    SCOPED_TRACE("next_extent_gen 2^32 - 16, 80 rounds: across the wrap");
    extent_round_trips_from(0xFFFF'FFF0u, 80);
  }
  {
    SCOPED_TRACE("next_extent_gen 0");
    extent_round_trips_from(0, 8);
  }
}

}  // namespace
}  // namespace mbmq
