// mbmq/file.h: data that lives in files, or leaves through sockets, without CPU copies.
//
// File ranges as payload: a buffer can carry (fd, offset, length) of a regular file (or a memfd)
// as a handle (Buffer::attach_file); the receiver takes it out as a FileRange, maps it read-only
// or forwards it, e.g. into a socket with send_file():
//
//   MBMQ_TRY(buf.attach_file(fd, 0, size));            // sender: fd is owned by the buffer now
//   mbmq::FileRange r = MBMQ_TRY(msg.buffer.take_file(0));
//   auto bytes = MBMQ_TRY(r.map());                     // read-only view, or:
//   auto sent = MBMQ_TRY(mbmq::send_file(sock, r.fd(), r.offset(), r.length()));
//
// Socket egress: send_file() pushes a file range into a socket with sendfile(2) (or splice(2)
// through a pipe, on request); send_buffer() does the same for a Buffer, whose bytes are in a
// memfd. Where the kernel refuses (EINVAL/ENOSYS/EOPNOTSUPP, e.g. an input that is a pipe), both
// fall back to read+write and say so in the result: nothing fails just because the copy-free path
// is not available.
//
// Trust: a FileRange from an untrusted peer is safe to forward (the kernel reads the file) and to
// pread. Mapping it is safe only if the file cannot shrink: a peer that truncates a regular file
// under a mapping makes reads of it fault (SIGBUS). FileRange::immutable() says whether the file
// is a memfd sealed against writing and shrinking; map() refuses other files unless asked to.
#pragma once

#include <cstdint>
#include <span>

#include "mbmq/buffer.h"
#include "mbmq/deadline.h"
#include "mbmq/export.h"
#include "mbmq/result.h"

namespace mbmq {

class MBMQ_EXPORT FileRange {
 public:
  FileRange() noexcept = default;
  FileRange(FileRange&& o) noexcept;
  FileRange& operator=(FileRange&& o) noexcept;
  FileRange(const FileRange&) = delete;
  FileRange& operator=(const FileRange&) = delete;
  ~FileRange();

  int fd() const noexcept { return fd_; }
  std::uint64_t offset() const noexcept { return offset_; }
  std::uint64_t length() const noexcept { return length_; }
  bool valid() const noexcept { return fd_ >= 0; }
  // The file is a memfd sealed against writing, shrinking and growing (F_SEAL_WRITE,
  // F_SEAL_SHRINK, F_SEAL_GROW): its bytes can never change or go away.
  bool immutable() const noexcept { return immutable_; }

  // A read-only view of the range (mmap), valid while this FileRange lives. Errc::Busy for a file
  // that may shrink under the mapping (not immutable()) unless allow_mutable_file is set.
  Result<std::span<const std::byte>> map(bool allow_mutable_file = false);
  // Gives up the fd (the caller owns it; any view is unmapped).
  int release() noexcept;

 private:
  friend class Buffer;
  void unmap() noexcept;
  int fd_ = -1;
  std::uint64_t offset_ = 0, length_ = 0;
  bool immutable_ = false;
  void* map_addr_ = nullptr;
  std::size_t map_size_ = 0;
};

enum class EgressPath : std::uint8_t { Sendfile, Splice, Write };
MBMQ_EXPORT const char* egress_path_name(EgressPath p) noexcept;

struct EgressOptions {
  Deadline deadline = Deadline::never();
  bool use_splice = false;  // splice(2) through a pipe instead of sendfile(2)
};

struct Egress {
  std::uint64_t bytes = 0;
  EgressPath path = EgressPath::Sendfile;
  // Empty when the copy-free path did it all; else why the kernel refused it (the errno text)
  // and the bytes went through read+write.
  const char* fallback = "";
};

// Writes `length` bytes of `file_fd` from `offset` into `socket`, waiting for room until the
// deadline. A finite deadline needs a non-blocking socket (O_NONBLOCK; else Errc::InvalidArgument:
// a blocking write would sleep in the kernel past it); with Deadline::never() a blocking socket
// is fine. Errc::InvalidArgument if the file ends before the range does;
// Errc::TimedOut at the deadline (result bytes are then unknown to the caller: the stream is
// mid-message and should be closed); Errc::System for socket errors (EPIPE: the peer left).
// SIGPIPE: like write(2), sending to a socket whose reader has gone raises SIGPIPE; a server
// should ignore it (signal(SIGPIPE, SIG_IGN)), as examples/file_server does.
MBMQ_EXPORT Result<Egress> send_file(int socket, int file_fd, std::uint64_t offset,
                                     std::uint64_t length, const EgressOptions& options = {});
// Writes buf's size() bytes into `socket`, from the memfd behind them (sendfile/splice), or with
// write() for bytes held in private memory (an untrusted end's copy; fallback says so).
MBMQ_EXPORT Result<Egress> send_buffer(int socket, const Buffer& buf,
                                       const EgressOptions& options = {});

}  // namespace mbmq
