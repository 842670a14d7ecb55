#include "os/file.h"

#include <fcntl.h>
#include <linux/openat2.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>

#include "os/fault.h"
#include "os/syscall_count.h"

namespace mbmq::os {

Result<UniqueFd> make_memfd(const char* name, std::size_t size) {
  if (injected(Fault::MemfdCreate))
    return fail(Error::from_syscall("memfd_create", fault_errno(Fault::MemfdCreate)));
  count_syscall();
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return fail(Error::from_syscall("memfd_create", errno));
  if (injected(Fault::Ftruncate))
    return fail(Error::from_syscall("ftruncate", fault_errno(Fault::Ftruncate)));
  count_syscall();
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0)
    return fail(Error::from_syscall("ftruncate", errno));
  return fd;
}

Status add_seals(int fd, unsigned seals) {
  count_syscall();
  if (::fcntl(fd, F_ADD_SEALS, static_cast<int>(seals)) != 0)
    return fail(Error::from_syscall("fcntl(F_ADD_SEALS)", errno));
  return {};
}

Result<FileInfo> file_info(int fd) {
  struct stat st {};
  count_syscall();
  if (::fstat(fd, &st) != 0) return fail(Error::from_syscall("fstat", errno));
  FileInfo i;
  i.regular = S_ISREG(st.st_mode);
  i.directory = S_ISDIR(st.st_mode);
  i.size = static_cast<std::uint64_t>(st.st_size);
  i.allocated = static_cast<std::uint64_t>(st.st_blocks) * 512;
  i.mtime_s = st.st_mtim.tv_sec;
  return i;
}

Result<UniqueFd> open_read(const char* path) {
  count_syscall();
  UniqueFd fd(::open(path, O_RDONLY | O_CLOEXEC));
  if (!fd) return fail(Error::from_syscall("open", errno));
  return fd;
}

Result<UniqueFd> create_file(const char* path) {
  count_syscall();
  UniqueFd fd(::open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) return fail(Error::from_syscall("open(O_CREAT)", errno));
  return fd;
}

Status remove_file(const char* path) noexcept {
  count_syscall();
  if (::unlink(path) != 0) return fail(Error::from_syscall("unlink", errno));
  return {};
}

Result<UniqueFd> open_beneath(int dir, const char* rel, OpenMode mode) {
  open_how how{};
  how.flags = O_RDONLY | O_CLOEXEC | (mode == OpenMode::NonBlocking ? O_NONBLOCK | O_NOCTTY : 0);
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  for (;;) {
    count_syscall();
    long r = ::syscall(SYS_openat2, dir, rel, &how, sizeof how);
    if (r >= 0) return UniqueFd(static_cast<int>(r));
    if (errno != EINTR) return fail(Error::from_syscall("openat2(RESOLVE_BENEATH)", errno));
  }
}

Result<UniqueFd> open_directory(const char* path) {
  count_syscall();
  UniqueFd fd(::open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return fail(Error::from_syscall("open(O_DIRECTORY)", errno));
  return fd;
}

Result<std::size_t> pread_full(int fd, std::span<std::byte> buf, std::uint64_t offset) {
  std::size_t done = 0;
  while (done < buf.size()) {
    count_syscall();
    ssize_t n =
        ::pread(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(Error::from_syscall("pread", errno));
    if (n == 0) break;
    done += static_cast<std::size_t>(n);
  }
  return done;
}

Status pwrite_full(int fd, std::span<const std::byte> buf, std::uint64_t offset) {
  std::size_t done = 0;
  while (done < buf.size()) {
    count_syscall();
    ssize_t n =
        ::pwrite(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail(Error::from_syscall("pwrite", n < 0 ? errno : EIO));
    done += static_cast<std::size_t>(n);
  }
  return {};
}

Result<std::size_t> sendfile_some(int out, int in, std::uint64_t* offset, std::size_t count) {
  if (injected(Fault::Sendfile))
    return fail(Error::from_syscall("sendfile", fault_errno(Fault::Sendfile)));
  auto off = static_cast<off_t>(*offset);
  for (;;) {
    count_syscall();
    ssize_t n = ::sendfile(out, in, &off, count);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return fail(Errc::WouldBlock, "sendfile");
    if (n < 0) return fail(Error::from_syscall("sendfile", errno));
    *offset = static_cast<std::uint64_t>(off);
    return static_cast<std::size_t>(n);
  }
}

Result<std::size_t> splice_some(int in, std::uint64_t* in_offset, int out, std::size_t count,
                                bool more) {
  if (injected(Fault::Splice))
    return fail(Error::from_syscall("splice", fault_errno(Fault::Splice)));
  loff_t off = in_offset != nullptr ? static_cast<loff_t>(*in_offset) : 0;
  unsigned flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK | (more ? SPLICE_F_MORE : 0u);
  for (;;) {
    count_syscall();
    ssize_t n = ::splice(in, in_offset != nullptr ? &off : nullptr, out, nullptr, count, flags);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return fail(Errc::WouldBlock, "splice");
    if (n < 0) return fail(Error::from_syscall("splice", errno));
    if (in_offset != nullptr) *in_offset = static_cast<std::uint64_t>(off);
    return static_cast<std::size_t>(n);
  }
}

Result<std::pair<UniqueFd, UniqueFd>> make_splice_pipe(std::size_t size) {
  int p[2];
  count_syscall();
  if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return fail(Error::from_syscall("pipe2", errno));
  std::pair<UniqueFd, UniqueFd> ends{UniqueFd(p[0]), UniqueFd(p[1])};
  count_syscall();
  (void)::fcntl(p[1], F_SETPIPE_SZ, static_cast<int>(size > INT_MAX ? INT_MAX : size));
  return ends;
}

Result<std::size_t> read_some(int fd, std::span<std::byte> buf) {
  for (;;) {
    count_syscall();
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return fail(Errc::WouldBlock, "read");
    if (n < 0) return fail(Error::from_syscall("read", errno));
    return static_cast<std::size_t>(n);
  }
}

Result<std::size_t> write_some(int fd, std::span<const std::byte> buf) {
  for (;;) {
    count_syscall();
    ssize_t n = ::write(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) return fail(Errc::WouldBlock, "write");
    if (n < 0) return fail(Error::from_syscall("write", errno));
    return static_cast<std::size_t>(n);
  }
}

Status set_nonblocking(int fd, bool on) {
  count_syscall();
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0) return fail(Error::from_syscall("fcntl(F_GETFL)", errno));
  fl = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
  count_syscall();
  if (::fcntl(fd, F_SETFL, fl) != 0) return fail(Error::from_syscall("fcntl(F_SETFL)", errno));
  return {};
}

Result<bool> is_nonblocking(int fd) {
  count_syscall();
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0) return fail(Error::from_syscall("fcntl(F_GETFL)", errno));
  return (fl & O_NONBLOCK) != 0;
}

}  // namespace mbmq::os

namespace mbmq::os {
Status truncate_file(int fd, std::uint64_t size) {
  if (injected(Fault::Ftruncate))
    return fail(Error::from_syscall("ftruncate", fault_errno(Fault::Ftruncate)));
  count_syscall();
  if (::ftruncate(fd, static_cast<off_t>(size)) != 0)
    return fail(Error::from_syscall("ftruncate", errno));
  return {};
}
}  // namespace mbmq::os
