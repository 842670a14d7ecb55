// Trust modes (P3c, P5b, P7b of src/shm/layout.h): a hostile sender that keeps writing after
// sending cannot change what an untrusted receiver sees, on the copy path and the sealed path;
// memfds without the required seals are refused with a clear error; answers travel back intact.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <thread>

#include "ipc/test_access.h"
#include "mbmq/rendezvous.h"
#include "os/file.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/process.h"
#include "support/fast.h"
#include "test_util.h"

namespace mbmq {
namespace {

using test::join;
using test::secs;
using test::spawn;

std::uint64_t hash(std::span<const std::byte> d) { return test::fnv1a(d); }

// The sealed path above 64 KiB (the slot size): copy_threshold's default copies everything.
constexpr std::uint32_t kSealAbove64K = 64 * 1024;

ChannelOptions untrusted_server(std::uint32_t threshold = kSealAbove64K) {
  ChannelOptions o;
  o.trust = {Trust::Cooperative, Trust::Untrusted};  // the second end (the server) trusts nobody
  o.copy_threshold = threshold;
  return o;
}

// The hostile client sends a message of `size` bytes one-way and, once the server has taken it,
// keeps scribbling over every byte it can still write (the pool slot, or its view of the extent
// and, through the fd, the file itself) for 300 ms; the untrusted server must see the original
// bytes, unchanged, the whole time. (Before the receiver takes a message its sender may of course
// still change it: that is its own data until then.) On the sealed path every attempt on the
// file itself must be refused by the kernel.
void hostile_writer_case(std::size_t size, std::uint32_t threshold, bool expect_sealed) {
  auto p = Channel::pair(untrusted_server(threshold));
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  auto taken = os::make_pipe();  // the server says "taken" on it
  ASSERT_TRUE(taken);
  pid_t pid = spawn([&] {
    server.close();
    taken->second.reset();
    auto b = client.buffer(size);
    if (!b) return 10;
    test::fill(b->data(), 7);
    std::byte* view = b->data().data();
    const int fd = detail::TestAccess::extent_fd(client, *b);
    os::UniqueFd file(fd >= 0 ? ::dup(fd) : -1);
    if (!client.send(std::move(*b))) return 11;
    std::byte go{};
    if (!os::read_full(taken->first.get(), {&go, 1})) return 12;
    int refused = 0, tries = 0;
    const std::int64_t end = monotonic_ns() + 300'000'000;
    while (monotonic_ns() < end) {
      if (!expect_sealed) {
        // The slot or shared extent mapping is still writable: scribble on it.
        std::memset(view, static_cast<int>(monotonic_ns() & 0xff), size);
      }
      if (file) {
        ++tries;
        std::byte junk[64]{};
        // EPERM: the seal. A sealed extent on huge pages (where vm.nr_hugepages has some free):
        // hugetlbfs has no write() at all (EINVAL).
        if (::pwrite(file.get(), junk, sizeof junk, 0) < 0 &&
            (errno == EPERM || (errno == EINVAL && os::is_hugetlb(file.get()))))
          ++refused;
        void* m = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, file.get(), 0);
        if (m == MAP_FAILED) {
          ++refused;
        } else {
          std::memset(m, 0x5a, size);
          ::munmap(m, size);
        }
        if (::ftruncate(file.get(), 4096) != 0) ++refused;
      }
      ::usleep(1000);
    }
    if (expect_sealed && refused != 3 * tries) return 20;  // the file must be immutable
    return 0;
  });
  client.close();
  auto m = server.receive(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Message);
  ASSERT_EQ(m->buffer.size(), size);
  const std::byte go{1};
  ASSERT_TRUE(os::write_full(taken->second.get(), {&go, 1}));
  EXPECT_TRUE(test::check(m->buffer.data(), 7));
  const std::uint64_t first = hash(m->buffer.data());
  for (int i = 0; i < 10; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_EQ(hash(m->buffer.data()), first) << "the sender changed what we saw, round " << i;
  }
  EXPECT_TRUE(test::check(m->buffer.data(), 7));
  m->buffer.reset();
  EXPECT_EQ(join(pid), 0);
}

TEST(Trust, CopyPathSlotIsImmuneToLaterWrites) { hostile_writer_case(4096, 0, false); }

TEST(Trust, CopyPathExtentIsImmuneToLaterWrites) {
  // 512 KiB: an extent (above slot_size), copied (below the 1 MiB threshold).
  hostile_writer_case(512 * 1024, 1 << 20, false);
}

TEST(Trust, SealedPathIsImmuneToLaterWrites) {
  // 4 MiB, above a 64 KiB threshold (slot_size): sealed by the sender, mapped, not copied.
  hostile_writer_case(4 << 20, kSealAbove64K, true);
}

TEST(Trust, DefaultCopyPathIsImmuneToLaterWritesAtAnySize) {
  // 4 MiB with the default threshold: an unsealed extent, copied before the server sees it.
  hostile_writer_case(4 << 20, 0, false);
}

// A peer announcing a huge sparse extent with a tiny payload gets a private copy of the payload's
// size (at least slot_size), not of the file: what it can make an untrusted end allocate is
// bounded by what it sends.
TEST(Trust, DefaultCopyIsSizedByThePayloadNotTheFile) {
  auto p = Channel::pair(untrusted_server(0));
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  auto sparse = os::make_sealed_memfd("sparse", std::size_t{1} << 30);  // 1 GiB, never written
  ASSERT_TRUE(sparse);
  ASSERT_TRUE(detail::TestAccess::forge_extent_request(client, sparse->get(), 1, 8, 0));
  auto m = server.receive(secs(5));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Request);
  EXPECT_EQ(m->buffer.size(), 8u);
  EXPECT_LE(m->buffer.capacity(), std::size_t{64} * 1024);
  EXPECT_TRUE(MsgQueue::reply(std::move(*m)));
}

// The spare extent (BufferTable::wants_spare): a sealed call prepares the fresh pages of the next
// sealed request, mapped writable by the sender. The next request takes them; sealing it must
// happen only once no writable mapping is left. Honest sender: the spare's own mapping is dropped
// and the spare itself is sealed (zero copies). Hostile sender that kept a writable mapping of the
// spare: the kernel refuses F_SEAL_WRITE (EBUSY), the payload goes in a fresh sealed copy, and its
// later writes through the kept mapping change nothing the server sees.
void spare_case(bool keep_mapping) {
  constexpr std::size_t kSize = 4 << 20;
  auto p = Channel::pair(untrusted_server());
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  auto taken = os::make_pipe();
  ASSERT_TRUE(taken);
  pid_t pid = spawn([&] {
    server.close();
    taken->second.reset();
    auto b = client.buffer(kSize);
    if (!b) return 10;
    test::fill(b->data(), 1);
    if (!client.call(*b, secs(10))) return 11;  // sealed: prepares the spare meanwhile
    if (!b->resize(kSize)) return 12;           // grows into the spare
    const int fd = detail::TestAccess::extent_fd(client, *b);
    if (fd < 0) return 13;
    os::UniqueFd file(::dup(fd));
    void* kept = MAP_FAILED;
    if (keep_mapping) {
      kept = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, file.get(), 0);
      if (kept == MAP_FAILED) return 14;
    }
    test::fill(b->data(), 7);
    if (!client.send(std::move(*b))) return 15;
    auto seals = os::get_seals(file.get());
    const bool immutable = seals && (*seals & os::kSealsImmutable) == os::kSealsImmutable;
    // Kept mapping: the spare could not be sealed; else it was, itself.
    if (immutable == keep_mapping) return 16;
    std::byte go{};
    if (!os::read_full(taken->first.get(), {&go, 1})) return 17;
    const std::int64_t end = monotonic_ns() + 200'000'000;
    while (keep_mapping && monotonic_ns() < end) {
      std::memset(kept, static_cast<int>(monotonic_ns() & 0xff), kSize);
      ::usleep(1000);
    }
    if (keep_mapping) ::munmap(kept, kSize);
    return 0;
  });
  client.close();
  auto first = server.receive(secs(10));
  ASSERT_TRUE(first) << first.error().message();
  ASSERT_EQ(first->kind, Kind::Request);
  EXPECT_TRUE(test::check(first->buffer.data(), 1));
  ASSERT_TRUE(first->buffer.resize(8));
  ASSERT_TRUE(MsgQueue::reply(std::move(*first)));
  auto m = server.receive(secs(10));
  ASSERT_TRUE(m) << m.error().message();
  ASSERT_EQ(m->kind, Kind::Message);
  ASSERT_EQ(m->buffer.size(), kSize);
  const std::byte go{1};
  ASSERT_TRUE(os::write_full(taken->second.get(), {&go, 1}));
  const std::uint64_t h = hash(m->buffer.data());
  for (int i = 0; i < 10; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_EQ(hash(m->buffer.data()), h) << "the sender changed what we saw, round " << i;
  }
  EXPECT_TRUE(test::check(m->buffer.data(), 7));
  m->buffer.reset();
  EXPECT_EQ(join(pid), 0);
}

TEST(Trust, ASpareExtentIsSealedOnlyOnceItsWritableMappingIsGone) { spare_case(false); }

TEST(Trust, ASpareExtentWhoseMappingTheSenderKeptGoesInAFreshSealedCopy) { spare_case(true); }

// Round trips in every size class, with the answer checked: request and reply both copied,
// both sealed, and mixed; both ends untrusted, so replies are checked too.
TEST(Trust, RoundTripsCarryTheirAnswersInEveryPath) {
  ChannelOptions o;
  o.trust = {Trust::Untrusted, Trust::Untrusted};
  o.copy_threshold = 256 * 1024;
  auto p = Channel::pair(o);
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  pid_t pid = spawn([&] {
    client.close();
    for (;;) {
      auto m = server.receive(secs(30));
      if (!m || m->kind != Kind::Request) return 0;
      // Request: its size and seq in the first 16 bytes, the pattern of seq after them. The
      // answer: `answer` bytes of the pattern of seq + 1, written over the request in place.
      std::uint64_t hdr[2];
      std::memcpy(hdr, m->buffer.data().data(), 16);
      if (!test::check(m->buffer.data().subspan(16), hdr[1])) return 5;
      const std::size_t answer = static_cast<std::size_t>(hdr[0]);
      if (!m->buffer.resize(std::min(answer, m->buffer.capacity()))) return 6;
      test::fill(m->buffer.data(), hdr[1] + 1);
      if (!MsgQueue::reply(std::move(*m))) return 7;
    }
  });
  server.close();
  struct Case {
    std::size_t request, answer;
  };
  std::uint64_t seq = 100;
  for (Case c : {Case{64, 64}, Case{100000, 8}, Case{100000, 100000}, Case{1 << 20, 8},
                 Case{1 << 20, 1 << 20}, Case{3 << 20, 3 << 20}, Case{64, 64}}) {
    SCOPED_TRACE(std::to_string(c.request) + " -> " + std::to_string(c.answer));
    auto b = client.buffer(c.request);
    ASSERT_TRUE(b);
    for (int round = 0; round < 3; ++round, ++seq) {  // the same buffer, again and again
      ASSERT_TRUE(b->resize(c.request));
      test::fill(b->data().subspan(16), seq);
      std::uint64_t hdr[2] = {c.answer, seq};
      std::memcpy(b->data().data(), hdr, 16);
      auto r = client.call(*b, secs(30));
      ASSERT_TRUE(r) << r.error().message();
      const std::size_t want = std::min(c.answer, std::max<std::size_t>(c.request, 65536));
      ASSERT_EQ(b->size(), std::min(c.answer, want));
      EXPECT_TRUE(test::check(b->data(), seq + 1));
    }
  }
  client.close();
  EXPECT_EQ(join(pid), 0);
}

// A forging sender: extents that break P5b's rules end the channel with Errc::Protocol.
void expect_refused(int fd, std::uint32_t size, std::uint32_t aux, const char* what,
                    const char* why_contains) {
  SCOPED_TRACE(what);
  auto p = Channel::pair(untrusted_server());
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  ASSERT_TRUE(detail::TestAccess::forge_extent_request(client, fd, 1, size, aux));
  // The final message of the channel says why.
  auto m = server.receive(secs(5));
  ASSERT_TRUE(m) << m.error().message();
  EXPECT_EQ(m->kind, Kind::PeerClosed);
  EXPECT_EQ(m->error, Errc::Protocol);
  EXPECT_NE(std::string(m->why).find(why_contains), std::string::npos) << m->why;
  // The forger sees the channel end too.
  auto b = client.buffer(64);
  if (b) {
    auto r = client.call(*b, secs(5));
    EXPECT_FALSE(r);
  }
}

TEST(Trust, ForgedExtentsAreRefused) {
  const std::size_t size = 1 << 20;
  // 1. Not sealed against writing, announced as sealed.
  auto plain = os::make_sealed_memfd("forged-plain", size);
  ASSERT_TRUE(plain);
  expect_refused(plain->get(), size, shm::kExtentSealed, "unsealed memfd claiming seals",
                 "lacks F_SEAL_WRITE");
  // 2. Not sealed, not claiming it, above the threshold.
  expect_refused(plain->get(), size, 0, "unsealed memfd above copy_threshold",
                 "not in a sealed memfd");
  // 3. F_SEAL_FUTURE_WRITE with a writable mapping left: the sender could still write.
  auto future = os::make_sealed_memfd("forged-future", size);
  ASSERT_TRUE(future);
  auto keep = os::Mapping::map_shared(future->get(), size, os::Access::ReadWrite);
  ASSERT_TRUE(keep);
  ASSERT_TRUE(os::add_seals(future->get(), os::kSealFutureWrite | os::kSealSeal));
  expect_refused(future->get(), size, shm::kExtentSealed, "F_SEAL_FUTURE_WRITE, mapping kept",
                 "lacks F_SEAL_WRITE");
  // 4. F_SEAL_WRITE but no F_SEAL_SEAL (nor SHRINK|GROW... it has those): the rule asks for
  // all four, so it is refused too.
  auto noseal = os::make_sealed_memfd("forged-noseal", size);
  ASSERT_TRUE(noseal);
  ASSERT_TRUE(os::add_seals(noseal->get(), os::kSealWrite));
  expect_refused(noseal->get(), size, shm::kExtentSealed, "no F_SEAL_SEAL", "lacks F_SEAL_WRITE");
  // 5. Not a memfd that can shrink-proof at all: a pipe.
  auto pipe = os::make_pipe();
  ASSERT_TRUE(pipe);
  expect_refused(pipe->first.get(), size, shm::kExtentSealed, "a pipe", "not sealed against");
}

// A connecting client asks for an untrusted end: the (cooperative) server's large answer then
// comes back sealed in a replacement memfd (P7b), and its small one copied (P5b).
TEST(Trust, AConnectingClientChoosesItsOwnTrust) {
  const std::string name = "trust-test-" + std::to_string(os::current_pid());
  auto l = Listener::create(name);
  ASSERT_TRUE(l);
  pid_t pid = spawn([&] {
    *l = Listener();
    auto ch = connect(name, secs(5), WaitPolicy{}, Trust::Untrusted);
    if (!ch) return 10;
    for (std::size_t answer : {std::size_t{100}, std::size_t{2} << 20}) {
      auto b = ch->buffer(2 << 20);
      if (!b) return 11;
      std::memcpy(b->data().data(), &answer, 8);
      if (!ch->call(*b, secs(10))) return 12;
      if (b->size() != answer || !test::check(b->data(), 5)) return 13;
    }
    return 0;
  });
  auto server = l->accept(secs(10));
  ASSERT_TRUE(server);
  for (int i = 0; i < 2; ++i) {
    auto m = server->receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    std::size_t answer;
    std::memcpy(&answer, m->buffer.data().data(), 8);
    ASSERT_TRUE(m->buffer.resize(answer));
    test::fill(m->buffer.data(), 5);
    ASSERT_TRUE(MsgQueue::reply(std::move(*m)));
  }
  EXPECT_EQ(join(pid), 0);
}

// Cooperative ends are untouched by all this: the same extent is read in place, zero copies.
TEST(Trust, CooperativeReceiverReadsInPlace) {
  auto p = Channel::pair();
  ASSERT_TRUE(p);
  auto b = p->first.buffer(1 << 20);
  ASSERT_TRUE(b);
  std::byte* sent_at = b->data().data();
  test::fill(b->data(), 3);
  ASSERT_TRUE(p->first.send(std::move(*b)));
  auto m = p->second.receive(secs(5));
  ASSERT_TRUE(m);
  // Same process, two mappings of one memfd: writing through the receiver's view shows in the
  // sender's (shared, not a copy).
  m->buffer.data()[0] = std::byte{0x42};
  EXPECT_EQ(sent_at[0], std::byte{0x42});
}

}  // namespace
}  // namespace mbmq
