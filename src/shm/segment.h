// shm/segment.h: one channel's shared segment (P1): creation, validated attach, and addressing.
// Geometry used after attach comes from a private, validated copy of the header, never from
// shared memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mbmq/result.h"
#include "os/fd.h"
#include "os/mapping.h"
#include "shm/layout.h"

namespace mbmq::shm {

struct Geometry {
  std::uint32_t slots_per_side = 16;
  std::uint32_t slot_size = 64 * 1024;
  std::uint64_t dir_offset[2] = {0, 0};
  std::uint64_t pool_offset = 0;
  std::uint64_t segment_size = 0;
  std::uint32_t max_in_flight = 0;  // 0: bounded by the buffers only
  std::uint32_t max_handles = kMaxHandles;
  std::uint32_t untrusted_mask = 0;  // bit s: side s is untrusted of its peer (P5b)
  std::uint32_t copy_threshold = 0;
};

struct Limits {
  std::uint32_t max_in_flight = 0;
  std::uint32_t max_handles = kMaxHandles;
  std::uint32_t untrusted_mask = 0;
  std::uint32_t copy_threshold =
      0;  // 0: kDefaultCopyThreshold if a side is untrusted, else slot_size
};

// The layout for the given pool; Errc::InvalidArgument outside the limits in layout.h.
Result<Geometry> compute_geometry(std::uint32_t slots_per_side, std::uint32_t slot_size,
                                  Limits limits = {});

class Segment {
 public:
  Segment() = default;
  // (P1) side 0: a new sealed memfd, header written, directions zeroed (ftruncate zero-fills).
  static Result<Segment> create(std::uint32_t slots_per_side, std::uint32_t slot_size,
                                Limits limits = {});
  // (P1) side 1: validates the seals, the size and the header, then keeps a private copy.
  // Errc::Protocol for any mismatch.
  static Result<Segment> attach(os::UniqueFd fd);

  const Geometry& geometry() const noexcept { return geo_; }
  Direction& dir(int i) const noexcept {
    return *reinterpret_cast<Direction*>(map_.data() + geo_.dir_offset[i]);
  }
  std::byte* slot(std::uint32_t index) const noexcept {
    return map_.data() + geo_.pool_offset + std::uint64_t{index} * geo_.slot_size;
  }
  std::uint32_t total_slots() const noexcept { return 2 * geo_.slots_per_side; }
  std::byte* base() const noexcept { return map_.data(); }
  int fd() const noexcept { return fd_.get(); }

 private:
  os::UniqueFd fd_;
  os::Mapping map_;
  Geometry geo_;
};

}  // namespace mbmq::shm
