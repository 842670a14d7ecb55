// os/file.h: files and the kernel's copy-free egress paths (sendfile, splice), plus the few file
// system calls the file-range and egress code needs. Every call is counted (os/syscall_count.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "mbmq/result.h"
#include "os/fd.h"

namespace mbmq::os {

// Seals (fcntl F_ADD_SEALS / F_GET_SEALS), as in <linux/fcntl.h>.
inline constexpr unsigned kSealSeal = 0x0001u;
inline constexpr unsigned kSealShrink = 0x0002u;
inline constexpr unsigned kSealGrow = 0x0004u;
inline constexpr unsigned kSealWrite = 0x0008u;
inline constexpr unsigned kSealFutureWrite = 0x0010u;  // leaves existing writable mappings
// What makes a memfd immutable for everybody: no write (and so no writable shared mapping
// exists: the kernel refuses F_SEAL_WRITE while one does), no size change, no seal change.
inline constexpr unsigned kSealsImmutable = kSealSeal | kSealShrink | kSealGrow | kSealWrite;

// memfd_create(MFD_CLOEXEC|MFD_ALLOW_SEALING) + ftruncate(size), no seals.
Result<UniqueFd> make_memfd(const char* name, std::size_t size);
// ftruncate(): a memfd's peer-visible size (tests play peers that shrink what they sent).
Status truncate_file(int fd, std::uint64_t size);
// fcntl(F_ADD_SEALS). EBUSY: a writable shared mapping exists; EPERM: F_SEAL_SEAL already set or
// sealing not allowed on this file.
Status add_seals(int fd, unsigned seals);

struct FileInfo {
  bool regular = false;
  bool directory = false;
  std::uint64_t size = 0;
  std::uint64_t allocated = 0;  // bytes of storage the file holds (st_blocks * 512)
  std::int64_t mtime_s = 0;
};
Result<FileInfo> file_info(int fd);  // fstat

// open(path, O_RDONLY|O_CLOEXEC).
Result<UniqueFd> open_read(const char* path);
// open(path, O_RDWR|O_CREAT|O_TRUNC|O_CLOEXEC, 0644).
Result<UniqueFd> create_file(const char* path);
Status remove_file(const char* path) noexcept;
// openat2(dir, rel, O_RDONLY|O_CLOEXEC, RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS): the kernel refuses
// any path ("..", an absolute path, a symlink) that would leave `dir` (Errc::System/EXDEV).
// OpenMode::NonBlocking adds O_NONBLOCK|O_NOCTTY: opening a FIFO does not wait for a writer (a
// server that serves regular files only checks the type afterwards); the fd stays non-blocking.
enum class OpenMode { Blocking, NonBlocking };
Result<UniqueFd> open_beneath(int dir, const char* rel, OpenMode mode = OpenMode::Blocking);
Result<UniqueFd> open_directory(const char* path);

// pread/pwrite until done (or end of file for pread: the count read).
Result<std::size_t> pread_full(int fd, std::span<std::byte> buf, std::uint64_t offset);
Status pwrite_full(int fd, std::span<const std::byte> buf, std::uint64_t offset);

// One sendfile(out, in, &offset, count) call: the bytes moved (offset advanced). Errc::WouldBlock
// when a non-blocking `out` is full; Errc::System otherwise (EINVAL/ENOSYS: the kernel cannot do
// it for these fds).
Result<std::size_t> sendfile_some(int out, int in, std::uint64_t* offset, std::size_t count);
// One splice call moving up to count bytes: from `in` at *in_offset (null: its position) into
// `out` (one of them must be a pipe). SPLICE_F_MOVE|SPLICE_F_MORE, plus SPLICE_F_NONBLOCK when
// nonblocking. 0 bytes at end of input.
Result<std::size_t> splice_some(int in, std::uint64_t* in_offset, int out, std::size_t count,
                                bool more);
// A pipe with its capacity raised to `size` where the kernel allows (fcntl F_SETPIPE_SZ), for
// splice; {read end, write end}.
Result<std::pair<UniqueFd, UniqueFd>> make_splice_pipe(std::size_t size);
// (Waiting for room or data: os::wait_writable / os::wait_readable in os/unix_socket.h.)
// One read()/write(); Errc::WouldBlock on EAGAIN, 0 at end of file.
Result<std::size_t> read_some(int fd, std::span<std::byte> buf);
Result<std::size_t> write_some(int fd, std::span<const std::byte> buf);
// fcntl(O_NONBLOCK) on or off.
Status set_nonblocking(int fd, bool on);
Result<bool> is_nonblocking(int fd);  // O_NONBLOCK set on fd's open file description

}  // namespace mbmq::os
