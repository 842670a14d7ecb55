// mbmq/buffer.h: Buffer, the message buffer (MBO) of the MBMQ model. Its bytes live in memory
// shared with the peer; sending moves ownership of the buffer, never its bytes.
//
//   mbmq::Buffer buf = MBMQ_TRY(client.buffer(4096));
//   std::memcpy(buf.data().data(), request, 4096);        // written in place, once
//   MBMQ_TRY(client.call(buf, mbmq::Deadline::after(1s))); // the reply is now in buf
//
// A buffer is at most slot_size bytes in the channel's pool, or, larger, its own sealed memfd
// extent that the peer maps on first sight (up to 4 GiB - 4 KiB); both are zero-copy.
// Exactly one side owns a buffer at a time. Destroying a buffer received as a request answers it
// with Errc::NoReply; destroying a one-way message gives it back to its sender.
//
// Handles: a buffer can carry up to kMaxHandles file descriptors and Channel ends (fewer if the
// channel's max_handles says so). They travel with the message, on the channel's control socket
// (SCM_RIGHTS), and the receiver takes them out of the buffer it got:
//
//   MBMQ_TRY(buf.attach_fd(memfd));             // ownership moves into the buffer
//   MBMQ_TRY(buf.attach(std::move(other_end))); // a Channel end: hand a connection on
//   MBMQ_TRY(ch.send(std::move(buf)));
//   ...                                         // receiver:
//   int fd = MBMQ_TRY(msg.buffer.take_fd(0));   // O_CLOEXEC; the caller owns it now
//   mbmq::Channel c = MBMQ_TRY(msg.buffer.take_channel(1));
//
// Handles not taken are closed when the buffer is released, and so are those of a message that
// is never delivered (the receiver died, the channel closed). A received buffer's own handles
// do not go back with the reply; handles attached after receipt do.
//
// A Buffer may also be a topic's sample (Publisher::buffer, mbmq/topic.h): it cannot grow past
// its capacity and cannot carry handles. Or a remote channel's message delivered through a
// MsgQueue (mbmq/net.h, net::Channel::redirect): its bytes are private memory of this process
// (UCX received them there; no copy), MsgQueue::reply() answers it over the network, and it
// cannot carry handles ("handles cannot cross hosts").
//
// Thread safety: a Buffer is a move-only value; use it from one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "mbmq/export.h"
#include "mbmq/result.h"

namespace mbmq {

class Channel;
namespace detail {
class Endpoint;
class PeerTrust;
class TopicCore;
class ForeignBuffer;
struct ForeignAccess;
struct Handles;
struct BufferAccess;
struct HandlesDeleter {  // defined where Handles is complete
  void operator()(Handles* h) const noexcept;
};
using HandlesPtr = std::unique_ptr<Handles, HandlesDeleter>;
}  // namespace detail

enum class HandleKind : std::uint8_t { None, Fd, Channel, File };
class FileRange;

class MBMQ_EXPORT Buffer {
 public:
  static constexpr std::size_t kMaxHandles = 8;

  Buffer() noexcept = default;
  Buffer(Buffer&& o) noexcept;
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer();

  // The payload: size() bytes, in shared memory. Empty for an invalid buffer.
  std::span<std::byte> data() const noexcept { return {data_, size_}; }
  std::size_t size() const noexcept { return size_; }
  std::size_t capacity() const noexcept { return capacity_; }
  bool valid() const noexcept { return data_ != nullptr; }
  // Which buffer of its channel end this is (a pool slot or an extent), as an opaque number: the
  // same for a buffer this side owns from send_request() to its Kind::Reply, and different for any
  // two buffers of one end in flight at once. It matches replies to requests when many are in
  // flight on one channel (mbmq/asio.h). data() cannot: an untrusted end reads a reply in a
  // private copy, and a sealed answer may come back in a replacement extent (P5b, P7b).
  // Meaningless for an invalid buffer.
  std::uint32_t id() const noexcept { return id_; }

  // Sets size(); n <= capacity() never moves the bytes. A larger n on a buffer this side owns
  // calls reserve(n) first. A buffer received from the peer cannot grow past its capacity
  // (Errc::InvalidArgument).
  Status resize(std::size_t n);
  // Makes capacity() >= n. For a buffer this side owns this may move it to a larger extent,
  // copying size() bytes once (a growth, not a per-message cost).
  Status reserve(std::size_t n);
  // Gives the buffer up now (as the destructor would).
  void reset() noexcept;

  // Attaches `fd`; the buffer owns it from here (it is closed on error too). Errc::InvalidArgument
  // past kMaxHandles or on an invalid buffer. The channel's max_handles is checked at send.
  Status attach_fd(int fd);
  // Attaches a Channel end. It must be quiet, as for Channel::send_over (Errc::Busy otherwise,
  // and `end` is left as it was); on success `end` is closed here and lives in the buffer.
  Status attach(Channel&& end);
  // Attaches a range of a regular file (or memfd): the buffer owns `fd` from here (closed on
  // error too). Errc::InvalidArgument if fd is not a regular file or the range passes its end.
  Status attach_file(int fd, std::uint64_t offset, std::uint64_t length);
  // Handles in this buffer, attached or received; taken ones read HandleKind::None.
  std::size_t handle_count() const noexcept;
  HandleKind handle_kind(std::size_t i) const noexcept;
  // Takes handle i out. Errc::InvalidArgument if it is not of that kind (or already taken);
  // take_channel: Errc::Protocol if the end that arrived is not a valid channel end.
  Result<int> take_fd(std::size_t i);
  Result<Channel> take_channel(std::size_t i);
  // take_file: Errc::Protocol if what arrived is not a regular file or the range passes its end
  // (see mbmq/file.h).
  Result<FileRange> take_file(std::size_t i);

 private:
  friend class detail::Endpoint;
  friend class detail::PeerTrust;
  friend class detail::TopicCore;
  friend struct detail::BufferAccess;
  friend struct detail::ForeignAccess;
  enum class Origin : std::uint8_t { None, Own, Peer };

  std::shared_ptr<detail::Endpoint> ep_;
  std::byte* data_ = nullptr;
  std::uint32_t size_ = 0;
  std::uint32_t capacity_ = 0;
  std::uint32_t id_ = 0;  // slot index, or shm::kExtentBit | extent id
  std::uint32_t gen_ = 0;
  Origin origin_ = Origin::None;
  std::uint16_t kind_ = 0;      // for Origin::Peer: the DescKind it arrived as
  detail::HandlesPtr handles_;  // null unless handles are attached or received
  // A topic's sample (Publisher::buffer, mbmq/topic.h) instead of a channel's buffer: ep_ is
  // null, id_/gen_ name the sample; dropping it unpublished gives it back to the topic's pool.
  std::shared_ptr<detail::TopicCore> topic_;
  // A remote channel's message (ipc/foreign_buffer.h): ep_ and topic_ are null, data_ points into
  // memory the ForeignBuffer owns; dropping the last reference releases it (an unanswered request
  // answers NoReply).
  std::shared_ptr<detail::ForeignBuffer> foreign_;
};

}  // namespace mbmq
