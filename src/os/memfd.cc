#include "os/memfd.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "os/fault.h"
#include "os/file.h"
#include "os/syscall_count.h"

namespace mbmq::os {

Result<UniqueFd> make_sealed_memfd(const char* name, std::size_t size) {
  UniqueFd fd = MBMQ_TRY(make_memfd(name, size));
  count_syscall();
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0)
    return fail(Error::from_syscall("fcntl(F_ADD_SEALS)", errno));
  return fd;
}

Result<UniqueFd> make_hugetlb_memfd(const char* name, std::size_t size) {
  if (size == 0 || size % kHugePageSize != 0)
    return fail(Errc::InvalidArgument, "make_hugetlb_memfd: not a multiple of 2 MiB");
  count_syscall();
  // MFD_HUGETLB alone is the default huge page size (2 MiB on x86-64, checked below).
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB));
  if (!fd) return fail(Error::from_syscall("memfd_create(MFD_HUGETLB)", errno));
  struct stat st {};
  count_syscall();
  if (::fstat(fd.get(), &st) != 0) return fail(Error::from_syscall("fstat", errno));
  if (static_cast<std::size_t>(st.st_blksize) != kHugePageSize)
    return fail(Errc::InvalidArgument, "make_hugetlb_memfd: default huge page size is not 2 MiB");
  count_syscall();
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
    return fail(Error::from_syscall("ftruncate", errno));
  // Every page now: without it a page missing at first touch is a SIGBUS, not an error.
  count_syscall();
  if (::fallocate(fd.get(), 0, 0, static_cast<off_t>(size)) != 0)
    return fail(Error::from_syscall("fallocate", errno));
  count_syscall();
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0)
    return fail(Error::from_syscall("fcntl(F_ADD_SEALS)", errno));
  return fd;
}

bool is_hugetlb(int fd) noexcept {
  struct statfs sf {};
  count_syscall();
  return ::fstatfs(fd, &sf) == 0 && sf.f_type == HUGETLBFS_MAGIC;
}

Result<unsigned> get_seals(int fd) {
  count_syscall();
  int s = ::fcntl(fd, F_GET_SEALS);
  if (s < 0) return fail(Error::from_syscall("fcntl(F_GET_SEALS)", errno));
  return static_cast<unsigned>(s);
}

Result<std::uint64_t> file_size(int fd) {
  struct stat st {};
  count_syscall();
  if (::fstat(fd, &st) != 0) return fail(Error::from_syscall("fstat", errno));
  return static_cast<std::uint64_t>(st.st_size);
}

bool hugetlb_opted_in() noexcept {
  const char* v = std::getenv("MBMQ_HUGETLB");
  return v != nullptr && v[0] == '1' && v[1] == '\0';
}

}  // namespace mbmq::os
