// Hostile review (rev-a) of 2428a08..1ae8aa9 in src/net: Spares (several payload vectors per
// worker, given back by a large net::Buffer's destructor, taken by buffer() and the receive
// paths) and the in-flight op tracking (PendingOp, ~WorkerCore). Client and server in this one
// process; every wait has a deadline, so a test fails rather than hangs.
//
// On the code reviewed (1ae8aa9, Release, 2 busy vCPUs; ASan+UBSan and TSan builds too), these
// failed (named for what they now assert; fixed since):
//   DestroyingAPair...DoesNotAbort   the helper aborted (ucp_ep.c:437) in 6 of 6 runs, in the
//       server channel's close() (0 of 6 at 2428a08): the peer's K5 linger kept its endpoint
//       open, so the server flush-closed its own endpoint with a fetch (ucp_am_recv_data_nbx)
//       in flight. Fixed (F7, net/core.h): close() and the linger wait for fetches in flight too
//       (looked at after the Bye: the allocating thread may start one meanwhile), and a failure
//       inside a request callback is applied once ucp_worker_progress has returned.
//   AForkedChildDestroysALargeBuffer...  1 child of 1-3 forks hung (futex_do_wait): ~Buffer took
//       the Spares' lock in a forked child; now it does not (ucx_usable()).
//   ASmallBufferPinsNoLargeVector...     64 MiB held by a dead worker's Spares, kept alive by a
//       kept 100 KiB buffer; Buffer::home_ is weak now.
//   SparesLetNothingGo...                {15 MiB, 1 MiB} + give(4 MiB) -> {15 MiB}: evicted, then
//       dropped the new one too; give() now looks first.
//   ABufferOfZeroBytes...                UBSan only: memset(nullptr, 0, 0) in buffer(0).
//   NoPayloadVectorIsAllocatedInsideUcx... passed (the window is a few instructions) but found a
//       wrong comment: buffer() takes spares unlocked, so a callback's "a spare fits" could be
//       stale; the callback now takes the spare first, then decides.
//   The others passed (TSan and ASan reports: none).
#include <dlfcn.h>
#include <execinfo.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <new>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mbmq/net.h"
#include "net/core.h"
#include "net/net_access.h"
#include "net/net_pair.h"
#include "net/net_util.h"
#include "os/process.h"
#include "test_util.h"

// Large allocations made inside a UCX callback (a libucp frame on the stack), i.e. under a
// worker's lock: counted by this binary's operator new (not under sanitizers, which have theirs).
namespace {
std::atomic<int> g_big_in_ucx{0};
std::atomic<bool> g_hook_on{false};
std::atomic<std::size_t> g_hook_min{std::size_t{1} << 20};
}  // namespace
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define REVIEW_S6A_HOOK 1
namespace {
thread_local bool t_in_hook = false;
void note(std::size_t n) {
  if (n < g_hook_min.load(std::memory_order_relaxed) || t_in_hook ||
      !g_hook_on.load(std::memory_order_relaxed))
    return;
  t_in_hook = true;
  void* frames[64];
  const int k = ::backtrace(frames, 64);
  for (int i = 0; i < k; ++i) {
    Dl_info info{};
    if (::dladdr(frames[i], &info) != 0 && info.dli_fname != nullptr &&
        std::strstr(info.dli_fname, "libucp") != nullptr) {
      g_big_in_ucx.fetch_add(1);
      break;
    }
  }
  t_in_hook = false;
}
}  // namespace
void* operator new(std::size_t n) {
  note(n);
  if (void* q = std::malloc(n == 0 ? 1 : n)) return q;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
void operator delete(void* q) noexcept { std::free(q); }
void operator delete[](void* q) noexcept { std::free(q); }
void operator delete(void* q, std::size_t) noexcept { std::free(q); }
void operator delete[](void* q, std::size_t) noexcept { std::free(q); }
#endif

namespace mbmq {
namespace {

using namespace std::chrono_literals;
using test::filled;
using test::make_many;
using test::secs;

constexpr std::size_t kMiB = std::size_t{1} << 20;

// Diagnostics only: private members (net/net_access.h).
using test::capacities;
using test::held_bytes;
using test::spares_of;

std::vector<std::byte> vec(std::size_t cap, char fill = 0) {
  std::vector<std::byte> v;
  v.reserve(cap);
  v.resize(cap, static_cast<std::byte>(fill));
  return v;
}

bool all_are(std::span<const std::byte> s, std::byte b) {
  return std::all_of(s.begin(), s.end(), [&](std::byte x) { return x == b; });
}

// (1) A spare holds another channel's payload: buffer() of a sibling channel (same worker) takes
// it and must zero it all; resize() within its capacity must not show the old tail; a received
// payload landing in a larger spare, resized by the application, must not show its tail either.
TEST(ReviewS6a, NoOtherChannelsBytesThroughBufferOrResize) {
  net::ListenOptions lo;
  net::ConnectOptions co;
  auto m = make_many(2, lo, co);
  ASSERT_TRUE(m);
  auto sp = spares_of(m->server[0]);
  ASSERT_EQ(sp, spares_of(m->server[1]));  // one worker: the listener's
  int leaks = 0;
  for (int round = 0; round < 3; ++round) {
    // Channel 0's secret lands in the server's worker and is dropped: its vector becomes a spare.
    ASSERT_TRUE(m->client[0].send(filled(m->client[0], kMiB, 'S'), secs(10)));
    {
      auto r = m->server[0].receive(secs(10));
      ASSERT_TRUE(r) << r.error().message();
      ASSERT_EQ(r->buffer.size(), kMiB);
    }
    std::printf("round %d: spares after the drop: %zu vectors, %zu bytes\n", round,
                capacities(*sp).size(), held_bytes(*sp));
    // Channel 1's buffer() of 600 KiB: the 1 MiB spare fits ([n, 2n]).
    {
      auto b = m->server[1].buffer(600 << 10);
      ASSERT_TRUE(b) << b.error().message();
      if (!all_are(b->data(), std::byte{0})) ++leaks;
      ASSERT_TRUE(b->resize(kMiB));
      if (!all_are(b->data(), std::byte{0})) ++leaks;
      ASSERT_TRUE(b->resize(10));
      ASSERT_TRUE(b->resize(kMiB));
      if (!all_are(b->data(), std::byte{0})) ++leaks;
    }  // its vector back to the spares
    // Channel 0's secret again, then channel 1 receives 600 KiB of 'T' into that spare.
    ASSERT_TRUE(m->client[0].send(filled(m->client[0], kMiB, 'S'), secs(10)));
    { ASSERT_TRUE(m->server[0].receive(secs(10))); }
    ASSERT_TRUE(m->client[1].send(filled(m->client[1], 600 << 10, 'T'), secs(10)));
    auto r = m->server[1].receive(secs(10));
    ASSERT_TRUE(r) << r.error().message();
    ASSERT_EQ(r->buffer.size(), std::size_t{600} << 10);
    EXPECT_TRUE(all_are(r->buffer.data(), std::byte{'T'}));
    ASSERT_TRUE(r->buffer.resize(kMiB));
    if (!all_are(r->buffer.data().subspan(600 << 10), std::byte{0})) ++leaks;
  }
  EXPECT_EQ(leaks, 0) << "another channel's bytes reached the application";
}

// (1) net::Buffer is copyable: a copy of a received large buffer must keep its bytes after the
// original is dropped (its vector given back) and the next payload lands in that vector.
TEST(ReviewS6a, ACopyOfAReceivedBufferKeepsItsBytes) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  std::optional<net::Buffer> copy;
  {
    ASSERT_TRUE(p->client.send(filled(p->client, 2 * kMiB, 'A'), secs(10)));
    auto r = p->server.receive(secs(10));
    ASSERT_TRUE(r) << r.error().message();
    copy.emplace(r->buffer);  // the application keeps a copy; the original goes back
  }
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(p->client.send(filled(p->client, 2 * kMiB, 'B'), secs(10)));
    auto r = p->server.receive(secs(10));
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_TRUE(all_are(r->buffer.data(), std::byte{'B'}));
  }
  EXPECT_TRUE(all_are(copy->data(), std::byte{'A'})) << "a copy's bytes were overwritten";
}

// (1) Spares' bound (core.h): at most kMaxVectors of kMaxBytes together, or one vector of any
// size; take(n) gives a vector of capacity in [n, 2n] resized to n. Random gives and takes.
TEST(ReviewS6a, SparesStayWithinTheirBound) {
  using net::detail::Spares;
  Spares s;
  std::mt19937 rng(7);
  const std::size_t sizes[] = {Spares::kMin,  Spares::kMin + 1, 100 << 10, kMiB,
                               3 * kMiB / 2,  2 * kMiB,         5 * kMiB,  15 * kMiB,
                               16 * kMiB + 1, 40 * kMiB};
  int broken = 0;
  // 1,500 steps; 600 under a sanitizer (whose page faults made it 15 s of the suite). 3,000 took
  // 29 s of the Release suite (CI, 2026-12-02): each give zero-filled half its vector (page faults
  // over ~4 GB); gives are now of reserved, untouched capacity (Spares looks at capacities only).
  const int steps = test::kSanitized ? 600 : 1500;
  for (int i = 0; i < steps; ++i) {
    const std::size_t n = sizes[rng() % std::size(sizes)];
    if (rng() % 3 == 0) {
      const std::size_t before = held_bytes(s);
      std::vector<std::byte> v = s.take(n);
      if (v.capacity() != 0) {
        if (v.size() != n || v.capacity() < n || v.capacity() / 2 > n) ++broken;
        if (held_bytes(s) != before - v.capacity()) ++broken;
      }
    } else {
      std::vector<std::byte> v;
      v.reserve(n);
      s.give(std::move(v));
    }
    const auto caps = capacities(s);
    std::size_t sum = 0;
    for (std::size_t c : caps) sum += c;
    if (sum != held_bytes(s)) ++broken;
    if (!(caps.size() <= 1 || (caps.size() <= Spares::kMaxVectors && sum <= Spares::kMaxBytes)))
      ++broken;
    if (std::any_of(caps.begin(), caps.end(), [](std::size_t c) { return c <= Spares::kMin; }))
      ++broken;
  }
  EXPECT_EQ(broken, 0);
}

// Spares' count bound, kMaxVectors (256: a default grant's worth of 64 KiB payloads, which a
// receiver behind its sender holds; with 16, half a 64 KiB stream's payloads landed in fresh
// heap pages), and 64 KiB vectors kept (kMin 32 KiB): past the bound a small vector is freed, a
// larger one makes room by letting the smallest go.
TEST(ReviewS6a, SparesKeepAtMostKMaxVectorsAndKeep64KiBVectors) {
  using net::detail::Spares;
  Spares s;
  s.give(vec(64 << 10));
  EXPECT_TRUE(s.has_for(64 << 10)) << "a 64 KiB vector was not kept";
  for (std::size_t i = 0; i < Spares::kMaxVectors + 20; ++i) s.give(vec(Spares::kMin + 1));
  EXPECT_EQ(capacities(s).size(), Spares::kMaxVectors);
  s.give(vec(kMiB));
  const auto caps = capacities(s);
  EXPECT_EQ(caps.size(), Spares::kMaxVectors);
  EXPECT_TRUE(s.has_for(kMiB));
  EXPECT_TRUE(s.has_for(64 << 10));
  std::vector<std::byte> v = s.take(Spares::kMin + 1);
  EXPECT_EQ(v.capacity(), Spares::kMin + 1) << "not the smallest that fits";
}

// (1) Spares::give() lets smaller vectors go to make room, then may find the room still too small
// and drop the given one too: the spares lose a vector for nothing (here a 1 MiB spare, which the
// next 1 MiB payload would have used: 256 page faults).
TEST(ReviewS6a, SparesLetNothingGoForAVectorTheyCannotKeep) {
  using net::detail::Spares;
  Spares s;
  s.give(vec(15 * kMiB));
  s.give(vec(kMiB));  // 16 MiB together: within the bound
  ASSERT_TRUE(s.has_for(kMiB));
  s.give(vec(4 * kMiB));  // 15 + 4 > 16 even without the 1 MiB one: it cannot be kept
  const auto caps = capacities(s);
  std::printf("spares after giving 4 MiB to {15 MiB, 1 MiB}: %zu vectors:", caps.size());
  for (std::size_t c : caps) std::printf(" %zu", c);
  std::printf("\n");
  EXPECT_TRUE(s.has_for(kMiB)) << "the 1 MiB spare was let go, and the 4 MiB one not kept";
}

// One vector larger than every payload since (a 64 MiB message's, kept alone: the bound allows
// one vector of any size) kept every smaller vector out of the spares for good: each 16 MiB
// payload after it got a fresh vector (mbmq-net-bench's one-way 16 MiB after its 64 MiB round
// trips: 1.67x raw UCX against 1.10x without them). Now it is let go once the takes it was too
// large for asked for as many bytes as it holds, and the size in use is kept again.
TEST(NetSpares, ALargeVectorNoLongerUsedMakesRoomForTheSizesInUse) {
  using net::detail::Spares;
  Spares s;
  s.give(vec(64 * kMiB));
  s.give(vec(16 * kMiB));  // beyond the bound beside the 64 MiB one: not kept
  ASSERT_EQ(capacities(s).size(), 1u);
  for (int k = 1; k < 4; ++k) {  // 48 MiB asked for: less than it holds
    EXPECT_EQ(s.take(16 * kMiB).capacity(), 0u);
    ASSERT_EQ(capacities(s).size(), 1u) << "let go after " << k << " misses";
  }
  for (int k = 0; k < 32; ++k) {  // 16 MiB more, in halves of a MiB: 64 MiB in all
    ASSERT_EQ(capacities(s).size(), 1u) << "let go after " << k << " small misses";
    EXPECT_EQ(s.take(kMiB / 2).capacity(), 0u);
  }
  EXPECT_TRUE(capacities(s).empty()) << "the 64 MiB vector is still kept";
  EXPECT_EQ(held_bytes(s), 0u);
  s.give(vec(16 * kMiB));
  EXPECT_EQ(s.take(16 * kMiB).capacity(), 16 * kMiB) << "the size in use was not kept";
  // A vector that fits is never let go by misses of other sizes it is too small for.
  s.give(vec(2 * kMiB));
  for (int k = 0; k < 64; ++k) EXPECT_EQ(s.take(8 * kMiB).capacity(), 0u);
  EXPECT_EQ(s.take(2 * kMiB).capacity(), 2 * kMiB);
}

// A one-way stream of 1 MiB messages at the default grant has up to 16 of them out (16 MiB / 1
// MiB). Their vectors come back in bursts: the sender's once UCX has read them (the send callbacks
// of one progress), the receiver's when its application drops what it received. With room for 8
// vectors (kMaxVectors was 8) the rest were freed, and the next buffer() or received payload got
// a fresh vector (page faults): 6-29 % of each side's messages in mbmq-net-bench's one-way 1 MiB
// stream. Every vector of a full window is kept now, on both sides (counted: 8 of 16 before).
TEST(NetSpares, AFullWindowOfMegabyteMessagesKeepsEveryVector) {
  constexpr std::size_t kOut = net::kDefaultInboxBytes / kMiB;  // the default grant's window: 16
  // No keeper (peer_timeout 0): only this test's threads progress the workers and touch their
  // spares, so the unlocked held_bytes() below reads what this thread's progress wrote.
  auto p = test::make_pair_without_keepers();
  ASSERT_TRUE(p);
  for (std::size_t i = 0; i < kOut; ++i)  // within the grant: none waits for credit
    ASSERT_TRUE(p->client.send(filled(p->client, kMiB, 'w'))) << i;
  // The client's worker progressed meanwhile (a rendezvous payload moves only then).
  std::atomic<bool> stop{false};
  std::thread progress([&] {
    while (!stop.load()) (void)p->client.receive(Deadline::after(2ms));
  });
  std::vector<net::Message> got;
  for (std::size_t i = 0; i < kOut; ++i) {
    auto r = p->server.receive(secs(10));
    if (!r || r->buffer.size() != kMiB) break;
    got.push_back(std::move(*r));
  }
  stop.store(true);
  progress.join();
  ASSERT_EQ(got.size(), kOut);
  got.clear();  // the receiver's application drops the whole window at once
  // The client's sends complete as its worker progresses (each gives its vector back).
  auto client_spares = spares_of(p->client);
  const std::int64_t until = monotonic_ns() + 3'000'000'000;
  while (held_bytes(*client_spares) < kOut * kMiB && monotonic_ns() < until)
    (void)p->client.receive(Deadline::after(5ms));
  // What the next window's buffer()s and received payloads find (take(): under the lock).
  auto count = [](net::detail::Spares& s) {
    std::size_t n = 0;
    while (s.take(kMiB).capacity() != 0) ++n;
    return n;
  };
  const std::size_t client_kept = count(*client_spares);
  const std::size_t server_kept = count(*spares_of(p->server));
  std::printf("1 MiB vectors kept of a window of %zu: sender %zu, receiver %zu\n", kOut,
              client_kept, server_kept);
  EXPECT_EQ(client_kept, kOut);
  EXPECT_EQ(server_kept, kOut);
}

// (1) A large net::Buffer keeps its worker's Spares alive (home_), after the worker and all its
// channels are gone: the vectors given to it meanwhile (here a dropped 64 MiB message's) stay
// allocated, for receives that can never come, as long as any such buffer lives. A 100 KiB
// message kept by the application pins 64 MiB (the documented bound is per worker, for its next
// payloads; a client has a worker per connection).
TEST(ReviewS6a, ASmallBufferPinsNoLargeVectorAfterItsWorkerIsGone) {
  std::optional<net::Buffer> kept;
  std::weak_ptr<net::detail::Spares> orphan;
  std::weak_ptr<net::detail::WorkerCore> worker;
  std::int64_t before = 0;
  {
    auto p = test::make_pair();
    ASSERT_TRUE(p);
    orphan = spares_of(p->server);
    worker = test::core_of(p->server)->w_;
    ASSERT_TRUE(p->client.send(filled(p->client, 100 << 10, 'k'), secs(10)));
    auto r = p->server.receive(secs(10));
    ASSERT_TRUE(r) << r.error().message();
    kept.emplace(std::move(r->buffer));  // the application keeps a 100 KiB message
    before = test::heap_bytes();
    ASSERT_TRUE(p->client.send(filled(p->client, 64 * kMiB, 'b'), secs(10)));
    auto big = p->server.receive(secs(20));
    ASSERT_TRUE(big) << big.error().message();
    ASSERT_EQ(big->buffer.size(), 64 * kMiB);
  }  // the 64 MiB message dropped (its vector to the spares), then the channels and listener
  // The workers go (the client's at once; the listener's once nothing holds it).
  const std::int64_t until = monotonic_ns() + 5'000'000'000;
  while (monotonic_ns() < until && !worker.expired()) std::this_thread::sleep_for(10ms);
  ASSERT_TRUE(worker.expired()) << "the listener's worker still lives after 5 s";
  const std::int64_t grown = test::heap_bytes() - before;
  auto sp = orphan.lock();
  std::printf(
      "the listener's worker gone: heap +%.1f MiB; the listener worker's spares %s (%zu "
      "vectors, %zu bytes)\n",
      static_cast<double>(grown) / kMiB, sp ? "alive" : "gone", sp ? capacities(*sp).size() : 0,
      sp ? held_bytes(*sp) : 0);
  const std::size_t pinned = sp ? held_bytes(*sp) : 0;
  sp.reset();
  kept.reset();
  std::printf("after the 100 KiB buffer is dropped: heap +%.1f MiB\n",
              static_cast<double>(test::heap_bytes() - before) / kMiB);
  EXPECT_LT(pinned, std::size_t{8} << 20)
      << "a 100 KiB buffer kept a dead worker's 64 MiB spare allocated";
}

// (1) A forked child that destroys a large net::Buffer (a copy of its parent's) gives its vector
// to the parent's Spares: it takes Spares::mu_, which another parent thread may have held at the
// fork, for ever in the child. The rest of mbmq::net takes no lock in a forked child (reply():
// check_not_forked "before the lock: a forked child may have it held"; ~WorkerCore and close():
// ucx_usable()). Before this change ~Buffer took no lock (a plain vector).
TEST(ReviewS6a, AForkedChildDestroysALargeBufferWithoutHanging) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  auto sp = spares_of(p->server);
  std::atomic<bool> stop{false};
  std::vector<std::thread> busy;  // the worker's spares in use (as receives or buffer() would)
  for (int i = 0; i < 3; ++i)
    busy.emplace_back([&] {
      while (!stop.load(std::memory_order_relaxed)) (void)sp->has_for(kMiB);
    });
  int hung = 0;
  int runs = 0;
  for (; runs < 200 && hung == 0; ++runs) {
    std::optional<net::Buffer> b;
    {
      auto r = p->server.buffer(kMiB);
      ASSERT_TRUE(r) << r.error().message();
      b.emplace(std::move(*r));
    }
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      b.reset();  // ~Buffer: home_->give()
      ::_exit(0);
    }
    bool done = false;
    const std::int64_t until = monotonic_ns() + 1'000'000'000;
    while (!done && monotonic_ns() < until) {
      int st = 0;
      if (::waitpid(pid, &st, WNOHANG) == pid) {
        done = true;
        break;
      }
      std::this_thread::sleep_for(1ms);
    }
    if (!done) {
      ++hung;
      std::ifstream wchan("/proc/" + std::to_string(pid) + "/wchan");
      std::string where;
      std::getline(wchan, where);
      std::printf("child %d hung, in the kernel at %s\n", static_cast<int>(pid), where.c_str());
      ::kill(pid, SIGKILL);
      int st = 0;
      (void)::waitpid(pid, &st, 0);
    }
  }
  stop.store(true);
  for (auto& t : busy) t.join();
  std::printf("forked children hung destroying a 1 MiB net::Buffer: %d of %d\n", hung, runs);
  EXPECT_EQ(hung, 0) << "a forked child hung in ~net::Buffer (Spares::mu_ held at the fork)";
}

// (2) A receive in flight (the listener's worker fetching a 32 MiB payload, into a spare or a
// fresh vector) when the listener and its channel are destroyed: ~WorkerCore progresses for it,
// then frees what UCX dropped. Run under ASan for use-after-free / double free (the RecvOp
// freed by recv_done during the drain, or by the drain after ucp_worker_destroy, never both);
// here: nothing crashes, the client learns the end, the heap does not keep the payloads.
TEST(ReviewS6a, AReceiveInFlightWhenItsWorkerGoesIsFreedOnce) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  const std::int64_t before = test::heap_bytes();
  for (int round = 0; round < 6; ++round) {
    auto p = test::make_pair(lo, co);
    ASSERT_TRUE(p);
    std::atomic<bool> stop{false};
    std::thread client([&] {
      Status s = p->client.send(filled(p->client, 32 * kMiB, 'r'), secs(10));
      EXPECT_TRUE(s) << s.error().message();
      const std::int64_t until = monotonic_ns() + 5'000'000'000;
      while (!stop.load() && monotonic_ns() < until) (void)p->client.receive(Deadline::after(2ms));
    });
    // The server progresses a little (the RTS comes, the fetch starts), then goes.
    for (int i = 0; i < 1 + round; ++i) (void)p->server.receive(Deadline::after(1ms));
    p->server = net::Channel{};
    p->l = net::Listener{};
    std::this_thread::sleep_for(std::chrono::milliseconds(20 * round));
    stop.store(true);
    client.join();
  }
  std::this_thread::sleep_for(200ms);
  std::printf("heap after 6 rounds of 32 MiB receives cut short: %+.1f MiB\n",
              static_cast<double>(test::heap_bytes() - before) / kMiB);
  EXPECT_LT(test::heap_bytes() - before, std::int64_t{40} << 20);
}

// (2) A call() that times out with its 8 MiB request still read by UCX (the peer does not
// progress): the request's vector goes with the send (op->owned, op->owner cleared), buf is given
// up. Then the peer goes and the channel is destroyed: the op completes (cancelled) or is freed by
// ~WorkerCore, once, and its vector is not given to a Buffer's home while UCX reads it.
TEST(ReviewS6a, ACallTimedOutWithItsRequestInFlightIsFreedOnce) {
  net::ListenOptions lo;
  lo.peer_timeout = 0ms;
  net::ConnectOptions co;
  co.peer_timeout = 0ms;
  for (int round = 0; round < 3; ++round) {
    auto p = test::make_pair(lo, co);
    ASSERT_TRUE(p);
    net::Buffer b = filled(p->client, 8 * kMiB, 'c');
    Status s = p->client.call(b, Deadline::after(30ms));
    ASSERT_FALSE(s);
    EXPECT_EQ(s.error().code, Errc::TimedOut) << s.error().message();
    EXPECT_FALSE(b.valid());
    EXPECT_EQ(b.size(), 0u);
    // A new buffer of the same size must not be the one UCX may still read (it is zeroed: if it
    // were, the request would change under UCX; checked on the server side below).
    net::Buffer other = filled(p->client, 8 * kMiB, 'X');
    if (round == 0) {
      // The server fetches the request: its bytes are the call's ('c'), not 'X'. (The client's
      // worker progressed meanwhile, by a thread: UCX serves the fetch from there.)
      std::atomic<bool> stop{false};
      std::thread progress([&] {
        const std::int64_t until = monotonic_ns() + 10'000'000'000;
        while (!stop.load() && monotonic_ns() < until)
          (void)p->client.receive(Deadline::after(2ms));
      });
      auto r = p->server.receive(secs(10));
      stop.store(true);
      progress.join();
      ASSERT_TRUE(r) << r.error().message();
      ASSERT_EQ(r->buffer.size(), 8 * kMiB);
      EXPECT_TRUE(all_are(r->buffer.data(), std::byte{'c'})) << "the request changed in flight";
    }
    p->server = net::Channel{};
    p->l = net::Listener{};
    for (int i = 0; i < 20; ++i) (void)p->client.receive(Deadline::after(2ms));
  }
}

// (1) needs_fresh_locked() (core.h: "Only threads holding mu take spares, so a false answer holds
// until mu is released") is checked, then take_spare() takes, in the AM callback under the
// worker's lock; but buffer() and the allocating thread (start_deferred_slow) take spares without
// that lock. A buffer() between the two leaves the callback to allocate the payload's vector
// fresh, under the lock, inside UCX (a 9 MiB one: 2304 page faults; bad_alloc there escapes
// through UCX's C frames: std::terminate). 9 MiB payloads: the spares keep one at most. Counted:
// allocations of 1 MiB or more with a libucp frame on the stack.
TEST(ReviewS6a, NoPayloadVectorIsAllocatedInsideUcxWhenBufferTakesTheSpare) {
  // (Under a sanitizer, which has its own operator new, nothing is counted: a stress for TSan.)
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  constexpr std::size_t kN = 9 * kMiB;
  void* warm[4];
  (void)::backtrace(warm, 4);  // loads libgcc_s now, not inside operator new
  std::atomic<bool> stop{false};
  std::thread sender([&] {
    while (!stop.load()) {
      if (!p->client.send(filled(p->client, kN, 's'), Deadline::after(200ms))) continue;
    }
  });
  std::thread stealer([&] {  // the application's buffer() of the same size, on the same worker
    std::mt19937 rng(3);
    while (!stop.load()) {
      { auto b = p->server.buffer(kN); }
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
    }
  });
  g_hook_on.store(true);
  int received = 0;
  const std::int64_t until = monotonic_ns() + 4'000'000'000;
  while (monotonic_ns() < until)
    if (auto r = p->server.receive(Deadline::after(50ms))) ++received;
  g_hook_on.store(false);
  stop.store(true);
  sender.join();
  stealer.join();
  const int raced = g_big_in_ucx.load();
  // Control (that the hook sees such allocations): a 900 KiB rendezvous payload, below the
  // deferral's 1 MiB, has its vector allocated in the callback, by design. The sender's last
  // 9 MiB messages are received first and skipped (one taken for the control's failed it: 3 of
  // 72 runs under load), and a spare vector is held meanwhile (a spare would serve it with no
  // allocation).
  for (int idle = 0; idle < 4;)  // until 200 ms pass with nothing
    idle = p->server.receive(Deadline::after(50ms)) ? 0 : idle + 1;
  auto hold = p->server.buffer(kN);  // takes the spare, if there is one
  EXPECT_TRUE(hold);
  g_big_in_ucx.store(0);
  g_hook_min.store(512 << 10);
  g_hook_on.store(true);
  std::thread control([&] { (void)p->client.send(filled(p->client, 900 << 10, 'c'), secs(10)); });
  {
    // A late 9 MiB message of the sender's may still come first (a send that timed out goes on).
    bool got = false;
    for (const Deadline end = secs(10); !got && !end.expired();) {
      auto r = p->server.receive(end);
      if (!r) break;
      got = r->buffer.size() == std::size_t{900} << 10;
    }
    EXPECT_TRUE(got) << "the control message did not arrive";
  }
  control.join();
  g_hook_on.store(false);
  const int control_seen = g_big_in_ucx.exchange(raced);
  // Nothing left in flight when the pair goes (DestroyingAPair... is that case).
  for (int i = 0; i < 10; ++i) (void)p->server.receive(Deadline::after(50ms));
  std::printf(
      "%d messages of 9 MiB received; vectors of 1 MiB+ allocated inside UCX: %d "
      "(control, 900 KiB in the callback by design: %d seen)\n",
      received, raced, control_seen);
  EXPECT_EQ(g_big_in_ucx.load(), 0) << "a payload vector was allocated under the worker's lock";
#ifdef REVIEW_S6A_HOOK
  EXPECT_GE(control_seen, 1) << "the hook does not see allocations inside UCX";
#endif
}

// (1) buffer(0): Spares::take(0) gives an empty vector, whose size() equals 0, so buffer() calls
// memset(data(), 0, 0) with data() null (channel.cc, ChannelCore::buffer): undefined behaviour
// (memset's argument is declared nonnull); UBSan (the asan preset, no recovery) aborts here.
// Passes in Release.
TEST(ReviewS6a, ABufferOfZeroBytesPassesNoNullPointerToMemset) {
  auto p = test::make_pair();
  ASSERT_TRUE(p);
  auto b = p->client.buffer(0);
  ASSERT_TRUE(b) << b.error().message();
  EXPECT_EQ(b->size(), 0u);
}

// Seen while running the test above (Release, 3 of ~15 runs): the process aborted when the pair
// was destroyed, in UCX: "ucp_ep.c:437 Assertion `ucs_hlist_is_empty(&ucp_ep_ext_gen(ep)->
// proto_reqs)' failed", from ucp_worker_progress <- WorkerCore::progress_locked <-
// ChannelCore::close() <- ~Channel: an endpoint closed (force) with a request of it still in UCX
// (a 9 MiB send or receive), destroyed by a later progress. The helper repeats that ending: 9 MiB
// messages in flight both ways of being fetched, then the pair destroyed. Run as a program of its
// own (it aborts); the test fails if it does not exit cleanly within its deadline.
TEST(ReviewS6a, DISABLED_HelperDestroyAPairWithLargeTransfersInFlight) {
  for (int round = 0; round < 8; ++round) {
    auto p = test::make_pair();
    ASSERT_TRUE(p);
    std::atomic<bool> stop{false};
    std::thread sender([&] {
      while (!stop.load())
        (void)p->client.send(filled(p->client, 9 * kMiB, 's'), Deadline::after(200ms));
    });
    std::thread stealer([&] {  // (REVIEW_S6A_NO_STEALER set: none)
      while (!stop.load() && std::getenv("REVIEW_S6A_NO_STEALER") == nullptr) {
        { auto b = p->server.buffer(9 * kMiB); }
        std::this_thread::sleep_for(100us);
      }
    });
    const std::int64_t until = monotonic_ns() + 400'000'000;
    while (monotonic_ns() < until) (void)p->server.receive(Deadline::after(50ms));
    stop.store(true);
    sender.join();
    stealer.join();
    std::printf("round %d: destroying the client\n", round);
    std::fflush(stdout);
    p->client = net::Channel{};
    std::printf("round %d: destroying the server's channel\n", round);
    std::fflush(stdout);
    p->server = net::Channel{};
    std::printf("round %d: destroying the listener\n", round);
    std::fflush(stdout);
  }  // the pair destroyed with a 9 MiB message maybe in flight
}

TEST(ReviewS6a, DestroyingAPairWithLargeTransfersInFlightDoesNotAbort) {
  int aborted = 0;
  int runs = 0;
  for (; runs < 2 && aborted == 0; ++runs) {  // each of 8 rounds: 6 of 6 runs aborted before
    auto pid = test::spawn_helper("ReviewS6a.DISABLED_HelperDestroyAPairWithLargeTransfersInFlight",
                                  {"UCX_HANDLE_ERRORS=none"});
    ASSERT_TRUE(pid) << pid.error().message();
    int st = 0;
    bool done = false;
    const std::int64_t until = monotonic_ns() + 60'000'000'000;
    while (!done && monotonic_ns() < until) {
      if (::waitpid(*pid, &st, WNOHANG) == *pid)
        done = true;
      else
        std::this_thread::sleep_for(10ms);
    }
    if (!done) {
      ::kill(*pid, SIGKILL);
      (void)::waitpid(*pid, &st, 0);
      ADD_FAILURE() << "the helper did not finish in 60 s";
      break;
    }
    const bool clean = WIFEXITED(st) && WEXITSTATUS(st) == 0;
    std::printf("helper run %d: %s %d\n", runs, WIFSIGNALED(st) ? "killed by signal" : "exit",
                WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
    if (!clean) ++aborted;
  }
  EXPECT_EQ(aborted, 0) << "destroying a pair with a large transfer in flight aborted the process";
}

}  // namespace
}  // namespace mbmq
