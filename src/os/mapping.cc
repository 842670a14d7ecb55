#include "os/mapping.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>

#include "os/fault.h"
#include "os/syscall_count.h"

namespace mbmq::os {

Result<Mapping> Mapping::map(int fd, std::uint64_t offset, std::size_t size, Access access,
                             Prefault prefault_pages) {
  if (size == 0) return fail(Errc::InvalidArgument, "mmap: empty");
  const bool huge =
      prefault_pages == Prefault::Huge && access == Access::ReadWrite && size >= kHugePageSize;
  const bool prefault = prefault_pages != Prefault::No && !huge;
  int prot = access == Access::ReadOnly ? PROT_READ : PROT_READ | PROT_WRITE;
  int flags = access == Access::CopyOnWrite ? MAP_PRIVATE : MAP_SHARED;
  // Populating a writable private mapping would copy every page: that one uses madvise below.
  if (prefault && access != Access::CopyOnWrite) flags |= MAP_POPULATE;
  if (injected(Fault::Mmap)) return fail(Error::from_syscall("mmap", fault_errno(Fault::Mmap)));
  count_syscall();
  void* p = ::mmap(nullptr, size, prot, flags, fd, static_cast<off_t>(offset));
  if (p == MAP_FAILED) return fail(Error::from_syscall("mmap", errno));
  if (prefault && access == Access::CopyOnWrite) {
    count_syscall();
    (void)::madvise(p, size, MADV_POPULATE_READ);  // a hint: EINVAL before Linux 5.14
  }
  if (huge) {
    // Before any page exists: the huge-page choice is made when a page is allocated. Both are
    // hints (EINVAL where THP is compiled out, or before Linux 5.14: pages fault in later).
    count_syscall();
    (void)::madvise(p, size, MADV_HUGEPAGE);
    count_syscall();
    (void)::madvise(p, size, MADV_POPULATE_WRITE);
  }
  Mapping m;
  m.addr_ = p;
  m.size_ = size;
  return m;
}

Result<Mapping> Mapping::anonymous(std::size_t size) {
  if (size == 0) return fail(Errc::InvalidArgument, "mmap: empty");
  if (injected(Fault::Mmap)) return fail(Error::from_syscall("mmap", fault_errno(Fault::Mmap)));
  count_syscall();
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return fail(Error::from_syscall("mmap(MAP_ANONYMOUS)", errno));
  Mapping m;
  m.addr_ = p;
  m.size_ = size;
  return m;
}

void Mapping::populate(std::size_t bytes) noexcept {
  if (addr_ == nullptr || bytes == 0) return;
  const std::size_t len = std::min(size_, (bytes + 4095) / 4096 * 4096);
  count_syscall();
  (void)::madvise(addr_, len, MADV_POPULATE_READ);  // EINVAL before Linux 5.14: faults later
}

void Mapping::reset() noexcept {
  if (addr_ != nullptr) {
    count_syscall();
    ::munmap(addr_, size_);
  }
  addr_ = nullptr;
  size_ = 0;
}

}  // namespace mbmq::os
