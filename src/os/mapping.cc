#include "os/mapping.h"

#include <sys/mman.h>

#include <cerrno>

#include "os/fault.h"
#include "os/syscall_count.h"

namespace mbmq::os {

Result<Mapping> Mapping::map_shared(int fd, std::size_t size, Access access) {
  if (size == 0) return fail(Errc::InvalidArgument, "mmap: empty");
  int prot = access == Access::ReadWrite ? PROT_READ | PROT_WRITE : PROT_READ;
  if (injected(Fault::Mmap)) return fail(Error::from_syscall("mmap", fault_errno(Fault::Mmap)));
  count_syscall();
  void* p = ::mmap(nullptr, size, prot, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail(Error::from_syscall("mmap", errno));
  Mapping m;
  m.addr_ = p;
  m.size_ = size;
  return m;
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
