// Sealed extents on huge pages (#16, BufferTable::make_extent_memory): where the kernel's hugetlb
// pool has free pages, an extent to be sent sealed to an untrusted peer is a hugetlb memfd (2 MiB
// pages, allocated up front); without them, silently, the 4 KiB memfd as before. Either way the
// sealed file is immutable and the untrusted receiver sees exactly what was sent. And when the
// pool has pages for the file but not for the receiver's copy-on-write view (a MAP_PRIVATE
// mapping of hugetlbfs reserves huge pages for its whole length), the receiver reads a private
// copy instead: the message arrives, never a SIGBUS, never a closed channel.
//
// These tests set vm.nr_hugepages (root only; skipped otherwise) and set it back at the end. They
// run alone (SERIAL): the pool is machine-wide, and another test's sealed sends would use it.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "ipc/buffer_id.h"
#include "ipc/sideband.h"
#include "ipc/test_access.h"
#include "os/file.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/process.h"
#include "support/fast.h"
#include "test_util.h"

namespace mbmq {
namespace {

// Sealed extents go on huge pages only where the application opts in (os::hugetlb_opted_in):
// these tests are about that path, so this process opts in (one test takes it back).
const bool kOptedIn = ::setenv("MBMQ_HUGETLB", "1", 1) == 0;

using test::join;
using test::secs;
using test::spawn;

constexpr std::size_t kSize = 16 << 20;  // 8 huge pages
constexpr long kPagesPer16M = 8;
constexpr std::uint32_t kSealAbove64K = 64 * 1024;

long meminfo(const char* key) {
  std::ifstream in("/proc/meminfo");
  std::string k;
  long v = 0;
  while (in >> k >> v) {
    if (k == key) return v;
    in.ignore(256, '\n');
  }
  return -1;
}

long status_kib(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string k;
  while (in >> k) {
    if (k == key) {
      long v = 0;
      in >> v;
      return v;
    }
    in.ignore(4096, '\n');
  }
  return -1;
}

// vm.nr_hugepages for the life of a test, set back by the destructor (so also when an assertion
// fails). free(n): the pool then has exactly n free 2 MiB pages (or, if the kernel could not
// find that much contiguous memory, fewer: the test skips).
class HugePagePool {
 public:
  HugePagePool() {
    std::ifstream in(kPath);
    if (!(in >> old_)) old_ = -1;
  }
  ~HugePagePool() {
    if (touched_) (void)write(old_);
  }
  HugePagePool(const HugePagePool&) = delete;
  HugePagePool& operator=(const HugePagePool&) = delete;

  // Empty, or why the pool cannot be set here.
  std::string free(long n) {
    if (::geteuid() != 0) return "needs root (writes /proc/sys/vm/nr_hugepages)";
    if (old_ < 0) return "no /proc/sys/vm/nr_hugepages (a kernel without hugetlbfs?)";
    if (meminfo("Hugepagesize:") != 2048) return "the default huge page size is not 2 MiB";
    const long in_use = meminfo("HugePages_Total:") - meminfo("HugePages_Free:");
    touched_ = true;
    if (!write(in_use + n) || meminfo("HugePages_Free:") != n)
      return "the kernel did not give " + std::to_string(n) + " free huge pages (has " +
             std::to_string(meminfo("HugePages_Free:")) + ")";
    return {};
  }

 private:
  static constexpr const char* kPath = "/proc/sys/vm/nr_hugepages";
  static bool write(long n) {
    std::ofstream out(kPath);
    out << n << '\n';
    out.flush();
    return static_cast<bool>(out);
  }
  long old_ = -1;
  bool touched_ = false;
};

#define SET_POOL_OR_SKIP(pool, n)            \
  do {                                       \
    const std::string why_ = (pool).free(n); \
    if (!why_.empty()) GTEST_SKIP() << why_; \
  } while (0)

ChannelOptions untrusted_server() {
  ChannelOptions o;
  o.trust = {Trust::Cooperative, Trust::Untrusted};  // the server trusts nobody
  o.copy_threshold = kSealAbove64K;                  // and takes what is above 64 KiB sealed
  return o;
}

std::uint64_t hash(std::span<const std::byte> d) { return test::fnv1a(d); }

bool blksize_is_2m(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && st.st_blksize == static_cast<blksize_t>(os::kHugePageSize);
}

// The library's fds and mappings in this process (memfds named mbmq-*), to show none is left.
struct Leaks {
  std::size_t fds = os::open_fd_count("memfd:mbmq-");
  std::size_t maps = os::mapping_count("memfd:mbmq-");
  void expect_none() const {
    // A channel that failed is let go by the peer watcher's thread too: give it a moment.
    for (const Deadline end = secs(2); !end.expired();) {
      if (os::open_fd_count("memfd:mbmq-") == fds && os::mapping_count("memfd:mbmq-") == maps)
        break;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_EQ(os::open_fd_count("memfd:mbmq-"), fds);
    EXPECT_EQ(os::mapping_count("memfd:mbmq-"), maps);
  }
};

enum class Expect { Huge, Small };
enum class View { Mapped, Copied };

// A hostile client sends kSize bytes one-way, sealed; once the server has taken them it tries
// for 200 ms to change them through the file (pwrite, a writable shared mmap, ftruncate): the
// kernel must refuse every attempt, and the server must see the original bytes throughout.
// `expect`: the extent the client's library chose (a hugetlb memfd or not). `view`: whether the
// server maps the file copy-on-write (a mapping of memfd:mbmq-extent) or reads a private copy.
void hostile_sealed_case(Expect expect, std::optional<View> view) {
  const Leaks leaks;
  {
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
      if (b->capacity() != kSize) return 11;  // 16 MiB is a multiple of 2 MiB: not rounded
      test::fill(b->data(), 7);
      const int fd = detail::TestAccess::extent_fd(client, *b);
      if (fd < 0) return 12;
      os::UniqueFd file(::dup(fd));
      if (os::is_hugetlb(file.get()) != (expect == Expect::Huge)) return 13;
      if (!client.send(std::move(*b))) return 14;
      auto seals = os::get_seals(file.get());
      if (!seals || (*seals & os::kSealsImmutable) != os::kSealsImmutable) return 15;
      std::byte go{};
      if (!os::read_full(taken->first.get(), {&go, 1})) return 16;
      int refused = 0, tries = 0;
      const std::int64_t end = monotonic_ns() + 200'000'000;
      while (monotonic_ns() < end) {
        ++tries;
        std::byte junk[64]{};
        // EPERM (the seal) on shmem; hugetlbfs has no write() at all (EINVAL): refused either way.
        if (::pwrite(file.get(), junk, sizeof junk, 0) < 0) ++refused;
        void* m = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, file.get(), 0);
        if (m == MAP_FAILED) {
          ++refused;
        } else {
          std::memset(m, 0x5a, kSize);
          ::munmap(m, kSize);
        }
        if (::ftruncate(file.get(), 4096) != 0) ++refused;
        // Punching a hole would free the pages under the server's view.
        if (::fallocate(file.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                        static_cast<off_t>(os::kHugePageSize)) != 0)
          ++refused;
        ::usleep(1000);
      }
      return refused == 4 * tries ? 0 : 20;
    });
    client.close();
    const std::size_t extent_maps = os::mapping_count("memfd:mbmq-extent");
    auto m = server.receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_EQ(m->kind, Kind::Message) << m->why;
    ASSERT_EQ(m->buffer.size(), kSize);
    const int fd = detail::TestAccess::extent_fd(server, m->buffer);
    ASSERT_GE(fd, 0);
    EXPECT_EQ(os::is_hugetlb(fd), expect == Expect::Huge);
    EXPECT_EQ(blksize_is_2m(fd), expect == Expect::Huge);
    if (view) {
      EXPECT_EQ(os::mapping_count("memfd:mbmq-extent") - extent_maps,
                *view == View::Mapped ? 1u : 0u);
    }
    const std::byte go{1};
    ASSERT_TRUE(os::write_full(taken->second.get(), {&go, 1}));
    EXPECT_TRUE(test::check(m->buffer.data(), 7));
    const std::uint64_t first = hash(m->buffer.data());
    for (int i = 0; i < 10; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      ASSERT_EQ(hash(m->buffer.data()), first) << "the sender changed what we saw, round " << i;
    }
    // Ours to write (an answer in place): copy-on-write, or the private copy.
    std::memset(m->buffer.data().data(), 0x11, 3 * os::kHugePageSize / 2);
    EXPECT_EQ(m->buffer.data()[os::kHugePageSize], std::byte{0x11});
    m->buffer.reset();
    EXPECT_EQ(join(pid), 0);
  }
  leaks.expect_none();
}

TEST(HugePages, ASealedMessageTravelsOnHugePagesAndIsImmutable) {
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, 64);
  hostile_sealed_case(Expect::Huge, View::Mapped);
}

TEST(HugePages, WithoutTheOptInSealedExtentsStayOn4KiBPages) {
  ASSERT_TRUE(kOptedIn);
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, 64);
  ASSERT_EQ(::unsetenv("MBMQ_HUGETLB"), 0);
  hostile_sealed_case(Expect::Small, View::Mapped);
  ASSERT_EQ(::setenv("MBMQ_HUGETLB", "1", 1), 0);
}

TEST(HugePages, WithoutFreeHugePagesTheSealedPathUses4KiBPages) {
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, 0);
  hostile_sealed_case(Expect::Small, View::Mapped);
}

TEST(HugePages, TooFewHugePagesForTheFileFallsBackTo4KiBPages) {
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, kPagesPer16M - 1);  // fallocate fails with 7 of the 8 pages
  hostile_sealed_case(Expect::Small, View::Mapped);
}

TEST(HugePages, AReceiverWhoseViewCannotBeReservedRefusesTheExtent) {
  // 16 pages: the file's 8, and the 8 the sender's own copy-on-write view of it reserves once it
  // is sealed. None left for the server's view: the extent is refused (a clear error on that
  // channel), never a private copy of a peer's file (the same file sent as many extents would be
  // copied as many times: OneHugePageSentAsEveryExtentIsNotCopied).
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, 2 * kPagesPer16M);
  const Leaks leaks;
  {
    auto p = Channel::pair(untrusted_server());
    ASSERT_TRUE(p);
    auto& [client, server] = *p;
    auto b = client.buffer(kSize);
    ASSERT_TRUE(b);
    test::fill(b->data(), 5);
    ASSERT_TRUE(os::is_hugetlb(detail::TestAccess::extent_fd(client, *b)));
    ASSERT_TRUE(client.send(std::move(*b)));
    auto m = server.receive(secs(10));
    ASSERT_TRUE(m) << m.error().message();
    EXPECT_EQ(m->kind, Kind::PeerClosed);
    EXPECT_EQ(m->error, Errc::Protocol);
    EXPECT_NE(std::string(m->why).find("mmap"), std::string::npos) << m->why;
  }
  leaks.expect_none();
}

// Round trips with both ends untrusted (answers sealed too), on huge pages: a sealed request,
// the spare the call prepares meanwhile (huge as well), a request grown into it, a request not a
// multiple of 2 MiB (its capacity rounded up), and one allocated huge but resized below
// copy_threshold before it is sent (it must go unsealed, in 4 KiB pages: the untrusted server
// answers it with pwrite, which hugetlbfs refuses).
TEST(HugePages, RoundTripsOnHugePagesCarryTheirAnswers) {
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, 200);
  const Leaks leaks;
  {
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
        // Its size and seq in the first 16 bytes, the pattern of seq after them; the answer:
        // `answer` bytes of the pattern of seq + 1, written over the request in place.
        std::uint64_t hdr[2];
        std::memcpy(hdr, m->buffer.data().data(), 16);
        if (!test::check(m->buffer.data().subspan(16), hdr[1])) return 5;
        if (!m->buffer.resize(static_cast<std::size_t>(hdr[0]))) return 6;
        test::fill(m->buffer.data(), hdr[1] + 1);
        if (!MsgQueue::reply(std::move(*m))) return 7;
      }
    });
    server.close();
    struct Case {
      std::size_t alloc, request, answer;
      bool huge;  // the request's extent, as sent
    };
    std::uint64_t seq = 100;
    for (Case c : {Case{16 << 20, 16 << 20, 8, true}, Case{16 << 20, 16 << 20, 16 << 20, true},
                   Case{3 << 20, 3 << 20, 3 << 20, true}, Case{4 << 20, 100000, 100000, false},
                   Case{64, 64, 64, false}}) {
      SCOPED_TRACE(std::to_string(c.alloc) + ": " + std::to_string(c.request) + " -> " +
                   std::to_string(c.answer));
      auto b = client.buffer(c.alloc);
      ASSERT_TRUE(b);
      if (c.alloc == (3 << 20)) {
        EXPECT_EQ(b->capacity(), std::size_t{4} << 20);  // 2 huge pages
      }
      for (int round = 0; round < 3; ++round, ++seq) {
        ASSERT_TRUE(b->resize(c.request));  // after an 8-byte answer: grows (into the spare)
        test::fill(b->data().subspan(16), seq);
        std::uint64_t hdr[2] = {c.answer, seq};
        std::memcpy(b->data().data(), hdr, 16);
        if (c.request > 64 * 1024) {
          const int fd = detail::TestAccess::extent_fd(client, *b);
          ASSERT_GE(fd, 0);
          // Sealed requests: huge pages as allocated, and after an 8-byte answer (a small
          // replacement) grown into the spare, huge as well. After a large answer the buffer is
          // its sealed replacement until the call sends it in a fresh extent: not seen here.
          if (c.huge && (round == 0 || c.answer == 8)) {
            EXPECT_TRUE(os::is_hugetlb(fd)) << "round " << round;
          }
          if (!c.huge) {
            EXPECT_EQ(os::is_hugetlb(fd), round == 0) << "round " << round;
          }
        }
        auto r = client.call(*b, secs(30));
        ASSERT_TRUE(r) << r.error().message();
        ASSERT_EQ(b->size(), c.answer);
        EXPECT_TRUE(test::check(b->data(), seq + 1));
      }
    }
    client.close();
    EXPECT_EQ(join(pid), 0);
  }
  leaks.expect_none();
}

// REVIEW (hostile peer, SIGBUS): an untrusted end accepts an UNSEALED extent memfd (payloads up
// to copy_threshold) with only F_SEAL_SHRINK|F_SEAL_GROW, whatever file system it is on. A
// hugetlbfs memfd so sealed can still have a hole punched (only F_SEAL_WRITE forbids it): the
// punch unmaps the page from the receiver's MAP_SHARED view and drops the file's reservation for
// it. The receiver keeps that view for the next descriptor of the same extent and generation;
// its copy (PeerTrust::peer_view's memcpy) then faults a page in, which hugetlbfs must allocate:
// with the pool empty, SIGBUS, inside the library, in the untrusted end.
// Now: an extent on huge pages must be sealed against writing (PeerTrust::map_extent_fd): the
// first one is refused, the channel closed with Protocol.
TEST(HugePages, AnUnsealedExtentOnHugePagesIsRefusedNeverASigbus) {
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, 1);
  pid_t pid = spawn([&] {
    ChannelOptions o;
    o.trust = {Trust::Cooperative, Trust::Untrusted};
    o.copy_threshold = 1 << 20;  // a 4 KiB payload may come unsealed
    auto p = Channel::pair(o);
    if (!p) return 10;
    auto& [hostile, server] = *p;
    auto fd = os::make_hugetlb_memfd("hostile", os::kHugePageSize);  // SHRINK|GROW, 1 page
    if (!fd) return 11;
    if (!detail::TestAccess::forge_extent_request(hostile, fd->get(), 1, 4096, 0)) return 12;
    {
      auto m = server.receive(secs(5));
      if (!m) return 13;
      if (m->kind == Kind::PeerClosed && m->error == Errc::Protocol) return 0;  // refused
      if (m->kind != Kind::Request) return 18;  // mapped MAP_SHARED, copied: what it was
    }  // dropped: NoReply; the server keeps its view of extent 0, generation 1
    if (::fallocate(fd->get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0,
                    static_cast<off_t>(os::kHugePageSize)) != 0)
      return 14;
    // Anyone may take the page the punch freed (another tenant; here: shrink the pool).
    {
      std::ofstream out("/proc/sys/vm/nr_hugepages");
      out << (meminfo("HugePages_Total:") - meminfo("HugePages_Free:")) << '\n';
    }
    if (meminfo("HugePages_Free:") != 0) return 15;
    // The same extent and generation again: no new mmap, the copy reads the punched view.
    if (!detail::TestAccess::forge_extent_request(hostile, fd->get(), 1, 4096, 0)) return 16;
    auto m = server.receive(secs(5));
    if (!m) return 17;
    return 0;  // a protocol error would be fine too (kind PeerClosed); a SIGBUS is not
  });
  const int rc = join(pid);
  EXPECT_EQ(rc, 0) << (rc == 128 + SIGBUS ? "SIGBUS in the untrusted receiver" : "");
}

// REVIEW (hostile peer, the machine's huge page pool): a sealed extent is mapped copy-on-write
// (sealed_view), and a MAP_PRIVATE mapping of a hugetlbfs file reserves huge pages for its whole
// length. A peer that sends a SPARSE sealed hugetlb memfd (ftruncate only: it holds no page)
// with a small payload thus makes the untrusted receiver reserve the whole file's worth of the
// pool (and allocate the payload's pages, zeros), for as long as the extent stays installed:
// nobody else on the machine (our own next sealed send included) gets a huge page. The receiver
// should not reserve more than the peer holds (sealed_view's own rule for its private copy).
// Now: an extent on huge pages with holes is refused before it is mapped.
TEST(HugePages, ASparseSealedExtentOnHugePagesIsRefusedAndReservesNothing) {
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, kPagesPer16M);
  auto p = Channel::pair(untrusted_server());
  ASSERT_TRUE(p);
  auto& [hostile, server] = *p;
  os::UniqueFd fd(::memfd_create("hostile", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB));
  ASSERT_TRUE(fd) << errno;
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(kSize)), 0);  // sparse: no page held
  ASSERT_EQ(
      ::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL), 0);
  ASSERT_EQ(meminfo("HugePages_Free:"), kPagesPer16M);
  ASSERT_TRUE(detail::TestAccess::forge_extent_request(hostile, fd.get(), 1, 128 * 1024,
                                                       shm::kExtentSealed));
  auto m = server.receive(secs(5));
  ASSERT_TRUE(m);
  EXPECT_EQ(m->kind, Kind::PeerClosed);
  EXPECT_EQ(m->error, Errc::Protocol);
  EXPECT_NE(std::string(m->why).find("holes"), std::string::npos) << m->why;
  const long free_pages = meminfo("HugePages_Free:"), rsvd = meminfo("HugePages_Rsvd:");
  // Another tenant's (or our own next sealed send's) one huge page:
  auto mine = os::make_hugetlb_memfd("mine", os::kHugePageSize);
  EXPECT_TRUE(mine) << "the pool is gone: free " << free_pages << ", reserved " << rsvd << " of "
                    << kPagesPer16M << " pages, for a peer that holds none";
  m->buffer.reset();
}

// REVIEW (fork, copy-on-write on hugetlbfs): with this change a sealed extent of 2 MiB or more
// arrives (from our own library) as a hugetlb memfd, and the receiver's view of it is a
// MAP_PRIVATE hugetlb mapping. Its huge page reservation belongs to the process that mapped it;
// a child forked afterwards (Channel is "usable across fork()") that writes into the received
// buffer (an answer in place, as the parent may) needs an unreserved free huge page for the
// copy-on-write, and with none free gets SIGBUS, where a 4 KiB view would just have allocated.
// Not fixed: a known limitation of the opt-in (MBMQ_HUGETLB=1), stated in the README and
// os/memfd.h. Kept as the reproducer, not run (it fails: SIGBUS in the child).
TEST(HugePages, DISABLED_AForkedChildWritingAReceivedHugeExtentDoesNotSigbus) {
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, 3 * kPagesPer16M);  // the file, the sender's view, the receiver's view
  auto p = Channel::pair(untrusted_server());
  ASSERT_TRUE(p);
  auto& [client, server] = *p;
  auto b = client.buffer(kSize);
  ASSERT_TRUE(b);
  test::fill(b->data(), 3);
  ASSERT_TRUE(os::is_hugetlb(detail::TestAccess::extent_fd(client, *b)));
  ASSERT_TRUE(client.send(std::move(*b)));
  const std::size_t extent_maps = os::mapping_count("memfd:mbmq-extent");
  auto m = server.receive(secs(5));
  ASSERT_TRUE(m);
  ASSERT_EQ(m->kind, Kind::Message) << m->why;
  ASSERT_TRUE(os::is_hugetlb(detail::TestAccess::extent_fd(server, m->buffer)));
  // The receiver's view is a mapping of the file (not sealed_view's private copy).
  ASSERT_EQ(os::mapping_count("memfd:mbmq-extent") - extent_maps, 1u)
      << "HugePages_Free " << meminfo("HugePages_Free:") << ", Rsvd " << meminfo("HugePages_Rsvd:");
  // Another tenant takes the pages nobody has reserved (here: the pool shrinks to what is used
  // or reserved).
  {
    std::ofstream out("/proc/sys/vm/nr_hugepages");
    out << (meminfo("HugePages_Total:") - meminfo("HugePages_Free:") + meminfo("HugePages_Rsvd:"))
        << '\n';
  }
  pid_t pid = spawn([&] {
    std::memset(m->buffer.data().data(), 0x22, 4096);  // copy-on-write of one huge page
    return m->buffer.data()[0] == std::byte{0x22} ? 0 : 1;
  });
  const int rc = join(pid);
  EXPECT_EQ(rc, 0) << (rc == 128 + SIGBUS ? "SIGBUS in the forked child" : "");
  // The parent, owner of the reservation, can.
  std::memset(m->buffer.data().data(), 0x33, 4096);
  m->buffer.reset();
}

long rss_anon_kib() { return status_kib("RssAnon:"); }

// REVIEW (hostile peer, memory beyond the stated bounds): when the pool cannot reserve the
// receiver's copy-on-write view, sealed_view copies the payload into anonymous memory "if the
// file holds at least that many bytes of huge pages ... so a peer can make us copy no more than
// it holds itself". The test is per extent, against the whole file's st_blocks: ONE hugetlb file
// holding one 2 MiB page, sent (the same fd) as all 64 extents with a 2 MiB payload each, makes
// the untrusted receiver hold 64 private copies (128 MiB) for the peer's 2 MiB; with 4 GiB
// files and 64 extents per channel this is up to 256 GiB per channel, none of it bounded by
// copy_threshold or the 128 MiB of retained copies (kRetainedCopyBytes).
// Now: no private copy of a peer's file; the view that cannot be reserved is refused.
TEST(HugePages, OneHugePageSentAsEveryExtentIsNotCopied) {
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, 2);  // the file's one page and one more: no view of 32 pages reserves
  auto p = Channel::pair(untrusted_server());
  ASSERT_TRUE(p);
  auto& [hostile, server] = *p;
  constexpr std::size_t kFile = 64 << 20;
  os::UniqueFd fd(::memfd_create("hostile", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB));
  ASSERT_TRUE(fd) << errno;
  ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(kFile)), 0);
  ASSERT_EQ(::fallocate(fd.get(), 0, 0, static_cast<off_t>(os::kHugePageSize)), 0);  // 1 page
  ASSERT_EQ(
      ::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL), 0);
  auto ctl = os::dup_fd(detail::TestAccess::control_fd(hostile));
  ASSERT_TRUE(ctl);
  detail::Sideband side(std::move(*ctl), detail::Sideband::Limits{});
  auto* out = reinterpret_cast<shm::Direction*>(detail::TestAccess::segment(hostile).data() +
                                                shm::kDirOffset);  // side 0's messages
  shm::RingProducer<> tx(&out->tail, &out->head, out->ring, out->tail.load());
  constexpr std::uint32_t kExtents = shm::kMaxExtents;
  for (std::uint32_t e = 0; e < kExtents; ++e) {
    ASSERT_TRUE(side.send_extent(e, 1, shm::kExtentSealed, fd.get()));
    ASSERT_EQ(tx.has_room(), shm::RingStatus::Ok);
    tx.put(shm::Desc{detail::BufferId::extent(e).raw(),
                     static_cast<std::uint32_t>(os::kHugePageSize), 1,
                     static_cast<std::uint16_t>(shm::DescKind::OneWay), 0});
    tx.publish();
  }
  const long before = rss_anon_kib();
  std::vector<Message> ms(kExtents);
  std::size_t got = 0;
  bool refused = false;
  while (got < kExtents && !refused) {
    auto n = server.receive_batch({ms.data() + got, kExtents - got}, secs(5));
    ASSERT_TRUE(n) << n.error().message() << " after " << got;
    for (std::size_t i = got; i < got + *n; ++i) {
      if (ms[i].kind == Kind::PeerClosed) {
        EXPECT_EQ(ms[i].error, Errc::Protocol) << ms[i].why;
        refused = true;
      } else {
        ASSERT_EQ(ms[i].kind, Kind::Message) << ms[i].why;
      }
    }
    got += *n;
  }
  EXPECT_TRUE(refused) << "a view of 32 huge pages with 1 free was not refused";
  const long grown = rss_anon_kib() - before;
  EXPECT_LE(grown, 8 * 1024) << "KiB of private copies for a peer that holds 2048 KiB of pages";
  // Dropping the messages does not free them: each copy is the installed extent's mapping,
  // kept until the peer releases or replaces the extent (it never does).
  for (Message& m : ms) m = Message{};
  EXPECT_LE(rss_anon_kib() - before, 8 * 1024) << "KiB still held after every message went back";
}

}  // namespace
}  // namespace mbmq
