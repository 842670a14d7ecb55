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
// Thread safety: a Buffer is a move-only value; use it from one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "mbmq/result.h"

namespace mbmq {

namespace detail {
class Endpoint;
}

class Buffer {
 public:
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

  // Sets size(); n <= capacity() never moves the bytes. A larger n on a buffer this side owns
  // calls reserve(n) first. A buffer received from the peer cannot grow past its capacity
  // (Errc::InvalidArgument).
  Status resize(std::size_t n);
  // Makes capacity() >= n. For a buffer this side owns this may move it to a larger extent,
  // copying size() bytes once (a growth, not a per-message cost).
  Status reserve(std::size_t n);
  // Gives the buffer up now (as the destructor would).
  void reset() noexcept;

 private:
  friend class detail::Endpoint;
  enum class Origin : std::uint8_t { None, Own, Peer };

  std::shared_ptr<detail::Endpoint> ep_;
  std::byte* data_ = nullptr;
  std::uint32_t size_ = 0;
  std::uint32_t capacity_ = 0;
  std::uint32_t id_ = 0;  // slot index, or shm::kExtentBit | extent id
  std::uint32_t gen_ = 0;
  Origin origin_ = Origin::None;
  std::uint16_t kind_ = 0;  // for Origin::Peer: the DescKind it arrived as
};

}  // namespace mbmq
