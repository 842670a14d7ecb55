// ipc/foreign_buffer.h: a Buffer whose bytes belong to neither a channel end nor a topic: a
// remote channel's message delivered through a MsgQueue (mbmq::net, net::Channel::redirect;
// docs/design/net.md, Q1). The core library knows only this interface; mbmq::net implements it.
//
// Such a Buffer has ep_ and topic_ null and foreign_ set; data_ points into memory the
// ForeignBuffer owns (a net::Buffer's vector, where UCX received the payload: no copy), so data()
// and the hot path are those of any Buffer. Dropping the Buffer drops its reference: the last one
// releases the message (an unanswered request answers NoReply, as a local one). It cannot carry
// handles (kHandlesCannotCrossHosts).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "mbmq/buffer.h"
#include "mbmq/result.h"

namespace mbmq::detail {

inline constexpr const char* kHandlesCannotCrossHosts =
    "Buffer: a remote channel's message cannot carry handles (handles cannot cross hosts)";

class ForeignBuffer {
 public:
  virtual ~ForeignBuffer() = default;
  // Buffer::reserve(n) past capacity(): may move the bytes (ForeignAccess::set_bytes) or refuse
  // (Errc::InvalidArgument, as a received local buffer).
  virtual Status grow(Buffer& b, std::size_t n) = 0;
  // MsgQueue::reply(): answers the request with b's size() bytes. b is invalid afterwards,
  // whatever the result.
  virtual Status reply(Buffer&& b) = 0;

 protected:
  ForeignBuffer() = default;
  ForeignBuffer(const ForeignBuffer&) = default;
  ForeignBuffer& operator=(const ForeignBuffer&) = default;
};

struct ForeignAccess {
  // A valid Buffer over [data, data + capacity) with `size` bytes in use, owned by `owner`. id:
  // Buffer::id() (any number that tells the buffers in flight apart).
  static Buffer make(std::shared_ptr<ForeignBuffer> owner, std::byte* data, std::size_t size,
                     std::size_t capacity, std::uint32_t id) noexcept;
  // After grow() moved the bytes.
  static void set_bytes(Buffer& b, std::byte* data, std::size_t capacity) noexcept;
  // After the owner changed how many bytes are in use (a remote call's reply), <= capacity().
  static void set_size(Buffer& b, std::size_t size) noexcept {
    b.size_ = static_cast<std::uint32_t>(size);
  }
  static ForeignBuffer* of(const Buffer& b) noexcept { return b.foreign_.get(); }
  static std::shared_ptr<ForeignBuffer> share(const Buffer& b) noexcept { return b.foreign_; }
  static std::size_t size(const Buffer& b) noexcept { return b.size_; }
};

}  // namespace mbmq::detail
