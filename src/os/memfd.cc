#include "os/memfd.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

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

}  // namespace mbmq::os
