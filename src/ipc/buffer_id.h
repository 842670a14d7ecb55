// ipc/buffer_id.h: BufferId, the name of a buffer on the wire (Desc::buffer, and CtlMsg::id of a
// handles packet): a slot index, or shm::kExtentBit | an extent id. The one place in the library
// that knows this encoding; everything else asks a BufferId.
#pragma once

#include <cstdint>

#include "shm/layout.h"

namespace mbmq::detail {

class BufferId {
 public:
  constexpr BufferId() = default;
  // As it travels: any value (a peer's descriptor is checked by whoever looks it up).
  static constexpr BufferId from_wire(std::uint32_t raw) noexcept { return BufferId(raw); }
  static constexpr BufferId slot(std::uint32_t index) noexcept { return BufferId(index); }
  static constexpr BufferId extent(std::uint32_t e) noexcept {
    return BufferId(shm::kExtentBit | e);
  }

  constexpr bool is_extent() const noexcept { return (raw_ & shm::kExtentBit) != 0; }
  // The extent table index (is_extent()); may be out of range for a peer's value.
  constexpr std::uint32_t extent_index() const noexcept { return raw_ & ~shm::kExtentBit; }
  // The segment slot index (!is_extent()); may be out of range for a peer's value.
  constexpr std::uint32_t slot_index() const noexcept { return raw_; }
  constexpr std::uint32_t raw() const noexcept { return raw_; }
  friend constexpr bool operator==(BufferId, BufferId) = default;

 private:
  constexpr explicit BufferId(std::uint32_t raw) noexcept : raw_(raw) {}
  std::uint32_t raw_ = 0;
};

static_assert(sizeof(BufferId) == sizeof(std::uint32_t));
static_assert(BufferId::extent(3).is_extent() && BufferId::extent(3).extent_index() == 3);
static_assert(!BufferId::slot(7).is_extent() && BufferId::slot(7).slot_index() == 7);

}  // namespace mbmq::detail
