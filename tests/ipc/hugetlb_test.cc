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
#include <cstring>
#include <fstream>
#include <optional>
#include <string>
#include <thread>

#include "ipc/test_access.h"
#include "os/file.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/process.h"
#include "test_util.h"

namespace mbmq {
namespace {

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

std::uint64_t hash(std::span<const std::byte> d) {
  std::uint64_t h = 1469598103934665603ull;
  for (std::byte b : d) h = (h ^ static_cast<std::uint64_t>(b)) * 1099511628211ull;
  return h;
}

bool blksize_is_2m(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && st.st_blksize == static_cast<blksize_t>(os::kHugePageSize);
}

// The library's fds and mappings in this process (memfds named mbmq-*), to show none is left.
struct Leaks {
  std::size_t fds = os::open_fd_count("memfd:mbmq-");
  std::size_t maps = os::mapping_count("memfd:mbmq-");
  void expect_none() const {
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

TEST(HugePages, AReceiverWhoseViewCannotBeReservedReadsAPrivateCopy) {
  // 16 pages: the file's 8, and the 8 the sender's own copy-on-write view of it reserves once it
  // is sealed. None left for the server's view: it reads a private copy instead.
  HugePagePool pool;
  SET_POOL_OR_SKIP(pool, 2 * kPagesPer16M);
  hostile_sealed_case(Expect::Huge, View::Copied);
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

}  // namespace
}  // namespace mbmq
