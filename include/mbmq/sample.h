// mbmq/sample.h: Sample, one sample of a topic as a subscriber received it (mbmq/topic.h): its
// bytes in the publisher's pool, read-only, in place. Delivered by Subscriber::receive() or, for a
// subscriber redirected to a MsgQueue, as Message::sample of a Kind::Sample message.
//
//   mbmq::Sample s = MBMQ_TRY(sub.receive(deadline));
//   use(s.data(), s.seq(), s.missed());   // dropping s releases this subscriber's reference
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "mbmq/export.h"

namespace mbmq {

namespace detail {
class SubscriberCore;
}  // namespace detail

// A received sample: its bytes in the publisher's pool, read-only. Dropping it (or reset())
// releases this subscriber's reference. Move-only; may be dropped on any thread.
class MBMQ_EXPORT Sample {
 public:
  Sample() noexcept = default;
  Sample(Sample&& o) noexcept;
  Sample& operator=(Sample&& o) noexcept;
  Sample(const Sample&) = delete;
  Sample& operator=(const Sample&) = delete;
  ~Sample();

  std::span<const std::byte> data() const noexcept { return {data_, size_}; }
  std::size_t size() const noexcept { return size_; }
  // The topic's sequence number of this sample (consecutive over everything published).
  std::uint64_t seq() const noexcept { return seq_; }
  // Samples published since the previous one this subscriber received (or since it joined) that
  // it did not get: dropped (DropOldest) or not offered. 0 under Block and Refuse.
  std::uint64_t missed() const noexcept { return missed_; }
  bool valid() const noexcept { return data_ != nullptr; }
  void reset() noexcept;

 private:
  friend class detail::SubscriberCore;
  std::shared_ptr<detail::SubscriberCore> core_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  std::uint64_t seq_ = 0;
  std::uint64_t missed_ = 0;
  std::uint32_t index_ = 0;
};

}  // namespace mbmq
