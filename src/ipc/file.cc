// File ranges as handles, and socket egress with sendfile/splice (include/mbmq/file.h).
#include "mbmq/file.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <vector>

#include "ipc/endpoint.h"
#include "ipc/foreign_buffer.h"
#include "ipc/handles.h"
#include "os/file.h"
#include "os/mapping.h"
#include "os/memfd.h"
#include "os/unix_socket.h"

namespace mbmq {

namespace detail {
struct BufferAccess {
  static const std::shared_ptr<Endpoint>& ep(const Buffer& b) { return b.ep_; }
};
}  // namespace detail

// ---- FileRange ----------------------------------------------------------------------------------

FileRange::FileRange(FileRange&& o) noexcept
    : fd_(std::exchange(o.fd_, -1)),
      offset_(o.offset_),
      length_(o.length_),
      immutable_(o.immutable_),
      map_addr_(std::exchange(o.map_addr_, nullptr)),
      map_size_(std::exchange(o.map_size_, 0)) {}

FileRange& FileRange::operator=(FileRange&& o) noexcept {
  if (this != &o) {
    this->~FileRange();
    new (this) FileRange(std::move(o));
  }
  return *this;
}

FileRange::~FileRange() {
  unmap();
  os::UniqueFd close_it(fd_);
  fd_ = -1;
}

void FileRange::unmap() noexcept {
  if (map_addr_ == nullptr) return;
  // Rebuild the owner to release it through the os layer.
  os::Mapping m = os::Mapping::adopt(map_addr_, map_size_);
  map_addr_ = nullptr;
  map_size_ = 0;
}

Result<std::span<const std::byte>> FileRange::map(bool allow_mutable_file) {
  if (!valid()) return fail(Errc::InvalidArgument, "FileRange::map: empty");
  if (!immutable_ && !allow_mutable_file)
    return fail(Errc::Busy, "FileRange::map: the file may shrink under a mapping (not sealed)");
  if (length_ == 0) return std::span<const std::byte>{};
  unmap();
  const std::uint64_t page = 4096;
  const std::uint64_t start = offset_ / page * page;
  const auto lead = static_cast<std::size_t>(offset_ - start);
  auto m = MBMQ_TRY(os::Mapping::map(fd_, start, lead + length_, os::Access::ReadOnly));
  map_size_ = m.size();
  map_addr_ = m.release();
  return std::span<const std::byte>{static_cast<const std::byte*>(map_addr_) + lead,
                                    static_cast<std::size_t>(length_)};
}

int FileRange::release() noexcept {
  unmap();
  return std::exchange(fd_, -1);
}

// ---- Buffer: file-range handles -----------------------------------------------------------------

Status Buffer::attach_file(int fd, std::uint64_t offset, std::uint64_t length) {
  os::UniqueFd owned(fd);
  if (!valid() || fd < 0) return fail(Errc::InvalidArgument, "Buffer::attach_file: invalid");
  if (foreign_) return fail(Errc::InvalidArgument, detail::kHandlesCannotCrossHosts);
  auto info = MBMQ_TRY(os::file_info(fd));
  if (!info.regular) return fail(Errc::InvalidArgument, "Buffer::attach_file: not a regular file");
  if (offset > info.size || length > info.size - offset)
    return fail(Errc::InvalidArgument, "Buffer::attach_file: range passes the end of the file");
  if (!handles_) handles_ = detail::HandlesPtr(new detail::Handles());
  if (handles_->count >= kMaxHandles)
    return fail(Errc::InvalidArgument, "Buffer::attach_file: kMaxHandles reached");
  detail::Handle& h = handles_->items[handles_->count];
  h = detail::Handle{};
  shm::FileRangeMeta meta{static_cast<std::uint32_t>(shm::WireHandle::FileRange), 0, offset, length,
                          0};
  std::memcpy(&h.meta, &meta, sizeof meta);
  h.fd = std::move(owned);
  ++handles_->count;
  return {};
}

Result<FileRange> Buffer::take_file(std::size_t i) {
  if (handle_kind(i) != HandleKind::File)
    return fail(Errc::InvalidArgument, "Buffer::take_file: no file range there");
  detail::Handle& h = handles_->items[i];
  shm::FileRangeMeta meta;
  std::memcpy(&meta, &h.meta, sizeof meta);
  h.meta.kind = 0;
  os::UniqueFd fd = std::move(h.fd);
  // The sender may be hostile: what it says about the file is checked against the file.
  auto info = os::file_info(fd.get());
  if (!info || !info->regular)
    return fail(Errc::Protocol, "Buffer::take_file: the handle is not a regular file");
  if (meta.offset > info->size || meta.length > info->size - meta.offset)
    return fail(Errc::Protocol, "Buffer::take_file: the range passes the end of the file");
  FileRange r;
  auto seals = os::get_seals(fd.get());  // EINVAL for files that are not memfds: not immutable
  r.immutable_ = seals && (*seals & (os::kSealWrite | os::kSealShrink | os::kSealGrow)) ==
                              (os::kSealWrite | os::kSealShrink | os::kSealGrow);
  r.fd_ = fd.release();
  r.offset_ = meta.offset;
  r.length_ = meta.length;
  return r;
}

// ---- egress -------------------------------------------------------------------------------------

const char* egress_path_name(EgressPath p) noexcept {
  switch (p) {
    case EgressPath::Sendfile:
      return "sendfile";
    case EgressPath::Splice:
      return "splice";
    case EgressPath::Write:
      return "write";
  }
  return "?";
}

namespace {

// Errors that mean "the kernel cannot do this copy-free for these fds": fall back to write.
bool kernel_refused(const Error& e) {
  return e.code == Errc::System && (e.sys_errno == EINVAL || e.sys_errno == ENOSYS ||
                                    e.sys_errno == EOPNOTSUPP || e.sys_errno == ESPIPE);
}

Status wait_out(int socket, const EgressOptions& o) {
  std::int64_t left = o.deadline.is_never() ? -1 : o.deadline.remaining_ns();
  if (!o.deadline.is_never() && left <= 0) return fail(Errc::TimedOut, "send_file");
  if (!MBMQ_TRY(os::wait_writable(socket, left))) return fail(Errc::TimedOut, "send_file");
  return {};
}

// Writes bytes [offset, end) of `in` with pread + write; `from` is a private copy to use instead
// of the file when not null.
Status copy_out(int socket, int in, const std::byte* from, std::uint64_t offset, std::uint64_t end,
                const EgressOptions& o, Egress* e) {
  std::vector<std::byte> chunk(from != nullptr ? 0 : 256 * 1024);
  while (offset < end) {
    std::span<const std::byte> piece;
    if (from != nullptr) {
      piece = {from + offset,
               static_cast<std::size_t>(std::min<std::uint64_t>(end - offset, 1u << 30))};
    } else {
      std::size_t want =
          static_cast<std::size_t>(std::min<std::uint64_t>(end - offset, chunk.size()));
      std::size_t got = MBMQ_TRY(os::pread_full(in, {chunk.data(), want}, offset));
      if (got == 0) return fail(Errc::InvalidArgument, "send_file: the file ends before the range");
      piece = {chunk.data(), got};
    }
    while (!piece.empty()) {
      auto n = os::write_some(socket, piece);
      if (!n && n.error().code == Errc::WouldBlock) {
        MBMQ_TRY(wait_out(socket, o));
        continue;
      }
      if (!n) return fail(n.error());
      piece = piece.subspan(*n);
      offset += *n;
      e->bytes += *n;
    }
  }
  return {};
}

Result<Egress> egress(int socket, int in, const std::byte* private_copy, std::uint64_t offset,
                      std::uint64_t length, const EgressOptions& o) {
  // A deadline can only be kept on a non-blocking socket: on a blocking one a write with no room
  // sleeps in the kernel for as long as the reader does not read.
  if (!o.deadline.is_never() && !MBMQ_TRY(os::is_nonblocking(socket)))
    return fail(Errc::InvalidArgument, "send_file: a deadline needs a non-blocking socket");
  Egress e;
  const std::uint64_t end = offset + length;
  if (private_copy != nullptr) {
    e.path = EgressPath::Write;
    e.fallback = "the bytes are in private memory (an untrusted end's copy)";
    MBMQ_TRY(copy_out(socket, -1, private_copy - offset, offset, end, o, &e));
    return e;
  }
  if (o.use_splice) {
    e.path = EgressPath::Splice;
    auto pipe = MBMQ_TRY(os::make_splice_pipe(1u << 20));
    std::size_t in_pipe = 0;
    while (offset < end || in_pipe > 0) {
      if (offset < end) {
        auto n = os::splice_some(
            in, &offset, pipe.second.get(),
            static_cast<std::size_t>(std::min<std::uint64_t>(end - offset, 1u << 20)), true);
        if (!n && kernel_refused(n.error()) && e.bytes == 0 && in_pipe == 0) {
          e.fallback = "splice(2) refused these fds";
          e.path = EgressPath::Write;
          MBMQ_TRY(copy_out(socket, in, nullptr, offset, end, o, &e));
          return e;
        }
        if (!n && n.error().code != Errc::WouldBlock) return fail(n.error());
        if (n && *n == 0)
          return fail(Errc::InvalidArgument, "send_file: the file ends before the range");
        if (n) in_pipe += *n;
      }
      auto m = os::splice_some(pipe.first.get(), nullptr, socket, in_pipe, offset < end);
      if (!m && m.error().code == Errc::WouldBlock) {
        MBMQ_TRY(wait_out(socket, o));
        continue;
      }
      if (!m) return fail(m.error());
      in_pipe -= *m;
      e.bytes += *m;
    }
    return e;
  }
  e.path = EgressPath::Sendfile;
  while (offset < end) {
    auto n = os::sendfile_some(
        socket, in, &offset,
        static_cast<std::size_t>(std::min<std::uint64_t>(end - offset, 1u << 30)));
    if (!n && n.error().code == Errc::WouldBlock) {
      MBMQ_TRY(wait_out(socket, o));
      continue;
    }
    if (!n && kernel_refused(n.error()) && e.bytes == 0) {
      e.fallback = "sendfile(2) refused these fds";
      e.path = EgressPath::Write;
      MBMQ_TRY(copy_out(socket, in, nullptr, offset, end, o, &e));
      return e;
    }
    if (!n) return fail(n.error());
    if (*n == 0) return fail(Errc::InvalidArgument, "send_file: the file ends before the range");
    e.bytes += *n;
  }
  return e;
}

}  // namespace

Result<Egress> send_file(int socket, int file_fd, std::uint64_t offset, std::uint64_t length,
                         const EgressOptions& options) {
  if (socket < 0 || file_fd < 0) return fail(Errc::InvalidArgument, "send_file: invalid fd");
  if (offset + length < offset) return fail(Errc::InvalidArgument, "send_file: range overflows");
  return egress(socket, file_fd, nullptr, offset, length, options);
}

Result<Egress> send_buffer(int socket, const Buffer& buf, const EgressOptions& options) {
  const auto& ep = detail::BufferAccess::ep(buf);
  if (socket < 0 || !buf.valid() || !ep) return fail(Errc::InvalidArgument, "send_buffer: invalid");
  int fd = -1;
  std::uint64_t off = 0;
  if (!ep->backing(buf, &fd, &off))
    return egress(socket, -1, buf.data().data(), 0, buf.size(), options);
  return egress(socket, fd, nullptr, off, buf.size(), options);
}

}  // namespace mbmq
